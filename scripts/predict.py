#!/usr/bin/env python
"""`vitrail predict` as a script: classify image files or folders, and draw what the model attends to.

    python scripts/predict.py photo.jpg more_photos/ --model runs/digits --top-k 3

Exit status 0 when every input was classified, 1 when any failed, 2 for bad flags. A few seconds for the digits
model, most of it start-up; `vitrail predict --help` lists the flags.
"""

import sys

from vitrail.cli import predict as main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
