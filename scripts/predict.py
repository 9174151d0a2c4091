#!/usr/bin/env python
"""Classify image files (or folders of them) with a vitrail checkpoint, and draw what it attends to.

    python scripts/predict.py photo.jpg more_photos/ --model runs/digits --top-k 3
    python scripts/predict.py images/ --model DIR_OR_REPO --json --attention-map maps/

Prints a table, or with `--json` one JSON object per line (`file`, `labels`, `scores`, best first; and
`attention_map` with `--attention-map`). Scores are softmax probabilities (sigmoid for multi-label checkpoints).
Folders are walked recursively for .bmp .gif .jpeg .jpg .png .ppm .tif .tiff .webp files (any case); files named
on the command line are tried whatever their name. A file that cannot be read is reported by name on stderr and
the others are still classified; the exit status is 1 if any input failed. `--attention-map DIR` writes one PNG
per image: the attention rollout and each last-layer head over the image as the model saw it
(`vitrail.visualize`). The checkpoint's own image processor prepares the images (transformers and timm
checkpoints are converted on loading). A few seconds for the digits model here, most of it start-up.
"""

import argparse
import logging
import sys

from transformers.utils import logging as hf_logging

from vitrail.predict import run
from vitrail.training import check_model_source

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    parser.add_argument("--model", required=True, help="a classifier checkpoint: folder or Hub repo id")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument(
        "--attention-map", metavar="OUT_DIR", help="write an attention-map PNG per image here"
    )
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args()
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be positive")
    try:
        check_model_source(
            args.model, "--model"
        )  # a missing folder, named before transformers reads it as a repo id
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    hf_logging.disable_progress_bar()  # "Loading weights" bars would mix with the failures on stderr
    sys.exit(
        run(args.inputs, args.model, args.top_k, args.attention_map, args.json, args.batch_size, args.device)
    )
