#!/usr/bin/env python
"""`vitrail export` as a script: export a classifier to ONNX and check it with onnxruntime.

    python scripts/export_onnx.py --model runs/digits --output runs/digits/model.onnx

Prints `max abs logit difference: ...` and exits with status 1 above `--tolerance` (1e-4); about 15 s for a
digits model on a 2-core CPU. `vitrail export --help` lists the flags.
"""

import sys

from vitrail.cli import export as main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
