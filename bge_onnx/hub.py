"""Resolving a model argument (local folder or hub repo id) to a local folder, via huggingface_hub."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from . import adopt
from .cache import Stamps, identity
from .errors import InputTypeError, ModelFilesError, ModelIntegrityError
from .spec import MANIFEST, ModelSpec, read_spec, sha256_file
from .tokenize import TOKENIZER_FILE

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
    graph: str | None = None,
) -> Path:
    """Return the local folder for ``model``: an existing path as is, else a hub repo downloaded to the cache.

    For a repo, ``files_for(spec)`` names the files to fetch beside the manifest (the tokenizer and one variant's
    graph), so that the caller picks the precision before anything large is downloaded. ``local_files_only``: the
    cache or an error, never the network; ``refresh``: ask the hub which commit the revision names now (a branch
    moves) instead of trusting the cache.

    Raises:
        InputTypeError: ``model`` is not a str or path.
        ModelFilesError: neither an existing folder nor a downloadable bge-onnx repo.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise InputTypeError(
            f"model must be a folder path or a hub repo id (str), got {type(model).__name__} {model!r}"
        )
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = os.fspath(model)
    if not looks_like_repo_id(name):
        raise ModelFilesError(f"model folder {name!r} does not exist (and is not a hub repo id 'owner/name')")
    return download(name, revision=revision, files_for=files_for, local_files_only=local_files_only, refresh=refresh,
                    graph=graph)


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


def probe(repo_id: str, filename: str, revision: str | None, *, fix: str) -> None:
    """One request that answers or fails within HF_HUB_ETAG_TIMEOUT, before a download: when nothing is cached,
    huggingface_hub retries a timed-out request with a 60 s timeout, five times, so a network that drops packets
    took minutes to fail. Any answer from the hub (even "no such file") passes; the download says what it means.

    Raises:
        ModelFilesError: no answer in time; the message ends with ``fix``.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:
        pass
    except Exception as err:  # no answer at all, whatever the HTTP stack calls it
        raise ModelFilesError(
            f"cannot reach the hub at {constants.ENDPOINT} to download {repo_id!r} "
            f"({type(err).__name__}: {err or 'no answer'} within HF_HUB_ETAG_TIMEOUT="
            f"{constants.HF_HUB_ETAG_TIMEOUT} s), and it is not in the local cache. Check the network or "
            f"HF_ENDPOINT, {fix}."
        ) from err


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    files_for: Callable[[ModelSpec], list[str]] = lambda spec: [],
    local_files_only: bool = False,
    refresh: bool = False,
    graph: str | None = None,
) -> Path:
    """Fetch a repo's files: a bge-onnx export's manifest, then only the files ``files_for(spec)`` names; a repo
    without a manifest (an official BAAI repo's onnx/ folder, an optimum or sentence-transformers export): its
    graph and weights, tokenizer, config and sentence-transformers files, never the PyTorch weights.

    When those files of the revision are already in the cache, nothing goes over the network (no request at all,
    not even the HEAD that checks a branch for a newer commit): a cached branch is not looked up again here
    (``refresh`` does: `bge-onnx pull`), and huggingface_hub's downloader is not even imported. Otherwise the files
    are fetched (huggingface_hub skips those it has); with ``local_files_only`` (or HF_HUB_OFFLINE=1) that is an
    error instead. An unreachable hub fails after one wait of HF_HUB_ETAG_TIMEOUT seconds (10 by default), not
    after huggingface_hub's minutes of retries.

    Raises:
        ModelFilesError: the repo, revision or a file cannot be fetched, or the repo holds no ONNX model.
        ModelIntegrityError: the manifest is not valid.
    """
    snapshot = None if refresh else cached_snapshot(repo_id, revision)
    if snapshot is not None and _complete(snapshot, files_for, graph):
        return snapshot
    from huggingface_hub import constants

    if local_files_only or constants.HF_HUB_OFFLINE:
        why = "local_files_only=True forbids" if local_files_only else "HF_HUB_OFFLINE=1 is set, which forbids"
        raise ModelFilesError(
            f"hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "") + " is not in the local "
            f"cache, or only in part, and {why} the network; fill the cache first with "
            f"`bge-onnx pull {repo_id}{' --revision ' + revision if revision else ''}` (where the hub is reachable, "
            "HF_HUB_OFFLINE unset), or pass a local folder."
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

    probe(repo_id, MANIFEST, revision, fix="fill the cache beforehand with `bge-onnx pull`, or pass a local folder")

    def fetch(filename: str, *, optional: bool = False) -> Path | None:
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
            if optional:
                return None
            raise ModelFilesError(f"hub repo {repo_id!r} has no file {filename}") from err
        except (HfHubHTTPError, OSError) as err:
            raise ModelFilesError(
                f"cannot download {filename} of hub repo {repo_id!r}"
                f"{'@' + revision if revision else ''}: {err}"
            ) from err

    manifest = fetch(MANIFEST, optional=True)
    if manifest is not None:
        folder = manifest.parent
        spec = read_spec(folder)  # ModelIntegrityError names the file when the manifest is not valid
        for filename in files_for(spec):
            fetch(filename)
        return folder
    # no manifest: an export that is not ours; its graph first, so that a repo without one fails before
    # anything else is fetched
    wanted = (graph,) if graph else adopt.GRAPH_FILES
    graph = next((g for g in wanted if fetch(g, optional=True) is not None), None)
    if graph is None:
        raise ModelFilesError(
            f"hub repo {repo_id!r} has neither {MANIFEST} nor an ONNX graph ({' or '.join(wanted)}): "
            f"it holds no ONNX model. Export it with `bge-onnx export {repo_id} --out DIR` and load DIR."
        )
    for suffix in adopt.DATA_SUFFIXES:
        fetch(graph + suffix, optional=True)
    folder = fetch(adopt.CONFIG_FILE).parent
    fetch(TOKENIZER_FILE)
    for filename in adopt.ST_FILES:
        fetch(filename, optional=True)
    pooling = adopt.pooling_config_file(folder)
    if pooling:
        fetch(pooling, optional=True)
    return folder


def _complete(snapshot: Path, files_for: Callable[[ModelSpec], list[str]], graph: str | None = None) -> bool:
    """Whether a cached snapshot holds all a load reads: for an export without a manifest, every file it may read
    is either there or known to be absent (huggingface_hub marks a file the hub said it lacks under .no_exist)."""
    if (snapshot / MANIFEST).is_file():
        return all((snapshot / filename).is_file() for filename in files_for(read_spec(snapshot)))
    found = adopt.find_graph(snapshot, graph)
    if found is None:
        return False
    absent = snapshot.parent.parent / ".no_exist" / snapshot.name
    maybe = [MANIFEST, *(found[0] + suffix for suffix in adopt.DATA_SUFFIXES), *adopt.ST_FILES]
    pooling = adopt.pooling_config_file(snapshot)
    if pooling:
        maybe.append(pooling)
    return all((snapshot / f).is_file() for f in (adopt.CONFIG_FILE, TOKENIZER_FILE)) and all(
        (snapshot / f).is_file() or (absent / f).is_file() for f in maybe
    )


def verify_hub_files(folder: Path, names: list[str], *, full: bool = False) -> None:
    """Check files of a hub cache snapshot against the hub's own hashes, recorded at download as their blob names.

    huggingface_hub stores each file as blobs/ETAG, with a link to it from the snapshot; the ETag of a file in
    Git LFS (every graph and weight file) is its sha256, that of a small file its git blob sha1. A download is
    written beside the blob and renamed only when complete, so an interrupted one is never linked. Files that are
    not links to such blobs (a local folder, a cache without symlinks) are not checked here. As for verify_files,
    a blob that matched and has not changed since is not hashed again unless ``full``.

    Raises:
        ModelIntegrityError: a file's content no longer matches its hash.
    """
    stamps = Stamps(folder)
    for name in names:
        path = Path(folder) / name
        if not path.is_symlink():
            continue
        blob = path.resolve()
        expected = blob.name
        before = identity(blob)
        if not full and stamps.vouches(name, expected, before):
            continue
        if _SHA256.match(expected):
            actual = sha256_file(blob)
        elif _COMMIT.match(expected):
            actual = git_blob_sha1(blob)
        else:
            continue
        if actual != expected:
            raise ModelIntegrityError(
                f"{path} does not match the hash the hub gave at download (expected {expected[:12]}…, found "
                f"{actual[:12]}…): the cached file is corrupt. Delete {blob} and load again, or run "
                "`bge-onnx pull` for the repo."
            )
        stamps.add(name, expected, before)
    stamps.save()


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def git_blob_sha1(path: Path) -> str:
    """The hash git (and the hub's ETag) gives a small file: sha1 of "blob SIZE\\0" + content."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
