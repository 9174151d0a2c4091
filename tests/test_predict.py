"""scripts/predict.py and vitrail.predict: classify files and folders, report unreadable files by name."""

import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from tests.conftest import tiny_config
from vitrail import VitrailForImageClassification, VitrailImageProcessor, VitrailModel
from vitrail.predict import Failure, find_images, load_classifier, predict_files, run

ROOT = Path(__file__).resolve().parents[1]
LABELS = {0: "cat", 1: "dog", 2: "goldfish"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classifier")
    config = tiny_config(
        image_size=16, patch_size=4, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    torch.manual_seed(0)
    VitrailForImageClassification(config).save_pretrained(folder)
    VitrailImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder with three readable images (RGB, grey with an upper-case suffix, RGBA in a subfolder), a file
    with an image suffix that is no image, and a text file."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (25, 18), dtype=np.uint8)).save(folder / "b.JPG", format="JPEG")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)).save(folder / "sub" / "c.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("not an image")
    return folder


def expected_top(checkpoint: Path, file: Path, k: int) -> tuple[list[str], list[float]]:
    model = VitrailForImageClassification.from_pretrained(checkpoint).eval()
    processor = VitrailImageProcessor.from_pretrained(checkpoint)
    with Image.open(file) as image, torch.no_grad():
        logits = model(**processor(images=image, return_tensors="pt")).logits[0]
    top = logits.softmax(-1).topk(k)
    return [LABELS[int(i)] for i in top.indices], top.values.tolist()


def test_predict_script_classifies_the_readable_files_and_names_the_rest(checkpoint, images, tmp_path):
    maps = tmp_path / "maps"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "predict.py"), str(images), str(tmp_path / "missing.png")]
        + [
            "--model",
            str(checkpoint),
            "--top-k",
            "2",
            "--json",
            "--attention-map",
            str(maps),
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    good = [images / "a.png", images / "b.JPG", images / "sub" / "c.png"]
    assert [record["file"] for record in records] == [str(file) for file in good]  # walked, sorted
    for record, file in zip(records, good, strict=True):
        labels, scores = expected_top(checkpoint, file, 2)
        assert record["labels"] == labels
        np.testing.assert_allclose(record["scores"], scores, atol=1e-5)
        with Image.open(record["attention_map"]) as png:
            assert png.format == "PNG" and png.width > 500
    assert sorted(p.name for p in maps.iterdir()) == ["a.png", "b.png", "c.png"]
    assert f"cannot classify {images / 'broken.jpg'}: " in result.stderr
    assert f"cannot classify {tmp_path / 'missing.png'}: no such file or folder" in result.stderr
    assert "2 input(s) failed, 3 file(s) classified." in result.stderr
    assert "skipped 1 file(s) without an image extension" in result.stderr and "notes.txt" in result.stderr
    assert "Loading weights" not in result.stderr


def test_table_output_and_exit_status(checkpoint, images, capsys):
    files = [str(images / "a.png"), str(images / "b.JPG")]
    assert run(files, str(checkpoint), top_k=5) == 0  # more than the 3 classes asked: 3 shown
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "top-1", "top-2", "top-3"]
    for line, file in zip(lines[1:], files, strict=True):
        labels, scores = expected_top(checkpoint, Path(file), 3)
        assert line.split() == [file] + [
            cell for pair in zip(labels, scores, strict=True) for cell in (pair[0], f"{pair[1]:.3f}")
        ]


def test_find_images_walks_folders_by_extension_and_reports_what_it_cannot(tmp_path, images):
    (tmp_path / "empty").mkdir()
    (images / "sub" / "d.WebP").write_bytes(b"")  # picked up by name; reading it fails later, by name
    files, failures = find_images(
        [str(images / "notes.txt"), str(images), str(tmp_path / "empty"), "nope.png"]
    )
    assert files == [
        str(images / name)
        for name in ("notes.txt", "a.png", "b.JPG", "broken.jpg", "sub/c.png", "sub/d.WebP")
    ]
    assert [(f.file, f.reason.split(" (")[0]) for f in failures] == [
        (str(tmp_path / "empty"), "folder holds no image file"),
        ("nope.png", "no such file or folder"),
    ]


def test_images_of_different_sizes_run_in_groups_for_dynamic_models(tmp_path):
    config = tiny_config(image_size=12, patch_size=4, dynamic_image_size=True, num_labels=3)
    model = VitrailForImageClassification(config).eval()
    processor = VitrailImageProcessor(do_resize=False)
    rng = np.random.default_rng(1)
    files = []
    for i, shape in enumerate([(12, 16, 3), (9, 13, 3), (12, 16, 3)]):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(files[-1])
    together = list(
        predict_files(files, model, processor, top_k=3, batch_size=8, attention_dir=tmp_path / "maps")
    )
    alone = [next(predict_files([file], model, processor, top_k=3)) for file in files]
    assert [p.file for p in together] == files
    for a, b in zip(together, alone, strict=True):
        assert a.labels == b.labels
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    assert len(list((tmp_path / "maps").iterdir())) == 3


def test_checkpoints_that_cannot_classify_are_refused(tmp_path, checkpoint):
    VitrailModel(tiny_config(image_size=16, patch_size=4)).save_pretrained(tmp_path / "backbone")
    VitrailImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "backbone")
    with pytest.raises(ValueError, match="holds no classification head"):
        load_classifier(str(tmp_path / "backbone"))
    bare = tmp_path / "bare"
    VitrailForImageClassification.from_pretrained(checkpoint).save_pretrained(bare)
    with pytest.raises(ValueError, match="has no preprocessor_config.json"):
        load_classifier(str(bare))


def test_unreadable_files_do_not_stop_the_batch(checkpoint, images):
    model, processor = load_classifier(str(checkpoint))
    files = [str(images / "broken.jpg"), str(images / "a.png"), str(images / "notes.txt")]
    results = list(predict_files(files, model, processor, top_k=1))
    assert isinstance(results[0], Failure) and "broken.jpg" in results[0].reason
    assert results[1].labels == expected_top(checkpoint, images / "a.png", 1)[0]
    assert isinstance(results[2], Failure) and "notes.txt" in results[2].reason


def test_a_transformers_checkpoint_is_converted_and_keeps_its_own_preprocessing(tmp_path):
    labels = dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, **labels)  # fmt: skip
    reference = ViTForImageClassification(config).eval()
    with torch.no_grad():  # random init leaves logits near zero; spread them so that preprocessing shows
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    # Not the 0.5 mean/std a vitrail processor defaults to; a 16x16 image, so no resize kernel differs.
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.1, 0.4, 0.9], image_std=0.2)
    reference.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    file = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(file)

    model, loaded_processor = load_classifier(str(tmp_path / "hf"))
    (prediction,) = predict_files([str(file)], model, loaded_processor, top_k=3)
    with Image.open(file) as image, torch.no_grad():
        logits = reference(**processor(images=image, return_tensors="pt")).logits[0]
    top = logits.softmax(-1).topk(3)
    assert prediction.labels == [LABELS[int(i)] for i in top.indices]
    np.testing.assert_allclose(prediction.scores, top.values, atol=1e-5)
    (default,) = predict_files([str(file)], model, VitrailImageProcessor(size={"height": 16, "width": 16}))
    assert np.abs(np.array(default.scores) - top.values.numpy()).max() > 1e-3  # the test can tell


def test_multi_label_scores_are_sigmoids_and_repeated_names_get_numbered_maps(checkpoint, images, tmp_path):
    model, processor = load_classifier(str(checkpoint))
    model.config.problem_type = "multi_label_classification"
    (images / "sub" / "a.png").write_bytes((images / "a.png").read_bytes())
    files = [str(images / "a.png"), str(images / "sub" / "a.png")]
    results = list(predict_files(files, model, processor, top_k=3, attention_dir=tmp_path / "maps"))
    with Image.open(images / "a.png") as image, torch.no_grad():
        logits = model(**processor(images=image, return_tensors="pt")).logits[0]
    expected = logits.sigmoid().topk(3)
    for result in results:
        assert result.labels == [LABELS[int(i)] for i in expected.indices]
        np.testing.assert_allclose(result.scores, expected.values, atol=1e-6)
    assert expected.values.sum() > 1.01  # not a softmax
    assert [Path(r.attention_map).name for r in results] == ["a.png", "a-2.png"]


def test_bad_flags_exit_with_status_2(checkpoint, images, monkeypatch, capsys):
    script = str(ROOT / "scripts" / "predict.py")
    monkeypatch.setattr(sys, "argv", [script, str(images), "--model", str(checkpoint), "--top-k", "0"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(script, run_name="__main__")
    assert exit_.value.code == 2
    assert "--top-k and --batch-size must be positive" in capsys.readouterr().err


def test_missing_model_folder_is_named_with_status_2(images, tmp_path, monkeypatch, capsys):
    """A folder that does not exist is named, not handed to transformers as a malformed Hub repo id."""
    script = str(ROOT / "scripts" / "predict.py")
    missing = tmp_path / "runs" / "nope"
    monkeypatch.setattr(sys, "argv", [script, str(images), "--model", str(missing)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(script, run_name="__main__")
    assert exit_.value.code == 2
    assert f"--model {missing}: no such file or folder" in capsys.readouterr().err


def test_symlinked_folders_are_followed_and_a_link_cycle_ends(images, tmp_path, caplog):
    """A symlinked subfolder is walked as training walks symlinked class folders; a link back up the tree is
    walked once and named, not followed forever."""
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "e.png")
    (images / "linked").symlink_to(outside, target_is_directory=True)
    (images / "sub" / "up").symlink_to(images, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="vitrail.predict"):
        files, failures = find_images([str(images)])
    assert files == [
        str(images / name) for name in ("a.png", "b.JPG", "broken.jpg", "linked/e.png", "sub/c.png")
    ]
    assert not failures
    assert (
        f"skipped 1 folder(s) already walked, reached again through a symbolic link, e.g. {images / 'sub' / 'up'}"
        in caplog.text
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need os.mkfifo (POSIX)")
def test_what_is_no_image_file_is_named(images, tmp_path, caplog):
    """A named pipe called like an image (reading it would wait forever) and a dangling link are skipped by name
    in a folder walk, and are failures when named on the command line."""
    os.mkfifo(images / "sub" / "pipe.png")
    (images / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with caplog.at_level(logging.WARNING, logger="vitrail.predict"):
        files, failures = find_images(
            [str(images), str(images / "sub" / "pipe.png"), str(images / "gone.png")]
        )
    assert files == [str(images / name) for name in ("a.png", "b.JPG", "broken.jpg", "sub/c.png")]
    assert (
        f"skipped 1 entries that are no regular file (named pipes, sockets, devices), e.g. {images / 'sub' / 'pipe.png'}"
        in caplog.text
    )
    assert f"skipped 1 symbolic link(s) to a missing target, e.g. {images / 'gone.png'}" in caplog.text
    assert [(f.file, f.reason) for f in failures] == [
        (str(images / "sub" / "pipe.png"), "not a regular file (a named pipe, socket or device)"),
        (str(images / "gone.png"), f"symbolic link to a missing target ({tmp_path / 'nowhere.png'})"),
    ]
