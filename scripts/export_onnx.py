#!/usr/bin/env python
"""Export a vitrail classifier to ONNX and check it against PyTorch with onnxruntime.

    python scripts/export_onnx.py --model runs/digits --output runs/digits/model.onnx
    python scripts/export_onnx.py --model DIR --output model.onnx --dynamic-size   # any image size too

The graph takes `pixel_values` `(batch, channels, height, width)`, preprocessed as the checkpoint's image
processor does, and gives `logits`. The batch is always dynamic; `--dynamic-size` makes height and width dynamic
too (from two patches a side), for checkpoints whose config has `dynamic_image_size=True`. The file is then run
with onnxruntime on batch sizes 1 and 3 (and, with `--dynamic-size`, two other image sizes) and compared with
PyTorch: prints `max abs logit difference: ...` and exits with status 1 above `--tolerance` (1e-4). Needs `onnx`,
`onnxscript` and `onnxruntime` (vitrail's dev extra). About 15 s of CPU for a digits model here (25 s on a busy machine).
"""

import argparse
import logging
import sys

from vitrail import VitrailForImageClassification
from vitrail.export import check_inputs, export_onnx, onnx_max_difference
from vitrail.training import check_model_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub repo id")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--dynamic-size", action="store_true", help="dynamic height and width as well as batch"
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest logit difference accepted")
    args = parser.parse_args(argv)
    try:
        check_model_source(args.model, "--model")
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(format="%(message)s")
    logging.getLogger("vitrail").setLevel(logging.INFO)  # our per-input differences, not onnxscript's passes

    model = VitrailForImageClassification.from_pretrained(args.model).eval()
    if args.dynamic_size and not model.config.dynamic_image_size:
        height, width = model.config.image_hw
        parser.error(
            f"--dynamic-size needs a checkpoint whose config has `dynamic_image_size=True`; {args.model} takes "
            f"{height}x{width} images only. Export it without --dynamic-size, or save a copy that accepts any size: "
            f"`VitrailForImageClassification.from_pretrained({args.model!r}, dynamic_image_size=True)"
            ".save_pretrained(NEW_DIR)`."
        )
    path = export_onnx(model, args.output, dynamic_size=args.dynamic_size)
    difference = onnx_max_difference(path, model, check_inputs(model.config, args.dynamic_size))
    print(f"wrote {path} (weights in {path}.data)")
    print(f"max abs logit difference: {difference:.3g} (onnxruntime vs PyTorch)")
    if difference > args.tolerance:
        print(f"above the tolerance {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
