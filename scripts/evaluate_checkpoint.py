#!/usr/bin/env python
"""`vitrail evaluate` as a script: score a classifier on a data split (metrics.json, confusion_matrix.png).

    python scripts/evaluate_checkpoint.py --model runs/digits            # the digits' held-out test split

Not named `evaluate.py`: Python puts `scripts/` first on `sys.path` for every script there, and a file of that
name would shadow the `evaluate` package. A few seconds on the digits; `vitrail evaluate --help` lists the flags.
"""

import sys

from vitrail.cli import evaluate as main

if __name__ == "__main__":
    main(sys.argv[1:])
