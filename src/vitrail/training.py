"""Fine-tuning and training from scratch with transformers' Trainer; `scripts/train.py` is the command line.

Runs unchanged as `python scripts/train.py ...` and `accelerate launch --multi_gpu --num_processes N
scripts/train.py ...`: the Trainer takes its distributed setup from Accelerate (DDP; FSDP only on GPUs, and
`check_fsdp` refuses it where Accelerate would drop it).
"""

from __future__ import annotations

import copy
import gc
import glob
import hashlib
import json
import logging
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, Image, load_dataset
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed
from transformers.trainer_callback import DefaultFlowCallback
from transformers.trainer_utils import speed_metrics

from .configuration_vitrail import VitrailConfig
from .convert import fit_processor_to, load_image_processor, processor_output_hw
from .data import (
    SAMPLE_ID,
    AugmentationConfig,
    BatchAugment,
    black_level,
    check_columns,
    check_files,
    digits_dataset,
    image_folder_dataset,
    mode_problem,
    split_dataset,
    tar_labels,
)
from .image_processing_vitrail import VitrailImageProcessor
from .modeling_vitrail import VitrailForImageClassification, VitrailForMaskedImageModeling
from .run_folder import (
    DATA_SPLIT,
    PUSH_RECORD,
    RESULTS,
    RunStart,
    check_foreign_files,
    check_model_source,
    check_output_dir,
    model_settings,
    read_json,
    schedule_settings,
    start_run,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "sklearn-digits"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint (folder or Hub id) to fine-tune: vitrail's, or any transformers or timm one "
            "vitrail converts (ViT, DeiT, DINOv2, CLIP, SigLIP, EVA-02, ...), converted on load with its "
            "architecture options and preprocessing."
        },
    )
    variant: str | None = field(
        default=None,
        metadata={"help": "Train from scratch at this size, e.g. 'Ti/16' (see VitrailConfig.VARIANTS)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated config fields, e.g. 'hidden_size=128,num_hidden_layers=4,pooling=mean'."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input size; a checkpoint made for another size gets resampled positions."},
    )
    layer_decay: float | None = field(
        default=None, metadata={"help": "Layer-wise learning-rate decay (e.g. 0.75); None disables it."}
    )
    fp8: bool = field(
        default=False,
        metadata={
            "help": "Train the encoder's linear layers in float8 (torchao's float8 training; needs torchao, "
            "--bf16 true and an NVIDIA GPU of compute capability 8.9 or later). Checkpoints stay plain."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"A Hub dataset (needs network). Default: {DEFAULT_DATASET}, embedded."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's config name."})
    train_files: str | None = field(
        default=None,
        metadata={
            "help": "Training files for --dataset_name's loader, a glob, e.g. --dataset_name webdataset "
            "--train_files 'data/train-*.tar'."
        },
    )
    validation_files: str | None = field(
        default=None,
        metadata={"help": "Held-out files for --dataset_name's loader (a glob), for evaluation."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read --dataset_name as a stream: no download or pass over the data before training; needs "
            "--max_steps. Each process of a multi-process run reads its own share."
        },
    )
    class_names_file: str | None = field(
        default=None,
        metadata={
            "help": "A text file with one class name a line (line i names label i), for data whose labels are "
            "numbers without names."
        },
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "Image folder <dir>/<class>/<image> to train on."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for validation."})
    image_column_name: str = field(
        default="image",
        metadata={"help": "Column holding the images (default: 'image', else jpg, jpeg, png or webp)."},
    )
    label_column_name: str = field(
        default="label", metadata={"help": "Column holding the class labels (default: 'label', else cls)."}
    )
    test_size: float = field(
        default=0.2, metadata={"help": "Held-out test fraction when the data has no test split."}
    )
    validation_size: float = field(
        default=0.1,
        metadata={"help": "Validation fraction (of the whole) when the data has no validation split."},
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the stratified splits."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate training data (for tests)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate validation/test data."})
    crop_scale: float = field(default=1.0, metadata={"help": "RandomResizedCrop min area (1.0 = no crop)."})
    hflip: float = field(default=0.0, metadata={"help": "Horizontal flip probability."})
    rotation: float = field(default=0.0, metadata={"help": "Random rotation, degrees."})
    translate: float = field(default=0.0, metadata={"help": "Random shift, fraction of the side."})
    scale_jitter: float = field(default=0.0, metadata={"help": "Random zoom range +-."})
    rand_augment: bool = field(default=False, metadata={"help": "Apply RandAugment."})
    mixup_alpha: float = field(default=0.0, metadata={"help": "MixUp alpha (0 disables)."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix alpha (0 disables)."})
    cache_pixels: bool | None = field(
        default=None,
        metadata={
            "help": "Process images once instead of every epoch (default: when the result fits in 1 GiB)."
        },
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={
            "help": "Leave out images that cannot be read or decoded (listed in all_results.json and the model "
            "card) instead of stopping."
        },
    )


@dataclass
class VitrailTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments, plus the flag that transformers 5 removed."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete the checkpoints and results of an earlier run in --output_dir before training; "
            "without it a rerun resumes that run, and only if its settings match."
        },
    )
    dataloader_num_workers: int = field(
        default=-1,
        metadata={
            "help": "Processes that decode, resize and augment images beside training. -1 (default): the CPUs "
            "available to each training process when images are processed on the fly, none for cached pixels."
        },
    )
    dataloader_persistent_workers: bool | None = field(
        default=None,
        metadata={
            "help": "Keep the data workers between epochs and evaluations (default: yes, when there are any)."
        },
    )


def batch_augment(data_args: DataArguments, processor) -> BatchAugment | None:
    """The geometric augmentation the flags ask for, filling with the processor's black; None when they ask none."""
    aug = AugmentationConfig(
        crop_scale=data_args.crop_scale,
        hflip=data_args.hflip,
        rotation=data_args.rotation,
        translate=data_args.translate,
        scale=data_args.scale_jitter,
    )
    return BatchAugment(aug, fill=black_level(processor)) if aug.geometric else None


def parse_overrides(text: str | None) -> dict[str, Any]:
    """'a=1,b=mean,c=true' -> typed values for VitrailConfig's fields; an unknown name fails here, a wrong type
    when the config is built."""
    if not text:
        return {}
    known = {f.name for f in fields(VitrailConfig)}
    values: dict[str, Any] = {}
    for item in text.split(","):
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or name not in known:
            raise ValueError(
                f"--config_overrides: cannot use {item!r}; write name=value with a VitrailConfig field."
            )
        lowered = raw.lower()
        if lowered in ("true", "false"):
            values[name] = lowered == "true"
        elif lowered in ("none", "null"):
            values[name] = None
        else:
            try:
                number = float(raw)
                values[name] = (
                    int(number) if number.is_integer() and "." not in raw and "e" not in lowered else number
                )
            except ValueError:
                values[name] = raw
    return values


# ---- checks -------------------------------------------------------------------------------------------------


def check_schedule(training_args: TrainingArguments) -> None:
    """Refuse a training length or batch size that trains nothing (the Trainer would run 0 steps and exit 0)."""
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(
            f"--max_steps {training_args.max_steps}: give a positive number of optimizer steps, or -1 (the "
            "default) to train for --num_train_epochs."
        )
    if training_args.max_steps == -1 and not training_args.num_train_epochs > 0:
        raise ValueError(
            f"--num_train_epochs {training_args.num_train_epochs} trains nothing: give a positive number of "
            "epochs (fractions work), or a step budget with --max_steps."
        )
    if training_args.per_device_train_batch_size < 1:
        raise ValueError(
            f"--per_device_train_batch_size {training_args.per_device_train_batch_size}: give at least 1."
        )


def check_split_fractions(data_args: DataArguments) -> None:
    for flag, value in (
        ("--test_size", data_args.test_size),
        ("--validation_size", data_args.validation_size),
    ):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{flag} {value}: give a fraction of the data in [0, 1); 0 skips that split.")
    if data_args.test_size + data_args.validation_size >= 1.0:
        raise ValueError(
            f"--test_size {data_args.test_size} and --validation_size {data_args.validation_size} leave no data "
            "to train on: make their sum less than 1."
        )


def check_process_group(training_args: TrainingArguments) -> None:
    """Refuse a launch whose processes did not join one process group, or that asks for FSDP where Accelerate
    would not shard. torchrun, or `accelerate launch --multi_gpu`, on a machine without GPUs and without
    `--use_cpu true` starts N processes that each train alone, all writing the same output folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise RuntimeError(
            f"This job was launched as {launched} processes (WORLD_SIZE={launched}), but they did not join one "
            f"process group (the Trainer sees {training_args.world_size}). Without GPUs, add `--use_cpu true` so "
            "that they train together over gloo (docs/guides/training.md, 'Several processes')."
        )
    check_fsdp(training_args)


def check_fsdp(training_args: TrainingArguments) -> None:
    """Refuse an FSDP request that Accelerate would drop without a word. Accelerate shards only a launch on GPUs
    (or other accelerators): on CPUs it trains plain DDP, every process holding the whole model and optimizer
    state, which is not what a user asking for FSDP has the memory for; in a process that no launcher started, it
    trains one unsharded model (transformers refuses its own `--fsdp` flag there, not Accelerate's variable)."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    asked = []
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        asked.append(
            "`accelerate launch --use_fsdp` or an FSDP `accelerate config` (ACCELERATE_USE_FSDP=true)"
        )
    if training_args.fsdp:
        asked.append("the Trainer flag `--fsdp`")
    state = training_args.distributed_state
    unsharded = (DistributedType.NO, DistributedType.MULTI_CPU)
    if not asked or state is None or state.distributed_type not in unsharded:
        return
    if state.distributed_type == DistributedType.MULTI_CPU:
        instead = (
            "runs on CPUs, where it would train plain DDP over gloo, each process holding the whole model"
        )
    else:
        instead = "is one process that no launcher started, which it would train unsharded"
    raise RuntimeError(
        f"FSDP was asked for ({' and '.join(asked)}), but Accelerate shards only a multi-process launch on GPUs, "
        f"and this job {instead}. On CPUs, drop the FSDP flags: `accelerate launch --multi_gpu --num_processes N "
        "scripts/train.py ... --use_cpu true` trains with DDP (docs/guides/training.md, 'Several processes'). "
        "To shard, launch on GPUs with `accelerate launch --use_fsdp ...`."
    )


@contextmanager
def closing_process_group():
    """End the default process group, if one was formed, when the block ends, on success or error, so that its
    gloo worker threads are joined while the interpreter is still alive. A thread still alive at exit can be freeing
    the last collective's buffers when the interpreter shuts down; it aborts the process after all its work is done
    ("terminate called without an active exception", status -6), and the launcher reports the job as failed.
    The group goes only when nothing else holds it: after an error, the failed frames' locals (a Trainer, its DDP
    model and through it the group) are cleared from the traceback, which still prints in full."""
    try:
        yield
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            gc.collect()  # a reference cycle may be what still holds the group


def check_overrides(overrides: dict[str, Any], **flags) -> None:
    """Refuse `--config_overrides` keys that another source sets: a flag given too with another value
    (`image_size=8` with `--image_size 16`: the flag would win silently), or the labels, which come from the data."""
    for name, value in flags.items():
        if value is not None and overrides.get(name) is not None and overrides[name] != value:
            raise ValueError(
                f"--{name} {value} and --config_overrides {name}={overrides[name]} disagree; give the value once: "
                f"drop {name}= from --config_overrides, or drop --{name}."
            )
    labels = sorted(overrides.keys() & {"id2label", "label2id"})
    if labels:
        raise ValueError(
            f"--config_overrides sets {', '.join(labels)}, but the labels come from the data (its class names or "
            "label column): drop them from --config_overrides."
        )


def check_arguments(model_args: ModelArguments) -> None:
    """Refuse model flags that would fail late or contradict each other, before any data is read (`open_run`
    checks the others)."""
    check_overrides(parse_overrides(model_args.config_overrides), image_size=model_args.image_size)
    if model_args.model_name_or_path:
        check_model_source(model_args.model_name_or_path)


# float8 GEMMs need Ada (8.9) or Hopper (9.0) tensor cores or later.
FP8_MIN_CAPABILITY = (8, 9)
FP8_GPUS = "H100, H200, L4, RTX 40xx"


def check_fp8(training_args: TrainingArguments) -> None:
    """Refuse `--fp8 true` where float8 training cannot run: on a CPU, on an older GPU, without bf16, without
    torchao."""
    needs = f"fp8 training needs an NVIDIA GPU with compute capability 8.9 or later ({FP8_GPUS})"
    if training_args.use_cpu or not torch.cuda.is_available():
        raise ValueError(f"{needs}; this run is on CPU. Drop --fp8 (or train on such a GPU).")
    capability = torch.cuda.get_device_capability()
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name()
        raise ValueError(
            f"{needs}; this run's GPU, {name}, has {capability[0]}.{capability[1]}. Drop --fp8 and keep --bf16 true."
        )
    if not training_args.bf16:
        raise ValueError(
            "--fp8 true trains the encoder's linear layers in float8 and the rest in bf16: add --bf16 true."
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError as error:
        raise ValueError(f'--fp8 true needs torchao: pip install "vitrail[fp8]" ({error}).') from error


def fp8_layer(module: torch.nn.Module, name: str) -> bool:
    """Whether `convert_to_fp8` converts this layer: the encoder's linear layers whose sides are multiples of 16
    (float8 GEMMs need them), never the classifier head: the logits stay in bf16."""
    return (
        isinstance(module, torch.nn.Linear)
        and ".encoder." in f".{name}."
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def convert_to_fp8(model: torch.nn.Module) -> torch.nn.Module:
    """Swap `model`'s encoder linear layers (see `fp8_layer`) for torchao's float8 training layers, in place.
    The float8 layers keep their `weight` and `bias` in the model's dtype under the same names, so checkpoints
    load into a plain vitrail model."""
    from torchao.float8 import convert_to_float8_training

    return convert_to_float8_training(model, module_filter_fn=fp8_layer)


# ---- data -------------------------------------------------------------------------------------------------------


@dataclass
class LoadedData:
    """The splits of a run, the dataset's readable name, the split record (`data_split.json`), the images
    `--skip_bad_images` left out (name -> reason), the image and label columns, and the class names."""

    splits: dict
    name: str
    record: dict
    skipped_images: dict[str, str]
    image_column: str = "image"
    label_column: str = "label"
    labels: list[str] = field(default_factory=list)
    reopen: Any = None  # for a stream recognised from its run's record: what opens it (`open`)

    def open(self) -> None:
        """Open the splits of a stream that was recognised from its run's record without being read."""
        if self.reopen is not None:
            self.splits, self.reopen = self.reopen().splits, None


# Stands for a split of a stream that is not opened yet (`LoadedData.open`).
UNOPENED = "a stream, not opened yet"


# Where images and labels are found when the named columns are missing (WebDataset members are named by extension).
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")
LABEL_COLUMNS = ("cls",)


def find_column(columns: list[str], given: str, default: str, conventions: tuple, kind: str) -> str:
    """`given` if the data has it; for the default name, else the first conventional one it has."""
    if given in columns:
        return given
    found = next((name for name in conventions if name in columns), None) if given == default else None
    if found is None:
        raise ValueError(
            f"The dataset has no {kind} column {given!r} (columns: {columns}); pass --{kind}_column_name."
        )
    return found


def class_names(split, label_col: str, data_args: DataArguments, files: list[str]) -> list[str]:
    """The class names: the label column's ClassLabel names, else `--class_names_file`, else the numbers the
    data holds (for tar shards read from their label members, for other data from the label column)."""
    from datasets import ClassLabel, IterableDataset

    feature = (split.features or {}).get(label_col)
    if data_args.class_names_file:
        names = [line.strip() for line in Path(data_args.class_names_file).read_text().splitlines()]
        names = [name for name in names if name]
        if not names or len(set(names)) != len(names):
            raise ValueError(
                f"--class_names_file {data_args.class_names_file}: give one distinct class name a line."
            )
        return names
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if isinstance(split, IterableDataset):
        tars = [file for file in files if file.endswith(".tar") and Path(file).is_file()]
        if not tars or len(tars) != len(files):
            raise ValueError(
                f"Column {label_col!r} is {feature}, not a ClassLabel, and a stream's labels cannot be listed "
                "without reading it: pass --class_names_file (one class name a line, line i naming label i)."
            )
        numbers = tar_labels(tars, label_col)
    else:
        numbers = sorted(set(split[label_col]))
    if not numbers or numbers[0] < 0 or any(not isinstance(n, int) for n in numbers):
        raise ValueError(
            f"Column {label_col!r} is {feature}, not a ClassLabel, and holds {numbers[:5]}, not class numbers "
            f"0, 1, ...: cast it first (`dataset.class_encode_column({label_col!r})`) or pass --class_names_file."
        )
    return [str(number) for number in range(numbers[-1] + 1)]


def data_files(data_args: DataArguments) -> dict[str, list[str]]:
    """`--train_files` / `--validation_files`, each a glob: the files that match, sorted (a Hub pattern as given)."""
    files = {}
    for key, pattern in (("train", data_args.train_files), ("validation", data_args.validation_files)):
        if pattern:
            found = sorted(glob.glob(os.path.expanduser(pattern)))
            if not found and not pattern.startswith(("hf://", "http://", "https://")):
                raise FileNotFoundError(f"--{key}_files {pattern}: no file matches.")
            files[key] = found or [pattern]
    return files


def dataset_source(data_args: DataArguments) -> str:
    """How the split record names a `--dataset_name` source: the name, and `:config` when one is given."""
    config = data_args.dataset_config_name
    return data_args.dataset_name + (f":{config}" if config else "")


def _files_summary(files: list[str]) -> dict:
    """Names and sizes of data files (a listing, nothing read), hashed."""
    listing = "\n".join(
        f"{Path(name).name} {Path(name).stat().st_size if Path(name).is_file() else ''}" for name in files
    )
    return {"files": len(files), "sha256": hashlib.sha256(listing.encode()).hexdigest()}


def load_splits(
    data_args: DataArguments, earlier: dict | None = None, labels: list[str] | None = None
) -> LoadedData:
    """train / validation / test splits from the Hub, data files, image folders, or the embedded default.

    Only listings are read here (file names, never pixels), so that a finished or resumed run is recognised
    without reading any image: image folders get their header check in `begin_run`, and images are decoded
    where they are processed. A stream of local files that `earlier` (the split record of the run in the output
    folder) describes, file names and sizes alike, is not even opened: its class names and columns come from
    that record, and it opens when the run trains (`LoadedData.open`). `labels`, when given, are the class
    names (not read from the data)."""
    from datasets import ClassLabel, IterableDataset

    files: dict[str, list[str]] = {}
    if data_args.streaming and not data_args.dataset_name:
        raise ValueError("--streaming reads --dataset_name (with --train_files for local files): give it.")
    if data_args.streaming:
        files = data_files(data_args)
        known = recorded_stream(data_args, files, earlier)
        if known is not None:
            return known
    if data_args.train_dir:
        splits, _ = image_folder_dataset(
            data_args.train_dir, data_args.validation_dir, data_args.skip_bad_images, check=False
        )
        # By name, not path: the record travels with the checkpoint, and the sample hashes below identify the data.
        name = source = Path(data_args.train_dir).resolve().name
    elif data_args.dataset_name:
        files = files or data_files(data_args)
        splits = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_files=files or None,
            streaming=data_args.streaming,
        )
        name, source = data_args.dataset_name, dataset_source(data_args)
    else:
        splits = {"train": digits_dataset()}
        name = source = DEFAULT_DATASET
    splits = dict(splits)
    if "train" not in splits:
        raise ValueError(f"The dataset has no 'train' split (it has {sorted(splits)}).")
    columns = list(splits["train"].column_names or [])
    image_col = find_column(columns, data_args.image_column_name, "image", IMAGE_COLUMNS, "image")
    label_col = find_column(columns, data_args.label_column_name, "label", LABEL_COLUMNS, "label")
    labels = labels or class_names(splits["train"], label_col, data_args, files.get("train", []))
    if isinstance(splits["train"], IterableDataset):
        return _stream_splits(splits, name, source, files, data_args, image_col, label_col, labels)
    if not isinstance(splits["train"].features[label_col], ClassLabel):
        for key in splits:
            splits[key] = splits[key].cast_column(label_col, ClassLabel(names=labels))
    check_columns(splits["train"], image_col, label_col)
    for key, split in splits.items():
        if SAMPLE_ID not in split.column_names:  # rows are named by their place in the split they came in
            splits[key] = split.add_column(SAMPLE_ID, [f"{key}:{i}" for i in range(len(split))])
    carved = [key for key in ("validation", "test") if key not in splits]
    if carved:
        parts = split_dataset(
            splits.pop("train"),
            label_col,
            test_size=0.0 if "test" in splits else data_args.test_size,
            validation_size=0.0 if "validation" in splits else data_args.validation_size,
            seed=data_args.split_seed,
        )
        for key in ("train", "validation", "test"):
            splits.setdefault(key, parts.get(key))
    for key, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                       ("test", data_args.max_eval_samples)):  # fmt: skip
        if limit is not None and splits[key] is not None and len(splits[key]) > limit:
            splits[key] = splits[key].select(range(limit))
    for key in ("train", "validation", "test"):
        if splits.get(key) is not None and len(splits[key]) == 0:
            raise ValueError(f"The {key} split is empty; give it some images or change the split fractions.")
    record = {
        "source": source,
        "validation_source": Path(data_args.validation_dir).resolve().name
        if data_args.validation_dir
        else None,
        "carved": carved,
        "split_seed": data_args.split_seed,
        "test_size": data_args.test_size,
        "validation_size": data_args.validation_size,
        "max_train_samples": data_args.max_train_samples,
        "max_eval_samples": data_args.max_eval_samples,
        **{key: _split_summary(splits.get(key)) for key in ("train", "validation", "test")},
    }
    return LoadedData(splits, name, record, {}, image_col, label_col, labels)


def _stream_splits(splits, name, source, files, data_args, image_col, label_col, labels) -> LoadedData:
    """The splits of a stream, as given (a stream has no length to carve held-out splits from), truncated by
    `--max_*_samples`; the record names the files (names and sizes) or the Hub dataset."""
    for key, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                       ("test", data_args.max_eval_samples)):  # fmt: skip
        if limit is not None and splits.get(key) is not None:
            splits[key] = splits[key].take(limit)
    for key in ("validation", "test"):
        splits.setdefault(key, None)
    if splits["validation"] is None and splits["test"] is None:
        logger.warning(
            "The stream has no held-out split: training runs without evaluation. Give --validation_files (or a "
            "dataset with a validation split) to evaluate."
        )
    record = stream_record(
        data_args, source, files, [key for key, split in splits.items() if split is not None]
    )
    # What a rerun needs to recognise the run without reading the stream (`recorded_stream`).
    record.update(class_names=labels, image_column=image_col, label_column=label_col)
    return LoadedData(splits, name, record, {}, image_col, label_col, labels)


def stream_record(
    data_args: DataArguments, source: str, files: dict[str, list[str]], splits: list[str]
) -> dict:
    """The split record of a stream: its source, files (names and sizes) and splits, and the sample limits."""
    return {
        "source": source,
        "streaming": True,
        "max_train_samples": data_args.max_train_samples,
        "max_eval_samples": data_args.max_eval_samples,
        **{key: _files_summary(paths) for key, paths in files.items()},
        "splits": sorted(splits),
    }


def recorded_stream(
    data_args: DataArguments, files: dict[str, list[str]], earlier: dict | None
) -> LoadedData | None:
    """The splits of a stream of local files that `earlier` records (same source, file names and sizes, limits),
    unopened, with the class names and columns of the record; None for any other stream."""
    local = files and all(Path(path).is_file() for paths in files.values() for path in paths)
    if not local or not isinstance(earlier, dict) or not isinstance(earlier.get("splits"), list):
        return None
    record = stream_record(data_args, dataset_source(data_args), files, earlier["splits"])
    known = {key: earlier.get(key) for key in ("class_names", "image_column", "label_column")}
    # The same keys (not, say, the files of one more split) with the same values.
    same = earlier.keys() == record.keys() | known.keys() and all(earlier[k] == v for k, v in record.items())
    if None in known.values() or not same:
        return None
    splits = {key: UNOPENED if key in record["splits"] else None for key in ("train", "validation", "test")}
    labels = list(known["class_names"])
    data = LoadedData(
        splits,
        data_args.dataset_name,
        {**record, **known},
        {},
        known["image_column"],
        known["label_column"],
        labels,
    )
    data.reopen = partial(load_splits, data_args, labels=labels)
    return data


def _split_summary(split) -> dict | None:
    """Size and a SHA-256 of the sorted sample names: equal for the same images, whatever their order."""
    if split is None:
        return None
    names = "\n".join(sorted(str(name) for name in split[SAMPLE_ID]))
    return {"size": len(split), "sha256": hashlib.sha256(names.encode()).hexdigest()}


def sample_names(batch: dict, image_col: str) -> list[str]:
    """How records name the samples of a batch: the file's path, its sample id, or a stream's shard and key."""
    values = batch[image_col]
    ids = batch.get(SAMPLE_ID) or [None] * len(values)
    keys = batch.get("__key__") or [None] * len(values)
    urls = batch.get("__url__") or [None] * len(values)
    names = []
    for value, sample, key, url in zip(values, ids, keys, urls, strict=True):
        path = value.get("path") if isinstance(value, dict) else None
        if key is not None:
            names.append(f"{Path(url).name}/{key}" if url else str(key))
        else:
            names.append(path or sample or "in memory")
    return names


def decode_images(
    batch: dict, image_col: str, feature: Image | None, skip_bad: bool = False
) -> tuple[list, dict[int, tuple[str, str]]]:
    """The batch's images, decoded here rather than inside datasets so that a file that fails is named; with
    `skip_bad`, the ones that fail are left out and returned by place in the batch (name, reason)."""
    if feature is None:
        return batch[image_col], {}
    images, bad = [], {}
    for index, (value, name) in enumerate(zip(batch[image_col], sample_names(batch, image_col), strict=True)):
        try:
            image = feature.decode_example(value)
            problem = mode_problem(image.mode)
        except Exception as error:  # PIL and datasets raise many types; all mean the same here
            problem = f"{type(error).__name__}: {error}"
        if problem and not skip_bad:
            raise ValueError(
                f"Cannot read image {name}: {problem}. Remove or replace it, or pass --skip_bad_images to train "
                "without it (it is then listed in all_results.json and the model card)."
            )
        if problem:
            bad[index] = (name, problem)
        else:
            images.append(image)
    return images, bad


class BatchProcessor:
    """Turns a batch of rows into `pixel_values` and `labels` with the image processor (and RandAugment when
    asked); runs in the data workers. Rows whose image cannot be read are kept with black pixels and named in
    `bad_image` when `--skip_bad_images` is on (`SkippingCollator` leaves them out of the batch), so that the
    names reach the training process."""

    def __init__(self, processor, image_col, label_col, feature, skip_bad: bool, rand_augment=None):
        self.processor, self.image_col, self.label_col, self.feature = (
            processor,
            image_col,
            label_col,
            feature,
        )
        self.skip_bad, self.rand_augment = skip_bad, rand_augment

    def __call__(self, batch: dict) -> dict:
        images, bad = decode_images(batch, self.image_col, self.feature, self.skip_bad)
        if self.rand_augment is not None:
            images = [
                self.rand_augment(im if im.mode in ("L", "RGB") else im.convert("RGB")) for im in images
            ]
        rows = len(batch[self.image_col])
        pixels = self.processor(images, return_tensors="pt")["pixel_values"] if images else None
        if bad:
            height, width = processor_output_hw(self.processor)
            full = torch.zeros(rows, self.processor.num_channels, height, width)
            good = [i for i in range(rows) if i not in bad]
            if good:
                full[good] = pixels
            pixels = full
        return {
            "pixel_values": pixels,
            "labels": batch[self.label_col],
            "bad_image": [bad[i][0] if i in bad else "" for i in range(rows)],
            "bad_reason": [bad[i][1] if i in bad else "" for i in range(rows)],
        }


class SkippingCollator:
    """Collates the rows `BatchProcessor` made whole with `collate`, leaving out those of unreadable images and
    naming them (name -> reason) in the batch's `bad_images`, which `VitrailTrainer` records, or, when given, to
    `record` in the collating process. Rows of a stream (`StreamProcessor`) carry the names of the unreadable
    images left out before them; a placeholder row only carries names. A batch with no readable image is a batch
    of `bad_images` alone, which `VitrailTrainer` skips."""

    def __init__(self, collate=default_data_collator, record=None):
        self.collate, self.record = collate, record

    def __call__(self, rows: list[dict]) -> dict:
        bad = {row["bad_image"]: row["bad_reason"] for row in rows if row.get("bad_image")}
        for row in rows:
            bad.update(dict(row.get("skipped") or []))
        extra = ("bad_image", "bad_reason", "skipped", "placeholder")
        good = [
            {k: v for k, v in row.items() if k not in extra}
            for row in rows
            if not row.get("bad_image") and not row.get("placeholder")
        ]
        batch = self.collate(good) if good else {}
        if bad and self.record is not None:
            self.record(bad)
        elif bad:
            batch["bad_images"] = bad
        return batch


class StreamProcessor:
    """`BatchProcessor` for a stream (`IterableDataset.map`): the rows of unreadable images leave the stream here,
    their names travelling on the next row (`skipped`), so that batches are made of readable images only. When
    every image of a mapped chunk is unreadable, one placeholder row carries their names."""

    def __init__(self, process: BatchProcessor):
        self.process = process

    def __call__(self, batch: dict) -> dict:
        processed = self.process(batch)
        bad = [
            [name, why]
            for name, why in zip(processed["bad_image"], processed["bad_reason"], strict=True)
            if name
        ]
        good = [i for i, name in enumerate(processed["bad_image"]) if not name]
        if not good:  # (1, C, H, W) of black, labelled as ignored
            return {"pixel_values": processed["pixel_values"][:1], "labels": [-100], "skipped": [bad],
                    "placeholder": [True]}  # fmt: skip
        return {
            "pixel_values": processed["pixel_values"][good],
            "labels": [processed["labels"][i] for i in good],
            "skipped": [bad] + [[] for _ in good[1:]],
            "placeholder": [False] * len(good),
        }


class ProcessedSplit(torch.utils.data.Dataset):
    """A split whose images are processed once, held as one `(N, C, H, W)` tensor: fetching a batch is a few
    tensor indexings, where a `datasets` row format costs about 1 ms an image here.

    Made with `ProcessedSplit.on_first_read`, the tensor fills as the images are first read: a batch's missing
    images are processed together, in the process that reads them, so that nothing is decoded before the first
    step and no image twice. An image that fails to decode under `--skip_bad_images` stays out of every batch,
    named in its row (`bad_image`, `bad_reason`) for `SkippingCollator`."""

    def __init__(self, pixel_values: torch.Tensor | None, labels: torch.Tensor):
        self.pixel_values, self.labels = pixel_values, labels
        self.source, self.process = None, None  # what fills `pixel_values`, for `on_first_read`
        self.done = torch.ones(len(labels), dtype=torch.bool)
        self.bad: dict[int, tuple[str, str]] = {}

    @classmethod
    def on_first_read(cls, split, process: BatchProcessor) -> ProcessedSplit:
        """A cache of `split` (undecoded images) that `process` fills batch by batch as it is read."""
        result = cls(None, torch.tensor(split[process.label_col]))
        result.source, result.process = split, process
        result.done = torch.zeros(len(split), dtype=torch.bool)
        return result

    def __len__(self) -> int:
        return len(self.labels)

    def fill(self, indices: list[int]) -> None:
        """Process the images at `indices` that are not in the tensor yet, as one batch."""
        missing = [index for index in indices if not self.done[index]]
        if not missing:
            return
        chunk = self.process(self.source[missing])
        if self.pixel_values is None:  # allocated on first use; pages untouched stay unused memory
            self.pixel_values = torch.empty(
                (len(self), *chunk["pixel_values"].shape[1:]), dtype=torch.float32
            )
        self.pixel_values[missing] = chunk["pixel_values"]
        for place, index in enumerate(missing):
            if chunk["bad_image"][place]:
                self.bad[index] = (chunk["bad_image"][place], chunk["bad_reason"][place])
        self.done[missing] = True

    def fill_all(self, chunk: int = 256) -> None:
        """Process every image not in the tensor yet. DataLoader workers get the tensor as the main process left
        it (their own copy-on-write pages), so with workers the cache is filled here first: one tensor that every
        worker shares, each image decoded once."""
        missing = torch.nonzero(~self.done).flatten().tolist()
        for start in range(0, len(missing), chunk):
            self.fill(missing[start : start + chunk])

    def __getitems__(self, indices: list[int]) -> list[dict]:
        self.fill(list(indices))
        return [self[index] for index in indices]

    def __getitem__(self, index: int) -> dict:
        self.fill([int(index)])
        row = {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}
        if int(index) in self.bad:
            row["bad_image"], row["bad_reason"] = self.bad[int(index)]
        return row


def check_image_files(data: LoadedData, data_args: DataArguments) -> None:
    """Check the header (and end marker) of every image of image-folder splits, without decoding pixels; leave
    the bad ones out (`--skip_bad_images`, recorded in `data.skipped_images`) or raise naming them."""
    roots = {"train": data_args.train_dir, "validation": data_args.validation_dir or data_args.train_dir}
    for key, split in data.splits.items():
        if split is None or not isinstance(split, Dataset):
            continue
        folder = Path(roots.get(key) or data_args.train_dir)
        files = [
            value["path"]
            for value in split.cast_column(data.image_column, Image(decode=False))[data.image_column]
        ]
        names = [f"{folder.name}/{sample}" for sample in split[SAMPLE_ID]]
        where = f"in --{'validation' if key == 'validation' and data_args.validation_dir else 'train'}_dir {folder}"
        bad = check_files(files, names, data_args.skip_bad_images, where)
        if bad:
            data.skipped_images.update(bad)
            data.splits[key] = split.select([i for i, name in enumerate(names) if name not in bad])
            left = set(data.splits[key][data.label_column])
            emptied = [data.labels[i] for i in sorted(set(split[data.label_column]) - left)]
            if emptied or len(data.splits[key]) == 0:
                raise ValueError(f"The {key} split: every image of class(es) {emptied} is unreadable.")


def prepare_splits(
    splits, processor, data_args: DataArguments, image_col: str | None = None, label_col: str | None = None,
    training_args: TrainingArguments | None = None,
) -> None:  # fmt: skip
    """Turn images into `pixel_values` with the image processor (the evaluation transform). When the processed
    data is small (`--cache_pixels`, default: up to 1 GiB) each image is processed once, not every epoch, when
    it is first read (`ProcessedSplit`): nothing is decoded before the first step. RandAugment needs the images
    themselves and keeps training on the fly. Streams are processed as they are read, unreadable images leaving
    them there (`StreamProcessor`), the training stream shuffled (a buffer) and shared out among the processes of
    a multi-process run. Geometric augmentation comes later, per batch."""
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    image_col = image_col or data_args.image_column_name
    label_col = label_col or data_args.label_column_name
    rand_augment = None
    # RandAugment (Cubuk et al. 2020) works on PIL images, so it runs before the processor.
    if data_args.rand_augment:
        from torchvision.transforms import v2

        rand_augment = v2.RandAugment()
    height, width = processor_output_hw(processor)
    for key in ("train", "validation", "test"):
        split = splits.get(key)
        if split is None:
            continue
        feature = (split.features or {}).get(image_col)
        if isinstance(feature, Image) and feature.decode:
            split = split.cast_column(image_col, Image(decode=False))
        else:
            feature = None
        on_the_fly = key == "train" and rand_augment is not None
        process = BatchProcessor(
            processor,
            image_col,
            label_col,
            feature,
            data_args.skip_bad_images,
            rand_augment if on_the_fly else None,
        )
        if isinstance(split, IterableDataset):
            if key == "train":
                seed = training_args.seed if training_args is not None else 0
                split = split.shuffle(seed=seed, buffer_size=1000)
                if training_args is not None and training_args.world_size > 1:
                    split = split_dataset_by_node(
                        split, rank=training_args.process_index, world_size=training_args.world_size
                    )
            # Held-out streams are read in order, as evaluation draws its batches: nothing is read beforehand.
            columns = list(split.column_names or [])
            splits[key] = split.map(
                StreamProcessor(process), batched=True, batch_size=64, remove_columns=columns
            )
            continue
        cache = data_args.cache_pixels
        if cache is None:
            cache = len(split) * processor.num_channels * height * width * 4 <= 2**30
        if cache and not on_the_fly:
            splits[key] = ProcessedSplit.on_first_read(split, process)
        else:
            split.set_transform(process)
            splits[key] = split


def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---- model --------------------------------------------------------------------------------------------------


def new_processor(config: VitrailConfig) -> VitrailImageProcessor:
    """An image processor for `config`'s input size and channels, with VitrailImageProcessor's defaults."""
    height, width = config.image_hw
    return VitrailImageProcessor(size={"height": height, "width": width}, num_channels=config.num_channels)


def build_model(model_args: ModelArguments, labels: list[str]):
    """A classifier for `labels`: from a checkpoint (new label set -> new head, new size -> resampled positions)
    or from scratch (`--variant` and/or `--config_overrides`)."""
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    overrides = parse_overrides(model_args.config_overrides)
    if model_args.image_size:
        overrides["image_size"] = model_args.image_size  # check_arguments refused a conflicting override
    if model_args.model_name_or_path:
        # A vitrail, transformers (ViT/DeiT/DINOv2) or timm checkpoint; from_pretrained converts foreign ones,
        # re-initialises the head for a new label set and resamples positions for a new size, saying so.
        source = model_args.model_name_or_path
        try:
            model = VitrailForImageClassification.from_pretrained(source, id2label=id2label, **overrides)
        except RuntimeError as error:  # transformers' "size mismatch" refusal
            if not overrides.keys() - {"image_size"}:
                raise
            raise ValueError(
                f"--config_overrides {model_args.config_overrides} changes the shapes of {source}'s weights "
                f"({error}). Override only what keeps the shapes (dropout, drop_path_rate, ...), or train from "
                "scratch without --model_name_or_path."
            ) from error
        processor = load_image_processor(source)
    else:
        values, variant = {"id2label": id2label, "label2id": label2id, **overrides}, model_args.variant
        config = VitrailConfig.from_variant(variant, **values) if variant else VitrailConfig(**values)
        model = VitrailForImageClassification(config)
        processor = None
    if processor is None:
        processor = new_processor(model.config)
    else:
        fit_processor_to(processor, model.config.image_hw)
    return model, processor


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norms, positions and learned tokens are not weights to shrink (timm's `no_weight_decay`): among
    them the MAP head's query `latent`, learned RoPE frequencies and relative position bias tables, as timm's
    Eva and BEiT exempt them."""
    return param.ndim <= 1 or name.endswith(
        ("cls_token", "distillation_token", "register_tokens", "mask_token", "position_embeddings", "latent",
         "rope_freqs", "relative_position_bias.table")
    )  # fmt: skip


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for encoder layer i, depth + 1 for the final norm and the head."""
    if ".embeddings." in f".{name}":
        return 0
    marker = "encoder.layers."
    if marker in name:
        return int(name.split(marker)[1].split(".")[0]) + 1
    return depth + 1


def parameter_groups(model, weight_decay: float, learning_rate: float, layer_decay: float | None = None):
    """AdamW groups: no decay where it does not belong, and optionally a learning rate that shrinks by
    `layer_decay` per layer from the head down (BEiT, Bao et al. 2021), so pretrained early layers move least."""
    depth = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth) if layer_decay else depth + 1
        decay = not no_decay(name, param)
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": learning_rate * (layer_decay or 1.0) ** (depth + 1 - layer),
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


class NothingLeftToTrain(Exception):
    """Raised by `RunBoundaries` when a resumed checkpoint already holds the run's last step."""


class RunBoundaries(TrainerCallback):
    """Makes a resumed run log, evaluate and stop as an uninterrupted one does.

    - The training loss is logged at every checkpoint, evaluation and the last step, so that each logged loss
      covers the same steps whether or not the run was resumed in between (the Trainer starts a new interval at
      the resumed step), and the log covers every step (`run_train_loss`).
    - A checkpoint due at the step that ends an epoch, or training, is saved after the end of that epoch (its
      evaluation with `--eval_strategy epoch`), which a resume from it would otherwise never run.
    - A resume from a checkpoint that holds the last step raises `NothingLeftToTrain` before any step: the Trainer
      would take one more (it resumes into the unfinished epoch of a `--max_steps` or fractional-epoch run).
    """

    def __init__(self):
        self.save_at_epoch_end = False

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps > 0:
            raise NothingLeftToTrain(f"step {state.global_step} of {state.max_steps}")

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_evaluate or control.should_training_stop:
            control.should_log = True
        # `state.epoch` is `epoch + (step + 1) / steps_in_epoch`: whole after the epoch's last step.
        if control.should_save and (control.should_training_stop or float(state.epoch).is_integer()):
            control.should_save, self.save_at_epoch_end = False, True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.save_at_epoch_end:
            control.should_save, self.save_at_epoch_end = True, False
        if control.should_save or control.should_evaluate:
            control.should_log = True


def run_train_loss(log_history: list[dict]) -> float:
    """The mean training loss over every step logged in `log_history` (each logged loss weighted by the steps it
    covers): the whole run's, where the Trainer reports only the steps since the last resume."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else 0.0


class VitrailTrainer(Trainer):
    """Trainer with vitrail's parameter groups, batch augmentation applied in training steps only (evaluation
    batches are never augmented), MixUp/CutMix, a soft-label loss for mixed batches, and `RunBoundaries`: resumed
    runs log the losses of an uninterrupted run and never step past its end."""

    def __init__(
        self,
        *args,
        layer_decay: float | None = None,
        augment: BatchAugment | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        **kwargs,
    ):
        kwargs["data_collator"] = SkippingCollator(kwargs.get("data_collator") or default_data_collator)
        super().__init__(*args, **kwargs)
        self.skipped_images: dict[str, str] = {}  # named by the batches (`SkippingCollator`)
        # Right after the default flow: its on_step_end decides what to save, and the stop comes before the
        # progress bar and reporting callbacks start.
        callbacks = self.callback_handler.callbacks
        flow = next(i for i, callback in enumerate(callbacks) if isinstance(callback, DefaultFlowCallback))
        callbacks.insert(flow + 1, RunBoundaries())
        self.layer_decay = layer_decay
        self.augment = augment
        self.mix = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from torchvision.transforms import v2

            num_labels = self.model.config.num_labels
            choices = [v2.MixUp(alpha=mixup_alpha, num_classes=num_labels)] if mixup_alpha > 0 else []
            choices += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_labels)] if cutmix_alpha > 0 else []
            self.mix = v2.RandomChoice(choices)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            groups = parameter_groups(
                model, self.args.weight_decay, self.args.learning_rate, self.layer_decay
            )
            for group in groups:
                group.pop("names")
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def record_skipped(self, inputs) -> dict:
        """The batch without its `bad_images`, which are recorded (and logged the first time)."""
        inputs = dict(inputs)  # the batch stays as the data loader gave it
        self.note_skipped(inputs.pop("bad_images", None) or {})
        return inputs

    def skip_step(self, model) -> torch.Tensor:
        """A training step for a batch with no readable image (`--skip_bad_images`): no gradient, so that the
        optimizer leaves the weights as they are (parameters without a gradient are not updated). In a
        multi-process run the other processes wait for this one's gradients: it adds zeros to them."""
        if self.args.world_size > 1:
            # A forward and backward of one black image, times zero: DDP reduces gradients as after a real batch.
            config = self.model.config
            black = torch.zeros(1, config.num_channels, *config.image_hw, device=self.args.device)
            inputs = {"pixel_values": black}
            if isinstance(self.model, VitrailForMaskedImageModeling):
                # Nothing masked, yet the mask token takes part (with a zero gradient): DDP waits for every
                # parameter unless it looks for unused ones (`--ddp_find_unused_parameters false`, the default
                # under gradient checkpointing).
                inputs["bool_masked_pos"] = torch.zeros(
                    1, config.num_patches, dtype=torch.bool, device=self.args.device
                )
            self.accelerator.backward(model(**inputs)[0].sum() * 0)
        return torch.zeros((), device=self.args.device)

    def get_train_dataloader(self):
        """A stream already shared out among processes (`split_dataset_by_node`) is read as it is: accelerate's
        own sharding would share it out a second time."""
        from datasets import IterableDataset

        dataset = self.train_dataset
        if not (isinstance(dataset, IterableDataset) and self.args.world_size > 1):
            return super().get_train_dataloader()
        from accelerate.data_loader import prepare_data_loader

        args = self.args
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
        )
        return prepare_data_loader(
            loader,
            self.args.device,
            num_processes=1,
            process_index=0,
            put_on_device=True,
            dispatch_batches=False,
        )

    def held_out_loader(self, dataset, batch_size: int):
        """A held-out stream in a multi-process run: the main process reads it and hands each process its part of
        every batch (Accelerate's dispatching, which evaluates each sample once); it collates in that process,
        with no data workers, so that the names of unreadable images are recorded there, not sent in batches."""
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=SkippingCollator(self.data_collator.collate, record=self.note_skipped),
        )
        return self.accelerator.prepare(loader)

    def get_eval_dataloader(self, eval_dataset=None):
        from datasets import IterableDataset

        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, IterableDataset) and self.args.world_size > 1:
            return self.held_out_loader(dataset, self.args.per_device_eval_batch_size)
        return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        from datasets import IterableDataset

        if isinstance(test_dataset, IterableDataset) and self.args.world_size > 1:
            return self.held_out_loader(test_dataset, self.args.per_device_eval_batch_size)
        return super().get_test_dataloader(test_dataset)

    def note_skipped(self, bad: dict[str, str]) -> None:
        """Record unreadable images left out of a batch (and log each the first time)."""
        for name, reason in bad.items():
            if name not in self.skipped_images:
                logger.warning("--skip_bad_images: left out %s: %s", name, reason)
                self.skipped_images[name] = reason

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self.record_skipped(inputs)
        if "pixel_values" not in inputs:  # every image of the batch was unreadable (`--skip_bad_images`)
            return None, None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = self.record_skipped(inputs)
        if "pixel_values" not in inputs:
            return self.skip_step(model)
        if self.augment is not None:
            inputs["pixel_values"] = self.augment(inputs["pixel_values"])
        if self.mix is not None:
            inputs["pixel_values"], inputs["labels"] = self.mix(inputs["pixel_values"], inputs["labels"])
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs:  # the end of training: the whole run's loss, not the steps since a resume
            logs["train_loss"] = run_train_loss(self.state.log_history)
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is not None and labels.is_floating_point() and labels.ndim == 2 and model.training:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            # Class probabilities as targets; smoothing mixes them with the uniform distribution.
            smoothing = self.args.label_smoothing_factor
            loss = F.cross_entropy(outputs.logits.float(), labels, label_smoothing=smoothing)
            return (loss, outputs) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


# ---- the job ----------------------------------------------------------------------------------------------------

# The Trainer's metric prefix for each split a run can report on, in the order of preference.
PREFIX = {"test": "test", "validation": "eval"}


def compute_metrics(num_labels: int):
    """The Trainer's `compute_metrics` (`vitrail.metrics.make_compute_metrics`), imported at the first evaluation:
    `vitrail.metrics` imports `evaluate`, about a second here, which the first training step need not wait for."""

    def compute(prediction) -> dict:
        from .metrics import make_compute_metrics

        return make_compute_metrics(num_labels)(prediction)

    return compute


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Train, evaluate on validation and the held-out test split, and write a shareable checkpoint folder.

    Returns what the folder's `all_results.json` holds. A rerun of a finished run with the same settings
    returns it without training; see `vitrail.run_folder.start_run` for resuming and refusing.
    """
    check_arguments(model_args)
    if model_args.fp8:
        check_fp8(training_args)
    output, data = open_run(data_args, training_args)
    labels = data.labels
    model, processor = build_model(model_args, labels)
    source = {
        "model_name_or_path": _source_id(model_args.model_name_or_path),
        "config": model_settings(model.config),
    }
    if model_args.fp8:  # recorded only when on, so runs without it keep their settings
        source["fp8"] = True
        convert_to_fp8(model)
    start = begin_run("train", source, data, data_args, training_args, layer_decay=model_args.layer_decay)
    if start.finished is not None:
        if training_args.push_to_hub and training_args.process_index == 0:
            # A finished run is pushed again, e.g. after a failed push; an unchanged folder makes no commit. The
            # card names the repo it goes to, so it is rendered for this push.
            split = reported_split(data.splits)
            write_card(
                output, model.config, start.finished, split, data, model_args, data_args, training_args
            )
            push(output, training_args, start.finished, split)
        return start.finished
    prepare_splits(data.splits, processor, data_args, data.image_column, data.label_column, training_args)
    trainer = VitrailTrainer(
        model=model,
        args=trainer_arguments(training_args, data.splits),
        train_dataset=data.splits["train"],
        eval_dataset=data.splits["validation"],
        data_collator=default_data_collator,
        processing_class=processor,
        compute_metrics=compute_metrics(len(labels)),
        layer_decay=model_args.layer_decay,
        augment=batch_augment(data_args, processor),
        mixup_alpha=data_args.mixup_alpha,
        cutmix_alpha=data_args.cutmix_alpha,
    )
    metrics = fit(trainer, start)
    # Results are reported on the held-out test split; with --test_size 0, on the validation split.
    split = reported_split(data.splits)
    prediction = trainer.predict(data.splits[split], metric_key_prefix=PREFIX[split]) if split else None
    if split == "test":  # the validation metrics are in already
        metrics.update(prediction.metrics)
    trainer.log_metrics("all", metrics)
    collect_skipped(trainer, data)
    results = {**metrics, "skipped_images": data.skipped_images} if data.skipped_images else metrics
    report = partial(
        write_report, output, trainer, metrics, split, prediction, data, model_args, data_args, training_args
    )
    save_run(trainer, output, training_args, results, split, report)
    return results


def collect_skipped(trainer: VitrailTrainer, data: LoadedData) -> None:
    """Add the images left out while training and evaluating, in every process, to `data.skipped_images`."""
    from accelerate.utils import gather_object

    found = dict(trainer.skipped_images)
    for name, reason in gather_object(sorted(found.items())):
        data.skipped_images.setdefault(name, reason)


def reported_split(splits: dict) -> str | None:
    """The split whose results a run reports: the held-out test split, else the validation split, else none."""
    return next((key for key in PREFIX if splits[key] is not None), None)


def open_run(data_args: DataArguments, training_args: TrainingArguments) -> tuple[Path, LoadedData]:
    """Refuse a launch or flags that would train nothing, make sure the output folder is usable, load the data,
    and seed (the Trainer seeds too, but only after the caller has initialised the model)."""
    check_process_group(training_args)
    check_schedule(training_args)
    check_split_fractions(data_args)
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError(
            "--streaming: a stream's length is unknown, so --num_train_epochs cannot end it; give --max_steps."
        )
    output = check_output_dir(training_args.output_dir)
    # Trainer users may pass transformers' TrainingArguments, which lacks the flag.
    check_foreign_files(output, overwrite=getattr(training_args, "overwrite_output_dir", False))
    # The split record of a run already in the folder, which may spare reading a stream (`load_splits`).
    overwrite = getattr(training_args, "overwrite_output_dir", False)
    earlier = None if overwrite else read_json(output / DATA_SPLIT)
    data = load_splits(data_args, earlier)
    set_seed(training_args.seed)
    return output, data


def begin_run(script: str, model: dict, data: LoadedData, data_args, training_args, **schedule) -> RunStart:
    """Record a run's settings in its output folder and decide how it starts (`run_folder.start_run`): `model`
    says what is trained, `schedule` adds to the schedule settings of `training_args`."""
    settings = {
        "script": script,
        "model": model,
        "data": data_settings(data_args),
        "schedule": {**schedule_settings(training_args), **schedule},
    }

    def check() -> None:  # once the run is known to need training
        data.open()
        if data_args.train_dir:
            check_image_files(data, data_args)

    return start_run(training_args, settings, data.record, check)


def data_settings(data_args: DataArguments) -> dict:
    """The data arguments that change training, less those the split record covers (source, fractions, seed,
    and through its hashes `--max_*_samples` and `--skip_bad_images`); `--cache_pixels` changes only speed."""
    left_out = {"dataset_name", "dataset_config_name", "train_dir", "validation_dir", "test_size",
                "validation_size", "split_seed", "max_train_samples", "max_eval_samples", "skip_bad_images",
                "cache_pixels", "train_files", "validation_files"}  # fmt: skip
    values = {k: v for k, v in asdict(data_args).items() if k not in left_out}
    for name in ("streaming", "class_names_file"):  # recorded when used, so that older records match
        if not values[name]:
            values.pop(name)
    return values


def _source_id(source: str | None) -> str | None:
    """A local checkpoint by its absolute path (the same folder whatever the working directory), else as given."""
    if source and Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    return source


def trainer_arguments(
    training_args: TrainingArguments, splits: dict | None = None, **changes
) -> TrainingArguments:
    """The Trainer's copy of `training_args`, with `changes`; the caller's arguments stay as given (they are what
    `training_args.json` records). The copy keeps the raw image column, which `set_transform` reads, and does not
    push: the Trainer's push would upload training_args.bin (a pickle) and its own card before ours exists, so
    `save_run` pushes the finished folder instead."""
    args = copy.copy(training_args)  # not dataclasses.replace: that would run __post_init__ a second time
    args.remove_unused_columns = False
    args.push_to_hub = False
    if getattr(args, "dataloader_num_workers", 0) < 0:  # the default: by how `splits` are processed
        on_the_fly = any(
            split is not None and not isinstance(split, ProcessedSplit) for split in (splits or {}).values()
        )
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.dataloader_num_workers = max(1, available_cpus() // local) if on_the_fly else 0
    if (
        args.dataloader_num_workers > 0
    ):  # workers share the pixel cache only if it is filled before they start
        for split in (splits or {}).values():
            if isinstance(split, ProcessedSplit):
                split.fill_all()
    if args.use_cpu or not torch.cuda.is_available():  # pinned memory serves copies to a GPU only
        args.dataloader_pin_memory = False
    if getattr(args, "dataloader_persistent_workers", False) is None:
        args.dataloader_persistent_workers = args.dataloader_num_workers > 0
    args.dataloader_persistent_workers = bool(
        args.dataloader_persistent_workers and args.dataloader_num_workers
    )
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def fit(trainer: Trainer, start: RunStart) -> dict:
    """Train from where `start` says, then evaluate on the validation split when there is one."""
    started = time.perf_counter()
    try:
        metrics = dict(trainer.train(resume_from_checkpoint=start.checkpoint).metrics)
    except NothingLeftToTrain:
        metrics = finish_training(trainer)
    metrics["train_wall_time"] = time.perf_counter() - started
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    return metrics


def finish_training(trainer: Trainer) -> dict:
    """What the Trainer does after a run's last step, for a resume whose checkpoint holds that step (killed before
    the results were written): the Trainer has loaded the checkpoint's weights and state, and stopped before
    stepping (`RunBoundaries`). Returns the training metrics, as `Trainer.train` does (no step taken: zero rates)."""
    started = time.time()
    trainer.is_in_train = False
    state = trainer.state
    metrics = speed_metrics("train", started, num_samples=0, num_steps=0)
    metrics.update(total_flos=state.total_flos, train_loss=run_train_loss(state.log_history))
    trainer.log(metrics)
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        load_weights(trainer.model, state.best_model_checkpoint)
    return metrics


def load_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Load a saved folder's safetensors weights (one file, or an index and its shards) into `model`."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    names = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    weights = {}
    for name in names:
        weights.update(load_file(folder / name))
    model.load_state_dict(weights)


def save_run(
    trainer, output: Path, training_args, results: dict, split: str | None = None, report=None
) -> None:
    """Save the model and the Trainer's state, then, on the main process: the run's arguments as
    `training_args.json` (in place of the pickled `training_args.bin` that `Trainer.save_model` writes: a shareable
    folder holds no pickle; the checkpoint-N folders keep the Trainer's copy, which resuming reads), the files
    of `report()`, the `results` (last: their presence marks the run finished), and the push when asked."""
    trainer.save_model()  # weights (safetensors), config, code files, processor
    trainer.save_state()
    if trainer.is_world_process_zero():
        (output / "training_args.bin").unlink(missing_ok=True)
        write_json_atomic(output / "training_args.json", json.loads(training_args.to_json_string()))
        if report is not None:
            report()
        write_json_atomic(output / RESULTS, results)
        if training_args.push_to_hub:
            push(output, training_args, results, split)


def write_report(
    output, trainer, metrics, split, prediction, data, model_args, data_args, training_args
) -> None:
    """Write what a finished run adds to its checkpoint: the training curves, the confusion matrix of the reported
    `split` from `prediction` (plot and JSON) and the model card."""
    from .metrics import confusion_matrix, first_array
    from .plots import plot_confusion_matrix, plot_training_curves

    plots = [plot_training_curves(trainer.state.log_history, output / "training_curves.png").name]
    config = trainer.model.config
    if prediction is not None:
        labels = [config.id2label[i] for i in range(config.num_labels)]
        matrix = confusion_matrix(prediction.label_ids, first_array(prediction.predictions), len(labels))
        title = f"{split.capitalize()} split"
        plots.append(plot_confusion_matrix(matrix, labels, output / "confusion_matrix.png", title=title).name)
        write_json_atomic(output / "confusion_matrix.json", {"labels": labels, "matrix": matrix.tolist()})
    write_card(output, config, metrics, split, data, model_args, data_args, training_args, plots)


def write_card(
    output, config, metrics, split, data, model_args, data_args, training_args, plots: list[str] | None = None
) -> None:
    """Render the model card `README.md` of a run's folder from its results; `plots` default to the plot files
    the folder holds. Its usage snippet names the repo of `--push_to_hub`, else the folder."""
    from .hub import PLOTS
    from .model_card import render_model_card

    if plots is None:
        plots = [name for name in PLOTS if (output / name).is_file()]
    render_model_card(
        model_name=output.name,
        output_dir=output,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        dataset_name=data.name,
        dataset_id=data_args.dataset_name,
        base_model=model_args.model_name_or_path,
        hyperparameters=_hyperparameters(model_args, data_args, training_args),
        recipe=_recipe(model_args, training_args),
        config_summary=_config_summary(config),
        plots=plots,
        repo_id=training_args.hub_model_id if training_args.push_to_hub else None,
        dataset_split=split or "test",
        skipped_images=sorted(data.skipped_images),
    )


def _hyperparameters(model_args, data_args, training_args) -> dict:
    keep = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "weight_decay",
            "lr_scheduler_type", "warmup_steps", "label_smoothing_factor", "seed", "bf16")  # fmt: skip
    values = {k: getattr(training_args, k) for k in keep}
    values.update({k: v for k, v in asdict(model_args).items() if v is not None})
    values.update(
        {k: v for k, v in asdict(data_args).items() if v not in (None, 0.0, False) and k != "split_seed"}
    )
    values["world_size"] = training_args.world_size
    return values


def _recipe(model_args, training_args) -> str:
    source = model_args.model_name_or_path
    start = f"Fine-tuned from `{source}`" if source else "Trained from scratch"
    schedule = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    return (
        f"{start} with vitrail's `scripts/train.py` (transformers Trainer, AdamW, {schedule} "
        f"schedule, no weight decay on biases, norms, positions and tokens)."
    )


# Architecture options the card names only where a checkpoint departs from the default (a converted CLIP tower
# shows its pre-norm, bias-free patch embedding and quick GELU).
CARD_OPTIONS = ("hidden_act", "norm_type", "pre_norm", "patch_embedding_bias", "patch_embedding_norm", "final_norm",
                "use_fc_norm", "qkv_bias", "key_bias", "qk_norm", "proj_bias", "mlp_bias", "attention_norm",
                "mlp_norm", "mlp_type", "layer_scale_init_value", "rope_type", "relative_position_bias")  # fmt: skip


def _config_summary(config: VitrailConfig) -> dict:
    keep = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "pooling", "use_cls_token", "position_embedding_type", "num_register_tokens")  # fmt: skip
    defaults = {f.name: f.default for f in fields(VitrailConfig)}
    options = {k: getattr(config, k) for k in CARD_OPTIONS if getattr(config, k) != defaults[k]}
    return {**{k: getattr(config, k) for k in keep}, **options}


def push(output: Path, training_args: TrainingArguments, metrics: dict, split: str | None) -> None:
    """Upload the finished folder with `vitrail.hub.push_checkpoint`, to the repo and branch the flags name, and
    record in `hub_push.json` whether it landed (written before the push: a kill during it reads as not landed)."""
    from .hub import push_checkpoint

    accuracy = metrics.get(f"{PREFIX[split]}_accuracy") if split else None
    record = {
        "repo_id": training_args.hub_model_id or output.name,
        "revision": training_args.hub_revision,
        "landed": False,
        "commit": None,
        "error": None,
    }
    write_json_atomic(output / PUSH_RECORD, record)
    try:
        commit = push_checkpoint(
            output,
            record["repo_id"],
            private=bool(training_args.hub_private_repo),
            revision=training_args.hub_revision,
            token=training_args.hub_token,
            commit_message=f"vitrail: {split} accuracy {accuracy:.4f}" if accuracy is not None else "vitrail",
        )
    except Exception as error:
        write_json_atomic(output / PUSH_RECORD, {**record, "error": f"{type(error).__name__}: {error}"})
        raise
    # No commit when the branch already held these files.
    write_json_atomic(
        output / PUSH_RECORD, {**record, "landed": True, "commit": commit.oid if commit else None}
    )
    logger.info("Hub: %s", commit.commit_url if commit else "unchanged, no new commit")


def argument_parser(**parser_options):
    """The parser of the three argument dataclasses; `parser_options` go to it (`prog`, `description`, ...)."""
    from transformers import HfArgumentParser

    return HfArgumentParser((ModelArguments, DataArguments, VitrailTrainingArguments), **parser_options)


def parse_args(argv: list[str] | None = None, parser=None):
    """The three argument dataclasses from `argv` (or one JSON file), read by `parser` (default:
    `argument_parser()`)."""
    parser = parser or argument_parser()
    if argv and len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


__all__ = [
    "DataArguments",
    "ModelArguments",
    "VitrailTrainer",
    "VitrailTrainingArguments",
    "argument_parser",
    "build_model",
    "closing_process_group",
    "convert_to_fp8",
    "parameter_groups",
    "train",
]
