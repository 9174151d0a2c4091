"""Share vitrail checkpoints on the Hugging Face Hub: push a checked folder, pull it back.

A push uploads the files `checkpoint_files` allows, once `check_checkpoint` has passed the folder (both from
`vitrail.checkpoint_folder`), as one commit on the branch head it read. A pull downloads one revision at one commit
sha, every file checked against the Hub's tree listing, and replaces a local folder's checkpoint only once all
arrived intact; an error or SIGTERM leaves no partial folder behind, and files that are not a checkpoint's stay.

Every request has a time-out (`timeout=`, seconds); idempotent ones are retried with backoff. Whatever goes wrong
is a `HubError` whose message names the repo, the revision and the cause.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
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

from .checkpoint_folder import (
    CARD,
    CODE_FILES,
    CONFIGS,
    PLOTS,  # noqa: F401  (training.py reads it from here)
    PULL_RECORD,
    WEIGHTS,
    WEIGHTS_INDEX,
    CheckpointError,
    auto_map_references,
    check_checkpoint,
    checkpoint_files,
    code_files,
    importable_modules,
    is_module_file,
    is_weights,
    json_object,
    json_or_empty,
    not_pushed,
    shard_names,
)

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

DEFAULT_TIMEOUT = 10.0  # seconds a request may wait to connect, or between two reads or writes
RETRIES = 2  # more tries for an idempotent request that timed out or lost its connection
BACKOFF = 0.5  # seconds before the first retry; doubled for each next one

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


class HubError(RuntimeError):
    """A Hub operation failed; the message names the repo, the revision and the cause."""

    def __init__(self, message: str, repo_id: str, revision: str | None):
        super().__init__(message)
        self.repo_id, self.revision = repo_id, revision


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
    """Give every request huggingface_hub makes `seconds` to connect and between two reads or writes: its shared
    client has no time-out, and some calls pass `timeout=None` (repo info, tree listings). The limit is a request
    hook that `_hub` puts on that client; it is process-wide, so other threads' Hub calls get the limit meanwhile."""
    limit = httpx.Timeout(seconds).as_dict()

    def limit_request(request):
        request.extensions["timeout"] = limit

    _limits.append(limit_request)
    try:
        yield
    finally:
        _limits.remove(limit_request)
        client = get_session()
        hooks = [hook for hook in client.event_hooks["request"] if hook is not limit_request]
        client.event_hooks = {**client.event_hooks, "request": hooks}


def _hub(call: Callable, *args, retry: bool = True, **kwargs):
    """`call(*args, **kwargs)`, a huggingface_hub call, under the time limits in force; tried again (RETRIES times,
    waiting BACKOFF seconds and twice as long each next time) after a time-out or a lost connection if `retry`."""
    for attempt in range(RETRIES + 1):
        # Hooks, not set_client_factory: that has no getter, so a user's factory (proxy, certificates) could not be
        # put back. After a refused connection huggingface_hub makes a new client: hooked here for the next call.
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
        The `CommitInfo` of the new commit (`.commit_url`, `.oid`), or `None` when every file already matched the
        branch's head. The commit also deletes weights of the other layout (`model.safetensors` vs. an index and
        shards) that the branch holds; other files on the Hub that are not in the folder stay.
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
            if is_weights(sibling.rfilename) and sibling.rfilename not in files
        )
        if stale:
            logger.info("Deleting weights the folder lacks from %s@%s: %s", repo_id, branch, ", ".join(stale))
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
    must match the size and sha the Hub's tree listing gives for it (`HfApi.verify_repo_checksums`).

    Args:
        repo_id: The model repo, `"namespace/name"`.
        revision: A branch, tag or commit sha; defaults to `main`.
        local_dir: Put the checkpoint here (created if needed); the files arrive in a hidden folder beside it and
            move in once all arrived intact. They replace what an earlier pull recorded there and the checkpoint
            files (`checkpoint_files`: the other weights layout, plots, results) of a vitrail checkpoint there (a
            `config.json` of model_type "vitrail" beside weights); other files stay. A folder with files a
            checkpoint would hold (`README.md`, `all_results.json`, ...) but no checkpoint and no record of them is
            refused by name before any request (a code file only the repo's `auto_map` names: before anything
            moves in). `.vitrail-pull.json` records the repo, the revision, its commit sha and each file's
            sha256. Without `local_dir`, the files stay in the Hugging Face cache and its snapshot folder is
            returned. With `HF_HUB_OFFLINE=1` they come from the cache; failing that, `local_dir` is returned
            only if its record says it holds this repo at this revision.
        token: A Hub token, for private repos.
        timeout: Seconds each request may wait for the server; requests that only read are retried.
        overwrite: Replace (or remove) the files of `local_dir` that a checkpoint would hold even where neither a
            checkpoint nor a pull record says they are a checkpoint's. Files no checkpoint holds stay, even then.

    Returns:
        The folder: `local_dir`, or the cache's snapshot folder. It opens with `from_pretrained`.
    """
    _validate("pull", repo_id, revision)
    fail = functools.partial(_error, "pull", repo_id, revision)
    target = None if local_dir is None else Path(local_dir).resolve()
    if target is not None and target.exists() and not target.is_dir():
        raise fail(f"local_dir {target} is a file, not a folder.")
    # Before any request: the files every pull writes, or may (code files, README.md), must be replaceable.
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
        download = functools.partial(
            hf_hub_download, repo_id, revision=info.sha, local_dir=staging, token=token, etag_timeout=timeout
        )

        def fetch(wanted: list[str]) -> Path:
            """Download `wanted` at the commit into `staging` (or the cache), check all there, and say where."""
            # File by file in this thread, not with snapshot_download: its worker threads finish a download (or wait
            # out its time-out) before SIGTERM can end the process, which then outlives a `docker stop`'s grace.
            for name in wanted:
                try:  # huggingface_hub retries a download itself, and skips a file it already brought
                    _hub(download, name, retry=False)
                except OSError as error:
                    if isinstance(error, (HfHubHTTPError, LocalEntryNotFoundError)):
                        raise
                    # e.g. huggingface_hub's check that the body is as long as the file's metadata said
                    raise fail(f"{name} did not download intact ({str(error).splitlines()[0]}).") from error
            result = _hub(api.verify_repo_checksums, repo_id, revision=info.sha, local_dir=staging)
            # A file that does not match is deleted (in the cache, its blob too), so that nothing loads it later.
            for bad in result.mismatches:
                path = result.verified_path / bad["path"]
                for copy in {path.resolve(), path}:
                    copy.unlink(missing_ok=True)
            if bad := (result.mismatches or [None])[0]:
                raise fail(
                    f"{bad['path']} does not match the sha the Hub lists for it ({bad['actual']} instead of "
                    f"{bad['expected']}): it was altered on the server or on the way, and is not used."
                )
            if lost := sorted(set(wanted) & set(result.missing_paths)):
                raise fail(f"{', '.join(lost)} did not arrive, though the Hub lists them.")
            return result.verified_path

        pulled = _files_to_pull({name for name in names if "/" not in name}, fetch, fail)
        folder = fetch(pulled)
        if staging is None:
            _remember_revision(folder, revision, info.sha)
            return folder
        _install(staging, target, _record(repo_id, revision, info.sha, staging, pulled), overwrite, fail)
    return target


def _pull_offline(repo_id: str, revision: str | None, target: Path | None, overwrite: bool) -> Path:
    """The pull from the cache alone; or `target` as it is, if its record says it holds this revision."""
    fail = functools.partial(_error, "pull", repo_id, revision)
    cached = try_to_load_from_cache(repo_id, CONFIGS[0], revision=revision or constants.DEFAULT_REVISION)
    if not isinstance(cached, str):
        record = json_or_empty(target / PULL_RECORD) if target is not None else {}
        if record and _holds(target, record, repo_id, revision):
            logger.info(
                "Offline: %s has %s at commit %s (its record).", target, repo_id, record.get("commit")
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
        _install(staging, target, _record(repo_id, revision, snapshot.name, staging, names), overwrite, fail)
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
    auto_maps = [json_object(folder / name, fail).get("auto_map") for name in configs]
    if elsewhere := ", ".join(sorted({ref for ref in auto_map_references(*auto_maps) if "--" in ref})):
        note = "not pulled; trust_remote_code=True fetches and runs it from there"
        logger.warning("auto_map points at code in other repos (%s): %s.", elsewhere, note)
    code = sorted(code_files(*auto_maps))
    for name in code:
        if not is_module_file(name):
            raise fail(f"auto_map names the code file {name!r}, which is not a plain module file name.")
        if name.removesuffix(".py") in importable_modules():
            raise fail(
                f"auto_map names the code file {name}, which would shadow the module "
                f"'{name.removesuffix('.py')}' (standard library or installed); a checkpoint's code never does."
            )
    if weights == [WEIGHTS_INDEX]:
        shards = sorted(shard_names(json_object(fetch(weights) / WEIGHTS_INDEX, fail)))
        if not shards or not all(_is_plain_name(name) and name.endswith(".safetensors") for name in shards):
            raise fail(
                f"{WEIGHTS_INDEX} names no shards, or shards that are not plain .safetensors file names."
            )
        weights += shards
    missing += [name for name in code + weights if name not in available]
    if missing:
        raise fail(f"the revision is not a complete vitrail checkpoint: it lacks {', '.join(missing)}.")
    return [*CONFIGS, *code, *weights, *([CARD] if CARD in available else [])]


def _is_plain_name(name: str) -> bool:
    """A file name with no folder part, that is not hidden."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def _remember_revision(snapshot: Path, revision: str | None, sha: str) -> None:
    """Point the cache's `refs/<revision>` at `sha`, as hf_hub_download does when it resolves a branch or tag
    (downloads by sha record none), so that offline loads by repo id find the snapshot."""
    revision = revision or constants.DEFAULT_REVISION
    if revision != sha:
        ref = snapshot.parent.parent / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)


def _record(repo_id: str, revision: str | None, sha: str, folder: Path, names: list[str]) -> dict:
    """What `PULL_RECORD` says of a pull: the repo, the revision, its commit and each file's sha256."""
    files = {}
    for name in names:
        with (folder / name).open("rb") as file:
            files[name] = {"sha256": sha_fileobj(file).hex()}
    return {
        "repo_id": repo_id,
        "revision": revision or constants.DEFAULT_REVISION,
        "commit": sha,
        "files": files,
    }


def _install(
    staging: Path, target: Path, record: dict, overwrite: bool, fail: Callable[[str], HubError]
) -> None:
    """Make `target` hold the checkpoint staged in `staging`, recorded by `record`: a new target is the staging
    folder renamed; otherwise (once `_refuse_to_clobber` found nothing there that is not the pull's to replace) the
    old checkpoint goes first, its record and every checkpoint file there or in its record that is not one now
    (the other weights layout, old shards, code, plots, results), then the new files move in, the record last.
    Interrupted half-way, the folder has no record and fails to load for want of weights, not with stale ones."""
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
    files = json_or_empty(folder / PULL_RECORD).get("files")
    return {name for name in files if _is_plain_name(name)} if isinstance(files, dict) else set()


def _checkpoint_there(folder: Path) -> set[str]:
    """The files of `folder` a checkpoint would hold: what `checkpoint_files` names, and weights by their name."""
    return set(checkpoint_files(folder)) | {path.name for path in folder.iterdir() if is_weights(path.name)}


def _holds_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a vitrail checkpoint: a `config.json` of model_type "vitrail", and weights."""
    return json_or_empty(folder / "config.json").get("model_type") == "vitrail" and any(
        (folder / name).is_file() for name in (WEIGHTS, WEIGHTS_INDEX)
    )


def _refuse_to_clobber(target: Path, incoming: set[str], fail: Callable[[str], HubError]) -> None:
    """Refuse a pull into `target` that would overwrite or remove a file it may not replace: one named `incoming`,
    or one a checkpoint would hold (`_checkpoint_there`: a user's README.md, its figure, `all_results.json`), where
    neither an earlier pull's record nor a vitrail checkpoint in the folder says it is a checkpoint's."""
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
    ends; only where SIGTERM would end it outright (no handler) and in the main thread, where handlers run."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def unwind(signum, frame):
        raise SystemExit(128 + signum)  # the exit status of a process that SIGTERM ended

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
