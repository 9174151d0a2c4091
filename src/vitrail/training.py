"""Fine-tuning and training from scratch with transformers' Trainer; `scripts/train.py` is the command line.

Runs unchanged as `python scripts/train.py ...` and `accelerate launch --multi_gpu --num_processes N
scripts/train.py ...`: the Trainer takes its distributed setup from Accelerate (DDP; FSDP only on GPUs, and
`check_fsdp` refuses it where Accelerate would drop it).
"""

from __future__ import annotations

import copy
import gc
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
from datasets import Image, load_dataset
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
    digits_dataset,
    image_folder_dataset,
    mode_problem,
    split_dataset,
)
from .image_processing_vitrail import VitrailImageProcessor
from .modeling_vitrail import VitrailForImageClassification
from .run_folder import (
    PUSH_RECORD,
    RESULTS,
    RunStart,
    check_foreign_files,
    check_model_source,
    check_output_dir,
    model_settings,
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


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"A Hub dataset (needs network). Default: {DEFAULT_DATASET}, embedded."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's config name."})
    train_dir: str | None = field(
        default=None, metadata={"help": "Image folder <dir>/<class>/<image> to train on."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for validation."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the class labels."})
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
            "help": "Leave out images of --train_dir/--validation_dir that cannot be decoded (listed in "
            "all_results.json and the model card) instead of stopping."
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
            "that they train together over gloo (README, 'Several processes')."
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
        "scripts/train.py ... --use_cpu true` trains with DDP (README, 'Several processes'). To shard, launch on "
        "GPUs with `accelerate launch --use_fsdp ...`."
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


# ---- data -------------------------------------------------------------------------------------------------------


@dataclass
class LoadedData:
    """The splits of a run, the dataset's readable name, the split record (`data_split.json`), and the images
    `--skip_bad_images` left out (name -> reason)."""

    splits: dict
    name: str
    record: dict
    skipped_images: dict[str, str]


def load_splits(data_args: DataArguments) -> LoadedData:
    """train / validation / test splits from the Hub, image folders, or the embedded default."""
    skipped: dict[str, str] = {}
    if data_args.train_dir:
        splits, skipped = image_folder_dataset(
            data_args.train_dir, data_args.validation_dir, data_args.skip_bad_images
        )
        # By name, not path: the record travels with the checkpoint, and the sample hashes below identify the data.
        name = source = Path(data_args.train_dir).resolve().name
    elif data_args.dataset_name:
        splits = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        name = source = data_args.dataset_name
        if data_args.dataset_config_name:
            source += f":{data_args.dataset_config_name}"
    else:
        splits = {"train": digits_dataset()}
        name = source = DEFAULT_DATASET
    splits = dict(splits)
    if "train" not in splits:
        raise ValueError(f"The dataset has no 'train' split (it has {sorted(splits)}).")
    check_columns(splits["train"], data_args.image_column_name, data_args.label_column_name)
    for key, split in splits.items():
        if SAMPLE_ID not in split.column_names:  # rows are named by their place in the split they came in
            splits[key] = split.add_column(SAMPLE_ID, [f"{key}:{i}" for i in range(len(split))])
    carved = [key for key in ("validation", "test") if key not in splits]
    if carved:
        parts = split_dataset(
            splits.pop("train"),
            data_args.label_column_name,
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
    return LoadedData(splits, name, record, skipped)


def _split_summary(split) -> dict | None:
    """Size and a SHA-256 of the sorted sample names: equal for the same images, whatever their order."""
    if split is None:
        return None
    names = "\n".join(sorted(str(name) for name in split[SAMPLE_ID]))
    return {"size": len(split), "sha256": hashlib.sha256(names.encode()).hexdigest()}


class ProcessedSplit(torch.utils.data.Dataset):
    """A split whose images are already processed, held as one `(N, C, H, W)` tensor: fetching a batch is a few
    tensor indexings, where a `datasets` row format costs about 1 ms an image here."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def decode_images(batch: dict, image_col: str, feature: Image | None) -> list:
    """The batch's images, decoded here rather than inside datasets so that a file that fails is named."""
    if feature is None:
        return batch[image_col]
    values = batch[image_col]
    images = []
    for value, sample in zip(values, batch.get(SAMPLE_ID) or [None] * len(values), strict=True):
        try:
            image = feature.decode_example(value)
            problem = mode_problem(image.mode)
        except Exception as error:  # PIL and datasets raise many types; all mean the same here
            problem = f"{type(error).__name__}: {error}"
        if problem:
            raise ValueError(
                f"Cannot read image {value.get('path') or sample or 'in memory'}: {problem}. Remove or replace it."
            )
        images.append(image)
    return images


def prepare_splits(splits, processor, data_args: DataArguments) -> None:
    """Turn images into `pixel_values` with the image processor (the evaluation transform). When the processed
    data is small (`--cache_pixels`, default: up to 1 GiB) it is computed once, not every epoch; RandAugment needs
    the images themselves and keeps training on the fly. Geometric augmentation comes later, per batch."""
    image_col, label_col = data_args.image_column_name, data_args.label_column_name
    rand_augment = None
    # RandAugment (Cubuk et al. 2020) works on PIL images, so it runs before the processor.
    if data_args.rand_augment:
        from torchvision.transforms import v2

        rand_augment = v2.RandAugment()

    def process(batch, feature: Image | None, augment: bool = False):
        images = decode_images(batch, image_col, feature)
        if augment:
            images = [rand_augment(im if im.mode in ("L", "RGB") else im.convert("RGB")) for im in images]
        return {
            "pixel_values": processor(images, return_tensors="pt")["pixel_values"],
            "labels": batch[label_col],
        }

    height, width = processor_output_hw(processor)
    for key in ("train", "validation", "test"):
        split = splits.get(key)
        if split is None:
            continue
        feature = split.features[image_col]
        if isinstance(feature, Image) and feature.decode:
            split = split.cast_column(image_col, Image(decode=False))
        else:
            feature = None
        on_the_fly = key == "train" and rand_augment is not None
        cache = data_args.cache_pixels
        if cache is None:
            cache = len(split) * processor.num_channels * height * width * 4 <= 2**30
        if cache and not on_the_fly:
            chunks = [process(split[start : start + 256], feature) for start in range(0, len(split), 256)]
            pixels = torch.cat([chunk["pixel_values"] for chunk in chunks])
            splits[key] = ProcessedSplit(pixels, torch.tensor(split[label_col]))
        else:
            split.set_transform(partial(process, feature=feature, augment=on_the_fly))
            splits[key] = split


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
        super().__init__(*args, **kwargs)
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

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = dict(inputs)  # the batch stays as the data loader gave it
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


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Train, evaluate on validation and the held-out test split, and write a shareable checkpoint folder.

    Returns what the folder's `all_results.json` holds. A rerun of a finished run with the same settings
    returns it without training; see `vitrail.run_folder.start_run` for resuming and refusing.
    """
    from .metrics import make_compute_metrics  # here, not at the top: it imports `evaluate`, which is slow

    check_arguments(model_args)
    output, data = open_run(data_args, training_args)
    labels = data.splits["train"].features[data_args.label_column_name].names
    model, processor = build_model(model_args, labels)
    source = {
        "model_name_or_path": _source_id(model_args.model_name_or_path),
        "config": model_settings(model.config),
    }
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
    prepare_splits(data.splits, processor, data_args)
    trainer = VitrailTrainer(
        model=model,
        args=trainer_arguments(training_args),
        train_dataset=data.splits["train"],
        eval_dataset=data.splits["validation"],
        data_collator=default_data_collator,
        processing_class=processor,
        compute_metrics=make_compute_metrics(len(labels)),
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
    results = {**metrics, "skipped_images": data.skipped_images} if data.skipped_images else metrics
    report = partial(
        write_report, output, trainer, metrics, split, prediction, data, model_args, data_args, training_args
    )
    save_run(trainer, output, training_args, results, split, report)
    return results


def reported_split(splits: dict) -> str | None:
    """The split whose results a run reports: the held-out test split, else the validation split, else none."""
    return next((key for key in PREFIX if splits[key] is not None), None)


def open_run(data_args: DataArguments, training_args: TrainingArguments) -> tuple[Path, LoadedData]:
    """Refuse a launch or flags that would train nothing, make sure the output folder is usable, load the data,
    and seed (the Trainer seeds too, but only after the caller has initialised the model)."""
    check_process_group(training_args)
    check_schedule(training_args)
    check_split_fractions(data_args)
    output = check_output_dir(training_args.output_dir)
    # Trainer users may pass transformers' TrainingArguments, which lacks the flag.
    check_foreign_files(output, overwrite=getattr(training_args, "overwrite_output_dir", False))
    data = load_splits(data_args)
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
    return start_run(training_args, settings, data.record)


def data_settings(data_args: DataArguments) -> dict:
    """The data arguments that change training, less those the split record covers (source, fractions, seed,
    and through its hashes `--max_*_samples` and `--skip_bad_images`); `--cache_pixels` changes only speed."""
    left_out = {"dataset_name", "dataset_config_name", "train_dir", "validation_dir", "test_size",
                "validation_size", "split_seed", "max_train_samples", "max_eval_samples", "skip_bad_images",
                "cache_pixels"}  # fmt: skip
    return {k: v for k, v in asdict(data_args).items() if k not in left_out}


def _source_id(source: str | None) -> str | None:
    """A local checkpoint by its absolute path (the same folder whatever the working directory), else as given."""
    if source and Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    return source


def trainer_arguments(training_args: TrainingArguments, **changes) -> TrainingArguments:
    """The Trainer's copy of `training_args`, with `changes`; the caller's arguments stay as given (they are what
    `training_args.json` records). The copy keeps the raw image column, which `set_transform` reads, and does not
    push: the Trainer's push would upload training_args.bin (a pickle) and its own card before ours exists, so
    `save_run` pushes the finished folder instead."""
    args = copy.copy(training_args)  # not dataclasses.replace: that would run __post_init__ a second time
    args.remove_unused_columns = False
    args.push_to_hub = False
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


def parse_args(argv: list[str] | None = None, **parser_options):
    """The three argument dataclasses from `argv` (or one JSON file); `parser_options` go to the parser
    (`prog`, `description`, ...)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, VitrailTrainingArguments), **parser_options)
    if argv and len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


__all__ = [
    "DataArguments",
    "ModelArguments",
    "VitrailTrainer",
    "VitrailTrainingArguments",
    "build_model",
    "closing_process_group",
    "parameter_groups",
    "train",
]
