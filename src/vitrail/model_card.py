"""Model cards for fine-tuned vitrail image classifiers.

`render_model_card` fills the Jinja template `vitrail/model_cards/vitrail_image_classification.md` through
`huggingface_hub.ModelCard.from_template` and writes `README.md`. The metadata block carries what the Hub
indexes: `library_name`, `pipeline_tag`, tags, datasets, base model, and a `model-index` with the measured
results, built from `EvalResult`s so that it has the shape the Hub expects.

`ModelCard.validate()` asks the Hub (`POST /api/validate-yaml`), which is out of reach here. What
`huggingface_hub` checks offline is the parse: `ModelCard.load` / `ModelCard(text)` rebuilds `ModelCardData`
from the YAML, turning `model-index` back into `EvalResult`s with `model_index_to_eval_results` and raising
`ValueError` on a malformed one. The tests parse the written README that way and compare the results.

Note: `Trainer.push_to_hub()` (and `push_to_hub=True`) calls `Trainer.create_model_card()`, which overwrites
`README.md`. Render this card after it, or upload the folder with `huggingface_hub.upload_folder`.
"""

import enum
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .run_folder import write_atomic

__all__ = ["DEFAULT_TEMPLATE_PATH", "render_model_card"]

logger = logging.getLogger(__name__)

# Package data: the wheel carries it, so a card is written wherever vitrail is installed.
DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parent / "model_cards" / "vitrail_image_classification.md"


TAGS = ["vitrail", "vision-transformer", "image-classification"]

# Keys that `Trainer.evaluate` returns next to the metrics; they describe the run, not the model.
_BOOKKEEPING = {"runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time"}
_VALIDATION_PREFIXES = ("eval_", "validation_")
_SPLIT_PREFIXES = ("train_", "eval_", "validation_", "test_", "predict_")


def render_model_card(
    *,
    model_name: str,
    output_dir,
    metrics: Mapping[str, float],
    dataset_name: str,
    dataset_id: str | None,
    base_model: str | None,
    hyperparameters: Mapping,
    recipe: str,
    config_summary: Mapping,
    plots: Sequence[str],
    limitations: str | None = None,
    repo_id: str | None = None,
    dataset_split: str = "test",
    license: str | None = None,
    template_path=None,
    skipped_images: Sequence[str] = (),
) -> ModelCard:
    """Render the model card of a trained classifier and write it to `output_dir/README.md`.

    Args:
        model_name (`str`): Title of the card and name of the model in `model-index`.
        output_dir (`str` or `os.PathLike`): The saved model's folder; created if missing.
        metrics (`dict[str, float]`): Results, bare (`accuracy`) or with the Trainer's prefix. When keys carry
            the prefix of `dataset_split` (`test_accuracy`; `eval_` for a "validation" split), only those are
            used, so the merged train/eval/test dictionary of a training run can be passed whole. `accuracy`,
            `macro_f1` and `top{k}_accuracy` go into `model-index`; all but the timing keys into the table.
        dataset_name (`str`): Readable dataset name ("scikit-learn digits").
        dataset_id (`str`, *optional*): Hub dataset id; listed under `datasets` and used as the `model-index`
            dataset type. Without it, the dataset name is used as the type.
        base_model (`str`, *optional*): Hub id of the checkpoint fine-tuned from; `None` for training from scratch.
            A local folder is named in the text but left out of the metadata, which takes Hub ids only.
        hyperparameters (`dict`): Shown as a table, in the given order.
        recipe (`str`): Markdown paragraph describing the training procedure.
        config_summary (`dict`): Architecture facts (variant, image and patch size, width, depth, parameters...),
            shown as a table.
        plots (`list[str]`): PNG files in `output_dir`, by relative name (absolute paths inside `output_dir` are
            made relative), embedded as images.
        limitations (`str`, *optional*): Markdown; a generic paragraph about the data and evaluation if omitted.
        repo_id (`str`, *optional*): Hub repo id used in the usage snippet; the output folder otherwise.
        dataset_split (`str`, defaults to `"test"`): The split `metrics` were measured on.
        license (`str`, *optional*): License id for the metadata (e.g. `"apache-2.0"`).
        template_path (`str` or `os.PathLike`, *optional*): Jinja template; defaults to `DEFAULT_TEMPLATE_PATH`.
        skipped_images (`list[str]`, *optional*): Unreadable images left out of the data (`--skip_bad_images`),
            listed under "Training".

    Returns:
        `huggingface_hub.ModelCard`: the card that was written.
    """
    output_dir = Path(output_dir)
    template_path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not template_path.is_file():
        raise FileNotFoundError(
            f"Model card template not found at {template_path}. The default one is package data of vitrail "
            "(vitrail/model_cards/): reinstall vitrail if it is missing, or pass template_path=... to use another."
        )

    measured = _select_split(metrics, dataset_split)
    card_data = ModelCardData(
        model_name=model_name,
        base_model=_hub_model_id(base_model),
        datasets=[dataset_id] if dataset_id else None,
        library_name="transformers",
        license=license,
        metrics=["accuracy", "f1"],
        pipeline_tag="image-classification",
        tags=list(TAGS),
        eval_results=_eval_results(
            measured,
            dataset_type=dataset_id or _slug(dataset_name),
            dataset_name=dataset_name,
            split=dataset_split,
        )
        or None,
    )

    dataset_link = (
        f"[{dataset_name}](https://huggingface.co/datasets/{dataset_id})" if dataset_id else dataset_name
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        description=_description(model_name, dataset_link, base_model, measured, dataset_split),
        repo_or_dir=repo_id or output_dir.as_posix(),
        architecture=[(_label(key), _cell(value)) for key, value in config_summary.items()],
        recipe=recipe.strip(),
        hyperparameters=[(_cell(key), _cell(value)) for key, value in hyperparameters.items()],
        results=_results_table(measured),
        split=dataset_split,
        dataset_link=dataset_link,
        plots=[
            (_label(Path(link).stem), link) for link in (_relative_link(plot, output_dir) for plot in plots)
        ],
        limitations=(limitations or _default_limitations(dataset_name, dataset_split)).strip(),
        skipped_images=_skipped_note(skipped_images),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / "README.md", str(card))
    return card


def _select_split(metrics: Mapping[str, float], split: str) -> dict[str, float]:
    """The metrics of `split`, names without their prefix, timing keys dropped, values as plain floats.

    Keys prefixed with the split (`test_accuracy`; `eval_` also counts for a "validation" split, as the Trainer
    names it) win; without any, the keys that carry no split prefix at all (`accuracy`) are taken. So a
    dictionary that mixes `train_`, `eval_` and `test_` results gives the `test_` ones for split "test".
    """
    prefixes = (f"{split}_",) + (_VALIDATION_PREFIXES if f"{split}_" in _VALIDATION_PREFIXES else ())
    selected = {key[len(p) :]: value for key, value in metrics.items() for p in prefixes if key.startswith(p)}
    if not selected:
        selected = {key: value for key, value in metrics.items() if not key.startswith(_SPLIT_PREFIXES)}
    if metrics and not selected.keys() - _BOOKKEEPING:
        logger.warning("No %s results among the metrics %s: the card will show none.", split, sorted(metrics))
    # YAML cannot represent numpy scalars, and the Trainer hands some back.
    return {name: float(value) for name, value in selected.items() if name not in _BOOKKEEPING}


def _hub_model_id(base_model: str | None) -> str | None:
    """`base_model` if it can name a Hub repo; `None` for a local folder, which the Hub's metadata cannot take."""
    if base_model is None or Path(base_model).exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base_model):
        return None
    return base_model


def _accuracies(measured: dict[str, float]) -> list[tuple[str, int, float]]:
    """(name, k, value) of `accuracy` (k = 1) and of each `top{k}_accuracy`, by k."""
    found = [("accuracy", 1, measured["accuracy"])] if "accuracy" in measured else []
    for name, value in measured.items():
        if name.startswith("top") and name.endswith("_accuracy") and name[3:-9].isdigit():
            found.append((name, int(name[3:-9]), value))
    return sorted(found, key=lambda item: item[1])


def _eval_results(
    measured: dict[str, float], *, dataset_type: str, dataset_name: str, split: str
) -> list[EvalResult]:
    # The Hub has no top-k metric id: accuracy with its k as an argument.
    metrics = [
        ("accuracy", f"Top-{k} Accuracy", None if name == "accuracy" else {"k": k}, value)
        for name, k, value in _accuracies(measured)
    ]
    if "macro_f1" in measured:
        metrics.append(("f1", "Macro F1", {"average": "macro"}, measured["macro_f1"]))
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_args=metric_args,
            metric_value=round(value, 4),
        )
        for metric_type, metric_name, metric_args, value in metrics
    ]


def _results_table(measured: dict[str, float]) -> list[tuple[str, str]]:
    """Rows (name, value): accuracies first (as percentages), then macro F1, then anything else as given."""
    accuracies = _accuracies(measured)
    rows = [(f"Top-{k} accuracy", f"{value:.2%}") for _, k, value in accuracies]
    if "macro_f1" in measured:
        rows.append(("Macro F1", f"{measured['macro_f1']:.4f}"))
    shown = {name for name, _, _ in accuracies} | {"macro_f1"}
    rows += [(_label(name), _cell(value)) for name, value in measured.items() if name not in shown]
    return rows


def _slug(text: str) -> str:
    """`"scikit-learn digits"` -> `"scikit-learn-digits"`: `model-index` dataset types are identifiers."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-")


def _description(
    model_name: str, dataset_link: str, base_model: str | None, measured: dict[str, float], split: str
) -> str:
    if _hub_model_id(base_model):
        origin = f"fine-tuned from [`{base_model}`](https://huggingface.co/{base_model})"
    elif base_model:
        origin = f"fine-tuned from `{base_model}`"
    else:
        origin = "trained from scratch"
    text = (
        f"**{model_name}** is a Vision Transformer image classifier "
        f"([Dosovitskiy et al., 2021](https://arxiv.org/abs/2010.11929)) built with vitrail, {origin} on {dataset_link}. "
        "An image is cut into patches, the patches are embedded as tokens and mixed by a Transformer encoder, "
        "and a linear head turns the pooled tokens into class scores."
    )
    if "accuracy" in measured:
        text += f" It reaches {measured['accuracy']:.2%} top-1 accuracy on the {split} split."
    return text


def _default_limitations(dataset_name: str, split: str) -> str:
    held_out = (
        ""
        if split == "test"
        else f"- No test split was held out (`--test_size 0`): the results are on the {split} split, which "
        "training may have used for model selection.\n"
    )
    return (
        f"- Trained and evaluated on {dataset_name} only. Expect lower accuracy on images that differ from it "
        "(other sources, resolutions, framing or preprocessing).\n"
        f"{held_out}"
        f"- The results come from a single training run and a single {split} split; no confidence interval is given.\n"
        "- The classifier always answers with one of its classes, even for an image that shows none of them."
    )


def _skipped_note(names: Sequence[str]) -> str | None:
    if not names:
        return None
    shown = ", ".join(f"`{name}`" for name in names[:20])
    more = f" and {len(names) - 20} more (see `all_results.json`)" if len(names) > 20 else ""
    count = "1 unreadable image was" if len(names) == 1 else f"{len(names)} unreadable images were"
    return f"{count} left out of the data (`--skip_bad_images`): {shown}{more}."


def _relative_link(plot, output_dir: Path) -> str:
    path = Path(plot)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(output_dir.resolve())
        except ValueError:
            raise ValueError(
                f"Plot {plot} is outside {output_dir}: the card links images by path relative to its folder."
            ) from None
    return path.as_posix()


def _label(key: str) -> str:
    """`"num_hidden_layers"` -> `"Num hidden layers"`."""
    text = str(key).replace("_", " ")
    return text[:1].upper() + text[1:]


def _cell(value) -> str:
    """A markdown table cell: enums by value, floats in short form (`1e-05`), sequences comma-separated, `|` escaped."""
    if isinstance(value, enum.Enum):  # TrainingArguments keeps some choices as enums (SchedulerType.LINEAR)
        value = value.value
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(item) for item in value)
    else:
        text = str(value)
    return text.replace("|", "\\|")
