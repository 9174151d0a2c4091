"""What a shareable vitrail checkpoint folder holds, and the checks it passes before it is shared.

`checkpoint_files` is the allowlist a push uploads (from the folder's top level only), `not_pushed` what it leaves
out, and `check_checkpoint` refuses a folder with symbolic links or pickles, an incomplete one, or one that does not
load and run through its own code files. `vitrail.hub` pushes and pulls such folders.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.metadata
import json
import keyword
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard

__all__ = ["CODE_FILES", "CheckpointError", "check_checkpoint", "checkpoint_files", "not_pushed"]

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

# Images in a card: Markdown `![alt](name.png)` or HTML `<img src="name.png">`.
CARD_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img\s[^>]*src=[\"']([^\"']+)", re.IGNORECASE)


class CheckpointError(ValueError):
    """A folder that must not be shared as it is; the message says what to fix."""


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
        shared |= files & shard_names(json_or_empty(folder / WEIGHTS_INDEX))
    auto_maps = [json_or_empty(folder / name).get("auto_map") for name in CONFIGS]
    shared |= files & {name for name in code_files(*auto_maps) if is_module_file(name)}
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


def is_weights(name: str) -> bool:
    return name in (WEIGHTS, WEIGHTS_INDEX) or SHARD.fullmatch(name) is not None


def shard_names(index: dict) -> set[str]:
    """The shard files a `model.safetensors.index.json` names."""
    weight_map = index.get("weight_map")
    return (
        {name for name in weight_map.values() if isinstance(name, str)}
        if isinstance(weight_map, dict)
        else set()
    )


def json_or_empty(path: Path) -> dict:
    """`path` parsed, or {} when it is missing or not a JSON object (`check_checkpoint` says which)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def json_object(path: Path, fail: Callable[[str], Exception]) -> dict:
    """`path` parsed, which must be a JSON object; else `fail(why)` is raised."""
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise fail(f"{path.name} is not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise fail(f"{path.name} is not a JSON object (it holds a {type(data).__name__}).")
    return data


def code_files(*auto_maps: dict | None) -> set[str]:
    """The code files `auto_map`s name: "module.Class" -> "module.py"."""
    # "other/repo--module.Class" points at code in another repo; it does not travel with this one.
    return {f"{ref.split('.')[0]}.py" for ref in auto_map_references(*auto_maps) if "--" not in ref}


def auto_map_references(*auto_maps: dict | None) -> list[str]:
    """`auto_map` values are "module.Class", or a pair of them (slow, fast) with None for a missing one."""
    values = []
    for auto_map in auto_maps:
        for value in (auto_map if isinstance(auto_map, dict) else {}).values():
            values += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return values


def is_module_file(name: str) -> bool:
    """Whether `name` is a plain `identifier.py` file name: no folder, nothing Python could not import."""
    stem = name.removesuffix(".py")
    return name.endswith(".py") and stem.isascii() and stem.isidentifier() and not keyword.iskeyword(stem)


@functools.cache  # reading every installed distribution's file list takes a fraction of a second
def importable_modules() -> frozenset[str]:
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
    code = set(CODE_FILES) | code_files(
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
        if name in code_files({auto: ref})
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
        return json_object(path, CheckpointError)
    except CheckpointError as error:
        problems.append(str(error).removesuffix("."))
        return None


def _check_forward(folder: Path, config: dict, processor_config: dict) -> None:
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    architecture = (config.get("architectures") or ["VitrailModel"])[0]
    reference = next(
        (r for r in auto_map_references(config["auto_map"]) if r.endswith(f".{architecture}")), None
    )
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
        processor_class = get_class_from_dynamic_module(
            auto_map_references({0: processor_reference})[0], str(folder)
        )
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
