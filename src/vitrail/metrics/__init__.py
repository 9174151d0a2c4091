"""Classification metrics for training and scoring vitrail classifiers, with no network access.

- `make_compute_metrics(num_labels)`: the `compute_metrics` callback for `transformers.Trainer`, in numpy.
- `confusion_matrix(references, predictions, num_labels)`: counts, rows = reference class.
- `load_classification_metric()`: the same metrics as an `evaluate` module (`classification.py` here), loaded
  from its path: `evaluate.load("accuracy")` would fetch a script from the Hugging Face Hub; a path needs nothing.

Both routes run one definition, `classification.classification_metrics`, and give the same numbers. The Trainer
takes the numpy route: `metric.compute` encodes every score through Arrow features first, about 100x slower
(random float32 logits of shape (10,000, 1,000): 8.1 s against 0.09 s on this 2-core machine, shared). Each
process computes on the predictions the Trainer has already gathered from all processes.
"""

from collections.abc import Callable
from pathlib import Path

import evaluate
import numpy as np

from .classification import classification_metrics, confusion_matrix

CLASSIFICATION_METRIC_PATH = Path(__file__).resolve().parent / "classification.py"

__all__ = [
    "CLASSIFICATION_METRIC_PATH",
    "classification_metrics",
    "confusion_matrix",
    "load_classification_metric",
    "make_compute_metrics",
]


def load_classification_metric(**kwargs):
    """Load vitrail's classification metric as an `evaluate.EvaluationModule`, offline.

    Args:
        **kwargs: forwarded to `evaluate.load` (`experiment_id`, `num_process`, `process_id`, `cache_dir`, ...).
            `keep_in_memory` defaults to `True` in a single process, so that no Arrow cache file is written.

    Returns:
        The metric. `metric.compute(predictions=logits, references=labels, top_k=5, confusion_matrix=False)`
        returns `accuracy`, `macro_f1`, `top5_accuracy` (when there are more than 5 classes) and, when asked,
        `confusion_matrix`.
    """
    if kwargs.get("num_process", 1) == 1:
        kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(CLASSIFICATION_METRIC_PATH), **kwargs)


def make_compute_metrics(num_labels: int, top_k: int = 5) -> Callable[..., dict[str, float]]:
    """Build the `compute_metrics` callback of `transformers.Trainer` for a `num_labels`-way classifier.

    Args:
        num_labels (`int`): Number of classes K; the logits must have K columns.
        top_k (`int`, defaults to 5): k of the top-k accuracy, reported as `top{k}_accuracy` when K > k.

    Returns:
        A function taking a `transformers.EvalPrediction` and returning `{"accuracy", "macro_f1"}` plus
        `"top{k}_accuracy"` when `num_labels > top_k`. The Trainer prefixes the keys (`eval_accuracy`, ...).
        When the model returns more than logits, `EvalPrediction.predictions` is a tuple whose first entry is
        taken as the logits.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}.")

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = np.asarray(first_array(eval_prediction.predictions))
        if logits.ndim != 2 or logits.shape[1] != num_labels:
            raise ValueError(f"Expected logits of shape (N, {num_labels}), got {logits.shape}.")
        return classification_metrics(logits, first_array(eval_prediction.label_ids), top_k=top_k)

    return compute_metrics


def first_array(value):
    """The first array of a Trainer output: models with extra outputs hand the Trainer tuples, e.g. (logits,
    hidden_states), with the logits first."""
    while isinstance(value, tuple):
        value = value[0]
    return value
