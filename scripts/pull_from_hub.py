#!/usr/bin/env python
"""`vitrail pull` as a script: download a checkpoint from a Hub model repo, every file checked.

    python scripts/pull_from_hub.py your-name/vitrail-digits --local-dir models/digits

Prints the folder; on an error, prints it and exits with status 1. `vitrail pull --help` lists the flags.
"""

import sys

from vitrail.cli import pull as main

if __name__ == "__main__":
    main(sys.argv[1:])
