"""Share vitrail checkpoints on the Hugging Face Hub: check a folder, push it, pull it back.

A push uploads one declared allowlist (`checkpoint_files`), and only once `check_checkpoint` has found the folder
free of symbolic links and pickles, complete and loadable; it lands as one commit on the branch head it read
(`push_checkpoint`). A pull downloads one revision at one commit sha, each file checked against the Hub's tree
listing, and replaces a local folder's checkpoint only once every file arrived intact (`pull_checkpoint`); an
error or SIGTERM leaves no partial folder behind, and files that are not a checkpoint's stay untouched.

Every request has a time-out (`timeout=`, seconds); idempotent ones are retried with backoff. Whatever goes wrong
is a `HubError` whose message names the repo, the revision and the cause.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import importlib.metadata
import json
import keyword
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    constants,
    get_session,
    hf_hub_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.utils.sha import sha_fileobj

try:  # huggingface_hub >= 2 ships its own httpx fork
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

__all__ = [
    "CODE_FILES",
    "DEFAULT_TIMEOUT",
    "CheckpointError",
    "HubError",
    "check_checkpoint",
    "checkpoint_files",
    "not_pushed",
    "pull_checkpoint",
    "push_checkpoint",
]

logger = logging.getLogger(__name__)

CODE_FILES = ("configuration_vitrail.py", "modeling_vitrail.py", "image_processing_vitrail.py")

# ---- what a checkpoint is: the allowlist a push uploads, from the folder's top level only ----
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights: the index, and the shards it names
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # transformers' shard names
CONFIGS = ("config.json", "preprocessor_config.json")  # and the code files their `auto_map` names
CARD = "README.md"  # and the PNG files it shows
PLOTS = ("training_curves.png", "confusion_matrix.png")  # what scripts/train.py draws
RESULTS = (  # what scripts/train.py records
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "test_results.json",
    "trainer_state.json",
    "training_args.json",
    "confusion_matrix.json",
    "data_split.json",
)
PULL_RECORD = ".vitrail-pull.json"  # which revision a pull put into a folder; never pushed

# Files that unpickle (and so can run code) when loaded; Trainer resume state included.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib")
PICKLE_NAMES = ("optimizer.*", "scheduler.*", "rng_state*", "training_args.bin")

DEFAULT_TIMEOUT = 10.0  # seconds a request may wait to connect, or between two reads or writes
RETRIES = 2  # more tries for an idempotent request that timed out or lost its connection
BACKOFF = 0.5  # seconds before the first retry; doubled for each next one

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# Images in a card: Markdown `![alt](name.png)` or HTML `<img src="name.png">`.
CARD_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img\s[^>]*src=[\"']([^\"']+)", re.IGNORECASE)


class CheckpointError(ValueError):
    """A folder that must not be shared as it is; the message says what to fix."""


class HubError(RuntimeError):
    """A Hub operation failed; the message names the repo, the revision and the cause."""

    def __init__(self, message: str, repo_id: str, revision: str | None):
        super().__init__(message)
        self.repo_id, self.revision = repo_id, revision


# ---- what a folder shares ----------------------------------------------------------------------------------


def checkpoint_files(folder: str | os.PathLike, include: Sequence[str] = ()) -> list[str]:
    """The files of `folder` a push uploads, by name: the checkpoint's allowlist and the extras `include` asks for.

    The allowlist: `model.safetensors`, or `model.safetensors.index.json` and the shards it names; `config.json`,
    `preprocessor_config.json` and the code files (`name.py`) their `auto_map` names; `README.md` and the PNG
    files it shows; the plots (`training_curves.png`, `confusion_matrix.png`) and result files
    (`all_results.json`, `trainer_state.json`, ...) the trainer writes. Only top-level files count, and never the
    pull record (`.vitrail-pull.json`).

    Args:
        folder: A checkpoint folder.
        include: Patterns (`fnmatch`, e.g. `"*.txt"`) of further top-level files to upload. A pattern with a "/"
            or one that matches no file raises `CheckpointError`.
    """
    folder = Path(folder)
    files = {path.name for path in folder.iterdir() if path.is_file() or path.is_symlink()}
    shared = files & {WEIGHTS, WEIGHTS_INDEX, *CONFIGS, CARD, *PLOTS, *RESULTS}
    if WEIGHTS_INDEX in files:
        shared |= files & _shards(_json_or_empty(folder / WEIGHTS_INDEX))
    auto_maps = [_json_or_empty(folder / name).get("auto_map") for name in CONFIGS]
    shared |= files & {name for name in _code_files(*auto_maps) if _is_module_file(name)}
    if CARD in files:
        links = (a or b for a, b in CARD_IMAGE.findall((folder / CARD).read_text(errors="replace")))
        shared |= files & {link.removeprefix("./") for link in links if link.lower().endswith(".png")}
    for pattern in include:
        if "/" in pattern or os.sep in pattern:
            raise CheckpointError(
                f"include pattern {pattern!r} names a path: patterns match the names of files at the top of "
                f"{folder}; subfolders are never pushed."
            )
        matched = {name for name in files if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            raise CheckpointError(f"include pattern {pattern!r} matches no file at the top of {folder}.")
        shared |= matched
    return sorted(shared - {PULL_RECORD})


def not_pushed(folder: str | os.PathLike, include: Sequence[str] = ()) -> list[str]:
    """What a push leaves out of `folder`: every other top-level entry, folders with a trailing "/"."""
    folder = Path(folder)
    shared = set(checkpoint_files(folder, include))
    return sorted(
        path.name + "/" * (path.is_dir() and not path.is_symlink())
        for path in folder.iterdir()
        if path.name not in shared
    )


def _is_weights(name: str) -> bool:
    return name in (WEIGHTS, WEIGHTS_INDEX) or SHARD.fullmatch(name) is not None


def _shards(index: dict) -> set[str]:
    """The shard files a `model.safetensors.index.json` names."""
    weight_map = index.get("weight_map")
    return (
        {name for name in weight_map.values() if isinstance(name, str)}
        if isinstance(weight_map, dict)
        else set()
    )


def _json_or_empty(path: Path) -> dict:
    """`path` parsed, or {} when it is missing or not a JSON object (`check_checkpoint` says which)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _code_files(*auto_maps: dict | None) -> set[str]:
    """The code files `auto_map`s name: "module.Class" -> "module.py"."""
    # "other/repo--module.Class" points at code in another repo; it does not travel with this one.
    return {f"{ref.split('.')[0]}.py" for ref in _references(*auto_maps) if "--" not in ref}


def _references(*auto_maps: dict | None) -> list[str]:
    """`auto_map` values are "module.Class", or a pair of them (slow, fast) with None for a missing one."""
    values = []
    for auto_map in auto_maps:
        for value in (auto_map if isinstance(auto_map, dict) else {}).values():
            values += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return values


def _is_module_file(name: str) -> bool:
    """Whether `name` is a plain `identifier.py` file name: no folder, nothing Python could not import."""
    stem = name.removesuffix(".py")
    return name.endswith(".py") and stem.isascii() and stem.isidentifier() and not keyword.iskeyword(stem)


@functools.cache  # reading every installed distribution's file list takes a fraction of a second
def _importable_modules() -> frozenset[str]:
    """The top-level modules of the standard library and of the installed distributions."""
    installed = importlib.metadata.packages_distributions()
    return frozenset({*sys.stdlib_module_names, *sys.builtin_module_names, *installed})


# ---- checking ----------------------------------------------------------------------------------------------


def check_checkpoint(folder: str | os.PathLike) -> None:
    """Refuse (`CheckpointError`) a folder that is not a complete, loadable, pickle-free vitrail checkpoint.

    Checks, in order: no symbolic links and no pickle files at the top level; weights as safetensors, in one
    layout (a single file, or an index and its shards); a vitrail `config.json`;
    every code file its `auto_map` (and the processor's) names; `preprocessor_config.json`; card metadata
    that parses (if there is a README.md). Then it loads the model and the image processor through the
    folder's own code files (the code a Hub user runs, not the installed vitrail), runs one forward pass on a
    processed dummy image, and refuses the folder if anything fails or the output is not finite. The folder's
    code is executed: check only folders you are about to publish anyway.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder.")
    if links := sorted(path for path in folder.iterdir() if path.is_symlink()):
        raise CheckpointError(
            f"{folder} holds symbolic links ({', '.join(f'{p.name} -> {os.readlink(p)}' for p in links)}). A push "
            "never follows a link, so that nothing outside the folder is shared by accident: replace each link "
            "by a copy of what it points to, or remove it."
        )
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
    if WEIGHTS in names and WEIGHTS_INDEX in names:
        problems.append(
            f"both {WEIGHTS} and {WEIGHTS_INDEX} (with its shards): transformers loads {WEIGHTS} and ignores "
            "the shards; delete the layout that is not the current model"
        )
    config = _read_json(folder / "config.json", problems)
    processor_config = _read_json(folder / "preprocessor_config.json", problems)
    if config is not None:
        if config.get("model_type") != "vitrail":
            problems.append(f"config.json has model_type {config.get('model_type')!r}, not 'vitrail'")
        if "auto_map" not in config:
            problems.append("config.json has no auto_map: save with vitrail's classes so the code travels")
    code = set(CODE_FILES) | _code_files(
        (config or {}).get("auto_map"), (processor_config or {}).get("auto_map")
    )
    if "README.md" in names:
        try:  # the Hub refuses a commit whose card metadata does not parse; say so before uploading
            ModelCard.load(folder / "README.md", ignore_metadata_errors=False)
        except Exception as error:
            problems.append(f"README.md's metadata (the YAML block at its top) does not parse: {error}")
    for name in sorted(code - names):
        problems.append(_missing_code(name, config, processor_config))
    if problems:
        raise CheckpointError(f"{folder} is not a shareable vitrail checkpoint:\n- " + "\n- ".join(problems))
    _check_forward(folder, config, processor_config)


def _missing_code(name: str, config: dict | None, processor_config: dict | None) -> str:
    """Why a code file is needed and what writes it: the model's `save_pretrained` copies the model's two files,
    the image processor's `save_pretrained` its own."""
    named_by = [
        f"{json_name}'s auto_map[{auto!r}]"
        for json_name, mapping in (("config.json", config), ("preprocessor_config.json", processor_config))
        for auto, ref in ((mapping or {}).get("auto_map") or {}).items()
        if name in _code_files({auto: ref})
    ]
    why = f"named by {', '.join(named_by)}" if named_by else "part of every vitrail checkpoint"
    if name == CODE_FILES[2]:
        fix = "save the image processor into this folder (`processor.save_pretrained(folder)` copies it)"
    elif name in CODE_FILES:
        fix = "save the model with vitrail's classes (`model.save_pretrained(folder)` copies it)"
    else:
        fix = "add the file, or save again with the classes that wrote that auto_map entry"
    return (
        f"code file {name} is missing ({why}); {fix}. Without it the checkpoint does not open where vitrail is "
        "not installed"
    )


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"no {path.name}")
        return None
    try:
        return _json_object(path, CheckpointError)
    except CheckpointError as error:
        problems.append(str(error).removesuffix("."))
        return None


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
    # transformers caches the code of a local folder under the folder's name (5.0) or name and code hash (5.24):
    # whatever the version, the code that ran must be the folder's own, not one cached for a same-named folder.
    classes = (model_class, model_class.config_class, processor_class)
    running = {Path(sys.modules[cls.__module__].__file__) for cls in classes}
    stale = sorted(
        file.name
        for file in running
        if not (folder / file.name).is_file() or file.read_bytes() != (folder / file.name).read_bytes()
    )
    if stale:
        raise CheckpointError(
            f"{folder}: the code transformers gave for {stale} is not the folder's own (it ran a module cached for "
            "another folder of the same name in this process); check the folder in a new process."
        )

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


# ---- errors and time limits --------------------------------------------------------------------------------


def _error(action: str, repo_id: str, revision: str | None, cause: str) -> HubError:
    """`HubError("Cannot <action> '<repo>' (revision '<rev>') at <endpoint>: <cause>")`."""
    where = f"{action} '{repo_id}' (revision '{revision or constants.DEFAULT_REVISION}')"
    if not constants.is_offline_mode():
        where += f" at {constants.ENDPOINT}"
    return HubError(f"Cannot {where}: {cause}", repo_id, revision)


def _validate(action: str, repo_id: str, revision: str | None) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise _error(action, repo_id, revision, f"that is not a valid repo id ({error})") from error


@contextlib.contextmanager
def _hub_errors(action: str, repo_id: str, revision: str | None, timeout: float):
    """Re-raise huggingface_hub's errors as `HubError`s saying which repo, which revision, and what failed."""
    fail = functools.partial(_error, action, repo_id, revision)
    try:
        yield
    except RepositoryNotFoundError as error:
        raise fail(
            "the repository was not found (it does not exist, or it is private and the token cannot see it)."
        ) from error
    except RevisionNotFoundError as error:
        raise fail(f"the repository has no revision '{revision}' (a branch, tag or commit sha).") from error
    except RemoteEntryNotFoundError as error:
        raise fail(f"the file {_file_of(error)} is missing from the repository.") from error
    except OfflineModeIsEnabled as error:
        raise fail("HF_HUB_OFFLINE is set; unset it to reach the Hub.") from error
    except (HfHubHTTPError, LocalEntryNotFoundError, httpx.HTTPError) as error:
        raise fail(f"{_describe(error, timeout)}.") from error
    except ValueError as error:  # huggingface_hub's answer to a card the Hub's validate-yaml refuses
        if "README.md" not in str(error):
            raise
        raise fail(f"the Hub refused the model card. {error}") from error


def _describe(error: BaseException, timeout: float) -> str:
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
    if isinstance(error, httpx.TimeoutException):
        try:
            request = f"{error.request.method} {error.request.url}"
        except RuntimeError:  # raised before a request was made
            request = "a request"
        return f"the server did not answer {request} within {timeout:g} s (timeout=; a slow link needs more)"
    if isinstance(error, httpx.TransportError):
        return f"the connection failed or was cut ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


def _file_of(error: RemoteEntryNotFoundError) -> str:
    url = str(error.response.url) if error.response is not None else ""
    match = re.search(r"/resolve/[^/]+/(.+)$", url)
    return f"'{match.group(1)}'" if match else "requested"


_limits: list[Callable] = []  # the request hooks of the `_time_limits` in force


@contextlib.contextmanager
def _time_limits(seconds: float):
    """Give every request huggingface_hub makes `seconds` to connect and between two reads or writes.

    Its shared httpx client is made without a time-out, and several calls pass `timeout=None` themselves (repo
    info, tree listings). A request hook on that client sets the limit on each request, whatever it asked for; the
    client is process-wide, so huggingface_hub calls in other threads get the same limit meanwhile.
    """
    limit = httpx.Timeout(seconds).as_dict()

    def limit_request(request):
        request.extensions["timeout"] = limit

    _limits.append(limit_request)
    try:
        yield
    finally:
        _limits.remove(limit_request)
        client = get_session()
        client.event_hooks = {
            **client.event_hooks,
            "request": [hook for hook in client.event_hooks["request"] if hook is not limit_request],
        }


def _hub(call: Callable, *args, retry: bool = True, **kwargs):
    """`call(*args, **kwargs)`, a huggingface_hub call, under the time limits in force; tried again (RETRIES times,
    waiting BACKOFF seconds and twice as long each next time) after a time-out or a lost connection if `retry`."""
    for attempt in range(RETRIES + 1):
        # huggingface_hub has no public getter for its client factory (set_client_factory could not be undone), so
        # the limits are hooks on its shared client, put (back) here: it makes a new one after a refused connection.
        client = get_session()
        if missing := [hook for hook in _limits if hook not in client.event_hooks["request"]]:
            client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks["request"], *missing]}
        try:
            return call(*args, **kwargs)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as error:
            if not retry or attempt == RETRIES:
                raise
            wait = BACKOFF * 2**attempt
            logger.warning("%s: %s; trying again in %g s.", call.__name__, type(error).__name__, wait)
            time.sleep(wait)


# ---- pushing -----------------------------------------------------------------------------------------------


def push_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    include: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> CommitInfo | None:
    """Check `folder` and push its checkpoint files to the model repo `repo_id` as one commit.

    Args:
        folder: A checkpoint folder (see `check_checkpoint`). The files `checkpoint_files` names are uploaded;
            the others are logged as not pushed (`not_pushed`). Subfolders (such as the Trainer's
            `checkpoint-*`) and symbolic links never are.
        repo_id: `"namespace/name"`, or `"name"` for the token's own namespace. Created if missing.
        private: Visibility of a repo this call creates; an existing repo keeps its own.
        revision: The branch to commit to (default `main`); created from `main` if it does not exist yet.
        commit_message: Defaults to "Upload vitrail checkpoint <folder name>".
        token: A Hub token with write access; defaults to `HF_TOKEN` or the saved login.
        include: Patterns of further top-level files to upload on purpose (see `checkpoint_files`).
        timeout: Seconds each request may wait for the server; requests that only read are retried.

    Returns:
        The `CommitInfo` of the new commit (`.commit_url`, `.oid`), or `None` when every file already matched
        the branch's head and nothing was committed. The commit also deletes weights of the other layout (a
        single `model.safetensors` vs. an index and shards) that the branch holds; other files on the Hub that
        are not in the folder stay.
    """
    folder = Path(folder)
    branch = revision or constants.DEFAULT_REVISION
    _validate("push to", repo_id, branch)
    if COMMIT_SHA.fullmatch(branch):
        raise _error("push to", repo_id, branch, "a commit sha is not a branch; pass a branch name.")
    check_checkpoint(folder)
    files = checkpoint_files(folder, include)
    if left_out := not_pushed(folder, include):
        logger.info("Not pushed (not part of the checkpoint; include= adds files): %s", ", ".join(left_out))
    api = HfApi(token=token)
    with _hub_errors("push to", repo_id, branch, timeout), _time_limits(timeout):
        repo_id = _hub(api.create_repo, repo_id, private=private, exist_ok=True).repo_id
        if branch != constants.DEFAULT_REVISION:
            _hub(api.create_branch, repo_id, branch=branch, exist_ok=True)
        info = _hub(api.repo_info, repo_id, revision=branch)
        # transformers loads model.safetensors before an index: weights the folder no longer holds must go.
        stale = sorted(
            sibling.rfilename
            for sibling in info.siblings or ()
            if _is_weights(sibling.rfilename) and sibling.rfilename not in files
        )
        if stale:
            logger.info(
                "Deleting weights the folder does not hold from %s@%s: %s", repo_id, branch, ", ".join(stale)
            )
        commit = _hub(
            api.create_commit,
            repo_id,
            [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in files]
            + [CommitOperationDelete(path_in_repo=name) for name in stale],
            commit_message=commit_message or f"Upload vitrail checkpoint {folder.resolve().name}",
            revision=branch,
            parent_commit=info.sha,  # refuse (HTTP 412) rather than overwrite a push that landed meanwhile
            retry=False,
        )
    # huggingface_hub leaves out files the branch holds unchanged; with none left it answers with the head.
    return None if commit.oid == info.sha else commit


# ---- pulling -----------------------------------------------------------------------------------------------


def pull_checkpoint(
    repo_id: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    overwrite: bool = False,
) -> Path:
    """Download the checkpoint at one revision of `repo_id`, each file checked, and return its folder.

    The revision is resolved to a commit sha once and every file is downloaded at that sha: `config.json` and
    `preprocessor_config.json` first, then the code files their `auto_map` names (a name that is not a plain
    `module.py`, or that would shadow an importable module such as `torch.py`, is refused), the weights (one
    file, or the index and the shards it names) and `README.md`. Nothing else, whatever the repo holds. Each file
    must match the size and sha the Hub's tree listing gives for it (git blob sha1, or sha256 for LFS files).

    Args:
        repo_id: The model repo, `"namespace/name"`.
        revision: A branch, tag or commit sha; defaults to `main`.
        local_dir: Put the checkpoint here (created if needed). The files arrive in a hidden folder beside it
            and are moved in only when all arrived intact. They replace what an earlier pull recorded there and
            the checkpoint files (those `checkpoint_files` names, e.g. the other weights layout, plots, results)
            of a vitrail checkpoint the folder holds (a `config.json` of model_type "vitrail" beside weights);
            other files stay. A folder holding files a checkpoint would (`README.md`, `all_results.json`, a
            `config.json`, ...) but no checkpoint and no record of them is refused before anything is
            downloaded, naming those files (a code file that only the repo's `auto_map` names: once it is known,
            before anything moves in). `.vitrail-pull.json` records the repo, the revision, its commit sha
            and each file's sha256. Without `local_dir`, the files stay in the Hugging Face cache
            (`HF_HUB_CACHE`) and its snapshot folder is returned.
            With `HF_HUB_OFFLINE=1`, the files come from the cache; failing that, `local_dir` is returned only if
            its record says it holds this repo at this revision.
        token: A Hub token, for private repos.
        timeout: Seconds each request may wait for the server; requests that only read are retried.
        overwrite: Replace (or remove) the files of `local_dir` that a checkpoint would hold even where neither a
            checkpoint nor a pull record says they are a checkpoint's. Files no checkpoint holds stay, even then.

    Returns:
        The folder: `local_dir`, or the cache's snapshot folder. It opens with `from_pretrained`.
    """
    _validate("pull", repo_id, revision)
    target = None if local_dir is None else Path(local_dir).resolve()
    if target is not None and target.exists() and not target.is_dir():
        raise _error("pull", repo_id, revision, f"local_dir {target} is a file, not a folder.")
    # Before any request: the files every pull writes, or may (code files, README.md), must be replaceable.
    fail = functools.partial(_error, "pull", repo_id, revision)
    if target is not None and not overwrite:
        _refuse_to_clobber(target, {*CONFIGS, *CODE_FILES, WEIGHTS, WEIGHTS_INDEX, CARD}, fail)
    with _hub_errors("pull", repo_id, revision, timeout):
        if constants.is_offline_mode():
            return _pull_offline(repo_id, revision, target, overwrite)
        with _time_limits(timeout):
            return _pull(repo_id, revision, target, token, timeout, overwrite)


def _pull(
    repo_id: str,
    revision: str | None,
    target: Path | None,
    token: str | None,
    timeout: float,
    overwrite: bool,
) -> Path:
    fail = functools.partial(_error, "pull", repo_id, revision)
    api = HfApi(token=token)
    info = _hub(api.repo_info, repo_id, revision=revision)
    names = [sibling.rfilename for sibling in info.siblings or ()]
    if odd := sorted(name for name in names if "\0" in name):
        raise fail(f"the server lists file names with a NUL byte ({', '.join(map(repr, odd))}); no Hub does.")

    with _staging_beside(target) if target is not None else contextlib.nullcontext() as staging:
        fetched: dict[str, Path] = {}

        def fetch(wanted: list[str]) -> Path:
            """Download `wanted` at the commit into `staging` (or the cache), check what is there, say where."""
            # File by file in this thread, not with snapshot_download: its worker threads finish a download (or wait
            # out its time-out) before SIGTERM can end the process, which then outlives a `docker stop`'s grace.
            for name in [name for name in wanted if name not in fetched]:
                try:
                    fetched[name] = Path(
                        _hub(
                            hf_hub_download,
                            repo_id,
                            name,
                            revision=info.sha,
                            local_dir=staging,
                            token=token,
                            etag_timeout=timeout,
                            retry=False,  # huggingface_hub retries downloads itself
                        )
                    )
                except OSError as error:
                    if isinstance(error, (HfHubHTTPError, LocalEntryNotFoundError)):
                        raise
                    # e.g. huggingface_hub's check that the body is as long as the file's metadata said
                    raise fail(f"{name} did not download intact ({str(error).splitlines()[0]}).") from error
            _verify(api, repo_id, info.sha, staging, wanted, fail)
            return fetched[wanted[0]].parent

        pulled = _files_to_pull({name for name in names if "/" not in name}, fetch, fail)
        folder = fetch(pulled)
        if staging is None:
            _remember_revision(folder, revision, info.sha)
            return folder
        record = _record(repo_id, revision, info.sha, {name: _sha256(staging / name) for name in pulled})
        _install(staging, target, record, overwrite, fail)
    return target


def _verify(
    api: HfApi,
    repo_id: str,
    sha: str,
    local_dir: Path | None,
    wanted: list[str],
    fail: Callable[[str], HubError],
) -> None:
    """Check the files in `local_dir` (or the cache's snapshot of `sha`) against the Hub's tree listing: git blob
    sha1, or sha256 for LFS files. A file that does not match is deleted (in the cache: its blob and its link) and
    refused; so is a pull that lacks one of `wanted`."""
    result = _hub(api.verify_repo_checksums, repo_id, revision=sha, local_dir=local_dir)
    for mismatch in result.mismatches:
        path = result.verified_path / mismatch["path"]
        for copy in {path.resolve(), path}:
            copy.unlink(missing_ok=True)
    if result.mismatches:
        bad = result.mismatches[0]
        raise fail(
            f"{bad['path']} does not match the sha the Hub lists for it ({bad['actual']} instead of "
            f"{bad['expected']}): it was altered on the server or on the way, and is not used."
        )
    if lost := sorted(set(wanted) & set(result.missing_paths)):
        raise fail(f"{', '.join(lost)} did not arrive, though the Hub lists them.")


def _pull_offline(repo_id: str, revision: str | None, target: Path | None, overwrite: bool) -> Path:
    """The pull from the cache alone; or `target` as it is, if its record says it holds this revision."""
    fail = functools.partial(_error, "pull", repo_id, revision)
    cached = try_to_load_from_cache(repo_id, CONFIGS[0], revision=revision or constants.DEFAULT_REVISION)
    if not isinstance(cached, str):
        record = _json_or_empty(target / PULL_RECORD) if target is not None else {}
        if record and _holds(target, record, repo_id, revision):
            logger.info(
                "Offline: %s holds %s at commit %s (its pull record says so).",
                target,
                repo_id,
                record.get("commit"),
            )
            return target
        if record:
            there = f"; {target} holds '{record.get('repo_id')}' at revision '{record.get('revision')}'"
        elif target is not None and target.is_dir() and checkpoint_files(target):
            there = f"; {target} holds a checkpoint with no pull record, from an unknown repo"
        else:
            there = ""
        raise fail(
            f"HF_HUB_OFFLINE is set and it is not in the local cache ({constants.HF_HUB_CACHE}){there}. "
            "Pull it once with the network on."
        )
    snapshot = Path(cached).parent  # the cache keeps each commit's files in snapshots/<commit sha>/
    names = _files_to_pull({path.name for path in snapshot.iterdir()}, lambda wanted: snapshot, fail)
    if target is None:
        return snapshot
    with _staging_beside(target) as staging:
        for name in names:
            shutil.copyfile(snapshot / name, staging / name)
        digests = {name: _sha256(staging / name) for name in names}
        _install(staging, target, _record(repo_id, revision, snapshot.name, digests), overwrite, fail)
    return target


def _holds(folder: Path, record: dict, repo_id: str, revision: str | None) -> bool:
    """Whether a pull record says `folder` holds `repo_id` at `revision` (a branch, tag or the commit), whole."""
    files = record.get("files")
    return (
        record.get("repo_id") == repo_id
        and (revision or constants.DEFAULT_REVISION) in (record.get("revision"), record.get("commit"))
        and isinstance(files, dict)
        and all(_is_plain_name(name) and (folder / name).is_file() for name in files)
    )


def _files_to_pull(
    available: set[str], fetch: Callable[[list[str]], Path], fail: Callable[[str], HubError]
) -> list[str]:
    """The files `pull_checkpoint` downloads (and the refusals it lists) of a revision whose top level holds
    `available`; `fetch(names)` brings the configs and the weights index here to read them, and says where."""
    weights = [name for name in (WEIGHTS, WEIGHTS_INDEX) if name in available][:1]  # transformers' preference
    missing = ([] if weights else [WEIGHTS]) + [name for name in CONFIGS if name not in available]
    configs = [name for name in CONFIGS if name in available]
    folder = fetch(configs) if configs else None
    auto_maps = [_json_object(folder / name, fail).get("auto_map") for name in configs]
    if elsewhere := sorted({ref for ref in _references(*auto_maps) if "--" in ref}):
        logger.warning(
            "auto_map points at code in other repos (%s): not pulled; trust_remote_code=True fetches and runs it "
            "from there.",
            ", ".join(elsewhere),
        )
    code = sorted(_code_files(*auto_maps))
    for name in code:
        if not _is_module_file(name):
            raise fail(f"auto_map names the code file {name!r}, which is not a plain module file name.")
        if name.removesuffix(".py") in _importable_modules():
            raise fail(
                f"auto_map names the code file {name}, which would shadow the module "
                f"'{name.removesuffix('.py')}' (standard library or installed); a checkpoint's code never does."
            )
    if weights == [WEIGHTS_INDEX]:
        shards = sorted(_shards(_json_object(fetch(weights) / WEIGHTS_INDEX, fail)))
        if not shards or not all(_is_plain_name(name) and name.endswith(".safetensors") for name in shards):
            raise fail(
                f"{WEIGHTS_INDEX} names no shards, or shards that are not plain .safetensors file names."
            )
        weights += shards
    missing += [name for name in code + weights if name not in available]
    if missing:
        raise fail(f"the revision is not a complete vitrail checkpoint: it lacks {', '.join(missing)}.")
    return [*CONFIGS, *code, *weights, *([CARD] if CARD in available else [])]


def _json_object(path: Path, fail: Callable[[str], Exception]) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise fail(f"{path.name} is not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise fail(f"{path.name} is not a JSON object (it holds a {type(data).__name__}).")
    return data


def _is_plain_name(name: str) -> bool:
    """A file name with no folder part, that is not hidden."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return sha_fileobj(file).hex()


def _remember_revision(snapshot: Path, revision: str | None, sha: str) -> None:
    """Point the cache's `refs/<revision>` at `sha`, as hf_hub_download does when it resolves a branch or tag
    (downloads by sha record none), so that offline loads by repo id find the snapshot."""
    revision = revision or constants.DEFAULT_REVISION
    if revision != sha:
        ref = snapshot.parent.parent / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)


def _record(repo_id: str, revision: str | None, sha: str, digests: dict[str, str]) -> dict:
    return {
        "repo_id": repo_id,
        "revision": revision or constants.DEFAULT_REVISION,
        "commit": sha,
        "files": {name: {"sha256": digest} for name, digest in digests.items()},
    }


def _install(
    staging: Path, target: Path, record: dict, overwrite: bool, fail: Callable[[str], HubError]
) -> None:
    """Make `target` hold the checkpoint staged in `staging`, recorded by `record`.

    A new target is the staging folder renamed. Otherwise, once `_refuse_to_clobber` has found nothing there that
    is not the pull's to replace (or `overwrite` says to replace it anyway), the previous checkpoint goes first (its
    record, and every file that was a checkpoint file there or in its record and is not one now: the other weights
    layout, old shards, old code, old plots and results), then the new files move in, the record last; other files
    stay. Interrupted half-way, the folder has no record, and loading it fails for want of weights rather than
    loading stale ones.
    """
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
    (staging / PULL_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if not target.exists():
        staging.rename(target)
        return
    if not overwrite:  # again with the files that came: code files other than vitrail's three, a card or none
        _refuse_to_clobber(target, set(record["files"]), fail)
    old = _checkpoint_there(target) | _recorded(target)
    (target / PULL_RECORD).unlink(missing_ok=True)
    for name in sorted(old - set(record["files"])):
        if not (target / name).is_dir() or (target / name).is_symlink():
            (target / name).unlink(missing_ok=True)
    for name in [*record["files"], PULL_RECORD]:
        os.replace(staging / name, target / name)


def _recorded(folder: Path) -> set[str]:
    """The files the pull record of `folder` lists (plain names only)."""
    files = _json_or_empty(folder / PULL_RECORD).get("files")
    return {name for name in files if _is_plain_name(name)} if isinstance(files, dict) else set()


def _checkpoint_there(folder: Path) -> set[str]:
    """The files of `folder` a checkpoint would hold: what `checkpoint_files` names, and weights by their name."""
    return set(checkpoint_files(folder)) | {path.name for path in folder.iterdir() if _is_weights(path.name)}


def _holds_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a vitrail checkpoint: a `config.json` of model_type "vitrail", and weights."""
    return _json_or_empty(folder / "config.json").get("model_type") == "vitrail" and any(
        (folder / name).is_file() for name in (WEIGHTS, WEIGHTS_INDEX)
    )


def _refuse_to_clobber(target: Path, incoming: set[str], fail: Callable[[str], HubError]) -> None:
    """Refuse a pull into `target` that would overwrite or remove a file a pull may not replace there.

    A pull may replace the files an earlier pull recorded, and the checkpoint files of a vitrail checkpoint the
    folder holds. It would touch the files there named `incoming` and, as the old checkpoint's, every file a
    checkpoint would hold (`_checkpoint_there`): a user's `README.md`, the figure it shows, `all_results.json`.
    """
    if not target.is_dir():
        return
    touched = _checkpoint_there(target) | {path.name for path in target.iterdir() if path.name in incoming}
    mine = _recorded(target) | (_checkpoint_there(target) if _holds_checkpoint(target) else set())
    if clobbered := sorted(touched - mine):
        raise fail(
            f"local_dir {target} holds {', '.join(clobbered)}, which the pull would overwrite or remove, and "
            "neither a vitrail checkpoint there nor the record of an earlier pull says they belong to a checkpoint; "
            "the folder is left as it was. Pull into an empty or new folder, or pass overwrite=True "
            "(--overwrite) to replace them (files no checkpoint holds stay, even then)."
        )


@contextlib.contextmanager
def _staging_beside(target: Path):
    """A new hidden folder beside `target`, removed on the way out: after success, an error, or SIGTERM."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_unwinds():
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.pull-", dir=target.parent))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_unwinds():
    """Turn SIGTERM into `SystemExit(143)` while this runs, so that `finally` blocks clean up before the process
    ends. Only where SIGTERM would end the process outright (no handler installed) and in the main thread, the
    only one Python runs signal handlers in."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    ):
        yield
        return

    def unwind(signum, frame):
        raise SystemExit(128 + signum)  # the exit status of a process that SIGTERM ended

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
