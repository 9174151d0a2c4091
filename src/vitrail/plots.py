"""PNG figures for training reports: loss and accuracy curves, and an annotated confusion matrix.

Figures are drawn on `matplotlib.figure.Figure` with an explicit Agg canvas, never through `pyplot`: that works
on machines without a display, and leaves alone whatever backend a notebook or script has already chosen.
matplotlib is imported inside the functions because it is an optional dependency (the `train` extra).
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_confusion_matrix", "plot_training_curves"]

_DPI = 120


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _series(log_history: Sequence[dict], key: str, x_key: str) -> tuple[list[float], list[float]]:
    points = [(entry[x_key], entry[key]) for entry in log_history if key in entry and x_key in entry]
    return [x for x, _ in points], [y for _, y in points]


def _note(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center", color="0.45")
    axes.set_xticks([])
    axes.set_yticks([])


def plot_training_curves(log_history: Sequence[dict], path) -> Path:
    """Plot loss (training and evaluation) and evaluation accuracy against the epoch, side by side.

    Args:
        log_history (`list[dict]`): `trainer.state.log_history`. Entries with `loss` are training logs, entries
            with `eval_loss` / `eval_accuracy` (and `eval_macro_f1`, drawn when present) evaluation logs. The
            x axis is `epoch`, or `step` when some entry lacks an epoch. Other entries (the closing `train_loss`
            summary, test-set results) are ignored. A panel with nothing to draw says so instead of failing.
        path (`str` or `os.PathLike`): Where to write the PNG; parent folders are created.

    Returns:
        `Path`: the path written.
    """
    from matplotlib.ticker import PercentFormatter

    curves = {"loss", "eval_loss", "eval_accuracy", "eval_macro_f1"}
    relevant = [entry for entry in log_history if curves & entry.keys()]
    x_key = "epoch" if all("epoch" in entry for entry in relevant) else "step"

    figure = _new_figure(11, 4)
    loss_axes, accuracy_axes = figure.subplots(1, 2)

    # Training logs carry `loss`; evaluation logs carry `eval_loss` and never `loss`.
    train_x, train_loss = _series([e for e in log_history if "eval_loss" not in e], "loss", x_key)
    eval_x, eval_loss = _series(log_history, "eval_loss", x_key)
    if train_loss:
        loss_axes.plot(train_x, train_loss, color="tab:blue", linewidth=1.2, label="train")
    if eval_loss:
        loss_axes.plot(eval_x, eval_loss, color="tab:orange", marker="o", markersize=3, label="eval")
    if train_loss or eval_loss:
        loss_axes.legend()
    else:
        _note(loss_axes, "no loss logged")
    loss_axes.set(title="Loss", xlabel=x_key, ylabel="loss")
    loss_axes.grid(alpha=0.3)

    accuracy_x, accuracy = _series(log_history, "eval_accuracy", x_key)
    f1_x, macro_f1 = _series(log_history, "eval_macro_f1", x_key)
    if accuracy:
        accuracy_axes.plot(
            accuracy_x, accuracy, color="tab:green", marker="o", markersize=3, label="accuracy"
        )
        best = int(np.argmax(accuracy))
        accuracy_axes.annotate(
            f"best {accuracy[best]:.1%}",
            (accuracy_x[best], accuracy[best]),
            xytext=(0, -16),
            textcoords="offset points",
            ha="center",
            fontsize=9,
        )
    if macro_f1:
        accuracy_axes.plot(f1_x, macro_f1, color="tab:purple", linestyle="--", linewidth=1, label="macro F1")
    if accuracy or macro_f1:
        accuracy_axes.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        accuracy_axes.legend(loc="best")
    else:
        _note(accuracy_axes, "no evaluation logged")
    accuracy_axes.set(title="Evaluation accuracy", xlabel=x_key)
    accuracy_axes.grid(alpha=0.3)

    return _save(figure, path)


def plot_confusion_matrix(
    matrix,
    class_names: Sequence[str],
    path,
    title: str = "Confusion matrix",
) -> Path:
    """Draw a confusion matrix with the count in every cell.

    Cells are coloured by the fraction of their row (the recall of the true class spread over the predictions),
    so that rare classes read as clearly as common ones; the numbers written in the cells are counts. Zero cells
    are written in light grey so that the errors stand out. Counts are written for up to 30 classes.

    Args:
        matrix (array-like of shape (K, K)): Counts, rows = true class, columns = predicted class, as returned by
            `vitrail.metrics.confusion_matrix`.
        class_names (`list[str]`): K names, in class-id order.
        path (`str` or `os.PathLike`): Where to write the PNG; parent folders are created.
        title (`str`): Figure title; the overall accuracy and sample count are added below it.

    Returns:
        `Path`: the path written.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"Expected a square confusion matrix, got shape {matrix.shape}.")
    num_labels = matrix.shape[0]
    if len(class_names) != num_labels:
        raise ValueError(f"Got {len(class_names)} class names for a {num_labels}-class confusion matrix.")

    row_totals = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, row_totals, out=np.zeros(matrix.shape), where=row_totals > 0)
    total = int(matrix.sum())
    accuracy = np.trace(matrix) / total if total else float("nan")

    side = max(5.0, 0.5 * num_labels + 2.5)
    figure = _new_figure(side + 1.0, side)
    axes = figure.subplots()
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")

    if num_labels <= 30:
        fontsize = 10 if num_labels <= 12 else 7
        for (row, column), count in np.ndenumerate(matrix):
            color = "white" if fractions[row, column] > 0.5 else ("0.75" if count == 0 else "black")
            axes.text(column, row, str(count), ha="center", va="center", color=color, fontsize=fontsize)

    ticks = np.arange(num_labels)
    long_names = max((len(str(name)) for name in class_names), default=0) > 3
    axes.set_xticks(
        ticks,
        [str(name) for name in class_names],
        rotation=45 if long_names else 0,
        ha="right" if long_names else "center",
    )
    axes.set_yticks(ticks, [str(name) for name in class_names])
    axes.set(xlabel="predicted class", ylabel="true class")
    axes.set_title(f"{title}\naccuracy {accuracy:.1%} on {total} samples", fontsize=11)
    # Light separators between cells make rows and columns easier to follow.
    axes.set_xticks(ticks[:-1] + 0.5, minor=True)
    axes.set_yticks(ticks[:-1] + 0.5, minor=True)
    axes.grid(which="minor", color="white", linewidth=1)
    axes.tick_params(which="minor", length=0)

    return _save(figure, path)
