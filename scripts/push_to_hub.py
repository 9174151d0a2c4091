#!/usr/bin/env python
"""`vitrail push` as a script: check a checkpoint folder and push it to a Hub model repo, as one commit.

    python scripts/push_to_hub.py runs/digits your-name/vitrail-digits

Prints the commit URL (or that nothing changed); on an error, prints it and exits with status 1. A few seconds
plus the upload; `vitrail push --help` lists the flags.
"""

import sys

from vitrail.cli import push as main

if __name__ == "__main__":
    main(sys.argv[1:])
