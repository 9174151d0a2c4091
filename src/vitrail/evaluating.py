"""Evaluate any vitrail checkpoint on a split: metrics, confusion matrix and plots; `scripts/evaluate_checkpoint.py` is the
command line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from .evaluation import confusion_matrix, make_compute_metrics
from .image_processing_vitrail import VitrailImageProcessor
from .modeling_vitrail import VitrailForImageClassification
from .plots import plot_confusion_matrix
from .training import Collator, DataArguments, VitrailTrainer, load_splits, prepare_splits


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "A vitrail classifier checkpoint (folder or Hub id)."})
    split: str = field(default="test", metadata={"help": "Which split to score: test, validation or train."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write metrics and plots."})
    batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})


def evaluate_checkpoint(args: EvaluateArguments, data_args: DataArguments) -> dict:
    model = VitrailForImageClassification.from_pretrained(args.model).eval()
    processor = VitrailImageProcessor.from_pretrained(args.model)
    splits, _ = load_splits(data_args)
    labels = splits["train"].features[data_args.label_column_name].names
    expected = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if labels != expected:
        raise ValueError(
            f"The checkpoint predicts {expected[:10]}, but the data's classes are {labels[:10]}: evaluate on the "
            "data it was trained for, or fine-tune it first."
        )
    if splits.get(args.split) is None:
        raise ValueError(
            f"No {args.split!r} split here; choose one of {[k for k, v in splits.items() if v]}."
        )
    prepared = {args.split: splits[args.split]}
    prepare_splits(prepared, processor, data_args)
    output = Path(args.output_dir or Path(args.model) / f"eval_{args.split}")
    output.mkdir(parents=True, exist_ok=True)
    trainer = VitrailTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(output),
            per_device_eval_batch_size=args.batch_size,
            report_to=[],
            disable_tqdm=True,
        ),
        data_collator=Collator(),
        compute_metrics=make_compute_metrics(len(labels)),
    )
    prediction = trainer.predict(prepared[args.split], metric_key_prefix=args.split)
    metrics = dict(prediction.metrics)
    matrix = confusion_matrix(prediction.label_ids, prediction.predictions.argmax(-1), len(labels))
    plot_confusion_matrix(matrix, labels, output / "confusion_matrix.png", title=f"{args.split} split")
    (output / "metrics.json").write_text(
        json.dumps({**metrics, "confusion_matrix": matrix.tolist()}, indent=2)
    )
    return metrics
