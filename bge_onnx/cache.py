"""bge-onnx's own cache: where it is, and the verification stamps that spare an unchanged file a second sha256."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_ENV = "BGE_ONNX_CACHE"
STAMPS = "stamps"


def cache_dir() -> Path:
    """$BGE_ONNX_CACHE, else $XDG_CACHE_HOME/bge-onnx, else ~/.cache/bge-onnx (the default model's export, stamps)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bge-onnx"


def identity(path: Path) -> list[int]:
    """What changes whenever a file's content can have changed: device, inode, size, mtime and ctime (ns).

    ctime is set by the kernel on every write, rename or metadata change and cannot be set back from user space
    (unlike mtime, which `touch -d` sets), so a file rewritten in place and given its old mtime still differs.
    """
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class Stamps:
    """The files of one folder whose hash was checked in full, each with the expected hash it matched and the
    file's identity at the time. A file is vouched for while both are unchanged (docs/decisions.md section 14).

    The record lives in the cache (``stamps/`` + a hash of the folder's path), never in the model folder, so a
    read-only folder works; where the cache cannot be written, nothing is recorded and every load hashes in full.
    """

    def __init__(self, folder: Path) -> None:
        folder = Path(folder).resolve()
        self.path = cache_dir() / STAMPS / (hashlib.sha256(os.fsencode(folder)).hexdigest()[:32] + ".json")
        self.folder = str(folder)
        self.changed = False
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            self.files = record["files"] if record.get("folder") == self.folder else {}
        except (OSError, ValueError, KeyError, TypeError):
            self.files = {}

    def vouches(self, name: str, expected: str, now: list[int]) -> bool:
        """Whether ``name`` matched ``expected`` in full when its identity was ``now``."""
        entry = self.files.get(name)
        return isinstance(entry, dict) and entry.get("hash") == expected and entry.get("identity") == now

    def add(self, name: str, expected: str, then: list[int]) -> None:
        """Record that ``name`` matched ``expected`` in full; ``then`` is its identity taken before hashing, so a
        file changed while it was read does not keep the stamp."""
        self.files[name] = {"hash": expected, "identity": then}
        self.changed = True

    def save(self) -> None:
        """Write the record atomically if anything was added; skipped where the cache is not writable."""
        if not self.changed:
            return
        temporary = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                json.dump({"folder": self.folder, "files": self.files}, f)
            os.replace(temporary, self.path)
        except OSError:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
