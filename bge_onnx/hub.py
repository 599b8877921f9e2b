"""Resolving a model argument (local folder or hub repo id) to a local folder, via huggingface_hub."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import ModelFilesError
from .spec import MANIFEST, ModelSpec, read_spec

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(name: str) -> bool:
    """True for 'owner/name' strings that could be a hub repo id.

    >>> looks_like_repo_id("BAAI/bge-small-en-v1.5"), looks_like_repo_id("./models/x")
    (True, False)
    """
    return bool(_REPO_ID.match(name)) and ".." not in name


def resolve(
    model: str | os.PathLike[str],
    *,
    revision: str | None = None,
    files_for: Callable[[ModelSpec], list[str]] = lambda spec: [],
    local_files_only: bool = False,
    refresh: bool = False,
) -> Path:
    """Return the local folder for ``model``: an existing path as is, else a hub repo downloaded to the cache.

    For a repo, ``files_for(spec)`` names the files to fetch beside the manifest (the tokenizer and one variant's
    graph), so that the caller picks the precision before anything large is downloaded. ``local_files_only``: the
    cache or an error, never the network; ``refresh``: ask the hub which commit the revision names now (a branch
    moves) instead of trusting the cache.

    Raises:
        ModelFilesError: neither an existing folder nor a downloadable bge-onnx repo.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise ModelFilesError(
            f"model must be a folder path or a hub repo id (str), got {type(model).__name__} {model!r}"
        )
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = os.fspath(model)
    if not looks_like_repo_id(name):
        raise ModelFilesError(f"model folder {name!r} does not exist (and is not a hub repo id 'owner/name')")
    return download(name, revision=revision, files_for=files_for, local_files_only=local_files_only, refresh=refresh)


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cache's snapshot folder of ``repo_id`` at ``revision``, if the cache knows that revision.

    Read from huggingface_hub's documented cache layout (HF_HUB_CACHE/models--owner--name/refs/REVISION holds the
    commit; snapshots/COMMIT holds the files) with only its constants imported, so that a cached load neither
    imports its downloader nor asks the hub anything.
    """
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    commit = revision
    if not _COMMIT.match(revision):
        try:
            commit = (repo / "refs" / revision).read_text(encoding="utf-8").strip()
        except OSError:
            return None
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    files_for: Callable[[ModelSpec], list[str]] = lambda spec: [],
    local_files_only: bool = False,
    refresh: bool = False,
) -> Path:
    """Fetch an exported bge-onnx repo's manifest, then only the files ``files_for(spec)`` names.

    When the manifest and those files of the revision are already in the cache, nothing goes over the network
    (no request at all, not even the HEAD that checks a branch for a newer commit): a cached branch is not looked
    up again here (``refresh`` does: `bge-onnx pull`), and huggingface_hub's downloader is not even imported.
    Otherwise the manifest is fetched anew, then each file (huggingface_hub skips those it has); with
    ``local_files_only`` (or HF_HUB_OFFLINE=1) that is an error instead.

    Raises:
        ModelFilesError: the repo, revision or a file cannot be fetched, or the repo is not a bge-onnx export.
        ModelIntegrityError: the manifest is not valid.
    """
    snapshot = None if refresh else cached_snapshot(repo_id, revision)
    if snapshot is not None and (snapshot / MANIFEST).is_file():
        if all((snapshot / filename).is_file() for filename in files_for(read_spec(snapshot))):
            return snapshot
    if local_files_only:
        raise ModelFilesError(
            f"hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "") + " is not in the local "
            "cache, or only in part, and local_files_only=True forbids the network; fill the cache first with "
            f"`bge-onnx pull {repo_id}{' --revision ' + revision if revision else ''}`, or pass a local folder."
        )

    # here, not at the top: importing huggingface_hub's downloader costs ~0.15 s, which a cached load never pays
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(filename: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except LocalEntryNotFoundError as err:  # offline, or the hub unreachable, and not cached
            raise ModelFilesError(
                f"cannot download {filename} of {repo_id!r} and it is not in the local cache "
                f"({err}); check the network or HF_ENDPOINT, or pass a local folder."
            ) from err
        except GatedRepoError as err:  # before RepositoryNotFoundError: it is one
            raise ModelFilesError(
                f"hub repo {repo_id!r} is gated: accept its terms on the hub with your account, then set HF_TOKEN "
                "to a token of that account."
            ) from err
        except RepositoryNotFoundError as err:
            raise ModelFilesError(
                f"hub repo {repo_id!r} does not exist, or is private: check the name, or set HF_TOKEN to a token "
                "that may read it."
            ) from err
        except RevisionNotFoundError as err:
            raise ModelFilesError(
                f"hub repo {repo_id!r} has no revision {revision!r} (a branch, tag or commit); check the name."
            ) from err
        except EntryNotFoundError as err:  # the hub answered: no such file
            if filename == MANIFEST:
                raise ModelFilesError(
                    f"hub repo {repo_id!r} has no {MANIFEST}: it is not an exported bge-onnx model. "
                    f"Export it with `bge-onnx export {repo_id} --out DIR` and load DIR."
                ) from err
            raise ModelFilesError(f"hub repo {repo_id!r} lists {filename} in {MANIFEST} but lacks the file") from err
        except (HfHubHTTPError, OSError) as err:
            raise ModelFilesError(
                f"cannot download {filename} of hub repo {repo_id!r}"
                f"{'@' + revision if revision else ''}: {err}"
            ) from err

    folder = fetch(MANIFEST).parent
    spec = read_spec(folder)  # ModelIntegrityError names the file when the manifest is not valid
    for filename in files_for(spec):
        fetch(filename)
    return folder
