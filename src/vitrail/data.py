"""Data for training: the embedded default dataset, image folders, checks with clear errors, and transforms.

The embedded default is scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes), which ships inside
the scikit-learn wheel and so needs no network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def digits_dataset() -> Dataset:
    """scikit-learn's digits as a `datasets.Dataset` with `image` (8x8 grayscale PIL) and `label` (ClassLabel)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts 0..16 of a 4x4 block of the original 32x32 bitmap; spread them over 0..255.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    images = [PIL.Image.fromarray(array, mode="L") for array in pixels]
    return Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


def split_dataset(
    dataset: Dataset, label_column: str, test_size: float, validation_size: float, seed: int
) -> DatasetDict:
    """Stratified train / validation / test split; the fractions are of the whole, and 0 skips a split. The test
    split is held out for the final report and never used for model selection."""
    if not (0.0 <= test_size < 1.0 and 0.0 <= validation_size < 1.0 and test_size + validation_size < 1.0):
        raise ValueError(
            f"Split fractions must be in [0, 1) and leave data to train on: test={test_size}, "
            f"validation={validation_size}."
        )
    stratify = label_column if isinstance(dataset.features[label_column], ClassLabel) else None
    splits = {"train": dataset}
    for name, fraction, of_rest in (
        ("test", test_size, 1.0),
        ("validation", validation_size, 1.0 - test_size),
    ):
        if fraction > 0:
            parts = splits["train"].train_test_split(
                test_size=fraction / of_rest, stratify_by_column=stratify, seed=seed
            )
            splits.update(train=parts["train"], **{name: parts["test"]})
    return DatasetDict(splits)


def check_image_folder(path: str | Path, role: str) -> Path:
    """Fail early and by name on what `imagefolder` would otherwise report late or not at all: a missing or empty
    folder, images outside class subfolders, and files PIL cannot read."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--{role}_dir {folder} does not exist or is not a folder.")
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(
            f"--{role}_dir {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). Lay it out as "
            f"{folder}/<class name>/<image file>."
        )
    loose = [p for p in files if p.parent == folder]
    if loose:
        raise ValueError(
            f"--{role}_dir {folder} has images directly inside it (e.g. {loose[0].name}); each image must sit in a "
            "subfolder named after its class, so the label is known."
        )
    for file in files:
        try:
            with PIL.Image.open(file) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for bad files; all mean the same here
            raise ValueError(f"Cannot read image {file}: {error}. Remove or replace the file.") from error
    return folder


def image_folder_dataset(train_dir: str, validation_dir: str | None = None) -> DatasetDict:
    """Load `<dir>/<class>/<image>` folders with datasets' `imagefolder` builder (works offline)."""
    data_files = {"train": str(check_image_folder(train_dir, "train") / "**")}
    if validation_dir:
        data_files["validation"] = str(check_image_folder(validation_dir, "validation") / "**")
    return load_dataset("imagefolder", data_files=data_files)


def check_columns(dataset: Dataset, image_column: str, label_column: str) -> None:
    """The image and label columns exist and have usable types; otherwise say what the dataset has."""
    columns = dataset.column_names
    if image_column not in columns:
        raise ValueError(
            f"The dataset has no image column {image_column!r} (columns: {columns}); pass --image_column_name."
        )
    if label_column not in columns:
        raise ValueError(
            f"The dataset has no label column {label_column!r} (columns: {columns}); pass --label_column_name, or "
            "use an image folder with one subfolder per class."
        )
    if not isinstance(dataset.features[label_column], ClassLabel):
        raise ValueError(
            f"Column {label_column!r} is {dataset.features[label_column]}, not a ClassLabel; cast it first "
            f"(`dataset.class_encode_column({label_column!r})`) so class names are known."
        )


@dataclass
class AugmentationConfig:
    """Training augmentation, applied per sample with torchvision.transforms.v2 before normalisation."""

    crop_scale: float = 1.0  # RandomResizedCrop's smallest kept area fraction; 1.0 disables the crop
    hflip: float = 0.0  # horizontal-flip probability (off by default: it changes the meaning of digits)
    rotation: float = 0.0  # RandomAffine degrees
    translate: float = 0.0  # RandomAffine max shift, as a fraction of the side
    scale: float = 0.0  # RandomAffine zoom range +-
    rand_augment: bool = False


def train_transform(processor, aug: AugmentationConfig):
    """A callable PIL image -> normalised `(C, H, W)` float tensor, with random augmentation."""
    from torchvision.transforms import InterpolationMode, v2

    size = (processor.size["height"], processor.size["width"])
    steps = [v2.ToImage()]
    if aug.crop_scale < 1.0:
        steps.append(v2.RandomResizedCrop(size, scale=(aug.crop_scale, 1.0), antialias=True))
    else:
        steps.append(v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.rotation or aug.translate or aug.scale:
        steps.append(
            v2.RandomAffine(
                degrees=aug.rotation,
                translate=(aug.translate, aug.translate) if aug.translate else None,
                scale=(1 - aug.scale, 1 + aug.scale) if aug.scale else None,
                interpolation=InterpolationMode.BILINEAR,
            )
        )
    if aug.rand_augment:
        steps.append(v2.RandAugment())
    mean = processor.image_mean if processor.do_normalize else 0.0
    std = processor.image_std if processor.do_normalize else 1.0
    channels = processor.num_channels
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(_per_channel(mean, channels), _per_channel(std, channels)),
    ]
    pipeline = v2.Compose(steps)
    return lambda image: pipeline(_to_mode(image, channels))


def _per_channel(value, channels: int) -> list[float]:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    return values * channels if len(values) == 1 else values[:channels] if channels == 1 else values


def _to_mode(image: PIL.Image.Image, channels: int) -> PIL.Image.Image:
    mode = "L" if channels == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)
