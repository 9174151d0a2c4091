"""Data for training: the embedded default dataset, image folders, checks with clear errors, and transforms.

The embedded default is scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes), which ships inside
the scikit-learn wheel and so needs no network.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
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
    """Random geometric training augmentation, run on whole batches of processed tensors by `BatchAugment`.
    (RandAugment, which needs PIL-level ops, runs per image before the processor: `rand_augment_transform`.)"""

    crop_scale: float = 1.0  # RandomResizedCrop's smallest kept area fraction; 1.0 disables the crop
    hflip: float = 0.0  # horizontal-flip probability (off by default: it changes the meaning of digits)
    rotation: float = 0.0  # max rotation, degrees
    translate: float = 0.0  # max shift, as a fraction of the side
    scale: float = 0.0  # zoom range +-

    @property
    def geometric(self) -> bool:
        return (
            self.crop_scale < 1.0
            or self.hflip > 0
            or self.rotation > 0
            or self.translate > 0
            or self.scale > 0
        )


class BatchAugment:
    """Per-sample random resized crop, flip, rotation, shift and zoom for a whole `(B, C, H, W)` batch at once.

    Every sample gets its own affine map, and one `affine_grid` + `grid_sample` call resamples the batch
    (bilinear). Per-image torchvision transforms cost about 1 ms an image here, more than a small model's training
    step; this costs about as much as one layer. Pixels that come from outside the image are filled with the
    normalised value of black.
    """

    def __init__(self, aug: AugmentationConfig, fill: torch.Tensor | float = 0.0):
        self.aug = aug
        self.fill = torch.as_tensor(fill, dtype=torch.float32).reshape(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        aug, batch = self.aug, pixels.shape[0]
        uniform = lambda low, high: torch.empty(batch).uniform_(low, high)  # noqa: E731
        # RandomResizedCrop: keep an area fraction `area` with aspect ratio `ratio` (log-uniform in [3/4, 4/3]).
        area = uniform(aug.crop_scale, 1.0)
        ratio = (
            torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
            if aug.crop_scale < 1.0
            else torch.ones(batch)
        )
        width = torch.sqrt(area * ratio).clamp(max=1.0)
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        zoom = uniform(1.0 - aug.scale, 1.0 + aug.scale)
        # Crop centre anywhere the crop fits, plus the random shift; grid coordinates span [-1, 1].
        shift_x = (1.0 - width) * uniform(-1.0, 1.0) + 2.0 * aug.translate * uniform(-1.0, 1.0)
        shift_y = (1.0 - height) * uniform(-1.0, 1.0) + 2.0 * aug.translate * uniform(-1.0, 1.0)
        angle = torch.deg2rad(uniform(-aug.rotation, aug.rotation))
        flip = torch.where(torch.rand(batch) < aug.hflip, -1.0, 1.0)
        sx, sy = width / zoom * flip, height / zoom
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([sx * cos, -sy * sin, shift_x], 1), torch.stack([sx * sin, sy * cos, shift_y], 1)], 1
        )  # (B, 2, 3): output grid -> input coordinates
        grid = F.affine_grid(theta.to(pixels.dtype), list(pixels.shape), align_corners=False)
        fill = self.fill.to(pixels.dtype)
        return (
            F.grid_sample(pixels - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            + fill
        )


def black_level(processor) -> torch.Tensor:
    """The value black (0) takes after the processor's rescale and normalisation, per channel."""
    channels = processor.num_channels
    if not processor.do_normalize:
        return torch.zeros(channels)
    mean = torch.as_tensor(processor.image_mean, dtype=torch.float32).flatten()
    std = torch.as_tensor(processor.image_std, dtype=torch.float32).flatten()
    return (-mean / std).expand(channels) if mean.numel() == 1 else -mean[:channels] / std[:channels]


def rand_augment_transform():
    """RandAugment (Cubuk et al. 2020) from torchvision, per PIL image, before the processor."""
    from torchvision.transforms import v2

    return v2.RandAugment()
