"""Classify image files with a vitrail checkpoint, optionally drawing an attention map of each;
`scripts/predict.py` is the command line.

Every file is opened and processed on its own, so one that cannot be read is reported by name and the others are
still classified; processed images of one size are then run together, `batch_size` at a time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import PIL.Image
import torch

from .configuration_vitrail import VitrailConfig
from .convert import load_image_processor
from .image_processing_vitrail import open_image_source
from .modeling_vitrail import VitrailForImageClassification
from .visualize import AttentionMaps, TokenLayout, model_view, record_attentions, save_attention_figure

logger = logging.getLogger(__name__)

# What a folder is searched for (any case). Files named on the command line are tried whatever their name.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


@dataclass
class Prediction:
    """The top classes of one file, best first, and where its attention map was written (if asked)."""

    file: str
    labels: list[str]
    scores: list[float]
    attention_map: str | None = None


@dataclass
class Failure:
    """A file (or folder) that could not be classified, and why."""

    file: str
    reason: str


def find_images(inputs: Iterable[str]) -> tuple[list[str], list[Failure]]:
    """Files named as they are; folders walked recursively (sorted, symlinked folders followed) for files with an
    `IMAGE_EXTENSIONS` suffix. A path that does not exist or is no regular file (a named pipe, a device), or a
    folder holding no image file, is a failure; whatever a walk leaves out is logged by name (`walk_folder`)."""
    files, failures = [], []
    for name in inputs:
        path = Path(name)
        if path.is_file():
            files.append(name)
        elif path.is_dir():
            found, skipped = walk_folder(path)
            for reason, paths in skipped.items():
                logger.warning("%s: skipped %d %s, e.g. %s", name, len(paths), reason, paths[0])
            if not found:
                failures.append(Failure(name, f"folder holds no image file ({' '.join(IMAGE_EXTENSIONS)})"))
            files.extend(str(p) for p in found)
        elif path.is_symlink() and not path.exists():
            failures.append(Failure(name, f"symbolic link to a missing target ({path.readlink()})"))
        elif path.exists():
            failures.append(Failure(name, "not a regular file (a named pipe, socket or device)"))
        else:
            failures.append(Failure(name, "no such file or folder"))
    return files, failures


def walk_folder(folder: Path) -> tuple[list[Path], dict[str, list[str]]]:
    """The image files under `folder`, sorted, and what the walk left out, by reason. Symlinked folders are
    followed, as training follows symlinked class folders; each real folder is read once, so a link back up the
    tree (a cycle) ends the walk there and is named, as are files without an image suffix, dangling links,
    entries that are no regular file (reading a named pipe would wait forever) and folders that cannot be read."""
    found: list[Path] = []
    skipped: dict[str, list[str]] = {}
    seen: set[tuple[int, int]] = set()

    def skip(reason: str, path) -> None:
        skipped.setdefault(reason, []).append(str(path))

    def unreadable(error: OSError) -> None:
        skip(f"folder(s) that cannot be read ({error.strerror})", error.filename)

    for root, folders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        status = os.stat(root)
        if (status.st_dev, status.st_ino) in seen:
            folders.clear()
            skip("folder(s) already walked, reached again through a symbolic link", root)
            continue
        seen.add((status.st_dev, status.st_ino))
        for name in names:
            child = Path(root, name)
            if child.suffix.lower() not in IMAGE_EXTENSIONS:
                skip(f"file(s) without an image extension ({' '.join(IMAGE_EXTENSIONS)})", child)
            elif not child.exists():
                skip("symbolic link(s) to a missing target", child)
            elif not child.is_file():
                skip("entries that are no regular file (named pipes, sockets, devices)", child)
            else:
                found.append(child)
    return sorted(found), skipped


def load_classifier(model_path: str, device: str | torch.device = "cpu"):
    """The checkpoint's classifier (in eval mode, on `device`) and its own image processor: vitrail's, or one
    translated from a transformers or timm checkpoint's preprocessing. Refuses a checkpoint without a
    classification head (a new one would be random) or without preprocessing settings. (Converted checkpoints
    report no loading info: for a transformers or timm backbone the converter warns that the head is new.)"""
    if VitrailConfig.get_config_dict(model_path)[0].get("model_type") == VitrailConfig.model_type:
        model, info = VitrailForImageClassification.from_pretrained(model_path, output_loading_info=True)
        missing = info["missing_keys"]
    else:
        model, missing = VitrailForImageClassification.from_pretrained(model_path), []
    if any(key.startswith("classifier.") for key in missing) or model.config.num_labels < 1:
        raise ValueError(
            f"{model_path} holds no classification head (a backbone or a pretraining checkpoint), so its "
            "predictions would be random: fine-tune it on labelled images first (scripts/train.py)."
        )
    processor = load_image_processor(model_path)
    if processor is None:
        raise ValueError(
            f"{model_path} has no preprocessor_config.json (nor timm's pretrained_cfg), so the resize and "
            "normalisation it was trained with are unknown: save its image processor beside it "
            "(`processor.save_pretrained(folder)`)."
        )
    return model.to(device).eval(), processor


def predict_files(
    files: Iterable[str],
    model,
    processor,
    top_k: int = 5,
    batch_size: int = 32,
    attention_dir: str | Path | None = None,
) -> Iterator[Prediction | Failure]:
    """A `Prediction` or a `Failure` per file, in order. With `attention_dir`, each classified file also gets a
    PNG there (`vitrail.visualize`: rollout and last-layer heads over the image as the model saw it), named after
    the file (`-2`, `-3`, ... added where names repeat)."""
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be positive, got {top_k} and {batch_size}.")
    files = list(files)
    map_names: set[str] = set()
    for start in range(0, len(files), batch_size):
        results: dict[str, Prediction | Failure] = {}
        by_shape: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for file in files[start : start + batch_size]:
            try:
                # (C, H, W); open_image_source's errors name the file
                pixels = processor(images=open_image_source(file), return_tensors="pt")["pixel_values"][0]
            except (OSError, ValueError, TypeError, PIL.Image.DecompressionBombError) as error:
                results[file] = Failure(file, str(error))
                continue
            by_shape.setdefault(tuple(pixels.shape), []).append((file, pixels))
        # Sizes differ only when the processor does not resize (dynamic-size models); each size is one batch.
        for group in by_shape.values():
            for prediction in _classify(group, model, processor, top_k, attention_dir, map_names):
                results[prediction.file] = prediction
        yield from (results[file] for file in files[start : start + batch_size])


def _classify(group, model, processor, top_k, attention_dir, map_names) -> list[Prediction]:
    names = [file for file, _ in group]
    pixels = torch.stack([p for _, p in group]).to(model.device)
    if attention_dir is None:
        with torch.no_grad():
            logits = model(pixel_values=pixels).logits
    else:
        outputs = record_attentions(model, pixels)
        logits = outputs.logits
        layout = TokenLayout.from_config(model.config, pixels.shape[-2:])
        maps = AttentionMaps.from_attentions([a.cpu() for a in outputs.attentions], layout)
    if model.config.problem_type == "multi_label_classification":
        scores = logits.float().sigmoid()
    else:
        scores = logits.float().softmax(dim=-1)
    top = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
    predictions = []
    for i, file in enumerate(names):
        labels = [model.config.id2label[int(k)] for k in top.indices[i]]
        prediction = Prediction(file, labels, [round(float(s), 6) for s in top.values[i]])
        if attention_dir is not None:
            name = _unique(Path(file).stem, map_names)
            title = f"{Path(file).name}: {labels[0]} ({prediction.scores[0]:.0%})"
            path = Path(attention_dir) / f"{name}.png"
            save_attention_figure(model_view(pixels[i], processor), maps, path, index=i, title=title)
            prediction.attention_map = str(path)
        predictions.append(prediction)
    return predictions


def _unique(stem: str, taken: set[str]) -> str:
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name


def run(
    inputs: list[str],
    model: str,
    top_k: int = 5,
    attention_map: str | None = None,
    as_json: bool = False,
    batch_size: int = 32,
    device: str | None = None,
) -> int:
    """`scripts/predict.py`: print a table (or JSON lines) of predictions on stdout, failures on stderr; returns the
    exit status, 1 when any input failed."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    classifier, processor = load_classifier(model, device)
    files, failures = find_images(inputs)
    width = max((len(f) for f in files), default=4)
    label_width = max(len(str(label)) for label in classifier.config.id2label.values())
    if not as_json and files:
        columns = [
            f"{'top-' + str(k + 1):<{label_width + 7}}" for k in range(min(top_k, classifier.num_labels))
        ]
        print(
            f"{'file':<{width}}  " + "".join(columns).rstrip() + ("  attention map" if attention_map else "")
        )
    failed = classified = 0
    for result in chain(
        failures, predict_files(files, classifier, processor, top_k, batch_size, attention_map)
    ):
        if isinstance(result, Failure):
            failed += 1
            print(f"cannot classify {result.file}: {result.reason}", file=sys.stderr)
            continue
        classified += 1
        if as_json:
            record = {"file": result.file, "labels": result.labels, "scores": result.scores}
            if result.attention_map is not None:
                record["attention_map"] = result.attention_map
            print(json.dumps(record), flush=True)
        else:
            cells = "".join(
                f"{label:<{label_width}} {score:.3f}  "
                for label, score in zip(result.labels, result.scores, strict=True)
            )
            print(f"{result.file:<{width}}  {cells}{result.attention_map or ''}".rstrip(), flush=True)
    if failed:
        print(f"{failed} input(s) failed, {classified} file(s) classified.", file=sys.stderr)
    return 1 if failed else 0
