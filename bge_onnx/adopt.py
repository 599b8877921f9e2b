"""ONNX exports that are not ours (an official repo's onnx/ folder, a sentence-transformers or optimum export):
where their files are, what their sentence-transformers config says, and the ModelSpec that runs them as they are."""

from __future__ import annotations

import dataclasses
import json
import mmap
from pathlib import Path
from typing import Any

from . import registry
from .errors import InputError, ModelFilesError, ModelIntegrityError
from .spec import POOLED_OUTPUTS, ModelSpec, Pooling, Precision, Task, Variant
from .tokenize import TOKENIZER_FILE

# where an export keeps its graph, in the order looked for: the official BAAI layout, then optimum's
GRAPH_FILES = ("onnx/model.onnx", "model.onnx")
# the names an export gives its graph's separate weights (torch.onnx and optimum use both)
DATA_SUFFIXES = ("_data", ".data")
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", TOKENIZER_CONFIG)
# modules.json types by class name: sentence-transformers writes sentence_transformers.models.Pooling, and since
# v5 also sentence_transformers.sentence_transformer.modules.pooling.Pooling
ST_TRANSFORMER, ST_POOLING, ST_NORMALIZE = "Transformer", "Pooling", "Normalize"
# token states, pooled here; BERT's pooler_output (dense + tanh over CLS) is neither CLS pooling nor a BGE vector
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelFilesError(f"{path} is missing") from err
    except ValueError as err:
        raise ModelIntegrityError(f"{path} is not valid JSON: {err}") from err


@dataclasses.dataclass(frozen=True)
class SentenceTransformersConfig:
    """What a sentence-transformers folder says about its pooling, length and prompts.

    ``pooling`` is None when there is no Pooling module or one bge-onnx cannot run; ``problem`` then says which.
    """

    pooling: Pooling | None
    problem: str
    unsupported: tuple[str, ...]
    normalize: bool
    max_length: int | None
    query_prompt: str


def read_sentence_transformers(folder: Path) -> SentenceTransformersConfig | None:
    """Read modules.json, the Pooling config, sentence_bert_config.json and config_sentence_transformers.json.

    Returns None for a folder without modules.json.

    Raises:
        ModelIntegrityError: one of those files is not valid JSON.
    """
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = read_json(modules_file)
    kinds = [_class_name(m) for m in modules]
    unsupported = tuple(m.get("type", "") for m, k in zip(modules, kinds) if k not in (ST_TRANSFORMER, ST_POOLING, ST_NORMALIZE))
    pooling, problem = None, ""
    module = next((m for m in modules if _class_name(m) == ST_POOLING), None)
    if module is None:
        problem = f"{modules_file} has no Pooling module"
    else:
        config_file = folder / module.get("path", "1_Pooling") / "config.json"
        if not config_file.is_file():
            problem = f"{config_file} is missing"
        else:
            config = read_json(config_file)
            if isinstance(config.get("pooling_mode"), str):  # sentence-transformers v5: "pooling_mode": "mean"
                modes = [config["pooling_mode"]]
            else:  # before: "pooling_mode_mean_tokens": true, ...
                modes = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
            pooling = {"pooling_mode_cls_token": Pooling.CLS, "pooling_mode_mean_tokens": Pooling.MEAN,
                       "cls": Pooling.CLS, "mean": Pooling.MEAN}.get(modes[0] if len(modes) == 1 else "")
            if pooling is None:
                problem = f"{config_file} uses pooling {modes}; bge-onnx runs cls or mean"
    bert_config = folder / "sentence_bert_config.json"
    max_length = read_json(bert_config).get("max_seq_length") if bert_config.is_file() else None
    tokenizer_config = folder / TOKENIZER_CONFIG
    if max_length is None and bert_config.is_file() and tokenizer_config.is_file():
        # sentence-transformers v5 keeps the limit as the tokenizer's model_max_length (others set it to 1e30)
        limit = read_json(tokenizer_config).get("model_max_length")
        max_length = int(limit) if isinstance(limit, (int, float)) and 0 < limit < 1_000_000 else None
    st_config = folder / "config_sentence_transformers.json"
    prompts = (read_json(st_config).get("prompts") or {}) if st_config.is_file() else {}
    return SentenceTransformersConfig(
        pooling, problem, unsupported, ST_NORMALIZE in kinds, max_length, prompts.get("query", "")
    )


def _class_name(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def pooling_config_file(folder: Path) -> str | None:
    """The Pooling module's config file named in modules.json, relative to the folder (1_Pooling/config.json)."""
    modules_file = Path(folder) / "modules.json"
    if not modules_file.is_file():
        return None
    module = next((m for m in read_json(modules_file) if _class_name(m) == ST_POOLING), None)
    return None if module is None else f"{module.get('path', '1_Pooling')}/config.json"


# op types only a quantised graph holds (onnxruntime.quantization's and optimum's int8 exports)
QUANTISED_OPS = ("DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul",
                 "QAttention", "QGemm", "DynamicQuantizeMatMul", "MatMulNBits", "QEmbedLayerNormalization")


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data, start: int, end: int):
    """(field number, (start, end)) of each length-delimited field of the protobuf message in ``data[start:end]``,
    stepping over every value without reading it."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 2:
            length, pos = _varint(data, pos)
            yield key >> 3, (pos, pos + length)
            pos += length
        elif wire == 0:
            _, pos = _varint(data, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")


def quantised_ops(path: Path) -> set[str]:
    """The quantised op types (QUANTISED_OPS) among the graph's nodes, read by walking the file's protobuf fields
    (ModelProto.graph = 7, GraphProto.node = 1, NodeProto.op_type = 4), which steps over the weights instead of
    reading them, and needs no onnx package. A file that is not such a message is left to the session (none)."""
    if path.stat().st_size == 0:
        return set()
    wanted = {op.encode() for op in QUANTISED_OPS}
    found: set[str] = set()
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            for number, graph in _fields(data, 0, len(data)):
                if number != 7:
                    continue
                for field, node in _fields(data, *graph):
                    if field == 1:
                        found.update(data[s:e].decode() for f, (s, e) in _fields(data, *node)
                                     if f == 4 and data[s:e] in wanted)
        except (ValueError, IndexError):  # not an ONNX model: the session's load says what is wrong
            pass
    return found


def graph_precision(path: Path) -> Precision:
    """INT8 where the graph holds a quantised op, else FP32 (:func:`quantised_ops`)."""
    return Precision.INT8 if quantised_ops(path) else Precision.FP32


def find_graph(folder: Path, graph: str | None = None) -> tuple[str, tuple[str, ...]] | None:
    """The graph of an export folder (relative path) and its separate weight files, or None: ``graph`` when given
    (one of several in a sentence-transformers export's onnx/), else the first of GRAPH_FILES there."""
    for candidate in (graph,) if graph else GRAPH_FILES:
        if (Path(folder) / candidate).is_file():
            data = tuple(candidate + suffix for suffix in DATA_SUFFIXES
                         if (Path(folder) / (candidate + suffix)).is_file())
            return candidate, data
    return None


def describe(
    folder: Path,
    *,
    graph: str,
    data_files: tuple[str, ...],
    inputs: list[str],
    outputs: dict[str, int],
    name: str | None = None,
    revision: str | None = None,
    pooling: Pooling | None = None,
    max_length: int | None = None,
    query_instruction: str | None = None,
    precision: Precision = Precision.FP32,
) -> ModelSpec:
    """A ModelSpec for running an export folder's graph as it is; its one variant is named by ``precision``.

    ``outputs`` maps the graph's output names to their ranks (read from the opened session). Pooling, max length
    and query instruction come from the folder's sentence-transformers files, else from the registry (by ``name``,
    the hub id, or the folder's name), unless given; the task from config.json's architecture. Where pooling happens follows the
    graph: token states are pooled in numpy, a pooled output is used as it is, a reranker's logits are scores.

    Raises:
        ModelFilesError: config.json is missing.
        ModelIntegrityError: the graph's outputs or the config do not fit an embedder or a reranker.
    """
    folder = Path(folder)
    config = read_json(folder / CONFIG_FILE)
    architectures = config.get("architectures") or ["BertModel"]
    task = Task.RERANK if architectures[0].endswith("ForSequenceClassification") else Task.EMBED
    max_positions = int(config.get("max_position_embeddings", 512))
    if config.get("model_type", "bert") != "bert":  # RoBERTa-style position ids start after the padding index
        max_positions -= int(config.get("pad_token_id", 1)) + 1
    known = registry.lookup(name) or registry.lookup(folder.name)
    known_model = known[1] if known else None
    st = read_sentence_transformers(folder) if task is Task.EMBED else None
    if st and st.unsupported:
        raise ModelIntegrityError(
            f"{folder / 'modules.json'} uses modules bge-onnx cannot run: {list(st.unsupported)}; "
            "its vectors would differ from the model's."
        )
    explicit_length = max_length is not None
    pooling = pooling or (st.pooling if st else None) or (known_model.pooling if known_model else None)
    max_length = (max_length or (st.max_length if st else None) or (known_model.max_length if known_model else None)
                  or max_positions)
    instruction = (st.query_prompt if st else "") or (known_model.query_instruction if known_model else "")
    if query_instruction is not None:
        instruction = query_instruction
    if max_length > max_positions:
        if explicit_length:
            raise InputError(f"max_length={max_length} exceeds what the model can take ({max_positions} tokens)")
        max_length = max_positions

    if task is Task.RERANK:
        output = "logits" if "logits" in outputs else next((o for o, rank in outputs.items() if rank == 2), None)
        dim = 1
    else:
        output = next((o for o in POOLED_OUTPUTS if outputs.get(o) == 2), None) or next(
            (o for o in TOKEN_OUTPUTS if outputs.get(o) == 3), None
        )
        dim = int(config.get("hidden_size", 0))
        if output not in POOLED_OUTPUTS and pooling is None:
            why = st.problem if st and st.problem else "it has no sentence-transformers Pooling config"
            raise ModelIntegrityError(
                f"cannot tell how {name or str(folder)!r} pools token states: {why}, and it is not a known BGE "
                "model. Convert it with `bge-onnx optimize SRC --out DIR --pooling cls|mean`."
            )
    if output is None:
        raise ModelIntegrityError(
            f"{folder / graph} has outputs {dict(outputs)} (name: rank); bge-onnx runs "
            f"{'logits (batch, labels)' if task is Task.RERANK else 'last_hidden_state (batch, tokens, dim) or sentence_embedding (batch, dim)'}"
        )
    return ModelSpec(
        task=task,
        architecture=architectures[0],
        dim=dim,
        max_length=int(max_length),
        max_positions=max_positions,
        pad_token_id=int(config.get("pad_token_id", 0)),
        inputs=tuple(inputs),
        output=output,
        variants={Precision(precision).value: Variant(
            graph, data_files, {"reference": "the graph as published; not checked by bge-onnx"})},
        pooling=pooling if task is Task.EMBED else None,
        normalize=st.normalize if st else task is Task.EMBED,
        query_instruction=instruction,
        source={"id": name or str(folder), "revision": revision, "layout": "onnx export"},
    )


def needed_files(folder: Path) -> list[str]:
    """The files an export folder's load reads: config, tokenizer, graph and weights, sentence-transformers files."""
    found = find_graph(folder)
    files = [CONFIG_FILE, TOKENIZER_FILE]
    if found:
        files += [found[0], *found[1]]
    files += [f for f in ST_FILES if (Path(folder) / f).is_file()]
    pooling = pooling_config_file(folder)
    if pooling and (Path(folder) / pooling).is_file():
        files.append(pooling)
    return files
