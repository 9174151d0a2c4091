#!/usr/bin/env python
"""Check a vitrail checkpoint folder and push it to a Hugging Face Hub model repo, as one commit.

    python scripts/push_to_hub.py runs/digits your-name/vitrail-digits                # main branch
    python scripts/push_to_hub.py runs/digits your-name/vitrail-digits --revision v2 --private
    python scripts/push_to_hub.py runs/digits your-name/vitrail-digits --include "*.txt" --timeout 30

The folder must be a complete checkpoint (model.safetensors or an index and its shards, config.json, the code
files, preprocessor_config.json; no pickle files, no symbolic links); it is loaded with its own code and run once
before anything is uploaded (a few seconds). Pushed: the weights, the two configs, the code files their auto_map
names, README.md and the PNGs it shows, the trainer's plots and result files. Everything else in the folder is
printed as "not pushed"; --include PATTERN (repeatable) adds top-level files on purpose. Files that already match
the branch are left out of the commit, and an unchanged folder makes no commit; weights of the other layout on
the branch are deleted in the same commit. The token comes from --token, HF_TOKEN or `hf auth login`;
HF_ENDPOINT selects another Hub. Prints the commit URL, or says that nothing changed; on an error, prints it
and exits with status 1.
"""

import argparse
import logging
import sys

from vitrail.hub import DEFAULT_TIMEOUT, CheckpointError, HubError, not_pushed, push_checkpoint


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="checkpoint folder, e.g. runs/digits")
    parser.add_argument("repo_id", help="model repo, 'namespace/name' (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private (if it is new)")
    parser.add_argument("--revision", help="branch to commit to (default main; created if missing)")
    parser.add_argument("--commit-message", help="commit title")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the saved login)")
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also push the top-level files matching this pattern, e.g. '*.txt' (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds each request may wait for the Hub (default {DEFAULT_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        commit = push_checkpoint(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            include=args.include,
            timeout=args.timeout,
        )
    except (CheckpointError, HubError) as error:
        parser.exit(1, f"error: {error}\n")
    print(
        f"pushed: {commit.commit_url}" if commit else f"unchanged: {args.repo_id} already holds {args.folder}"
    )
    if left_out := not_pushed(args.folder, args.include):
        print(f"not pushed: {', '.join(left_out)}")
    return commit


if __name__ == "__main__":
    main(sys.argv[1:])
