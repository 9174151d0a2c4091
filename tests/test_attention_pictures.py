"""scripts/attention_pictures.py: the README's two pictures are written, small, from the data they claim."""

from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import load_script, tiny_config
from vitrail import VitrailForImageClassification, VitrailImageProcessor
from vitrail.run_folder import DATA_SPLIT, write_json_atomic
from vitrail.training import DataArguments, load_splits


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    """A random stand-in for the `make train` output: its token layout (8x8 grey, patch 2, mean pooling, no
    class token), its labels, and the `data_split.json` of the default split."""
    folder = tmp_path_factory.mktemp("digits")
    labels = {i: str(i) for i in range(10)}
    config = tiny_config(
        image_size=8,
        patch_size=2,
        num_channels=1,
        pooling="mean",
        use_cls_token=False,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    VitrailForImageClassification(config).save_pretrained(folder)
    VitrailImageProcessor(size={"height": 8, "width": 8}, num_channels=1).save_pretrained(folder)
    write_json_atomic(folder / DATA_SPLIT, load_splits(DataArguments()).record)
    return folder


def test_both_pictures_are_written_small(digits_model, tmp_path):
    photos, digits = load_script("scripts/attention_pictures.py").main(
        str(digits_model), str(tmp_path / "docs")
    )
    assert [photos.name, digits.name] == ["attention_photos.png", "attention_digits.png"]
    for path, figures in ((photos, 2), (digits, 3)):
        assert path.stat().st_size < 200 * 1024
        with Image.open(path) as png:
            assert png.format == "PNG" and png.mode == "P"  # 256 colours
            assert png.width > 600 and png.height > figures * 200  # one figure per image, stacked
            low, high = png.convert("L").getextrema()
            assert high - low > 100


def test_digits_must_come_from_the_models_held_out_split(digits_model, tmp_path):
    other = tmp_path / "other_split"
    other.mkdir()
    for file in digits_model.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    write_json_atomic(other / DATA_SPLIT, load_splits(DataArguments(split_seed=1)).record)
    with pytest.raises(ValueError, match="test split here is not the one stored"):
        load_script("scripts/attention_pictures.py").digits(str(other), tmp_path, tmp_path)
