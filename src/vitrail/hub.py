"""Share vitrail checkpoints on the Hugging Face Hub: check a folder, push it, pull it back.

A shareable checkpoint is the folder `save_pretrained` (or `scripts/train.py`) writes: `model.safetensors`,
`config.json` with an `auto_map`, the code files it names, and `preprocessor_config.json`; the model card
(`README.md`), plots and result files ride along. `check_checkpoint` refuses anything else before a byte
leaves the machine, and loads the folder with *its own* code files, as a user without vitrail would.

`push_checkpoint` makes one commit holding only the files that differ from the branch's head, so a checkpoint
is never half-updated on the Hub and an unchanged folder makes no commit at all. `pull_checkpoint` downloads
only what loading needs (weights, configs, code, card); into `local_dir` it downloads beside the target and
moves the files in only when everything arrived, so a failed pull leaves no partial checkpoint behind.

Hub failures are re-raised as `HubError`, with a message that names the repo, the revision and what went
wrong.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, constants, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

try:  # huggingface_hub >= 2 ships its own httpx fork
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

__all__ = [
    "CODE_FILES",
    "CheckpointError",
    "HubError",
    "check_checkpoint",
    "checkpoint_files",
    "pull_checkpoint",
    "push_checkpoint",
]

logger = logging.getLogger(__name__)

CODE_FILES = ("configuration_vitrail.py", "modeling_vitrail.py", "image_processing_vitrail.py")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

# What a push uploads, from the folder's top level only (checkpoint-*/ and other subfolders hold resume
# state).
PUSH_PATTERNS = ("*.safetensors", "*.json", "*.py", "*.md", "*.png")
# What a pull downloads: what loading needs, and the card.
PULL_PATTERNS = [
    "*.safetensors",
    WEIGHTS_INDEX,
    "config.json",
    "preprocessor_config.json",
    "*.py",
    "README.md",
]
# Files that unpickle (and so can run code) when loaded; Trainer resume state included.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib")
PICKLE_NAMES = ("optimizer.*", "scheduler.*", "rng_state*", "training_args.bin")

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


class CheckpointError(ValueError):
    """A folder that must not be shared as it is; the message says what to fix."""


class HubError(RuntimeError):
    """A Hub operation failed; the message names the repo, the revision and the cause."""

    def __init__(self, message: str, repo_id: str, revision: str | None):
        super().__init__(message)
        self.repo_id, self.revision = repo_id, revision


# ---- checking ----------------------------------------------------------------------------------------------


def checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` that a push uploads: top-level weights, JSON files, code, Markdown and PNGs."""
    folder = Path(folder)
    return sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith((".", "_"))
        and any(fnmatch.fnmatch(path.name, pattern) for pattern in PUSH_PATTERNS)
    )


def check_checkpoint(folder: str | os.PathLike) -> None:
    """Refuse (`CheckpointError`) a folder that is not a complete, loadable, pickle-free vitrail checkpoint.

    Checks, in order: no pickle files at the top level; weights as safetensors; a vitrail `config.json`;
    every code file its `auto_map` (and the processor's) names; `preprocessor_config.json`; card metadata
    that parses (if there is a README.md). Then it loads the model and the image processor through the
    folder's own code files (the code a Hub user runs, not the installed vitrail), runs one forward pass on a
    processed dummy image, and refuses the folder if anything fails or the output is not finite. The folder's
    code is executed: check only folders you are about to publish anyway.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder.")
    names = {path.name for path in folder.iterdir() if path.is_file()}
    pickles = sorted(
        name for name in names if any(fnmatch.fnmatch(name, p) for p in PICKLE_PATTERNS + PICKLE_NAMES)
    )
    if pickles:
        raise CheckpointError(
            f"{folder} holds pickle files ({', '.join(pickles)}). Loading a pickle can run arbitrary "
            "code, so they are never shared: delete them (weights belong in model.safetensors; optimizer, "
            "scheduler and RNG states stay in the local checkpoint-* folders, which are not pushed)."
        )

    problems = []
    if WEIGHTS not in names and WEIGHTS_INDEX not in names:
        problems.append(f"no {WEIGHTS}: save the model with `save_pretrained` (safetensors is its default)")
    config = _read_json(folder / "config.json", problems)
    processor_config = _read_json(folder / "preprocessor_config.json", problems)
    if config is not None:
        if config.get("model_type") != "vitrail":
            problems.append(f"config.json has model_type {config.get('model_type')!r}, not 'vitrail'")
        if "auto_map" not in config:
            problems.append("config.json has no auto_map: save with vitrail's classes so the code travels")
    code = set(CODE_FILES)
    for mapping in (config or {}).get("auto_map", {}), (processor_config or {}).get("auto_map", {}):
        # "other/repo--module.Class" points at code in another repo; it does not travel with this folder.
        code |= {f"{ref.split('.')[0]}.py" for ref in _references(mapping) if "--" not in ref}
    if "README.md" in names:
        try:  # the Hub refuses a commit whose card metadata does not parse; say so before uploading
            ModelCard.load(folder / "README.md", ignore_metadata_errors=False)
        except Exception as error:
            problems.append(f"README.md's metadata (the YAML block at its top) does not parse: {error}")
    if missing := sorted(code - names):
        problems.append(
            f"code files missing: {', '.join(missing)} (saving with `save_pretrained` copies them; without "
            "them the checkpoint does not open where vitrail is not installed)"
        )
    if problems:
        raise CheckpointError(f"{folder} is not a shareable vitrail checkpoint:\n- " + "\n- ".join(problems))
    _check_forward(folder, config, processor_config)


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"no {path.name}")
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        problems.append(f"{path.name} is not valid JSON ({error})")
        return None


def _references(auto_map: dict) -> list[str]:
    """`auto_map` values are "module.Class", or a pair of them (slow, fast) with None for a missing one."""
    values = []
    for value in auto_map.values():
        values += [v for v in (value if isinstance(value, list) else [value]) if v]
    return values


def _check_forward(folder: Path, config: dict, processor_config: dict) -> None:
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    architecture = (config.get("architectures") or ["VitrailModel"])[0]
    reference = next((r for r in _references(config["auto_map"]) if r.endswith(f".{architecture}")), None)
    if reference is None:
        raise CheckpointError(
            f"{folder}: config.json names the architecture {architecture}, which its auto_map does not map."
        )
    processor_reference = (processor_config.get("auto_map") or {}).get("AutoImageProcessor")
    if not processor_reference:
        raise CheckpointError(
            f"{folder}: preprocessor_config.json has no auto_map entry for AutoImageProcessor."
        )
    try:
        # The folder's copies of the code, imported as transformers does for trust_remote_code=True.
        model_class = get_class_from_dynamic_module(reference, str(folder))
        processor_class = get_class_from_dynamic_module(_references({0: processor_reference})[0], str(folder))
        model, info = model_class.from_pretrained(folder, output_loading_info=True)
        processor = processor_class.from_pretrained(folder)
    except Exception as error:
        raise CheckpointError(
            f"{folder} does not load with its own code: {type(error).__name__}: {error}"
        ) from error
    incomplete = {
        key: info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[key]
    }
    if incomplete:
        raise CheckpointError(f"{folder}: the weights do not match config.json: {incomplete}")

    size = model.config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    # An odd-sized RGB image: the processor must bring it to what the model reads.
    image = np.random.default_rng(0).integers(0, 256, (height + 7, width + 5, 3), dtype=np.uint8)
    try:
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            output = model.eval()(pixel_values=pixel_values).to_tuple()[0]
    except Exception as error:
        raise CheckpointError(
            f"{folder}: a forward pass on a processed dummy image fails: {type(error).__name__}: {error}"
        ) from error
    if not torch.isfinite(output).all():
        raise CheckpointError(
            f"{folder}: the model's output on a dummy image is not finite (NaN or inf weights?)."
        )


# ---- errors ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _hub_errors(action: str, repo_id: str, revision: str | None):
    """Re-raise huggingface_hub's errors as `HubError`s saying which repo, which revision, and what failed."""
    where = f"{action} '{repo_id}' (revision '{revision or 'main'}') at {constants.ENDPOINT}"
    try:
        yield
    except RepositoryNotFoundError as error:
        raise HubError(
            f"Cannot {where}: the repository was not found (it does not exist, or it is private and the "
            "token cannot see it).",
            repo_id,
            revision,
        ) from error
    except RevisionNotFoundError as error:
        raise HubError(
            f"Cannot {where}: the repository has no revision '{revision}' (a branch, tag or commit sha).",
            repo_id,
            revision,
        ) from error
    except RemoteEntryNotFoundError as error:
        raise HubError(
            f"Cannot {where}: the file {_file_of(error)} is missing from the repository.", repo_id, revision
        ) from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        if constants.is_offline_mode():
            message = (
                f"Cannot {action} '{repo_id}' (revision '{revision or 'main'}'): HF_HUB_OFFLINE is set and "
                f"it is not in the local cache ({constants.HF_HUB_CACHE}). Pull it once with the network on."
            )
        else:
            message = f"Cannot {where}: {_describe(error)}, and there is no complete copy in the local cache."
        raise HubError(message, repo_id, revision) from error
    except (HfHubHTTPError, httpx.HTTPError) as error:
        raise HubError(f"Cannot {where}: {_describe(error)}.", repo_id, revision) from error
    except ValueError as error:  # huggingface_hub's answer to a card the Hub's validate-yaml refuses
        if "README.md" not in str(error):
            raise
        raise HubError(
            f"Cannot {where}: the Hub refused the model card. {error}", repo_id, revision
        ) from error


def _describe(error: BaseException) -> str:
    """The root network or HTTP cause of `error`, in words."""
    while not isinstance(error, (HfHubHTTPError, httpx.HTTPError)) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status >= 500:
            return f"the server failed (HTTP {status}); try again later"
        if status in (401, 403):
            return f"the token is missing or may not do this (HTTP {status}); pass token= or log in"
        if status == 412:
            return "the branch moved while pushing (HTTP 412); push again"
        return f"the server refused the request (HTTP {status}: {str(error).splitlines()[0]})"
    if isinstance(error, httpx.TransportError):
        return f"the connection failed or was cut ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


def _file_of(error: RemoteEntryNotFoundError) -> str:
    url = str(error.response.url) if error.response is not None else ""
    match = re.search(r"/resolve/[^/]+/(.+)$", url)
    return f"'{match.group(1)}'" if match else "requested"


# ---- pushing -----------------------------------------------------------------------------------------------


def _same_content(path: Path, remote: RepoFile | None) -> bool:
    """Whether the local file equals the Hub's copy: git blob sha1 of a regular file, sha256 of an LFS one."""
    if remote is None or remote.size != path.stat().st_size:
        return False
    if remote.lfs is not None:
        digest, expected = hashlib.sha256(), remote.lfs.sha256
    else:
        digest, expected = hashlib.sha1(b"blob %d\0" % remote.size), remote.blob_id
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == expected


def push_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> CommitInfo | None:
    """Check `folder` and push it to the model repo `repo_id` as one commit.

    Args:
        folder: A checkpoint folder (see `check_checkpoint`). Top-level weights, JSON, code, Markdown and PNG
            files are uploaded; subfolders (such as the Trainer's `checkpoint-*`) are not.
        repo_id: `"namespace/name"`, or `"name"` for the token's own namespace. Created if missing.
        private: Visibility of a repo this call creates; an existing repo keeps its own.
        revision: The branch to commit to (default `main`); created from `main` if it does not exist yet.
        commit_message: Defaults to "Upload vitrail checkpoint <folder name>".
        token: A Hub token with write access; defaults to `HF_TOKEN` or the saved login.

    Returns:
        The `CommitInfo` of the new commit (`.commit_url`, `.oid`), or `None` when every file already matched
        the branch's head and nothing was committed. Files on the Hub that are not in the folder stay.
    """
    folder = Path(folder)
    check_checkpoint(folder)
    branch = revision or constants.DEFAULT_REVISION
    if COMMIT_SHA.fullmatch(branch):
        raise ValueError(f"revision={branch!r} is a commit sha; a push needs a branch name.")
    files = checkpoint_files(folder)
    api = HfApi(token=token)
    with _hub_errors("push to", repo_id, branch):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.repo_info(repo_id, revision=branch).sha
        remote = {
            entry.path: entry
            for entry in api.list_repo_tree(repo_id, revision=head, recursive=True)
            if isinstance(entry, RepoFile)
        }
        changed = [name for name in files if not _same_content(folder / name, remote.get(name))]
        if not changed:
            logger.info(
                "%s: all %d files already match %s@%s; nothing to commit.",
                folder,
                len(files),
                repo_id,
                branch,
            )
            return None
        logger.info(
            "Pushing %d changed file(s) to %s@%s: %s", len(changed), repo_id, branch, ", ".join(changed)
        )
        commit = api.create_commit(
            repo_id,
            [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in changed],
            commit_message=commit_message or f"Upload vitrail checkpoint {folder.resolve().name}",
            revision=branch,
            parent_commit=head,  # refuse (HTTP 412) rather than overwrite a push that landed meanwhile
        )
    # huggingface_hub also skips files whose remote oid matches; with none left it returns the unchanged head.
    return None if commit.oid == head else commit


# ---- pulling -----------------------------------------------------------------------------------------------


def _missing(folder: Path) -> list[str]:
    """The files loading needs that `folder` lacks."""
    names = {path.name for path in folder.iterdir()} if folder.is_dir() else set()
    missing = [name for name in ("config.json", "preprocessor_config.json", *CODE_FILES) if name not in names]
    if WEIGHTS not in names and WEIGHTS_INDEX not in names:
        missing.insert(0, WEIGHTS)
    return missing


def _require_loadable(folder: Path, repo_id: str, revision: str | None) -> None:
    if missing := _missing(folder):
        raise HubError(
            f"'{repo_id}' (revision '{revision or 'main'}') is not a complete vitrail checkpoint: it lacks "
            f"{', '.join(missing)}.",
            repo_id,
            revision,
        )


def pull_checkpoint(
    repo_id: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    token: str | None = None,
) -> Path:
    """Download the files a vitrail checkpoint needs from `repo_id` and return the folder that holds them.

    Args:
        repo_id: The model repo, `"namespace/name"`.
        revision: A branch, tag or commit sha; defaults to `main`.
        local_dir: Put the files here (created if needed; other files in it are left alone). They are
            downloaded into a temporary folder beside it and moved in only when all arrived. Without it, the
            files stay in the Hugging Face cache (`HF_HUB_CACHE`) and the snapshot folder is returned. With
            `HF_HUB_OFFLINE=1`, files come from the cache, or a complete checkpoint already in `local_dir` is
            returned as it is.
        token: A Hub token, for private repos.

    Returns:
        The folder: `local_dir`, or the cache's snapshot folder. It opens with `from_pretrained`.
    """
    download = dict(
        repo_id=repo_id, revision=revision, allow_patterns=PULL_PATTERNS, ignore_patterns=["*/*"], token=token
    )
    with _hub_errors("pull", repo_id, revision):
        if local_dir is None:
            folder = Path(snapshot_download(**download))
            _require_loadable(folder, repo_id, revision)
            return folder

        target = Path(local_dir).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.pull-", dir=target.parent))
        try:
            if constants.is_offline_mode():
                # Offline, the files can only come from the cache (copied: the cache keeps its own), or be the
                # ones an earlier pull left in `local_dir`.
                try:
                    cached = snapshot_download(**download)
                except LocalEntryNotFoundError:
                    if _missing(target):
                        raise
                    logger.warning(
                        "Offline: using the checkpoint already in %s (its revision is not checked).", target
                    )
                    return target
                shutil.copytree(cached, staging, dirs_exist_ok=True)
            else:
                snapshot_download(**download, local_dir=staging)
                # huggingface_hub's bookkeeping for the staging folder; meaningless once the files move.
                shutil.rmtree(staging / ".cache", ignore_errors=True)
            _require_loadable(staging, repo_id, revision)
            if not target.exists():
                staging.rename(target)
            else:
                for path in staging.iterdir():
                    os.replace(path, target / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target
