"""Convert a foreign Vision Transformer checkpoint into a complete vitrail folder, and prove it predicts the same.

    .venv/bin/python scripts/convert_checkpoint.py --from hf --input /tmp/vitb --output /tmp/vitb-vitrail

Runtime on this 2-core CPU: 14 s for a ViT-B/16 with 1,000 classes (346 MB read and written, two forward passes
of 2 images at 224 px), about 2 s for the tiny test models. `--input` is a local transformers ViT or DeiT folder
(config.json + model.safetensors; the Hub is not reachable here). The script converts the weights
(`vitrail.convert`), runs transformers' own class loaded from `--input` and the converted model on one fixed input,
then saves the model (`save_pretrained`) and a `VitrailImageProcessor` matching the source's
preprocessor_config.json when there is one, reopens the saved folder and compares again. It prints
`max abs logit difference: ...` (last hidden state for backbone-only checkpoints) and exits with status 1 above
1e-4. Expected: 0.000e+00 (measured on the ViT-B/16 above and the tiny ViT/DeiT of tests/test_convert.py; the
fused qkv product gives the same floats as three separate ones here).

`--from timm` and `--from npz` are reserved and not implemented yet.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import transformers

from vitrail import VitrailForImageClassification, VitrailModel
from vitrail.convert import image_processor_from_hf, load_hf_checkpoint

TOLERANCE = 1e-4
logger = logging.getLogger("convert_checkpoint")


def _outputs(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _reference_model(src: Path):
    config = transformers.AutoConfig.from_pretrained(src)
    architecture = (config.architectures or ["ViTModel"])[0]
    return getattr(transformers, architecture).from_pretrained(src).eval()


def convert_hf(src: Path, dst: Path, allow_pickle: bool = False) -> float:
    """Convert, compare, save, reload, compare; returns the larger of the two max abs differences."""
    model = load_hf_checkpoint(src, allow_pickle=allow_pickle)
    reference = _reference_model(src)
    config = model.config
    torch.manual_seed(0)
    pixels = torch.randn(2, config.num_channels, *config.image_hw)
    want = _outputs(reference, pixels)
    before = (_outputs(model, pixels) - want).abs().max().item()
    print(f"max abs logit difference (converted, before saving): {before:.3e}")
    if before > TOLERANCE:
        return before

    model.save_pretrained(dst)
    preprocessor = src / "preprocessor_config.json"
    if preprocessor.is_file():
        image_processor_from_hf(json.loads(preprocessor.read_text())).save_pretrained(dst)
    else:
        logger.warning("No preprocessor_config.json in %s: the output folder has no image processor.", src)
    cls = VitrailForImageClassification if isinstance(model, VitrailForImageClassification) else VitrailModel
    reloaded = cls.from_pretrained(dst).eval()
    after = (_outputs(reloaded, pixels) - want).abs().max().item()
    print(f"max abs logit difference (reloaded from {dst}): {after:.3e}")
    return max(before, after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source_format", required=True, choices=["hf", "timm", "npz"])
    parser.add_argument("--input", required=True, type=Path, help="source checkpoint folder")
    parser.add_argument("--output", required=True, type=Path, help="vitrail folder to write")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="read pytorch_model.bin when no safetensors file exists"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.source_format != "hf":
        parser.error(f"--from {args.source_format} is not implemented yet; only --from hf works so far.")
    diff = convert_hf(args.input, args.output, allow_pickle=args.allow_pickle)
    print(f"max abs logit difference: {diff:.3e}")
    if diff > TOLERANCE:
        print(f"FAILED: difference above {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
