#!/usr/bin/env python
"""The attention pictures of docs/guides/inspect.md ("The pictures"), remade from scratch.

    make train                                   # the digits model, in runs/digits (under 2 minutes here)
    python scripts/attention_pictures.py --digits-model runs/digits --output docs

Writes two PNGs into `--output`:
- `attention_photos.png`: scikit-learn's two sample photos (china.jpg, flower.jpg, 427x640) seen by a vitrail
  Ti/16 with a class token at 224x336 pixels (14x21 patches) and **random weights** (`torch.manual_seed(0)`, the
  default initialisation). It has learned nothing: the picture shows the machinery (a non-square grid, the
  rollout, each head), not what a trained model looks at.
- `attention_digits.png`: the `make train` model (4 layers x 4 heads, mean pooling, no class token, 8x8 inputs,
  2x2 patches) on the first held-out test digit of classes 0, 4 and 7 (the test split of `make train`: the
  default data arguments; a model whose `data_split.json` records another test split is refused), through the
  same code as `scripts/predict.py --attention-map`.

Each image's figure is drawn by `vitrail.visualize.save_attention_figure`; a picture's figures are stacked and
stored as a 256-colour PNG to keep it small (about 130 KB and 20 KB). About 20 s here (2 cores).
"""

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from vitrail import VitrailConfig, VitrailForImageClassification, VitrailImageProcessor
from vitrail.evaluate_checkpoint import EvaluateArguments, check_split
from vitrail.predict import load_classifier, predict_files
from vitrail.training import DataArguments, load_splits
from vitrail.visualize import attention_maps, model_view, save_attention_figure

DIGIT_CLASSES = (0, 4, 7)


def stack(parts: list[Path], path: Path) -> Path:
    """Stack PNGs vertically, as one 256-colour PNG."""
    images = [Image.open(part).convert("RGB") for part in parts]
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def photos(output: Path, scratch: Path) -> Path:
    """`attention_photos.png`: the two sample photos through a randomly initialised ViT-Ti/16."""
    torch.manual_seed(0)
    config = VitrailConfig.from_variant("Ti/16", image_size=(224, 336), num_labels=10)
    model = VitrailForImageClassification(config).eval()
    processor = VitrailImageProcessor(size={"height": 224, "width": 336})
    sample = load_sample_images()
    parts = []
    for name, image in zip(sample.filenames, sample.images, strict=True):
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        maps = attention_maps(model, pixels)
        title = f"{Path(name).name}: RANDOM weights (untrained ViT-Ti/16, 14x21 patches)"
        view = model_view(pixels[0], processor)
        parts.append(save_attention_figure(view, maps, scratch / Path(name).name, title=title))
    return stack(parts, output / "attention_photos.png")


def digits(model_dir: str, output: Path, scratch: Path) -> Path:
    """`attention_digits.png`: held-out test digits through the `make train` model at `model_dir`."""
    data = load_splits(DataArguments())  # the defaults are `make train`'s data and split
    check_split(EvaluateArguments(model=model_dir, split="test"), data.record)
    files = []
    for label in DIGIT_CLASSES:
        row = next(r for r in data.splits["test"] if r["label"] == label)
        files.append(str(scratch / f"test_digit_{label}.png"))
        row["image"].save(files[-1])
    model, processor = load_classifier(model_dir)
    predictions = list(predict_files(files, model, processor, top_k=1, attention_dir=scratch / "maps"))
    return stack([Path(p.attention_map) for p in predictions], output / "attention_digits.png")


def main(digits_model: str, output: str) -> list[Path]:
    """Write both pictures into `output`."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        return [photos(folder, Path(scratch)), digits(digits_model, folder, Path(scratch))]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--digits-model", default="runs/digits", help="a `make train` output folder")
    parser.add_argument("--output", default="docs", help="where the two PNGs go")
    args = parser.parse_args()
    main(args.digits_model, args.output)
