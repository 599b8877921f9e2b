"""Opening a model folder for a task: resolving it, its manifest, the variant to run, file checks, tokenizer, session."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import onnxruntime

from . import adopt, hub
from .checks import positive_int
from .errors import BgeOnnxError, InputError, ModelFilesError, ProviderError, WrongTaskError, caller_stacklevel
from .session import CUDA, Session, choose_providers
from .spec import MANIFEST, ModelSpec, Pooling, Precision, Task, read_spec, verify_files
from .tokenize import TOKENIZER_FILE, TextTokenizer


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    folder: Path
    spec: ModelSpec
    tokenizer: TextTokenizer
    session: Session
    precision: Precision
    # what another process opens to get the same model without the network: the folder, or for an export without
    # a manifest opened by repo id (described by that name: its pooling may come from the registry) the repo id at
    # the cached revision, with the load options that pin it
    reopen: tuple[str, dict[str, object]] = ("", {})


def gate_passed(spec: ModelSpec, precision: Precision) -> bool:
    """Whether the folder holds a variant of this precision that passed its quality gate at export."""
    variant = spec.variants.get(precision.value)
    return variant is not None and (precision is Precision.FP32 or bool(variant.parity.get("passed")))


# onnxruntime's int8 GEMM kernels on AVX-512 VNNI and AMX CPUs returned wrong results before the fix of onnxruntime
# PR #27671 (2026-03), shipped in 1.25; the int8 graphs run those kernels.
INT8_ONNXRUNTIME = (1, 25)


def int8_runtime_problem(version: str | None = None) -> str | None:
    """Why this onnxruntime must not run int8 graphs, or None when it may."""
    version = version or onnxruntime.__version__
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if numbers >= INT8_ONNXRUNTIME:
        return None
    need = ".".join(map(str, INT8_ONNXRUNTIME))
    return (f"onnxruntime {version} computes int8 wrongly on AVX-512 VNNI and AMX CPUs (fixed in {need}); "
            f"pip install -U 'onnxruntime>={need}' (or onnxruntime-gpu), or run precision='fp32'")


def batch_independent(spec: ModelSpec, precision: Precision) -> bool:
    """Whether a text's vector (or a pair's score) is the same whatever else shares its batch: fp32 and fp16 graphs,
    and int8 graphs that scale activations per token; not the per-batch int8 of older exports."""
    return precision is not Precision.INT8 or spec.variants[precision.value].activations == "per-token"


def _precision(value: str | Precision) -> Precision:
    try:
        return Precision(value)
    except ValueError:
        raise InputError(f"precision must be 'auto', 'fp32', 'int8' or 'fp16', got {value!r}") from None


def choose_precision(spec: ModelSpec, precision: str | Precision, *, on_cuda: bool, folder: Path) -> Precision:
    """The variant to run: an explicit precision must exist; "auto" takes fp16 on CUDA, int8 on CPU, else fp32.

    "auto" takes a quantised variant only when it passed its quality gate at export (a forced export did not), and
    int8 only on an onnxruntime that computes it right (with a warning otherwise).

    Raises:
        ProviderError: int8 asked for on an onnxruntime older than INT8_ONNXRUNTIME.
    """
    if precision == "auto":
        preferred = Precision.FP16 if on_cuda else Precision.INT8
        if not gate_passed(spec, preferred):
            return Precision.FP32
        problem = int8_runtime_problem() if preferred is Precision.INT8 else None
        if problem:
            warnings.warn(f"running fp32, not int8: {problem}", RuntimeWarning, stacklevel=caller_stacklevel())
            return Precision.FP32
        return preferred
    precision = _precision(precision)
    if precision.value not in spec.variants:
        raise ModelFilesError(
            f"{folder} has no {precision.value} variant (it has {', '.join(sorted(spec.variants))}); add one with "
            f"`bge-onnx export SRC --out {folder} --precision {' '.join(sorted({*spec.variants, precision.value}))} --force` "
            "or pass precision='auto'"
        )
    if precision is Precision.INT8 and (problem := int8_runtime_problem()):
        raise ProviderError(f"precision='int8': {problem}")
    if precision is Precision.FP16 and not on_cuda:
        warnings.warn(
            "precision='fp16' on CPU: onnxruntime runs it through casts, slower than fp32; fp16 is meant for CUDA",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    return precision


def files_to_load(spec: ModelSpec, precision: str | Precision, *, on_cuda: bool, folder: Path) -> list[str]:
    """The files a load reads besides the manifest: the tokenizer and the chosen variant's graph (and weights)."""
    chosen = choose_precision(spec, precision, on_cuda=on_cuda, folder=folder)
    return [TOKENIZER_FILE, *spec.variants[chosen.value].all_files]


def open_model(
    model: str | os.PathLike[str],
    *,
    task: Task,
    device: str,
    threads: int | None,
    max_length: int | None,
    revision: str | None,
    precision: str | Precision = "auto",
    local_files_only: bool = False,
) -> LoadedModel:
    """Resolve, check and load a model folder for ``task``.

    The execution provider and so the precision are chosen before a hub repo is downloaded, so that only the
    chosen variant's files are fetched.

    Raises:
        ProviderError: device="cuda" with an int8 graph that quantises its rows in place (and as choose_providers).
    """
    if max_length is not None:
        positive_int("max_length", max_length)
    if device == "auto" and precision != "auto" and _precision(precision) is Precision.INT8:
        device = "cpu"  # int8 is the CPU variant (on CUDA its blocked QuantizeLinear fails: below)
    providers = choose_providers(device)
    on_cuda = CUDA in providers

    def files_for(spec: ModelSpec, *, cuda: bool = on_cuda) -> list[str]:
        """What a hub repo's load needs: the tokenizer and the chosen variant's graph (its warning comes later)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return files_to_load(spec, precision, on_cuda=cuda, folder=Path(os.fspath(model)))

    folder = hub.resolve(model, revision=revision, files_for=files_for, local_files_only=local_files_only)
    if not (folder / MANIFEST).is_file() and adopt.find_graph(folder) is not None:
        return _open_export(folder, os.fspath(model), task=task, device=device, threads=threads,
                            max_length=max_length, precision=precision, providers=providers)
    spec = read_spec(folder)
    _check_task(folder, spec, task)
    max_length = _max_length(spec, max_length)
    chosen = choose_precision(spec, precision, on_cuda=on_cuda, folder=folder)
    variant = spec.variants[chosen.value]
    if chosen is Precision.INT8 and on_cuda and variant.parity.get("rows_in_place"):
        raise ProviderError(
            f"precision='int8' with device='cuda': {folder}'s int8 graph quantises its rows with blocked "
            "QuantizeLinear, which onnxruntime's CUDA provider runs for 4-bit types only; int8 is the CPU variant: "
            "run it with device='cpu' (or 'auto'), or on CUDA with precision='auto' (fp16 where the folder has it, "
            "else fp32)")
    # Hashing the files and parsing the graph each read every byte; both release the GIL, so the check runs
    # beside the load instead of before it (cold start: docs/decisions.md).
    checked = in_background(verify_files, folder, spec, [TOKENIZER_FILE, *variant.all_files])
    with _explained_by(checked):
        tokenizer = TextTokenizer(folder, max_length=max_length)
        session = Session(folder / variant.file, device=device, threads=threads, providers=providers,
                          output=spec.output)
    if precision == "auto" and chosen is Precision.FP16 and CUDA not in session.providers:
        # CUDA failed to start and the session fell back to CPU (with a warning): fp16 has no place there; a hub
        # repo's CPU graph may still need fetching
        def cpu_files(spec: ModelSpec) -> list[str]:
            return files_for(spec, cuda=False)

        hub.resolve(model, revision=revision, files_for=cpu_files, local_files_only=local_files_only)
        chosen = choose_precision(spec, "auto", on_cuda=False, folder=folder)
        variant = spec.variants[chosen.value]
        verify_files(folder, spec, variant.all_files)
        session = Session(folder / variant.file, device="cpu", threads=threads, output=spec.output)
    return LoadedModel(folder, spec, tokenizer, session, chosen, (str(folder), {}))


def _open_export(
    folder: Path,
    name: str,
    *,
    task: Task,
    device: str,
    threads: int | None,
    max_length: int | None,
    precision: str | Precision,
    providers: list[str],
) -> LoadedModel:
    """Open an ONNX export that is not ours (no manifest): its one graph as it is, described by adopt.describe."""
    graph, _ = adopt.find_graph(folder)
    kind = adopt.graph_precision(folder / graph)
    if precision != "auto" and _precision(precision) is not kind:
        other = "fp32 and int8" if kind is Precision.INT8 else _precision(precision).value
        raise ModelFilesError(
            f"{folder} is an ONNX export without a bge-onnx manifest: it has one graph, {graph}, which is "
            f"{kind.value}. For {other}, convert its fp32 graph: `bge-onnx optimize {name} --out DIR --precision fp32 "
            "int8` (or fp16)"
        )
    checked = in_background(hub.verify_hub_files, folder, adopt.needed_files(folder))
    with _explained_by(checked):
        session = Session(folder / graph, device=device, threads=threads, providers=providers)
        spec = describe_export(folder, name, session, precision=kind)
        session.output = spec.output
        _check_task(folder, spec, task)
        tokenizer = TextTokenizer(folder, max_length=_max_length(spec, max_length))
    by_name = _described_by_name(name)
    reopen = (name, {"revision": folder.name, "local_files_only": True}) if by_name else (str(folder), {})
    return LoadedModel(folder, spec, tokenizer, session, kind, reopen)


def describe_export(
    folder: Path, name: str, session: Session | None = None, *, graph: str | None = None,
    precision: Precision | None = None, **overrides: Pooling | int | str | None
) -> ModelSpec:
    """The ModelSpec of an export folder without a manifest (adopt.describe, which takes ``overrides``: pooling,
    max_length, query_instruction), its graph (``graph``, else adopt.find_graph's) and that graph's inputs and
    outputs read from ``session`` or a CPU session; ``precision``: the graph's, where the caller has read it."""
    graph, data_files = adopt.find_graph(folder, graph)
    session = session or Session(folder / graph, device="cpu", threads=1)
    return adopt.describe(
        folder, graph=graph, data_files=data_files, inputs=session.input_names, outputs=session.outputs,
        precision=precision or adopt.graph_precision(folder / graph),
        name=name if _described_by_name(name) else None,
        revision=folder.name if folder.parent.name == "snapshots" else None, **overrides,
    )


def _described_by_name(name: str) -> bool:
    """Whether an export without a manifest is described by the repo id it was opened by (not a local path)."""
    return hub.looks_like_repo_id(name) and not Path(name).exists()


def read_any_spec(folder: Path, name: str) -> ModelSpec:
    """A folder's manifest, or for an export without one, what describe_export makes of it."""
    if not (Path(folder) / MANIFEST).is_file() and adopt.find_graph(folder) is not None:
        return describe_export(folder, name)
    return read_spec(folder)


def _check_task(folder: Path, spec: ModelSpec, task: Task) -> None:
    if spec.task is not task:
        kinds = {Task.EMBED: ("an embedding", "Embedder"), Task.RERANK: ("a reranker", "Reranker")}
        raise WrongTaskError(
            f"{folder} holds {kinds[spec.task][0]} model ({spec.architecture}); load it with "
            f"bge_onnx.{kinds[spec.task][1]}, not {kinds[task][1]}"
        )


def _max_length(spec: ModelSpec, max_length: int | None) -> int:
    if max_length is None:
        return spec.max_length
    if max_length > spec.max_positions:
        raise InputError(f"max_length={max_length} exceeds what the model can take ({spec.max_positions} tokens)")
    return max_length


@contextlib.contextmanager
def _explained_by(checked: Callable[[], None]) -> Iterator[None]:
    """Wait for the background file check after the block; if the block failed, a missing or changed file
    explains it better than the parser does."""
    try:
        yield
    except BaseException as err:
        try:
            checked()
        except BgeOnnxError as changed:
            raise changed from err
        raise
    checked()


def in_background(function: Callable[..., None], *args: object) -> Callable[[], None]:
    """Start ``function(*args)`` in a thread; the returned callable waits for it and raises what it raised."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            function(*args)
        except BaseException as err:  # handed to the caller's thread by wait()
            raised.append(err)

    thread = threading.Thread(target=target, name="bge-onnx-verify", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if raised:
            raise raised[0]

    return wait
