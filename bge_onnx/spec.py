"""The artifact contract: the manifest bge_onnx.json <-> a frozen, self-validating ModelSpec."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cache import Stamps, identity
from .checks import positive_int
from .errors import ModelFilesError, ModelIntegrityError

MANIFEST = "bge_onnx.json"
# 2: an embedding graph outputs its pooled vectors (POOLED_OUTPUT). 1: token states, which the runtime pools in
# numpy; still read. A runtime that reads only 1 refuses 2 instead of pooling pooled vectors again.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
POOLED_OUTPUT = "sentence_embedding"
# outputs that are one vector per text already: ours, and the names other exports give theirs
POOLED_OUTPUTS = (POOLED_OUTPUT, "dense_vecs")


class Task(str, enum.Enum):
    """What a model folder is for."""

    EMBED = "embed"
    RERANK = "rerank"


class Precision(str, enum.Enum):
    """Which graph of a model folder to run: fp32 (exact), int8 (CPU, quantised), fp16 (CUDA)."""

    FP32 = "fp32"
    INT8 = "int8"
    FP16 = "fp16"


class Pooling(str, enum.Enum):
    """How token states become one vector per text."""

    CLS = "cls"
    MEAN = "mean"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ONNX graph of the model (one precision) and its measured parity.

    ``parity`` holds the figures measured at export: for fp32 against PyTorch; for int8 and fp16 against the
    fp32 graph, with the gate they were held to, whether they passed it, the recipe, and where they ran; for fp32
    also the onnxruntime fusions applied (``fused_ops``).
    """

    file: str
    data_files: tuple[str, ...] = ()
    parity: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_files", tuple(self.data_files))

    @property
    def all_files(self) -> list[str]:
        """The graph file and its separate weight files, if any."""
        return [self.file, *self.data_files]

    @property
    def activations(self) -> str:
        """How an int8 graph scales its activations: "per-token" (a text's vector depends on the text alone) or
        "per-batch" (exports before issue 20: onnxruntime's dynamic quantisation, one scale per batch, so a vector
        moves slightly with its batch neighbours). Meaningless for fp32 and fp16."""
        return str(self.parity.get("activations", "per-batch"))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the runtime needs to know about an exported model folder.

    Built by the exporter, written as bge_onnx.json, read back by the runtime.
    """

    task: Task
    architecture: str
    dim: int
    max_length: int
    max_positions: int
    pad_token_id: int
    inputs: tuple[str, ...]
    output: str
    variants: Mapping[str, Variant]
    pooling: Pooling | None = None
    normalize: bool = True
    query_instruction: str = ""
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # bge-m3's extra outputs, when the graph has them: {"lexical": output name (batch, seq) of per-token weights,
    # "colbert": output name (batch, seq - 1, colbert_dim) of normalised token vectors, "colbert_dim": int,
    # "skip_ids": token ids that get no lexical weight (cls, eos, pad, unk)}. Absent from other manifests.
    heads: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # an embedding model's vectors for storage: {"ranges": [[min per dimension], [max per dimension]] of the fp32
    # graph's normalised vectors of "texts" shipped texts}, what output_dtype int8/uint8 steps through. Absent from
    # older manifests and from rerankers'.
    calibration: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", Task(self.task))
        if self.pooling is not None:
            object.__setattr__(self, "pooling", Pooling(self.pooling))
        if self.task is Task.EMBED and self.pooling is None:
            raise ValueError("an embedding model needs a pooling (cls or mean)")
        for name in ("dim", "max_length", "max_positions"):
            positive_int(name, getattr(self, name))  # InputError is a ValueError: read_spec reports the manifest
        if self.max_length > self.max_positions:
            raise ValueError(
                f"max_length {self.max_length} exceeds the model's max_positions {self.max_positions}"
            )
        if "input_ids" not in self.inputs or "attention_mask" not in self.inputs:
            raise ValueError(f"inputs must include input_ids and attention_mask, got {list(self.inputs)}")
        # an export bge-onnx did not make (adopt.describe) has one graph, whatever its precision
        if "fp32" not in self.variants and not (len(self.variants) == 1 and self.source.get("layout") == "onnx export"):
            raise ValueError(f"variants must include fp32, got {sorted(self.variants)}")
        for name in self.variants:
            Precision(name)
        object.__setattr__(self, "inputs", tuple(self.inputs))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["task"] = self.task.value
        data["pooling"] = self.pooling.value if self.pooling else None
        data["inputs"] = list(self.inputs)
        for optional in ("heads", "calibration"):
            if not data[optional]:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        fields["variants"] = {
            name: Variant(**variant) for name, variant in dict(data.get("variants", {})).items()
        }
        return cls(**fields)


def read_spec(folder: Path) -> ModelSpec:
    """Read and validate ``folder/bge_onnx.json``.

    Raises:
        ModelFilesError: the folder or its manifest is missing.
        ModelIntegrityError: the manifest is not valid JSON or not a valid spec.
    """
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise ModelFilesError(f"model folder {str(folder)!r} does not exist or is not a folder")
    if not path.is_file():
        raise ModelFilesError(
            f"{path} is missing: {str(folder)!r} is not a bge-onnx model folder. "
            "Create one with `bge-onnx export SRC --out DIR`."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelIntegrityError(f"{path} is not valid JSON ({err}); re-export the model.") from err
    if not isinstance(data, dict):
        raise ModelIntegrityError(f"{path} must hold a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelIntegrityError(
            f"{path} has format_version {version!r}; this bge-onnx reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. "
            "Upgrade bge-onnx or re-export the model."
        )
    try:
        return ModelSpec.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ModelIntegrityError(f"{path} is not a valid manifest: {err}") from err


def write_spec(folder: Path, spec: ModelSpec) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(spec.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # 1 MB chunks
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)  # releases the GIL for large chunks (the load runs beside it)
    return digest.hexdigest()


def verify_files(folder: Path, spec: ModelSpec, names: list[str], *, full: bool = False) -> None:
    """Check that each named file exists and matches its sha256 in the manifest.

    A file that matched before and whose identity (cache.identity: inode, size, mtime, ctime) has not changed
    since is not hashed again, unless ``full`` (``bge-onnx verify``, push); each full match is stamped.

    Raises:
        ModelFilesError: a file is missing.
        ModelIntegrityError: a file is not listed in the manifest or its content changed.
    """
    stamps = Stamps(folder)
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            raise ModelFilesError(
                f"{path} is missing (listed in {MANIFEST}); re-export or re-download the model."
            )
        expected = spec.files.get(name)
        if expected is None:
            raise ModelIntegrityError(f"{path} has no sha256 in {MANIFEST}; re-export the model.")
        before = identity(path)
        if not full and stamps.vouches(name, expected, before):
            continue
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(
                f"{path} does not match the sha256 in {MANIFEST} "
                f"(expected {expected[:12]}…, found {actual[:12]}…): the file is corrupt or was "
                "changed after export. Re-export or re-download the model."
            )
        stamps.add(name, expected, before)
    stamps.save()
