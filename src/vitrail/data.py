"""Data for training: the embedded default dataset, image folders, checks with clear errors, and transforms.

The embedded default is scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes), which ships inside
the scikit-learn wheel and so needs no network.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from .image_processing_vitrail import channel_statistic

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
    split is held out for the final report and never used for model selection. (`training.check_split_fractions`
    checks the fractions.)"""
    stratify = label_column if isinstance(dataset.features[label_column], ClassLabel) else None
    if stratify and (test_size > 0 or validation_size > 0):
        _check_stratifiable(dataset, label_column)
    splits = {"train": dataset}
    for name, fraction, of_rest in (
        ("test", test_size, 1.0),
        ("validation", validation_size, 1.0 - test_size),
    ):
        if fraction > 0:
            try:
                parts = splits["train"].train_test_split(
                    test_size=fraction / of_rest, stratify_by_column=stratify, seed=seed
                )
            except ValueError as error:
                if not stratify:
                    raise
                names = dataset.features[label_column].names
                counts = np.bincount(splits["train"][label_column], minlength=len(names))
                smallest = ", ".join(
                    f"{names[i]!r} ({counts[i]})" for i in np.argsort(counts, kind="stable")[:3]
                )
                raise ValueError(
                    f"Cannot carve a stratified {name} split (--{name}_size {fraction}) from "
                    f"{len(splits['train'])} images in {len(names)} classes: {error} Smallest classes (images "
                    f"left): {smallest}. Add images to small classes, or change --test_size / --validation_size."
                ) from error
            splits.update(train=parts["train"], **{name: parts["test"]})
    return DatasetDict(splits)


def _check_stratifiable(dataset: Dataset, label_column: str) -> None:
    """A class with a single image cannot be in both the training and a held-out split: name it."""
    labels = np.asarray(dataset[label_column])
    names = dataset.features[label_column].names
    lonely = [i for i in range(len(names)) if (labels == i).sum() == 1]
    if lonely:
        ids = dataset[SAMPLE_ID] if SAMPLE_ID in dataset.column_names else None
        described = ", ".join(
            f"{names[i]!r}" + (f" ({ids[int(np.flatnonzero(labels == i)[0])]})" if ids else "")
            for i in lonely
        )
        raise ValueError(
            f"Class {described} has a single image; a stratified split needs at least two images per class to "
            "hold some out. Add images to it, or remove the class."
        )


# ---- image folders ---------------------------------------------------------------------------------------------

# A column that names each sample (an image folder's relative file path, else a row index): split records hash it.
SAMPLE_ID = "sample_id"


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def scan_image_folder(path: str | Path, role: str) -> dict[str, list[Path]]:
    """The images of a `<dir>/<class>/<image>` folder by class name, symlinked class folders included.

    Fails early and by name on a missing or empty folder, images outside class folders or nested deeper than
    one level, and class folders with no image; logs every file it leaves out (unsupported formats, dangling
    symlinks, hidden files, named pipes and other entries that are no regular file), with a count.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--{role}_dir {folder} does not exist or is not a folder.")
    classes: dict[str, list[Path]] = {}
    loose, nested, skipped = [], [], []

    def sort_out(file: Path, images: list[Path]) -> None:
        if file.name.startswith("."):
            skipped.append(f"{file.relative_to(folder)} (hidden)")
        elif not file.exists():
            skipped.append(f"{file.relative_to(folder)} (dangling symlink)")
        elif file.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(f"{file.relative_to(folder)} (unsupported format)")
        elif not file.is_file():  # reading a named pipe would wait for a writer forever
            skipped.append(f"{file.relative_to(folder)} (not a regular file)")
        else:
            images.append(file)

    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():  # is_dir() follows symlinks: a symlinked class folder counts
            sort_out(entry, loose)
        elif entry.name.startswith("."):
            skipped.append(f"{entry.name}/ (hidden folder)")
        else:
            images = classes.setdefault(entry.name, [])
            for item in sorted(entry.iterdir()):
                if item.is_dir():
                    deeper = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
                    nested.extend(deeper)
                    if not deeper:
                        skipped.append(f"{item.relative_to(folder)}/ (folder)")
                else:
                    sort_out(item, images)
    layout = f"Lay it out as {folder}/<class name>/<image file>."
    if loose:
        raise ValueError(
            f"--{role}_dir {folder} has images directly inside it (e.g. {loose[0].name}); each image must sit in a "
            "subfolder named after its class, so the label is known. " + layout
        )
    if nested:
        example = nested[0].relative_to(folder)
        raise ValueError(
            f"--{role}_dir {folder} has images nested more than one folder deep ({len(nested)}, e.g. {example}), "
            f"so the class of each is unclear. {layout} Point --{role}_dir at the folder that holds the class "
            f"folders (e.g. {folder / example.parts[0]}), or move the images up into their class folder."
        )
    if skipped:
        logger.warning("--%s_dir %s: skipped %d files: %s", role, folder, len(skipped), _listing(skipped))
    if not any(classes.values()):
        raise ValueError(
            f"--{role}_dir {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). " + layout
        )
    empty = [name for name, images in classes.items() if not images]
    if empty:
        raise ValueError(
            f"--{role}_dir {folder}: class folder(s) {_listing(empty)} hold no usable image "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder(s)."
        )
    return classes


def mode_problem(mode: str) -> str | None:
    """Why the image processor refuses images of PIL `mode` (as it does), or None."""
    if mode in ("I", "F"):
        return f"PIL mode {mode!r} holds 32-bit values with no fixed range; save it with 8 or 16 bits per channel"
    return None


def image_problem(path: str | Path) -> str | None:
    """Why PIL cannot fully decode the image at `path` into something the image processor takes, or None."""
    if not Path(path).is_file():  # a named pipe would block the read
        return "not a regular file"
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decodes every pixel: `verify()` passes a truncated JPEG
            return mode_problem(image.mode)
    except Exception as error:  # PIL raises many types for bad files; all mean the same here
        return f"{type(error).__name__}: {error}"


# The last bytes of a whole file: a JPEG ends with its EOI marker, a PNG with its IEND chunk. A file cut short
# (a partial download or copy) lacks them, which `PIL.Image.open` and `verify()` do not notice.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
# How far from the end a marker may sit (some writers pad a file, or append a little data after the image).
END_WINDOW = 64 * 1024


def header_problem(path: str | Path) -> str | None:
    """Why the image at `path` is unusable, judged from its header and its last bytes without decoding pixels,
    or None. A truncated JPEG or PNG is caught by its missing end marker; pixels that fail to decode in a whole
    file are caught later, where they are decoded (`training.decode_images`)."""
    path = Path(path)
    if not path.is_file():  # a named pipe would block the read
        return "not a regular file"
    try:
        with PIL.Image.open(path) as image:  # reads the header only
            problem, kind = mode_problem(image.mode), image.format
        if problem or kind not in END_MARKERS:
            return problem
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            file.seek(max(0, size - END_WINDOW))
            tail = file.read()
        if END_MARKERS[kind] not in tail:
            return f"the {kind} file has no end marker: it is cut short (truncated)"
        return None
    except Exception as error:  # PIL raises many types for bad files; all mean the same here
        return f"{type(error).__name__}: {error}"


def check_images(folder: Path, classes: dict[str, list[Path]], role: str, skip_bad: bool) -> dict[str, str]:
    """Check the header (and end marker) of every image, without decoding pixels; drop the bad ones from
    `classes` and return them (name -> reason) when `skip_bad`, else raise naming them."""
    files = [file for images in classes.values() for file in images]
    with ThreadPoolExecutor() as pool:  # file reads release the GIL
        problems = dict(zip(files, pool.map(header_problem, files), strict=True))
    bad = {file: problem for file, problem in problems.items() if problem}
    if bad and not skip_bad:
        if len(bad) == 1:
            ((file, problem),) = bad.items()
            described = f"Cannot read image {file}: {problem}."
        else:
            named = [f"{file.relative_to(folder)} ({problem})" for file, problem in bad.items()]
            described = (
                f"Cannot read {len(bad)} of {len(files)} images in --{role}_dir {folder}: {_listing(named)}."
            )
        raise ValueError(
            f"{described} Remove or replace them, or pass --skip_bad_images to train without them (they are then "
            "listed in all_results.json and the model card)."
        )
    if bad:
        logger.warning(
            "--skip_bad_images: left out %d unreadable images of --%s_dir %s", len(bad), role, folder
        )
        for name in classes:
            classes[name] = [file for file in classes[name] if file not in bad]
        emptied = [name for name, images in classes.items() if not images]
        if emptied:
            raise ValueError(
                f"--{role}_dir {folder}: every image of class(es) {_listing(emptied)} is unreadable."
            )
    return {folder_name(folder, file): problem for file, problem in bad.items()}


def check_files(files: list[str], names: list[str], skip_bad: bool, where: str) -> dict[str, str]:
    """Check the header of each file (`header_problem`); return the bad ones (name -> reason) when `skip_bad`,
    else raise naming them. `names` are how records name the files; `where` says where they come from."""
    with ThreadPoolExecutor() as pool:  # file reads release the GIL
        problems = list(pool.map(header_problem, files))
    bad = {
        (name, file): problem for name, file, problem in zip(names, files, problems, strict=True) if problem
    }
    if bad and not skip_bad:
        if len(bad) == 1:
            (((_, file), problem),) = bad.items()
            described = f"Cannot read image {file}: {problem}."
        else:
            named = [f"{name} ({problem})" for (name, _), problem in bad.items()]
            described = f"Cannot read {len(bad)} of {len(files)} images {where}: {_listing(named)}."
        raise ValueError(
            f"{described} Remove or replace them, or pass --skip_bad_images to train without them (they are then "
            "listed in all_results.json and the model card)."
        )
    if bad:
        logger.warning("--skip_bad_images: left out %d unreadable images %s", len(bad), where)
    return {name: problem for (name, _), problem in bad.items()}


def tar_labels(files: list[str], extension: str) -> list[int]:
    """The distinct integer labels held in the `<key>.<extension>` members of WebDataset tar shards, read from
    the tar headers and those small members only (image members are skipped over, not read)."""
    import tarfile

    labels = set()
    for path in files:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(f".{extension}"):
                    text = tar.extractfile(member).read().decode().strip()
                    try:
                        labels.add(int(text))
                    except ValueError:
                        raise ValueError(
                            f"{path}: {member.name} holds {text[:40]!r}, not a class number; give class names "
                            "with --class_names_file and numbers in the label members."
                        ) from None
    return sorted(labels)


def folder_name(folder: Path, file: Path) -> str:
    """How records name an image of an image folder: the folder's name and the file's path inside it."""
    return f"{folder.name}/{file.relative_to(folder).as_posix()}"


def image_folder_dataset(
    train_dir: str, validation_dir: str | None = None, skip_bad_images: bool = False, check: bool = True
) -> tuple[DatasetDict, dict[str, str]]:
    """Image folders `<dir>/<class>/<image>` as datasets with `image`, `label` and `sample_id` (the file's path
    in its folder) columns, after checking every file's header (`check`; without it the listing alone is read);
    also returns the images left out by `skip_bad_images`.

    Class names are the training folder's subfolders, sorted (as datasets' `imagefolder` does); a validation
    folder may lack classes, but not add any.
    """
    folders = {"train": train_dir} | ({"validation": validation_dir} if validation_dir else {})
    scanned = {role: scan_image_folder(path, role) for role, path in folders.items()}
    names = sorted(scanned["train"])
    extra = sorted(set(scanned.get("validation", {})) - set(names))
    if extra:
        raise ValueError(
            f"--validation_dir {validation_dir} has classes that --train_dir {train_dir} lacks: {_listing(extra)}. "
            "The model would get classes it never trained on: add them to the training folder or remove them."
        )
    features = Features({"image": Image(), "label": ClassLabel(names=names), SAMPLE_ID: Value("string")})
    splits, skipped = {}, {}
    for role, classes in scanned.items():
        folder = Path(folders[role])
        if check:
            skipped |= check_images(folder, classes, role, skip_bad_images)
        rows = [(file, names.index(name)) for name, files in classes.items() for file in files]
        splits[role] = Dataset.from_dict(
            {
                "image": [str(file) for file, _ in rows],
                "label": [label for _, label in rows],
                SAMPLE_ID: [file.relative_to(folder).as_posix() for file, _ in rows],
            },
            features=features,
        )
    return DatasetDict(splits), skipped


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
    (RandAugment, which needs PIL-level ops, runs per image before the processor, in `training.prepare_splits`.)"""

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
        # (B, 2, 3): for each sample, the affine map from output grid to input coordinates.
        row_x = torch.stack([sx * cos, -sy * sin, shift_x], 1)
        row_y = torch.stack([sx * sin, sy * cos, shift_y], 1)
        theta = torch.stack([row_x, row_y], 1)
        # Drawn on the CPU generator (the same draws whatever the device), then moved to the batch's device, where
        # the Trainer's data loader has already put it (a GPU in training).
        where = dict(device=pixels.device, dtype=pixels.dtype)
        grid = F.affine_grid(theta.to(**where), list(pixels.shape), align_corners=False)
        fill = self.fill.to(**where)
        return (
            F.grid_sample(pixels - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            + fill
        )


def black_level(processor) -> torch.Tensor:
    """The value black (0) takes after the processor's rescale and normalisation, per channel."""
    channels = processor.num_channels
    if not processor.do_normalize:
        return torch.zeros(channels)
    # The processor's own rule for one value or one per channel (any channel count).
    mean, std = (
        torch.as_tensor(channel_statistic(value, name, channels), dtype=torch.float32).expand(channels)
        for value, name in ((processor.image_mean, "image_mean"), (processor.image_std, "image_std"))
    )
    return -mean / std
