"""The baseline of `benchmarks/data_scale.py`: transformers' Trainer on an `imagefolder` dataset, following the
pipeline of transformers' `examples/pytorch/image-classification/run_image_classification.py` step for step
(written for this benchmark, not copied; the example itself needs the Hub for its metric and an older datasets).

    python benchmarks/imagefolder_trainer.py --train_dir PHOTOS --output_dir OUT --max_steps 20 \
        [--per_device_train_batch_size 32] [--dataloader_num_workers 0] [--train_val_split 0.15]

The steps: `load_dataset("imagefolder", data_dir=...)`; a validation split carved from the training split
(`train_test_split`, 15% by default) when there is none; class names from the label feature; an image processor
for the input size and its mean and std; `set_transform` with torchvision's RandomResizedCrop, RandomHorizontalFlip,
ToTensor and Normalize for training (Resize, CenterCrop for evaluation); a ViT-Ti/16 classifier (transformers'
`ViTForImageClassification`, random weights); `Trainer` with a collator that stacks the tensors. Every other flag
is a `TrainingArguments` flag; the data loader workers default to the Trainer's (0), as in the example.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from torchvision.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)
from transformers import (
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)


@dataclass
class DataFlags:
    train_dir: str = field(metadata={"help": "Image folder <dir>/<class>/<image>."})
    train_val_split: float = field(default=0.15, metadata={"help": "Validation fraction carved from train."})
    image_size: int = field(default=224, metadata={"help": "Input side, pixels."})


def main() -> None:
    parser = HfArgumentParser((DataFlags, TrainingArguments))
    data_flags, training_args = parser.parse_args_into_dataclasses()
    training_args.remove_unused_columns = False  # set_transform reads the image column

    dataset = load_dataset("imagefolder", data_dir=data_flags.train_dir)
    if "validation" not in dataset and data_flags.train_val_split > 0:
        parts = dataset["train"].train_test_split(data_flags.train_val_split)
        dataset["train"], dataset["validation"] = parts["train"], parts["test"]
    names = dataset["train"].features["label"].names

    side = data_flags.image_size
    processor = ViTImageProcessor(size={"height": side, "width": side})
    normalize = Normalize(mean=processor.image_mean, std=processor.image_std)
    train_transform = Compose(
        [RandomResizedCrop((side, side)), RandomHorizontalFlip(), ToTensor(), normalize]
    )
    eval_transform = Compose([Resize((side, side)), CenterCrop((side, side)), ToTensor(), normalize])

    def transformed(transform):
        def apply(batch: dict) -> dict:
            batch["pixel_values"] = [transform(image.convert("RGB")) for image in batch["image"]]
            return batch

        return apply

    dataset["train"].set_transform(transformed(train_transform))
    if "validation" in dataset:
        dataset["validation"].set_transform(transformed(eval_transform))

    def collate(rows: list[dict]) -> dict:
        return {
            "pixel_values": torch.stack([row["pixel_values"] for row in rows]),
            "labels": torch.tensor([row["label"] for row in rows]),
        }

    # ViT-Ti/16 (Touvron et al. 2021): width 192, 12 layers, 3 heads.
    config = ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=side,
        patch_size=16,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    trainer = Trainer(
        model=ViTForImageClassification(config),
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset.get("validation"),
        data_collator=collate,
        processing_class=processor,
    )
    trainer.train()


if __name__ == "__main__":
    main()
