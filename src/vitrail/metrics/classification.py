"""Image-classification metrics from class scores: accuracy, top-k accuracy, macro F1, confusion matrix.

This file is an `evaluate` module that needs no network: load it with
`evaluate.load("<path>/vitrail/metrics/classification.py")` (or `vitrail.metrics.load_classification_metric()`).
`evaluate.load` copies this one file into its module cache and imports the copy, so it must stay
self-contained: numpy, datasets and evaluate only, no imports from vitrail. The same functions are imported
directly by `vitrail.metrics`, so the `evaluate` path and `Trainer(compute_metrics=...)` share one definition.

Definitions (chosen to agree with scikit-learn and with `np.argmax`):

- accuracy: the fraction of samples whose arg-max class is the reference. Ties go to the lower class index,
  as `np.argmax` breaks them.
- top-k accuracy: the fraction of samples whose reference is among the k highest scores, ties broken the same
  way, so top-1 accuracy equals accuracy. Reported only when there are more than k classes: otherwise it is 1.
- macro F1: the unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN), over the classes that occur in
  the references or the predictions (scikit-learn's `f1_score(average="macro")` without `labels=`). A class
  that is never predicted scores 0, as with scikit-learn's `zero_division=0`.
- confusion matrix: counts, rows = reference class, columns = predicted class.
"""

import datasets
import evaluate  # keep `import evaluate`: `evaluate.load` takes the first Metric class it finds in this module
import numpy as np

_DESCRIPTION = """\
Accuracy, top-k accuracy and macro F1 of a classifier, computed from its class scores (logits or
probabilities). Optionally also the confusion matrix.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]` of shape (N, K), or `list[int]` of shape (N,)):
        Class scores (logits or probabilities) for K classes, or predicted class ids. Top-k accuracy needs scores.
    references (`list[int]` of shape (N,)): Reference class ids in [0, K).
    top_k (`int`, defaults to 5): k of the top-k accuracy, reported as `top{k}_accuracy` when K > k.
        `None` or 0 turns it off.
    confusion_matrix (`bool`, defaults to `False`): also return the confusion matrix as a nested list.
    num_labels (`int`, *optional*): K when predictions are class ids (defaults to the largest id seen + 1).

Returns:
    accuracy (`float`): top-1 accuracy in [0, 1].
    macro_f1 (`float`): macro-averaged F1 in [0, 1].
    top{k}_accuracy (`float`): only for scores with K > k.
    confusion_matrix (`list[list[int]]`): only when asked; rows = reference class, columns = predicted class.

Examples:
    >>> metric = evaluate.load("src/vitrail/metrics/classification.py")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], top_k=None)
    {'accuracy': 0.5, 'macro_f1': 0.3333333333333333}
"""

_CITATION = ""


def _check_label_range(labels: np.ndarray, num_labels: int, name: str) -> None:
    if labels.size == 0:
        raise ValueError(f"No {name}: metrics of an empty set are undefined.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype}.")
    if labels.min() < 0 or labels.max() >= num_labels:
        raise ValueError(
            f"{name} must lie in [0, {num_labels}), got values in [{labels.min()}, {labels.max()}]. "
            "Check num_labels, or whether padding (-100) reached the metric."
        )


def confusion_matrix(references, predictions, num_labels: int) -> np.ndarray:
    """Counts of (reference, predicted) class pairs.

    Args:
        references (array-like of int, shape (N,)): Reference class ids.
        predictions (array-like, shape (N,) of int or (N, K) of scores): Predicted class ids, or class scores
            (their arg-max is taken).
        num_labels (`int`): K, the number of classes; fixes the matrix size even when some class never occurs.

    Returns:
        `np.ndarray` of shape (K, K) and dtype int64: entry [i, j] counts samples of class i predicted as j.
    """
    references = np.asarray(references)
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=1)
    if references.shape != predictions.shape or references.ndim != 1:
        raise ValueError(
            f"Expected references and predictions of shape (N,), got {references.shape} and {predictions.shape}."
        )
    _check_label_range(references, num_labels, "references")
    _check_label_range(predictions, num_labels, "predictions")
    # Pair (i, j) -> flat index i*K + j, counted in one pass.
    flat = references.astype(np.int64) * num_labels + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def macro_f1_from_confusion(matrix: np.ndarray) -> float:
    """Macro F1 over the classes that occur in the references or the predictions (see the module docstring)."""
    true_positives = np.diag(matrix).astype(np.float64)
    # Row sum + column sum = (TP + FN) + (TP + FP): the denominator of F1 = 2·TP / (2·TP + FP + FN).
    denominator = matrix.sum(axis=1) + matrix.sum(axis=0)
    present = denominator > 0
    return float(np.mean(2.0 * true_positives[present] / denominator[present]))


def top_k_accuracy(scores, references, k: int) -> float:
    """Fraction of samples whose reference class is among the k highest scores.

    Equal scores are ranked by class index (lower first), the order `np.argmax` uses, so `k=1` gives accuracy.
    """
    scores = np.asarray(scores)
    references = np.asarray(references)
    if scores.ndim != 2:
        raise ValueError(f"Expected class scores of shape (N, K), got shape {scores.shape}.")
    if references.shape != (scores.shape[0],):
        raise ValueError(
            f"Expected one reference per row of scores: scores have shape {scores.shape}, references {references.shape}."
        )
    _check_label_range(references, scores.shape[1], "references")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    rows = np.arange(len(references))
    true_scores = scores[rows, references][:, None]  # (N, 1)
    # Rank of the reference class: classes scoring strictly higher, plus equal ones with a lower index.
    ahead = (scores > true_scores) | (
        (scores == true_scores) & (np.arange(scores.shape[1]) < references[:, None])
    )
    return float(np.mean(ahead.sum(axis=1) < k))


def classification_metrics(
    predictions,
    references,
    top_k: int | None = 5,
    with_confusion_matrix: bool = False,
    num_labels: int | None = None,
) -> dict:
    """All metrics of this module from class scores (N, K) or predicted ids (N,) and references (N,).

    Returns a dict with `accuracy` and `macro_f1` (floats), `top{k}_accuracy` when scores are given and K > k,
    and `confusion_matrix` (nested list of ints) when `with_confusion_matrix` is set.
    """
    predictions = np.asarray(predictions)
    references = np.asarray(references)
    if predictions.ndim == 2:
        if num_labels is not None and num_labels != predictions.shape[1]:
            raise ValueError(f"num_labels={num_labels} but the scores have {predictions.shape[1]} columns.")
        num_labels = predictions.shape[1]
    elif predictions.ndim == 1:
        if num_labels is None:
            num_labels = int(max(predictions.max(initial=0), references.max(initial=0))) + 1
    else:
        raise ValueError(f"Expected predictions of shape (N, K) or (N,), got {predictions.shape}.")

    matrix = confusion_matrix(references, predictions, num_labels)  # checks the shapes and the class ids
    results = {
        "accuracy": float(np.trace(matrix) / matrix.sum()),
        "macro_f1": macro_f1_from_confusion(matrix),
    }
    if predictions.ndim == 2 and top_k and num_labels > top_k:
        results[f"top{top_k}_accuracy"] = top_k_accuracy(predictions, references, top_k)
    if with_confusion_matrix:
        results["confusion_matrix"] = matrix.tolist()
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VitrailClassification(evaluate.Metric):
    """Accuracy, top-k accuracy, macro F1 and (optionally) the confusion matrix of a classifier."""

    def _info(self) -> evaluate.MetricInfo:
        label = datasets.Value("int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Tried in order: class scores first, then predicted class ids. (No `format="numpy"`: evaluate
            # allows it only for scalar features; `classification_metrics` converts the lists itself.)
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("float32")), "references": label}
                ),
                datasets.Features({"predictions": label, "references": label}),
            ],
            reference_urls=[
                "https://scikit-learn.org/stable/modules/model_evaluation.html#classification-metrics",
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        top_k: int | None = 5,
        confusion_matrix: bool = False,
        num_labels: int | None = None,
    ) -> dict:
        return classification_metrics(
            predictions,
            references,
            top_k=top_k,
            with_confusion_matrix=confusion_matrix,
            num_labels=num_labels,
        )
