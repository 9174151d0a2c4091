#!/usr/bin/env python
"""SimMIM masked-image-modeling pretraining of a vitrail encoder on unlabeled images.

    python scripts/pretrain_mim.py --output_dir runs/mim --config_overrides image_size=8,patch_size=2,\
encoder_stride=2,num_channels=1,hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=512 \
        --num_train_epochs 20 --learning_rate 1e-3 --per_device_train_batch_size 128 --use_cpu
    python scripts/train.py --model_name_or_path runs/mim --output_dir runs/mim-ft ...

Data as for train.py: `--train_dir` (an image folder; labels are ignored), `--dataset_name`, or the embedded digits.
The masked L1 loss is logged; the output folder is a complete vitrail checkpoint (weights, config, processor,
code). Runs under `accelerate launch` unchanged.
"""

import logging
import sys

from transformers import HfArgumentParser

from vitrail.pretraining import PretrainArguments, pretrain
from vitrail.training import DataArguments, VitrailTrainingArguments, closing_process_group

if __name__ == "__main__":
    with closing_process_group():  # every rank ends the process group of a multi-process launch
        parser = HfArgumentParser((PretrainArguments, DataArguments, VitrailTrainingArguments))
        args, data_args, training_args = parser.parse_args_into_dataclasses(args=sys.argv[1:])
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        metrics = pretrain(args, data_args, training_args)
    print(f"train_loss={metrics['train_loss']:.4f} output_dir={training_args.output_dir}")
