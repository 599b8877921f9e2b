"""Publishing an exported model folder to a hub repo, with a model card (card.py) written from its manifest."""

from __future__ import annotations

import os
import sys
from pathlib import Path, PurePosixPath

from ._version import __version__
from .card import CARD, model_card, variant_names
from .errors import InputError, ModelIntegrityError, PushError
from .hub import looks_like_repo_id
from .spec import MANIFEST, ModelSpec, read_spec, verify_files
from .tokenize import TOKENIZER_FILE


def files_to_push(folder: Path, spec: ModelSpec) -> list[str]:
    """The files a push uploads besides the card: every file the manifest lists (each variant's graph and weights,
    the tokenizer, the configs) and the manifest itself; nothing else lying in the folder.

    Raises:
        ModelIntegrityError: the manifest names a file outside the folder.
    """
    names = {*spec.files, TOKENIZER_FILE, *(f for variant in spec.variants.values() for f in variant.all_files)}
    for name in names:
        # a hand-edited manifest must not make a push upload files from elsewhere on the disk
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts or "\\" in name:
            raise ModelIntegrityError(
                f"{Path(folder) / MANIFEST} lists {name!r}, which is not a file inside the folder; re-export the model."
            )
    return sorted(names - {CARD, MANIFEST}) + [MANIFEST]


def push(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an exported bge-onnx folder to the hub repo ``repo_id``, with a model card generated from its manifest.

    The folder is checked first, with no network: its manifest must be valid and every file it lists must match its
    sha256, so that a corrupt or altered folder is never published. Then the repo is created if it does not exist
    (``private`` applies only then), and one commit uploads the manifest's files, the manifest and the card
    (README.md, written into the upload, not into ``folder``). A ``revision`` other than main is created as a branch
    from main if missing.

    Args:
        folder: a folder written by `bge-onnx export`.
        repo_id: 'owner/name'.
        revision: the branch to commit to (default: main).
        private: create the repo private.
        token: a hub token with write access (default: $HF_TOKEN, else the one `hf auth login` saved).
        commit_message: default: names the source model and the variants.

    Returns:
        The URL of the commit.

    Raises:
        ModelFilesError: the folder, its manifest or a file it lists is missing.
        ModelIntegrityError: the manifest is invalid or a file does not match its sha256.
        InputError: ``repo_id`` is not 'owner/name'.
        PushError: the hub refused the upload (no token, no write access) or cannot be reached.

    >>> push("bge-small-onnx", "me/bge-small-en-v1.5-onnx")  # doctest: +SKIP
    'https://huggingface.co/me/bge-small-en-v1.5-onnx/commit/...'
    """
    if not isinstance(repo_id, str) or not looks_like_repo_id(repo_id):
        raise InputError(f"repo_id must be a hub repo id 'owner/name', got {repo_id!r}")
    folder = Path(folder).expanduser()
    spec = read_spec(folder)
    names = files_to_push(folder, spec)
    verify_files(folder, spec, names[:-1], full=True)
    card = model_card(spec, repo_id, revision=revision).encode("utf-8")

    # here, not at the top: only a push needs huggingface_hub's upload side
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in names]
    for operation in operations[:-1]:  # the hash huggingface_hub computed for the upload, read after our check
        if operation.upload_info.sha256.hex() != spec.files[operation.path_in_repo]:
            raise ModelIntegrityError(f"{folder / operation.path_in_repo} changed while being pushed; push again.")
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card))
    api = HfApi(token=token)
    where = f"{repo_id!r}" + (f" (branch {revision!r})" if revision else "")
    # the transport errors of the HTTP client this huggingface_hub uses (requests before 1.0, then httpx, httpx2),
    # which it has imported by now; not OSError at large, which would also take a file vanishing mid-upload
    clients = [("httpx", "TransportError"), ("httpx2", "TransportError"), ("requests", "ConnectionError"),
               ("requests", "Timeout")]
    network_errors = tuple(getattr(sys.modules[module], name) for module, name in clients if module in sys.modules)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or _commit_message(spec),
            revision=revision,
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            found = "the hub refused the token" if (token or get_token()) else "no hub token was found"
            raise PushError(
                f"cannot push to {where}: {found} (401). Set HF_TOKEN to a token with write access "
                "(https://huggingface.co/settings/tokens), or run `hf auth login`."
            ) from err
        if status == 403:
            raise PushError(
                f"cannot push to {where}: the token has no write access to it (403). Push to a namespace you may "
                "write to, or use a token with write permission on this repo or organisation."
            ) from err
        raise PushError(f"cannot push to {where}: the hub answered {status}: {err}") from err
    except OfflineModeIsEnabled as err:
        raise PushError(f"cannot push to {where}: HF_HUB_OFFLINE is set; unset it to upload.") from err
    except network_errors as err:
        raise PushError(
            f"cannot push to {where}: the hub at {api.endpoint} cannot be reached ({err}); check the network, "
            "or HF_ENDPOINT if it is set."
        ) from err
    return str(info.commit_url)


def _commit_message(spec: ModelSpec) -> str:
    variants = ", ".join(variant_names(spec))
    return f"bge-onnx {__version__} export of {spec.source.get('id') or 'a local checkpoint'} ({variants})"
