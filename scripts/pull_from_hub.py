#!/usr/bin/env python
"""Download a vitrail checkpoint from a Hugging Face Hub model repo, every file checked.

    python scripts/pull_from_hub.py your-name/vitrail-digits                 # into the HF cache
    python scripts/pull_from_hub.py your-name/vitrail-digits --revision v2 --local-dir models/digits-v2
    python scripts/pull_from_hub.py your-name/vitrail-digits --local-dir my-project --overwrite
    HF_HUB_OFFLINE=1 python scripts/pull_from_hub.py your-name/vitrail-digits  # from the cache, no network

The revision (a branch, tag or commit sha) is resolved to one commit, and only what loading needs is downloaded
at that commit: config.json and preprocessor_config.json, the code files their auto_map names (never a name that
is not a plain module file name or would shadow an importable module), the weights and README.md. Each file must
match the sha the Hub lists for it. With --local-dir the files arrive in a hidden folder beside it and replace
the checkpoint there only when all of them arrived intact; .vitrail-pull.json records the revision. Only what an
earlier pull recorded, or the files of a vitrail checkpoint that is there, is replaced; a folder holding files
a checkpoint would (README.md, all_results.json, ...) but no checkpoint is refused before any download, naming
them, unless --overwrite says to replace them. Files no checkpoint holds always stay. Offline, a
--local-dir not in the cache is used only if its record names this repo and revision. Prints the folder; it
opens with `AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)`, with or without
vitrail. On an error, prints it and exits with status 1. HF_ENDPOINT selects another Hub.
"""

import argparse
import logging
import sys

from vitrail.hub import DEFAULT_TIMEOUT, HubError, pull_checkpoint


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_id", help="model repo, 'namespace/name'")
    parser.add_argument("--revision", help="branch, tag or commit sha (default main)")
    parser.add_argument("--local-dir", help="put the files here instead of the HF cache")
    parser.add_argument("--token", help="Hub token, for private repos (default: HF_TOKEN or the saved login)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds each request may wait for the Hub (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files in --local-dir that a checkpoint would hold (README.md, results, plots, ...) even "
        "where no checkpoint or earlier pull put them there; other files stay",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        folder = pull_checkpoint(
            args.repo_id,
            revision=args.revision,
            local_dir=args.local_dir,
            token=args.token,
            timeout=args.timeout,
            overwrite=args.overwrite,
        )
    except HubError as error:
        parser.exit(1, f"error: {error}\n")
    print(folder)
    return folder


if __name__ == "__main__":
    main(sys.argv[1:])
