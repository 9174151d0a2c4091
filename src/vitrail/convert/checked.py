"""A conversion that proves itself: the job behind `vitrail convert` (and `scripts/convert_checkpoint.py`).

Converts a foreign checkpoint, runs the source's own implementation beside the converted model on one fixed input
(again after resampling to another size), saves a complete vitrail folder, reopens it and compares once more.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from ..configuration_vitrail import VitrailConfig
from . import fit_processor_to
from .common import model_outputs

# The largest max abs difference of logits (or last hidden states) that `vitrail convert` accepts.
TOLERANCE = 1e-4
logger = logging.getLogger(__name__)


def _compare(model, reference, pixels: torch.Tensor, what: str) -> float:
    if reference is None:
        print(f"{what}: no reference implementation available, comparison skipped")
        return 0.0
    diff = (model_outputs(model, pixels) - reference(pixels)).abs().max().item()
    print(f"max abs logit difference ({what}): {diff:.3e}")
    return diff


def convert_checked(source_format: str, src: Path, dst: Path, target_size=None, **options) -> float:
    """Convert, compare, (resample, compare,) save, reload, compare; returns the largest difference seen."""
    module = importlib.import_module(f"vitrail.convert.{source_format}")
    converted = module.open_source(src, **{k: v for k, v in options.items() if v is not None})
    for note in converted.notes:
        print(note)
    model, processor = converted.model.eval(), converted.processor
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, model.config.num_channels, *model.config.image_hw, generator=generator)
    diffs = [_compare(model, converted.reference, pixels, "converted, before saving")]

    if target_size is not None:
        old_hw, new_hw = model.config.image_hw, VitrailConfig(image_size=target_size, patch_size=1).image_hw
        if new_hw != old_hw:
            model.set_image_size(target_size)
            if processor is not None:
                fit_processor_to(processor, new_hw)
            pixels = torch.randn(2, model.config.num_channels, *new_hw, generator=generator)
            diffs.append(
                _compare(model, converted.reference, pixels, f"resampled to {new_hw[0]}x{new_hw[1]}")
            )

    model.save_pretrained(dst)
    if processor is not None:
        processor.save_pretrained(dst)
    else:
        logger.warning("The source says nothing about preprocessing: %s has no image processor.", dst)
    reloaded = type(model).from_pretrained(dst).eval()
    after = (model_outputs(reloaded, pixels) - model_outputs(model, pixels)).abs().max().item()
    print(f"max abs logit difference (reloaded from {dst} vs converted): {after:.3e}")
    diffs.append(after)
    return max(diffs)
