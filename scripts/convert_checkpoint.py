#!/usr/bin/env python
"""`vitrail convert` as a script: convert a foreign ViT checkpoint into a vitrail folder, and prove it predicts
the same.

    python scripts/convert_checkpoint.py --from hf --input /tmp/vit-b16 --output /tmp/vit-b16-vitrail

Prints each max abs logit difference and exits with status 1 above 1e-4; about 14 s for a ViT-B/16 on a 2-core
CPU. `vitrail convert --help` lists the sources and flags.
"""

import sys

from vitrail.cli import convert as main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
