"""The output folder of a training run: what makes reruns safe after a kill or a change of settings.

- Files vitrail writes there are replaced atomically (`write_atomic`), so a kill leaves the old file or the new one.
- `check_output_dir` finds an unusable `--output_dir`, and `check_foreign_files` one that holds files a run would
  replace but that no run wrote, before any data is read.
- `find_resume_checkpoint` picks the newest *complete* `checkpoint-N` (the Trainer writes its files one by one, so a
  kill during a save leaves a partial folder that `get_last_checkpoint` would pick).
- `start_run` compares the settings of the run about to start with those recorded in the folder
  (`run_settings.json`, `data_split.json`) and decides: resume, start afresh, report a finished run, or refuse.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from .configuration_vitrail import VitrailConfig

logger = logging.getLogger(__name__)

RUN_SETTINGS = "run_settings.json"
DATA_SPLIT = "data_split.json"
# Written last by a run, so its presence means the run finished.
RESULTS = "all_results.json"
# Whether the push of a finished run landed (`--push_to_hub`); never pushed itself.
PUSH_RECORD = "hub_push.json"
# What a run writes at the top of its output folder; `--overwrite_output_dir` deletes these and checkpoint-*.
RUN_FILES = (
    RUN_SETTINGS, DATA_SPLIT, RESULTS, PUSH_RECORD, "model.safetensors", "model.safetensors.index.json",
    "config.json", "preprocessor_config.json", "configuration_vitrail.py", "modeling_vitrail.py",
    "image_processing_vitrail.py", "trainer_state.json", "training_args.json", "training_args.bin", "README.md",
    "training_curves.png", "confusion_matrix.png", "confusion_matrix.json",
)  # fmt: skip
# Config fields that describe how a model is run or saved, not the model that is trained (`problem_type` is
# filled in by the first training step).
_RUNTIME_CONFIG_FIELDS = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "label2id", "problem_type",
}  # fmt: skip


# ---- writing ----------------------------------------------------------------------------------------------------


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (atomic on POSIX and Windows)."""
    path = Path(path)
    # A dot-name beside the target: same file system for os.replace, and never pushed to the Hub.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (a folder from an older vitrail)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---- checking -------------------------------------------------------------------------------------------------


def check_model_source(source: str, flag: str = "--model_name_or_path") -> None:
    """A local path must exist; anything else must look like a Hub repo id. (Without this, a mistyped folder
    reaches the Hub client and comes back as "Repo id must be in the form ...".)"""
    path = Path(source).expanduser()
    if path.exists():
        return
    try:
        validate_repo_id(source)
        # "runs/digitz" is a valid repo id too; a first component that is a local folder says it is a path.
        is_repo_id = not path.parent.is_dir() or path.parent == Path(".")
    except HFValidationError:
        is_repo_id = False
    if not is_repo_id:
        raise ValueError(
            f"{flag} {source}: no such file or folder. Give a saved checkpoint folder or a Hub repo id "
            "(namespace/name)."
        )


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create `output_dir` if needed and prove it writable, so that a bad folder fails now, not after training."""
    folder = Path(output_dir)
    blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(
            f"--output_dir {folder} cannot be a folder: {blocking} is a file. Choose another --output_dir."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"--output_dir {folder} is not writable ({error.strerror or error}). Choose another --output_dir or "
            "fix its permissions."
        ) from error
    return folder


def check_foreign_files(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a folder without a run record (`run_settings.json`), checkpoints or results that holds files a run
    writes: they are the user's (a card, a config, a model pulled there), and a run would replace them. A run's own
    folder, an empty one, or one with other files only passes; so does any with `--overwrite_output_dir`, which
    deletes them."""
    folder = Path(output_dir)
    if overwrite or (folder / RUN_SETTINGS).is_file():
        return
    if (folder / RESULTS).is_file() or sort_checkpoints(str(folder), PREFIX_CHECKPOINT_DIR):
        return  # a run without a record (an older vitrail's?): `start_run` refuses it, naming the ways to resume
    # The split record is written just before the run record, so a run killed between the two leaves it alone.
    names = [
        name for name in RUN_FILES if name not in (DATA_SPLIT, PUSH_RECORD) and (folder / name).is_file()
    ]
    names += sorted(path.name for path in folder.glob("model-*-of-*.safetensors"))
    if names:
        raise ValueError(
            f"--output_dir {folder} holds {', '.join(names)}, but no {RUN_SETTINGS}: no vitrail run wrote them, "
            "and a run would replace them. Move them elsewhere or choose another --output_dir; "
            "--overwrite_output_dir deletes them."
        )


def _complete_zip(path: Path) -> bool:
    """torch.save writes a zip archive whose directory comes last: a cut-off file has none."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def _weights_problem(folder: Path) -> str | None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = (read_json(index) or {}).get("weight_map")
        if not weight_map:
            return f"{index.name} is unreadable"
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return "model.safetensors is missing"
    for name in files:
        try:
            # Opening reads the header and checks that the data it describes covers the whole file.
            with safe_open(str(folder / name), "pt") as weights:
                if "format" not in (weights.metadata() or {}):
                    return f"{name} has no format metadata"
        except Exception as error:  # SafetensorError, OSError: either way the file cannot be loaded
            return f"{name} is unreadable ({error})"
    return None


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why a Trainer `checkpoint-N` folder cannot be resumed from, or None if it is complete.

    The Trainer saves weights, then optimizer and scheduler, then RNG states, then `trainer_state.json`; each
    file is checked, in that order, to be whole (without unpickling anything), so the reason names the first
    file a kill cut short.
    """
    folder = Path(checkpoint)
    problem = _weights_problem(folder)
    if problem:
        return problem
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file():
            return f"{name} is missing"
        if not _complete_zip(folder / name):
            return f"{name} is cut off"
    rng_states = list(folder.glob("rng_state*.pth"))
    if not rng_states or not all(_complete_zip(path) for path in rng_states):
        return "the RNG state is missing or cut off"
    state = read_json(folder / "trainer_state.json")
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json is missing or cut off"
    return None


def find_resume_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir`, or None; logs each newer one it skips, and why."""
    for checkpoint in reversed(sort_checkpoints(str(output_dir), PREFIX_CHECKPOINT_DIR)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("Skipping %s, it is incomplete (killed while saving?): %s.", checkpoint, problem)
    return None


# ---- settings ------------------------------------------------------------------------------------------------


def model_settings(config) -> dict:
    """The fields of a model config that make it a different model, as JSON values."""
    names = {f.name for f in fields(VitrailConfig)} - _RUNTIME_CONFIG_FIELDS
    return _as_json({name: getattr(config, name, None) for name in sorted(names)})


def schedule_settings(training_args) -> dict:
    """The TrainingArguments that change what is trained, step by step."""
    keep = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "seed",
            "data_seed", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
            "optim_args", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "label_smoothing_factor",
            "bf16", "fp16", "max_steps")  # fmt: skip
    values = {name: getattr(training_args, name) for name in keep}
    if training_args.dataloader_drop_last:  # fewer steps an epoch; only when on, so older records match
        values["dataloader_drop_last"] = True
    # With a step budget the epoch count plays no part.
    values["num_train_epochs"] = None if training_args.max_steps > 0 else training_args.num_train_epochs
    return _as_json(values)


def _as_json(value):
    """JSON's view of `value` (tuples as lists, enums by value, int keys as strings): what a record reads back as."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))


def _flat(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value and key != "id2label":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: dict, new: dict) -> list[str]:
    """`"name: old -> new"` for each setting that differs between two records."""
    old, new = _flat(old), _flat(new)
    return [
        f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


# ---- the decision ---------------------------------------------------------------------------------------------


@dataclass
class RunStart:
    """What `start_run` decided: resume from `checkpoint` (None: from step 0), or, when `finished` holds the
    results of a finished run with the same settings, do nothing."""

    checkpoint: str | None = None
    finished: dict | None = None


def _delete_run(folder: Path) -> None:
    checkpoints = [Path(path) for path in sort_checkpoints(str(folder), PREFIX_CHECKPOINT_DIR)]
    files = [folder / name for name in RUN_FILES if (folder / name).is_file()]
    files += folder.glob("model-*-of-*.safetensors")
    for path in checkpoints:
        shutil.rmtree(path)
    for path in files:
        path.unlink()
    if checkpoints or files:
        logger.warning("--overwrite_output_dir: deleted %s", ", ".join(p.name for p in checkpoints + files))


def start_run(training_args, settings: dict, split: dict, check=None) -> RunStart:
    """Decide how a run starts in `training_args.output_dir` (made by `check_output_dir`), and record its settings
    there.

    `settings` (model config, data, schedule) and `split` (the data split record) are compared with those of the
    run already in the folder. The same: resume from the newest complete checkpoint, or return the results of a
    finished run. Different, or unknown (checkpoints without a record): refuse with a `ValueError` naming the
    differences and the ways out. `--overwrite_output_dir` deletes the old run first. `check()`, when given, runs
    once the run is known to need training, before its records are written (a check of the data). An explicit
    `--resume_from_checkpoint` is the user's call: it must be complete and hold the same model config; other
    differences are only logged. In a multi-process run the main process decides and writes first.
    """
    with training_args.main_process_first(desc="output folder", local=training_args.save_on_each_node):
        start = _decide(
            training_args.output_dir,
            settings,
            split,
            # Trainer users may pass transformers' TrainingArguments, which lacks the flag.
            overwrite=getattr(training_args, "overwrite_output_dir", False),
            resume_from_checkpoint=training_args.resume_from_checkpoint,
            should_save=training_args.should_save,
            check=check,
        )
    if start.finished is not None:
        logger.warning(
            "%s already holds this run, finished, with the same settings: returning its results without "
            "training. Pass --overwrite_output_dir to train it again.",
            training_args.output_dir,
        )
        pushed = read_json(Path(training_args.output_dir) / PUSH_RECORD)
        if isinstance(pushed, dict) and not pushed.get("landed") and not training_args.push_to_hub:
            logger.warning(
                "Its push to %s did not land (%s): rerun with --push_to_hub to push it.",
                pushed.get("repo_id"),
                pushed.get("error") or "interrupted",
            )
    elif start.checkpoint:
        logger.warning("Resuming from %s.", start.checkpoint)
    return start


def _decide(
    output_dir: str | os.PathLike,
    settings: dict,
    split: dict,
    *,
    overwrite: bool,
    resume_from_checkpoint: str | None,
    should_save: bool,
    check=None,
) -> RunStart:
    folder = Path(output_dir)
    old_settings, old_split = read_json(folder / RUN_SETTINGS), read_json(folder / DATA_SPLIT)
    if overwrite and should_save:
        _delete_run(folder)
        old_settings = old_split = None
    checkpoints = sort_checkpoints(str(folder), PREFIX_CHECKPOINT_DIR)
    holds_run = old_settings is not None or checkpoints or (folder / RESULTS).is_file()
    changed = (
        differences({**old_settings, "split": old_split}, {**settings, "split": split})
        if isinstance(old_settings, dict) and isinstance(old_split, dict)
        else None
    )
    ways_out = (
        "Pass --overwrite_output_dir to delete its checkpoints and results and start again, or choose "
        "another --output_dir."
    )
    if resume_from_checkpoint:
        problem = checkpoint_problem(resume_from_checkpoint)
        if problem:
            raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint} is incomplete: {problem}.")
        saved = model_settings(VitrailConfig.from_pretrained(resume_from_checkpoint))
        mismatch = differences(saved, settings["model"]["config"])
        if mismatch:
            raise ValueError(
                f"--resume_from_checkpoint {resume_from_checkpoint} holds another model:\n  "
                + "\n  ".join(mismatch)
                + "\nResume with the model settings it was trained with, or start a new run."
            )
        if changed:
            logger.warning(
                "Resuming %s with changed settings:\n  %s", resume_from_checkpoint, "\n  ".join(changed)
            )
        start = RunStart(checkpoint=resume_from_checkpoint)
    elif holds_run and changed is None:
        raise ValueError(
            f"--output_dir {folder} holds checkpoints or results of a run whose settings were not recorded "
            f"({RUN_SETTINGS} or {DATA_SPLIT} is missing), so resuming it cannot be checked. Pass "
            "--resume_from_checkpoint DIR to resume one of its checkpoints anyway. " + ways_out
        )
    elif changed:
        raise ValueError(
            f"--output_dir {folder} holds a run with other settings:\n  "
            + "\n  ".join(changed)
            + "\nResuming it would mix the two runs. "
            + ways_out
        )
    elif isinstance(results := read_json(folder / RESULTS), dict):
        return RunStart(finished=results)
    else:
        start = RunStart(checkpoint=find_resume_checkpoint(folder))
    if check is not None:
        check()
    if should_save:
        # The results (and push) of an earlier run are stale from here on. The run record goes last: a folder
        # with one is a run's (`check_foreign_files`), and a kill before it leaves a folder that starts afresh.
        (folder / RESULTS).unlink(missing_ok=True)
        (folder / PUSH_RECORD).unlink(missing_ok=True)
        write_json_atomic(folder / DATA_SPLIT, split)
        write_json_atomic(folder / RUN_SETTINGS, settings)
    return start
