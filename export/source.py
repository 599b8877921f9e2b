"""Reading a checkpoint (local folder or hub id): what it is, how it pools, how long its inputs may be."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bge_onnx import registry
from bge_onnx.adopt import read_sentence_transformers
from bge_onnx.errors import ExportError, ModelFilesError
from bge_onnx.hub import looks_like_repo_id, probe
from bge_onnx.spec import Pooling, Task

SUPPORTED_TYPES = ("bert", "xlm-roberta", "roberta")
# bge-m3's heads, beside the encoder in its repo (FlagEmbedding's file names)
COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"


def has_heads(folder: Path) -> bool:
    """Whether the checkpoint carries bge-m3's heads; one without the other is an error (FlagEmbedding would then
    silently use random heads for both)."""
    present = [name for name in (COLBERT_FILE, SPARSE_FILE) if (folder / name).is_file()]
    if len(present) == 1:
        missing = SPARSE_FILE if present == [COLBERT_FILE] else COLBERT_FILE
        raise ModelFilesError(f"{folder} has {present[0]} but not {missing}: bge-m3's lexical and ColBERT outputs "
                              "need both heads")
    return bool(present)


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint on local disk and everything decided about it before conversion."""

    folder: Path
    source_id: str
    revision: str | None
    task: Task
    model_type: str
    architecture: str
    pooling: Pooling | None
    normalize: bool
    query_instruction: str
    max_length: int
    max_positions: int
    dim: int
    with_token_types: bool
    heads: bool = False  # bge-m3's colbert_linear.pt and sparse_linear.pt are beside the encoder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelFilesError(f"{path} is missing") from err
    except ValueError as err:
        raise ExportError(f"{path} is not valid JSON: {err}") from err


def fetch(src: str, revision: str | None) -> tuple[Path, str | None]:
    """Return a local folder for ``src`` (downloading a hub id) and the revision it was taken at."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelFilesError(f"export source {src!r} is a file; give the checkpoint's folder")
        return path, revision
    if not looks_like_repo_id(src):
        raise ModelFilesError(f"export source {src!r} is neither an existing folder nor a hub repo id")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # the torch weights and configs only: hub repos often also carry ONNX, OpenVINO or GGUF copies
    ignore = ["*.onnx", "*.onnx_data", "onnx/*", "openvino/*", "*.gguf", "*.h5", "*.msgpack", "*.ot"]
    try:
        if not constants.HF_HUB_OFFLINE:
            try:  # a silent hub fails here within HF_HUB_ETAG_TIMEOUT, not after minutes of retries
                probe(src, "config.json", revision, fix="or export from a local checkpoint folder")
            except ModelFilesError as unreachable:
                try:  # a checkpoint already in the cache needs no hub
                    folder = Path(snapshot_download(src, revision=revision, ignore_patterns=ignore,
                                                    local_files_only=True))
                except (LocalEntryNotFoundError, OSError):
                    raise unreachable from None
                return folder, folder.name
        folder = Path(snapshot_download(src, revision=revision, ignore_patterns=ignore + _duplicate_weights(src, revision)))
    except ModelFilesError:
        raise
    except Exception as err:  # huggingface_hub raises many network/auth/not-found types
        raise ModelFilesError(f"cannot download hub repo {src!r}: {err}") from err
    return folder, folder.name  # the snapshot folder is named by its commit


def _duplicate_weights(src: str, revision: str | None) -> list[str]:
    """pytorch_model.bin (and its shards) where the repo also has safetensors: both readers and transformers take
    the safetensors, and the .bin would double the download (bge-m3: 2.3 GB each)."""
    from huggingface_hub import HfApi

    try:
        names = {s.rfilename for s in HfApi().model_info(src, revision=revision).siblings or []}
    except Exception:  # the download that follows reports what is wrong with the repo
        return []
    if any(name in names for name in ("model.safetensors", "model.safetensors.index.json")):
        return ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    return []


def _sentence_transformers(folder: Path, *, pooling_given: bool) -> tuple[Pooling | None, bool, int | None, str] | None:
    """Pooling, normalise, max_seq_length and query prompt from a sentence-transformers folder; the pooling is
    not needed (None) when the caller gives one."""
    st = read_sentence_transformers(folder)
    if st is None:
        return None
    if st.unsupported:  # e.g. a Dense layer after the pooling: the vectors would differ whatever the pooling
        raise ExportError(f"{folder / 'modules.json'} uses modules bge-onnx cannot run yet: {list(st.unsupported)}")
    if st.pooling is None and not pooling_given:
        raise ExportError(f"{st.problem}; pass --pooling cls|mean")
    return (None if pooling_given else st.pooling), st.normalize, st.max_length, st.query_prompt


def describe_source(
    src: str,
    *,
    revision: str | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    query_instruction: str | None = None,
) -> Source:
    """Decide task, pooling, instruction and lengths: explicit arguments, then the checkpoint's
    sentence-transformers config, then the registry of known models, then (pooling only) bge-m3's heads, which
    BGEM3FlagModel always pools CLS, then (max length only) the model's positions (``max_position_embeddings``,
    less RoBERTa's offset). Never a silent guess at pooling otherwise.

    Raises:
        ModelFilesError: no such folder or repo, or no config.json.
        ExportError: an unsupported architecture, or the pooling cannot be told.
    """
    folder, revision = fetch(src, revision)
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type", "")
    if model_type not in SUPPORTED_TYPES:
        raise ExportError(
            f"{folder / 'config.json'} has model_type {model_type!r}; bge-onnx exports {list(SUPPORTED_TYPES)}"
        )
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else "BertModel"
    task = Task.RERANK if architecture.endswith("ForSequenceClassification") else Task.EMBED
    max_positions = config["max_position_embeddings"]
    if model_type != "bert":  # RoBERTa-style position ids start after the padding index
        max_positions -= config.get("pad_token_id", 1) + 1
    known = registry.lookup(src) or registry.lookup(folder.name)
    source_id, known_model = known if known else (src, None)

    normalize = task is Task.EMBED
    instruction = ""
    limit = None
    chosen = None
    st = _sentence_transformers(folder, pooling_given=pooling is not None) if task is Task.EMBED else None
    if st:
        chosen, normalize, limit, instruction = st
    if known_model:  # fills in only what the checkpoint's own sentence-transformers files leave unsaid
        chosen = chosen or known_model.pooling
        limit = limit or min(known_model.max_length, max_positions)
        instruction = instruction or known_model.query_instruction
    if chosen is None and task is Task.EMBED and has_heads(folder):
        chosen = Pooling.CLS  # bge-m3's heads: BGEM3FlagModel always pools the first token
    if pooling is not None:
        chosen = Pooling(pooling)
    if task is Task.RERANK:
        chosen = None
        labels = len(config.get("id2label") or {0: 0})
        if labels != 1:
            raise ExportError(f"{folder} is a classifier with {labels} labels; a reranker has exactly 1")
        dim = 1
    else:
        dim = config["hidden_size"]
        if chosen is None:
            raise ExportError(
                f"cannot tell how {src!r} pools token states: it has no sentence-transformers Pooling config "
                "and is not a known BGE model. Pass --pooling cls or --pooling mean."
            )
    if max_length is None:
        max_length = limit or max_positions
    if query_instruction is not None:
        instruction = query_instruction
    if max_length > max_positions:
        raise ExportError(f"max_length {max_length} exceeds the model's {max_positions} positions")
    return Source(
        folder=folder,
        source_id=source_id,
        revision=revision,
        task=task,
        model_type=model_type,
        architecture=architecture,
        pooling=chosen,
        normalize=normalize,
        query_instruction=instruction,
        max_length=max_length,
        max_positions=max_positions,
        dim=dim,
        with_token_types=config.get("type_vocab_size", 1) > 1,
        heads=task is Task.EMBED and has_heads(folder),
    )
