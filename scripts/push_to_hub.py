#!/usr/bin/env python
"""Check a vitrail checkpoint folder and push it to a Hugging Face Hub model repo, as one commit.

    python scripts/push_to_hub.py runs/digits your-name/vitrail-digits                # main branch
    python scripts/push_to_hub.py runs/digits your-name/vitrail-digits --revision v2 --private
    python scripts/push_to_hub.py runs/digits your-name/vitrail-digits --commit-message "150 epochs, 98.3%"

The folder must be a complete checkpoint (model.safetensors, config.json, the code files,
preprocessor_config.json; no pickle files); it is loaded with its own code and run once before anything is
uploaded (a few seconds). Only the files that differ from the branch are committed, and an unchanged folder
makes no commit. Subfolders (the Trainer's checkpoint-*) are not pushed. The token comes from --token,
HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub. Prints the commit URL, or says that nothing
changed.
"""

import argparse
import logging
import sys

from vitrail.hub import CheckpointError, HubError, push_checkpoint


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="checkpoint folder, e.g. runs/digits")
    parser.add_argument("repo_id", help="model repo, 'namespace/name' (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private (if it is new)")
    parser.add_argument("--revision", help="branch to commit to (default main; created if missing)")
    parser.add_argument("--commit-message", help="commit title")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the saved login)")
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
        )
    except (CheckpointError, HubError) as error:
        parser.exit(1, f"error: {error}\n")
    print(
        f"pushed: {commit.commit_url}" if commit else f"unchanged: {args.repo_id} already holds {args.folder}"
    )
    return commit


if __name__ == "__main__":
    main(sys.argv[1:])
