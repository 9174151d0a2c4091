"""SimMIM masked-image-modeling pretraining (Xie et al. 2021) with the Trainer; `scripts/pretrain_mim.py` is the
command line. The checkpoint it writes is what `scripts/train.py --model_name_or_path` fine-tunes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .configuration_vitrail import VitrailConfig
from .modeling_vitrail import VitrailForMaskedImageModeling
from .run_folder import model_settings
from .training import (
    DataArguments,
    VitrailTrainer,
    batch_augment,
    begin_run,
    check_overrides,
    collect_skipped,
    fit,
    new_processor,
    open_run,
    parse_overrides,
    prepare_splits,
    push,
    save_run,
    trainer_arguments,
)

logger = logging.getLogger(__name__)


@dataclass
class PretrainArguments:
    variant: str | None = field(default=None, metadata={"help": "Model size, e.g. 'Ti/16'."})
    config_overrides: str | None = field(default=None, metadata={"help": "Comma-separated config fields."})
    image_size: int | None = field(default=None, metadata={"help": "Input size."})
    mask_ratio: float = field(default=0.6, metadata={"help": "Fraction of patches hidden from the encoder."})
    mask_patch_size: int | None = field(
        default=None,
        metadata={
            "help": "Side of the square blocks that are masked together, in pixels (SimMIM uses 32); a "
            "multiple of the model's patch size. Default: one model patch."
        },
    )


class MaskingCollator:
    """Stacks images and draws a SimMIM mask per image: `mask_ratio` of the blocks of `block` x `block` patches."""

    def __init__(self, grid: tuple[int, int], mask_ratio: float, block: int = 1):
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"`mask_ratio` is a fraction in (0, 1), got {mask_ratio}.")
        self.grid, self.ratio, self.block = grid, mask_ratio, block
        self.blocks = (-(-grid[0] // block), -(-grid[1] // block))

    def __call__(self, samples):
        pixels = torch.stack([torch.as_tensor(s["pixel_values"]) for s in samples])
        count = self.blocks[0] * self.blocks[1]
        hidden = max(1, round(count * self.ratio))
        # The `hidden` lowest of uniform scores per image: an exact count of masked blocks, in random places.
        order = torch.rand(len(samples), count).argsort(dim=1)
        masked = torch.zeros(len(samples), count, dtype=torch.bool)
        masked.scatter_(1, order[:, :hidden], True)
        masked = masked.reshape(-1, *self.blocks)
        masked = masked.repeat_interleave(self.block, 1).repeat_interleave(self.block, 2)
        masked = masked[:, : self.grid[0], : self.grid[1]].reshape(len(samples), -1)
        return {"pixel_values": pixels, "bool_masked_pos": masked}


def pretrain(args: PretrainArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Pretrain an encoder with SimMIM and save it as a checkpoint; reruns resume, refuse or report a finished
    run as `vitrail.training.train` does."""
    overrides = parse_overrides(args.config_overrides)
    check_overrides(overrides, image_size=args.image_size)
    output, data = open_run(data_args, training_args)
    if args.image_size:
        overrides["image_size"] = args.image_size
    if "patch_size" in overrides:  # SimMIM reconstructs one patch per token
        overrides.setdefault("encoder_stride", overrides["patch_size"])
    config = (
        VitrailConfig.from_variant(args.variant, **overrides) if args.variant else VitrailConfig(**overrides)
    )
    block = 1
    if args.mask_patch_size:
        patch = config.patch_hw[0]
        if args.mask_patch_size % patch:
            raise ValueError(
                f"--mask_patch_size {args.mask_patch_size} must be a multiple of the patch size {patch}."
            )
        block = args.mask_patch_size // patch
    source = {"config": model_settings(config), "mask_ratio": args.mask_ratio, "mask_block": block}
    start = begin_run("pretrain_mim", source, data, data_args, training_args)
    if start.finished is not None:
        if training_args.push_to_hub and training_args.process_index == 0:  # e.g. after a failed push
            push(output, training_args, start.finished, None)
        return start.finished
    processor = new_processor(config)
    prepare_splits(data.splits, processor, data_args, data.image_column, data.label_column, training_args)
    trainer = VitrailTrainer(
        model=VitrailForMaskedImageModeling(config),
        # The masks play the part of labels: with them named so, evaluation computes the masked loss.
        args=trainer_arguments(training_args, data.splits, label_names=["bool_masked_pos"]),
        train_dataset=data.splits["train"],
        eval_dataset=data.splits["validation"],
        data_collator=MaskingCollator(config.grid_size, args.mask_ratio, block),
        processing_class=processor,
        augment=batch_augment(data_args, processor),
    )
    metrics = fit(trainer, start)
    collect_skipped(trainer, data)
    results = {**metrics, "skipped_images": data.skipped_images} if data.skipped_images else metrics
    save_run(trainer, output, training_args, results)
    return results
