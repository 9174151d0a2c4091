"""Score a vitrail classifier checkpoint on one split of the data: metrics, confusion matrix and its plot;
`scripts/evaluate_checkpoint.py` is the command line. (The metrics themselves live in `vitrail.metrics`.)"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments, default_data_collator
from transformers.utils import cached_file

from .image_processing_vitrail import VitrailImageProcessor
from .metrics import confusion_matrix, first_array, make_compute_metrics
from .modeling_vitrail import VitrailForImageClassification
from .plots import plot_confusion_matrix
from .run_folder import DATA_SPLIT, check_model_source, differences, read_json, write_json_atomic
from .training import (
    DataArguments,
    VitrailTrainer,
    check_split_fractions,
    load_splits,
    prepare_splits,
)

logger = logging.getLogger(__name__)


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "A vitrail classifier checkpoint (folder or Hub id)."})
    split: str = field(default="test", metadata={"help": "Which split to score: test, validation or train."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write metrics and plots."})
    batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    allow_split_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Score even when the split differs from the one stored with the checkpoint "
            "(data_split.json), with a warning: its images may have been trained on."
        },
    )


def check_split(args: EvaluateArguments, record: dict) -> None:
    """Refuse (or, with `allow_split_mismatch`, warn) when the split to score is not the one recorded in the
    checkpoint's `data_split.json`: another seed or fraction mixes training images into it."""
    path = cached_file(args.model, DATA_SPLIT, _raise_exceptions_for_missing_entries=False)
    stored = read_json(Path(path)) if path else None
    if stored is None:
        logger.warning(
            "%s has no %s: cannot check that the %s split holds no training images.",
            args.model,
            DATA_SPLIT,
            args.split,
        )
        return
    if stored.get(args.split) == record.get(args.split):
        return
    message = (
        f"The {args.split} split here is not the one stored with {args.model} ({DATA_SPLIT}):\n  "
        + "\n  ".join(differences(stored, record))
        + "\nIt may hold images the model was trained on, which would inflate the score. Pass the data arguments "
        "of the training run, or --allow_split_mismatch to score anyway."
    )
    if not args.allow_split_mismatch:
        raise ValueError(message)
    logger.warning(message)


def evaluate_checkpoint(args: EvaluateArguments, data_args: DataArguments) -> dict:
    """Score `args.model` on one split of the data (by default the held-out test split of its training run)."""
    check_model_source(args.model, "--model")
    check_split_fractions(data_args)
    model = VitrailForImageClassification.from_pretrained(args.model).eval()
    processor = VitrailImageProcessor.from_pretrained(args.model)
    data = load_splits(data_args)
    splits = data.splits
    labels = data.labels
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
    check_split(args, data.record)
    prepared = {args.split: splits[args.split]}
    prepare_splits(prepared, processor, data_args, data.image_column, data.label_column)
    output = Path(args.output_dir or Path(args.model) / f"eval_{args.split}")
    output.mkdir(parents=True, exist_ok=True)
    trainer = VitrailTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(output),
            per_device_eval_batch_size=args.batch_size,
            report_to=[],
            disable_tqdm=True,
            remove_unused_columns=False,  # data too big to cache is processed on the fly, from the image column
        ),
        data_collator=default_data_collator,
        compute_metrics=make_compute_metrics(len(labels)),
    )
    prediction = trainer.predict(prepared[args.split], metric_key_prefix=args.split)
    metrics = dict(prediction.metrics)
    matrix = confusion_matrix(prediction.label_ids, first_array(prediction.predictions), len(labels))
    plot_confusion_matrix(matrix, labels, output / "confusion_matrix.png", title=f"{args.split} split")
    write_json_atomic(output / "metrics.json", {**metrics, "confusion_matrix": matrix.tolist()})
    return metrics
