#!/usr/bin/env python
"""`vitrail train` as a file, for launchers that run one (`accelerate launch`, `torchrun`): same flags, same job.

    python scripts/train.py --output_dir runs/digits  <recipe flags: see DIGITS_RECIPE in the Makefile>
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --output_dir runs/ddp ... --use_cpu true

The main job trains from scratch on the embedded digits in under 2 minutes on a 2-core CPU and reaches about
97.5% test accuracy (docs/guides/training.md). `vitrail train --help` lists every flag.
"""

import sys

from vitrail.cli import train as main

if __name__ == "__main__":
    main(sys.argv[1:])
