"""onnxruntime InferenceSession: execution providers (no silent fallback), threads from the usable CPUs."""

from __future__ import annotations

import contextlib
import enum
import functools
import io
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .checks import env_flag, positive_int
from .errors import (
    ConfigError,
    InputError,
    ModelFilesError,
    ModelIntegrityError,
    ProviderError,
    caller_stacklevel,
)

THREADS_ENV = "BGE_ONNX_THREADS"
# onnxruntime's threads waiting for work: "1" spin (onnxruntime's default, which the library keeps: fastest, but a
# process burns ~20 ms of CPU per idle second after a call), "0" sleep (no idle CPU; each parallel step of a call
# wakes them; the serverless handler's default), "run" spin within a call and sleep once it ends (the server's
# default; docs/decisions.md section 14).
SPIN_ENV = "BGE_ONNX_SPIN"
# "1": weights stay in the pages mapped from the model's data file instead of being repacked per process, so that
# processes on one host share them (at a cost in speed; docs/decisions.md section 14). Worker processes and Ray
# actors set it.
SHARE_WEIGHTS_ENV = "BGE_ONNX_SHARE_WEIGHTS"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# bge-onnx goes too: it requires onnxruntime, which a later pip run would put back beside onnxruntime-gpu
# bge-onnx-gpu is not on PyPI yet: it installs from a checkout's gpu/ folder
GPU_FIX = ("pip uninstall -y bge-onnx bge-onnx-gpu onnxruntime onnxruntime-gpu && pip install ./gpu (in a bge-onnx "
           "checkout)")


def has_nvidia_gpu(root: Path = Path("/")) -> bool:
    """Whether the NVIDIA driver shows a GPU here (Linux: /proc/driver/nvidia/gpus or /dev/nvidia0; elsewhere we
    cannot tell and say yes)."""
    if not (root / "proc").is_dir():
        return True
    gpus = root / "proc" / "driver" / "nvidia" / "gpus"
    return (gpus.is_dir() and any(gpus.iterdir())) or (root / "dev" / "nvidia0").exists()


class Device(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by the cgroup CPU quota (v2 cpu.max or v1 cfs files), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: its affinity mask capped by the cgroup quota (not the host's count)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def resolve_threads(threads: int | None) -> int:
    """The thread count to use: the argument, else $BGE_ONNX_THREADS, else the usable CPUs."""
    if threads is not None:
        return positive_int("threads", threads)
    env = os.environ.get(THREADS_ENV)
    if not env:
        return usable_cpus()
    try:
        value: object = int(env)
    except ValueError:
        value = env
    return positive_int(f"${THREADS_ENV}", value)


def conflicting_runtimes(installed: Iterable[str] | None = None) -> bool:
    """True when both onnxruntime and onnxruntime-gpu are installed: they overwrite each other's files."""
    if installed is None:
        import importlib.metadata  # here, not at the top: it costs ~0.03 s of import, and CPU-only use never needs it

        installed = []
        for name in ("onnxruntime", "onnxruntime-gpu"):
            try:
                importlib.metadata.distribution(name)
                installed.append(name)
            except importlib.metadata.PackageNotFoundError:
                pass
    return {"onnxruntime", "onnxruntime-gpu"} <= set(installed)


@functools.cache
def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of pip's nvidia-* wheels, which onnxruntime-gpu does not find by itself
    (unless torch was imported first)."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints notices, and our stdout may carry vectors
            preload(msvc=False)


def choose_providers(
    device: str | Device, available: Iterable[str] | None = None, *, gpu: bool | None = None
) -> list[str]:
    """The execution providers to ask for, in order; raises when the device cannot be served. ``available``: the
    providers onnxruntime offers, ``gpu``: whether an NVIDIA GPU is present (default: asked of this machine).

    Raises:
        InputError: unknown device.
        ProviderError: device="cuda" but onnxruntime has no CUDA provider.
    """
    try:
        device = Device(device)
    except ValueError:
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}") from None
    available = list(ort.get_available_providers() if available is None else available)
    if device is Device.CPU:
        return [CPU]
    conflict = conflicting_runtimes()
    if conflict:
        warnings.warn(
            "both onnxruntime and onnxruntime-gpu are installed: they overwrite each other's files and CUDA can "
            f"silently disappear. Fix: {GPU_FIX}",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )
    if CUDA in available:
        load_cuda_libraries()
        return [CUDA, CPU]
    if device is Device.CUDA:
        if not (has_nvidia_gpu() if gpu is None else gpu):
            raise ProviderError(
                "device='cuda' but this machine shows no NVIDIA GPU (no /proc/driver/nvidia/gpus, no /dev/nvidia0); "
                "run on the CPU with device='cpu' or 'auto'"
            )
        hint = "they have overwritten each other; fix: " if conflict else "install the GPU build: "
        raise ProviderError(
            f"device='cuda' but onnxruntime offers no CUDAExecutionProvider (available: {available}); "
            f"{hint}{GPU_FIX}"
        )
    return [CPU]


def spin_mode() -> str:
    """$BGE_ONNX_SPIN as "1", "0" or "run" ("1" when unset; yes/no words as 1/0).

    Raises:
        ConfigError: any other value.
    """
    value = os.environ.get(SPIN_ENV, "").strip().lower()
    if value == "run":
        return value
    try:
        return "1" if env_flag(SPIN_ENV, default=True) else "0"
    except ConfigError:
        raise ConfigError(f"${SPIN_ENV} must be 1 (spin), 0 (sleep) or run (spin within a call), got {value!r}") from None


class Session:
    """An onnxruntime session over one .onnx file, with the inputs it declares."""

    def __init__(
        self,
        path: Path,
        *,
        device: str | Device = "auto",
        threads: int | None = None,
        providers: list[str] | None = None,
        output: str | None = None,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelFilesError(f"{path} is missing; re-export or re-download the model.")
        if providers is None:
            providers = choose_providers(device)
        self.threads = resolve_threads(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.spin = spin_mode()
        if self.spin == "0":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif self.spin == "run":
            options.add_session_config_entry("session.force_spinning_stop", "1")
        self.shares_weights = env_flag(SHARE_WEIGHTS_ENV)
        if self.shares_weights:
            options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelIntegrityError(
                f"{path} could not be loaded by onnxruntime ({type(err).__name__}: {err}); the file is "
                "corrupt or not an ONNX model. Re-export or re-download the model."
            ) from err
        self.providers = self._session.get_providers()
        if CUDA in providers and CUDA not in self.providers:
            message = (
                "onnxruntime lists CUDAExecutionProvider but could not start it (CUDA/cuDNN libraries "
                f"missing or mismatched); fix the CUDA install or: {GPU_FIX}"
            )
            if Device(device) is Device.CUDA:
                raise ProviderError(message)
            warnings.warn(message + ". Running on CPU.", RuntimeWarning, stacklevel=caller_stacklevel())
        self.input_names = [i.name for i in self._session.get_inputs()]
        unknown = [name for name in self.input_names if name not in KNOWN_INPUTS]
        if unknown or "input_ids" not in self.input_names:
            raise ModelIntegrityError(
                f"{path} declares inputs {self.input_names}; bge-onnx feeds {list(KNOWN_INPUTS)}. "
                "Re-export the model with bge-onnx."
            )

        # name -> rank, for exports whose outputs are read at load (adopt.describe)
        self.outputs = {o.name: len(o.shape or ()) for o in self._session.get_outputs()}
        self.output = output or next(iter(self.outputs))
        if self.output not in self.outputs:
            raise ModelIntegrityError(
                f"{path} has outputs {list(self.outputs)}, not {self.output!r}; re-export or re-download the model."
            )

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Run the graph and return its output (pooled vectors, token states or logits)."""
        return self._session.run([self.output], feeds)[0]

    def run_outputs(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph for the named outputs (bge-m3: dense, lexical and ColBERT from one pass)."""
        return self._session.run(names, feeds)
