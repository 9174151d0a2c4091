#!/usr/bin/env python
"""Fine-tune or train a vitrail image classifier with transformers' Trainer.

The main job (`make train`) trains from scratch on the embedded digits (scikit-learn's 1,797 real 8x8 scans, split
70/10/20 stratified, seed 0) and reports accuracy on the held-out 20% test split:

    python scripts/train.py --output_dir runs/digits  <recipe flags: see RECIPE in the Makefile>

Other data: `--train_dir DIR [--validation_dir DIR]` (image folders, <dir>/<class>/<image>) or `--dataset_name`
(a Hub dataset, when online). Other models: `--model_name_or_path CKPT` fine-tunes a checkpoint (a new label set
re-initialises the head, `--image_size` resamples positions), `--variant S/16 [--config_overrides ...]` trains from
scratch. Every `TrainingArguments` flag works (`--bf16`, `--resume_from_checkpoint`, `--push_to_hub`, ...), and the
same command runs under `accelerate launch --multi_gpu --num_processes N scripts/train.py ...` (add
`--use_cpu true` on CPUs; FSDP is refused there, see the README's "Several processes").

Rerun in the same `--output_dir`, it resumes from the newest complete checkpoint, or prints the results of the
finished run; with other settings it stops and names them (`--overwrite_output_dir` starts again).

Output folder: model.safetensors, config.json, preprocessor_config.json, the code files (opens with
`trust_remote_code=True` without vitrail), all_results.json (with test_accuracy and train_runtime),
README.md (model card), training_curves.png, confusion_matrix.png, run_settings.json, data_split.json.
"""

import logging
import sys

from transformers.utils import logging as hf_logging

from vitrail.training import closing_process_group, parse_args, train


def main(argv: list[str] | None = None) -> dict:
    # Parsing the arguments already forms the process group of a multi-process launch; every rank ends it.
    with closing_process_group():
        model_args, data_args, training_args = parse_args(argv)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        hf_logging.set_verbosity_warning()
        metrics = train(model_args, data_args, training_args)
    if training_args.process_index == 0:
        # With --test_size 0 the report is on the validation split, and without one there is none.
        accuracy = next(
            (f"{k}={metrics[k]:.4f} " for k in ("test_accuracy", "eval_accuracy") if k in metrics), ""
        )
        print(
            f"{accuracy}train_runtime={metrics['train_runtime']:.1f}s output_dir={training_args.output_dir}"
        )
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
