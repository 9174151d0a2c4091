#!/usr/bin/env python
"""`vitrail pretrain` as a file, for launchers that run one (`accelerate launch scripts/pretrain_mim.py ...`).

    python scripts/pretrain_mim.py --output_dir runs/mim --config_overrides ... --use_cpu true

SimMIM masked-image-modeling pretraining on unlabeled images; `vitrail pretrain --help` lists every flag.
"""

import sys

from vitrail.cli import pretrain as main

if __name__ == "__main__":
    main(sys.argv[1:])
