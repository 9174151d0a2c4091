#!/usr/bin/env python
"""Score a vitrail classifier on a data split and write metrics.json and confusion_matrix.png.

    python scripts/evaluate_checkpoint.py --model runs/digits            # the embedded digits' held-out test split
    python scripts/evaluate_checkpoint.py --model DIR --train_dir IMAGES --split validation --output_dir out/

Not named `evaluate.py`: Python puts `scripts/` first on `sys.path` for every script there, and a file of that
name would shadow the `evaluate` package that train.py's metrics import. Data arguments are train.py's (same splits
for the same seed and fractions); a split other than the one in the checkpoint's data_split.json is refused unless
`--allow_split_mismatch` is given. Takes a few seconds on the digits.
"""

import sys

from transformers import HfArgumentParser

from vitrail.evaluate_checkpoint import EvaluateArguments, evaluate_checkpoint
from vitrail.training import DataArguments

if __name__ == "__main__":
    args, data_args = HfArgumentParser((EvaluateArguments, DataArguments)).parse_args_into_dataclasses(
        sys.argv[1:]
    )
    metrics = evaluate_checkpoint(args, data_args)
    for name, value in sorted(metrics.items()):
        print(f"{name} = {value:.4f}" if isinstance(value, float) else f"{name} = {value}")
