#!/usr/bin/env python
"""Download a vitrail checkpoint from a Hugging Face Hub model repo.

    python scripts/pull_from_hub.py your-name/vitrail-digits                 # into the HF cache
    python scripts/pull_from_hub.py your-name/vitrail-digits --revision v2 --local-dir models/digits-v2
    HF_HUB_OFFLINE=1 python scripts/pull_from_hub.py your-name/vitrail-digits  # from the cache, no network

Only what loading needs is downloaded (weights, config.json, preprocessor_config.json, the code files,
README.md). With --local-dir the files arrive in a temporary folder beside it and are moved in only when all
of them are there: a failed pull leaves no partial checkpoint. Prints the folder; it opens with
`AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)`, with or without vitrail.
--revision takes a branch, tag or commit sha; HF_ENDPOINT selects another Hub.
"""

import argparse
import logging
import sys

from vitrail.hub import HubError, pull_checkpoint


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_id", help="model repo, 'namespace/name'")
    parser.add_argument("--revision", help="branch, tag or commit sha (default main)")
    parser.add_argument("--local-dir", help="put the files here instead of the HF cache")
    parser.add_argument("--token", help="Hub token, for private repos (default: HF_TOKEN or the saved login)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        folder = pull_checkpoint(
            args.repo_id, revision=args.revision, local_dir=args.local_dir, token=args.token
        )
    except HubError as error:
        parser.exit(1, f"error: {error}\n")
    print(folder)
    return folder


if __name__ == "__main__":
    main(sys.argv[1:])
