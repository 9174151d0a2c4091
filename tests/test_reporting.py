"""Reporting: the offline classification metric, Trainer's compute_metrics, the plots and the model card."""

import importlib.resources
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score, top_k_accuracy_score
from transformers import EvalPrediction, SchedulerType

from vitrail.metrics import (
    CLASSIFICATION_METRIC_PATH,
    confusion_matrix,
    load_classification_metric,
    make_compute_metrics,
)
from vitrail.metrics.classification import classification_metrics, top_k_accuracy
from vitrail.model_card import render_model_card
from vitrail.plots import plot_confusion_matrix, plot_training_curves

# A hand-made 6-class example. Each row of ORDERINGS lists the classes from highest to lowest score.
REFERENCES = [0, 0, 1, 1, 2, 3, 4, 5]
ORDERINGS = [
    [0, 1, 2, 3, 4, 5],  # right
    [1, 0, 2, 3, 4, 5],  # wrong, reference 2nd
    [1, 0, 2, 3, 4, 5],  # right
    [1, 2, 0, 3, 4, 5],  # right
    [2, 1, 0, 3, 4, 5],  # right
    [0, 1, 2, 4, 5, 3],  # wrong, reference 6th: outside the top 5
    [4, 0, 1, 2, 3, 5],  # right
    [4, 5, 0, 1, 2, 3],  # wrong, reference 2nd
]
PREDICTED = [order[0] for order in ORDERINGS]
# Per class (TP, FP, FN) -> F1 = 2TP / (2TP + FP + FN):
#   0: (1, 1, 1) -> 2/4     1: (2, 1, 0) -> 4/5     2: (1, 0, 0) -> 1
#   3: (0, 0, 1) -> 0       4: (1, 1, 0) -> 2/3     5: (0, 0, 1) -> 0
MACRO_F1 = (1 / 2 + 4 / 5 + 1 + 0 + 2 / 3 + 0) / 6
CONFUSION = [
    [1, 1, 0, 0, 0, 0],
    [0, 2, 0, 0, 0, 0],
    [0, 0, 1, 0, 0, 0],
    [1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 1, 0],
]


def hand_made_scores() -> np.ndarray:
    scores = np.zeros((len(ORDERINGS), 6), dtype=np.float32)
    for row, order in enumerate(ORDERINGS):
        scores[row, order] = np.linspace(2.0, -1.0, 6)  # the first class gets the highest score
    return scores


def test_metrics_on_a_hand_made_example():
    results = classification_metrics(hand_made_scores(), REFERENCES)
    assert results["accuracy"] == 5 / 8
    assert results["top5_accuracy"] == 7 / 8
    assert results["macro_f1"] == pytest.approx(MACRO_F1)
    assert results["macro_f1"] == pytest.approx(
        f1_score(REFERENCES, PREDICTED, average="macro", zero_division=0)
    )
    assert "confusion_matrix" not in results

    results = classification_metrics(hand_made_scores(), REFERENCES, top_k=2, with_confusion_matrix=True)
    assert results["top2_accuracy"] == 7 / 8
    assert results["confusion_matrix"] == CONFUSION


def test_top_k_is_only_reported_above_k_classes():
    scores = hand_made_scores()[:, :5]
    references = [min(r, 4) for r in REFERENCES]
    assert set(classification_metrics(scores, references)) == {"accuracy", "macro_f1"}
    assert set(classification_metrics(hand_made_scores(), REFERENCES, top_k=None)) == {"accuracy", "macro_f1"}


def test_ties_rank_lower_class_first_so_top1_is_accuracy():
    tied = np.zeros((2, 6))
    assert top_k_accuracy(tied, [4, 5], k=5) == 0.5  # class 5 ranks 6th among equals
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(200, 7)).astype(np.float32)  # many ties
    references = rng.integers(0, 7, size=200)
    assert top_k_accuracy(scores, references, k=1) == classification_metrics(scores, references)["accuracy"]


def test_matches_scikit_learn_on_random_data_with_absent_classes():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(300, 12))
    scores[:, 11] -= 100.0  # class 11 is never predicted...
    references = rng.integers(0, 10, size=300)  # ...and 10, 11 never occur
    predicted = scores.argmax(axis=1)
    results = classification_metrics(scores, references, top_k=3)
    assert results["accuracy"] == pytest.approx(np.mean(predicted == references))
    assert results["macro_f1"] == pytest.approx(
        f1_score(references, predicted, average="macro", zero_division=0)
    )
    assert results["top3_accuracy"] == pytest.approx(
        top_k_accuracy_score(references, scores, k=3, labels=range(12))
    )


def test_confusion_matrix_counts():
    matrix = confusion_matrix(REFERENCES, PREDICTED, num_labels=6)
    assert matrix.dtype == np.int64 and matrix.shape == (6, 6)
    np.testing.assert_array_equal(matrix, CONFUSION)
    np.testing.assert_array_equal(matrix, sk_confusion_matrix(REFERENCES, PREDICTED, labels=range(6)))
    np.testing.assert_array_equal(confusion_matrix(REFERENCES, hand_made_scores(), num_labels=6), CONFUSION)
    assert confusion_matrix([0, 1], [1, 1], num_labels=4).tolist() == [
        [0, 1, 0, 0],
        [0, 1, 0, 0],
        [0] * 4,
        [0] * 4,
    ]
    with pytest.raises(ValueError, match="-100"):
        confusion_matrix([0, -100], [0, 1], num_labels=2)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix([0, 1, 1], [0, 1], num_labels=2)


def test_evaluate_metric_loads_offline_from_the_installed_package():
    # The metric file is package data of `vitrail.metrics`, found by setuptools' `packages.find`.
    assert CLASSIFICATION_METRIC_PATH == Path(
        str(importlib.resources.files("vitrail.metrics") / "classification.py")
    )
    assert CLASSIFICATION_METRIC_PATH.is_file()

    metric = load_classification_metric()
    scores = hand_made_scores()
    results = metric.compute(predictions=scores, references=REFERENCES, confusion_matrix=True)
    assert results == classification_metrics(scores, REFERENCES, with_confusion_matrix=True)
    assert results["top5_accuracy"] == 7 / 8

    # Batches accumulate; predicted class ids work too (no top-k then).
    metric.add_batch(predictions=scores[:3], references=REFERENCES[:3])
    metric.add_batch(predictions=scores[3:], references=REFERENCES[3:])
    assert metric.compute(top_k=2)["top2_accuracy"] == 7 / 8
    results = metric.compute(predictions=PREDICTED, references=REFERENCES)
    assert results == {"accuracy": 5 / 8, "macro_f1": pytest.approx(MACRO_F1)}


def test_make_compute_metrics_takes_logits_from_a_tuple():
    compute_metrics = make_compute_metrics(num_labels=6)
    hidden_states = np.zeros((8, 4, 3), dtype=np.float32)
    prediction = EvalPrediction(
        predictions=(hand_made_scores(), hidden_states), label_ids=np.array(REFERENCES)
    )
    results = compute_metrics(prediction)
    assert results == {"accuracy": 5 / 8, "macro_f1": pytest.approx(MACRO_F1), "top5_accuracy": 7 / 8}
    assert all(type(value) is float for value in results.values())  # JSON-serialisable for the Trainer's logs

    three_way = make_compute_metrics(num_labels=3)
    logits = np.eye(3)[[0, 1, 2, 2]]
    assert three_way(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 2, 1]))) == {
        "accuracy": 0.75,
        "macro_f1": pytest.approx((1 + 2 / 3 + 2 / 3) / 3),
    }
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        three_way(EvalPrediction(predictions=hand_made_scores(), label_ids=np.array(REFERENCES)))


def test_compute_metrics_agrees_with_the_evaluate_module_without_its_cost(monkeypatch):
    """The Trainer's callback gives the `evaluate` module's numbers (ties included), computed in numpy, never
    through the module, whose Arrow encoding took 4.5 s for 10,000 x 1,000 logits (the work is checked, not
    timed: a time bound would fail on a busy machine)."""
    rng = np.random.default_rng(2)
    logits = rng.integers(0, 4, size=(500, 12)).astype(np.float32)  # many ties
    labels = rng.integers(0, 12, size=500)
    results = make_compute_metrics(num_labels=12)(EvalPrediction(predictions=logits, label_ids=labels))
    assert results == load_classification_metric().compute(predictions=logits, references=labels)
    assert set(results) == {"accuracy", "macro_f1", "top5_accuracy"}

    logits = rng.normal(size=(10_000, 1_000)).astype(np.float32)
    labels = rng.integers(0, 1_000, size=10_000)
    compute_metrics = make_compute_metrics(num_labels=1_000)
    expected = classification_metrics(logits, labels)

    def slow_path(*args, **kwargs):
        raise AssertionError("the Trainer's callback went through the evaluate module")

    monkeypatch.setattr(evaluate.EvaluationModule, "compute", slow_path)
    monkeypatch.setattr(evaluate.EvaluationModule, "add_batch", slow_path)
    assert compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == expected


def log_history(epochs: int = 4, with_eval: bool = True) -> list[dict]:
    """The shape of `trainer.state.log_history`: training logs, evaluation logs, then the run summary."""
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        for quarter in range(1, 5):
            step += 3
            history.append(
                {
                    "loss": 2.0 / (epoch + quarter / 4),
                    "learning_rate": 1e-3,
                    "epoch": epoch - 1 + quarter / 4,
                    "step": step,
                }
            )
        if with_eval:
            history.append(
                {
                    "eval_loss": 2.2 / epoch,
                    "eval_accuracy": 1 - 0.5 / epoch,
                    "eval_macro_f1": 1 - 0.6 / epoch,
                    "epoch": float(epoch),
                    "step": step,
                }
            )
    history.append({"train_runtime": 12.0, "train_loss": 0.9, "epoch": float(epochs), "step": step})
    return history


def assert_png(path, min_size: tuple[int, int]) -> None:
    assert path.stat().st_size > 10_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        low, high = image.convert("L").getextrema()
        assert high - low > 100  # something is drawn


@pytest.mark.parametrize(
    "history", [log_history(), log_history(with_eval=False), []], ids=["eval", "no-eval", "empty"]
)
def test_training_curves_are_written(tmp_path, history):
    pyplot_was_loaded = "matplotlib.pyplot" in sys.modules
    path = plot_training_curves(history, tmp_path / "plots" / "training_curves.png")
    assert path == tmp_path / "plots" / "training_curves.png"
    assert_png(path, (1000, 400))
    assert pyplot_was_loaded or "matplotlib.pyplot" not in sys.modules  # global matplotlib state left alone


def test_confusion_matrix_plot_is_written(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 4, size=(10, 10)) + np.diag(rng.integers(20, 40, size=10))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    path = plot_confusion_matrix(matrix, names, tmp_path / "confusion_matrix.png", title="CIFAR-10 test")
    assert_png(path, (700, 700))
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(matrix, names[:9], tmp_path / "bad.png")


CARD_ARGS = dict(
    model_name="vitrail-tiny-digits",
    dataset_name="scikit-learn digits",
    base_model=None,
    hyperparameters={
        "learning_rate": 2e-3,
        "per_device_train_batch_size": 128,
        "num_train_epochs": 150,
        "lr_scheduler_type": SchedulerType.COSINE,
    },
    recipe="AdamW with a one-cycle schedule and label smoothing 0.1.",
    config_summary={"variant": "custom", "image_size": 8, "patch_size": 2, "parameters": "0.8 M"},
    plots=["training_curves.png", "confusion_matrix.png"],
)


def test_model_card_metadata_round_trips(tmp_path):
    # A training run's merged results: only the test_ ones belong in the card.
    metrics = {
        "train_loss": 0.31,
        "train_runtime": 263.0,
        "epoch": 150.0,
        "eval_loss": 0.09,
        "eval_accuracy": 0.97,
        "test_loss": np.float64(0.0712),  # numpy scalars, as the Trainer returns some
        "test_accuracy": np.float64(0.98333333),
        "test_macro_f1": 0.982512,
        "test_top5_accuracy": 1.0,
        "test_runtime": 1.2,
    }
    card = render_model_card(
        **{**CARD_ARGS, "base_model": "google/vit-base-patch16-224"},
        output_dir=tmp_path,
        metrics=metrics,
        dataset_id="ylecun/mnist",
        repo_id="someone/vitrail-tiny-digits",
        license="apache-2.0",
    )
    readme = tmp_path / "README.md"
    assert readme.read_text(encoding="utf-8") == str(card)

    # ModelCard.validate() needs the Hub. Offline, parsing is the check: ModelCard.load rebuilds ModelCardData
    # and its EvalResults from `model-index` (model_index_to_eval_results), raising ValueError if malformed.
    loaded = ModelCard.load(readme)
    data = loaded.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert data.tags == ["vitrail", "vision-transformer", "image-classification"]
    assert data.datasets == ["ylecun/mnist"]
    assert data.base_model == "google/vit-base-patch16-224"
    assert data.metrics == ["accuracy", "f1"]
    assert data.license == "apache-2.0"
    assert data.model_name == "vitrail-tiny-digits"
    values = {result.metric_name: result.metric_value for result in data.eval_results}
    assert values == {"Top-1 Accuracy": 0.9833, "Top-5 Accuracy": 1.0, "Macro F1": 0.9825}
    for result in data.eval_results:
        assert (result.task_type, result.dataset_type, result.dataset_split) == (
            "image-classification",
            "ylecun/mnist",
            "test",
        )

    # The YAML's model-index and the EvalResults convert into each other without loss.
    front_matter = yaml.safe_load(readme.read_text(encoding="utf-8").split("---\n")[1])
    assert eval_results_to_model_index(data.model_name, data.eval_results) == front_matter["model-index"]
    assert model_index_to_eval_results(front_matter["model-index"]) == (data.model_name, data.eval_results)
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict() == front_matter

    text = loaded.text
    assert 'repo = "someone/vitrail-tiny-digits"' in text
    assert "AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)" in text
    assert "AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)" in text
    assert (
        'pipeline("image-classification", model="someone/vitrail-tiny-digits", trust_remote_code=True)'
        in text
    )
    assert "![Training curves](training_curves.png)" in text
    assert "![Confusion matrix](confusion_matrix.png)" in text
    assert "| Top-1 accuracy | 98.33% |" in text
    assert "| learning_rate | 0.002 |" in text
    assert "| lr_scheduler_type | cosine |" in text
    assert "| Patch size | 2 |" in text
    assert "fine-tuned from [`google/vit-base-patch16-224`]" in text
    assert "## Limitations" in text
    assert "| Loss | 0.0712 |" in text
    assert "runtime" not in text.lower() and "0.97" not in text and "0.31" not in text


def test_model_card_variants(tmp_path):
    plot = tmp_path / "confusion_matrix.png"
    card = render_model_card(
        # A local base model is named in the text, not in the metadata; an absolute plot path inside output_dir
        # becomes a relative link.
        **{**CARD_ARGS, "base_model": str(tmp_path), "plots": [str(plot)]},
        output_dir=tmp_path,
        metrics={"eval_accuracy": 0.5, "train_loss": 0.7},
        dataset_id=None,
        dataset_split="validation",  # the Trainer's `eval_` prefix
        limitations="Toy model.",
    )
    data = card.data.to_dict()
    assert "datasets" not in data and "base_model" not in data
    dataset = data["model-index"][0]["results"][0]["dataset"]
    assert (dataset["type"], dataset["split"]) == ("scikit-learn-digits", "validation")
    assert "](confusion_matrix.png)" in card.text
    assert f'repo = "{tmp_path.as_posix()}"' in card.text
    assert f"fine-tuned from `{tmp_path}`" in card.text and "Toy model." in card.text
    assert "| Top-1 accuracy | 50.00% |" in card.text and "0.7" not in card.text

    card = render_model_card(**CARD_ARGS, output_dir=tmp_path, metrics={"accuracy": 0.25}, dataset_id=None)
    assert card.data.eval_results[0].metric_value == 0.25 and "trained from scratch" in card.text

    card = render_model_card(
        **CARD_ARGS, output_dir=tmp_path, metrics={"eval_accuracy": 0.5}, dataset_id=None
    )
    assert "model-index" not in card.data.to_dict()  # no test results given: none claimed
    assert "No evaluation results were recorded." in card.text

    with pytest.raises(ValueError, match="outside"):
        render_model_card(
            **{**CARD_ARGS, "plots": ["/elsewhere/a.png"]}, output_dir=tmp_path, metrics={}, dataset_id=None
        )
