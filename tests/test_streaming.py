"""Streams of WebDataset shards: training and evaluation end to end in one and two processes, bad images named
and counted, resuming mid-stream; no image read before the run is known to need training; header checks."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Collection
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from sklearn.datasets import load_digits

from tests.test_training import QUIET, ROOT, TINY, run_train
from tests.test_training_reliability import gray_folder, truncated_jpeg
from vitrail import training
from vitrail.data import header_problem


def write_shards(folder: Path, shards: int = 4, per_shard: int = 24, bad: Collection[str] = ()) -> Path:
    """sklearn's digits as WebDataset shards (`<key>.jpg` + `<key>.cls`): train-00N.tar and one val-000.tar.
    The samples keyed in `bad` get a JPEG cut in half."""
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"train-{s:03d}.tar" for s in range(shards)] + ["val-000.tar"]
    index = 0
    for name in names:
        with tarfile.open(folder / name, "w") as tar:
            for _ in range(per_shard):
                buffer = io.BytesIO()
                PIL.Image.fromarray(pixels[index], mode="L").save(buffer, "JPEG", quality=95)
                key = f"{index:06d}"
                jpeg = buffer.getvalue()
                if key in bad:
                    jpeg = jpeg[: len(jpeg) // 2]
                for member, payload in (
                    (f"{key}.jpg", jpeg),
                    (f"{key}.cls", str(digits.target[index]).encode()),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                index += 1
    return folder


def stream_flags(data: Path, *extra: str) -> list[str]:
    return [
        "--dataset_name", "webdataset", "--train_files", str(data / "train-*.tar"),
        "--validation_files", str(data / "val-*.tar"), "--streaming", "true",
        "--per_device_train_batch_size", "8", "--save_strategy", "no", *extra,
    ]  # fmt: skip


def test_a_stream_of_shards_trains_and_evaluates_and_names_bad_images(tmp_path):
    data = write_shards(tmp_path / "shards", bad={"000030"})
    with pytest.raises(ValueError, match="--max_steps"):
        run_train(tmp_path, *stream_flags(data), name="no-steps")
    with pytest.raises(ValueError, match=r"Cannot read image train-001\.tar/000030: .*--skip_bad_images"):
        run_train(tmp_path, *stream_flags(data, "--max_steps", "12"), name="strict")
    metrics, out = run_train(
        tmp_path, *stream_flags(data, "--max_steps", "12", "--skip_bad_images", "true"), name="skipping"
    )
    assert metrics["skipped_images"] == {
        "train-001.tar/000030": metrics["skipped_images"]["train-001.tar/000030"]
    }
    assert "OSError" in metrics["skipped_images"]["train-001.tar/000030"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 12
    # Evaluated on the held-out shard, every sample once; labels named by the numbers the shards hold.
    assert sum(map(sum, json.loads((out / "confusion_matrix.json").read_text())["matrix"])) == 24
    assert json.loads((out / "config.json").read_text())["id2label"] == {str(i): str(i) for i in range(10)}
    assert "eval_accuracy" in metrics


DRIVER = r"""
import json, os, runpy, sys
from vitrail import training

seen = []
decode = training.decode_images


def record(batch, image_col, feature, skip_bad=False):
    seen.extend(name for name in training.sample_names(batch, image_col) if name.startswith("train-"))
    return decode(batch, image_col, feature, skip_bad)


training.decode_images = record
train_py, out = sys.argv[1], sys.argv[2]
sys.argv = [train_py, *sys.argv[3:]]
runpy.run_path(train_py, run_name="__main__")
rank = int(os.environ.get("RANK", 0))
with open(os.path.join(out, f"rank{rank}.json"), "w") as file:
    json.dump(seen, file)
"""


def test_two_processes_each_read_their_own_share_of_the_stream(tmp_path):
    data = write_shards(tmp_path / "shards", bad={"000100"})  # one held-out image unreadable
    out, records = tmp_path / "ddp", tmp_path / "records"
    records.mkdir()
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "driver.py"),
        str(ROOT / "scripts" / "train.py"), str(records), "--output_dir", str(out), "--config_overrides", TINY,
        *QUIET, *stream_flags(data, "--max_steps", "4", "--dataloader_num_workers", "0", "--skip_bad_images", "true"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first and second and not set(first) & set(second)  # each rank its own share
    shards = [{name.split("/")[0] for name in seen} for seen in (first, second)]
    assert shards[0] | shards[1] == {f"train-{s:03d}.tar" for s in range(4)} and not shards[0] & shards[1]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    # The held-out shard is streamed and evaluated once in all, not once per rank; its unreadable image is named.
    assert sum(map(sum, json.loads((out / "confusion_matrix.json").read_text())["matrix"])) == 23
    assert list(json.loads((out / "all_results.json").read_text())["skipped_images"]) == [
        "val-000.tar/000100"
    ]


def test_a_resumed_stream_continues_where_it_stopped(tmp_path, monkeypatch):
    data = write_shards(tmp_path / "shards")
    steps = []
    step = training.VitrailTrainer.training_step

    def record(self, model, inputs, num_items_in_batch=None):
        steps.append(inputs["labels"].tolist())
        return step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(training.VitrailTrainer, "training_step", record)
    flags = stream_flags(data, "--max_steps", "4", "--dataloader_num_workers", "0")
    flags[flags.index("--save_strategy") + 1] = "steps"
    _, out = run_train(tmp_path, *flags, "--save_steps", "2")
    whole = list(steps)
    assert len(whole) == 4
    # As if killed after checkpoint-2: the rerun resumes it and takes steps 3 and 4 on the stream's next batches.
    shutil.rmtree(out / "checkpoint-4")
    (out / "all_results.json").unlink()
    steps.clear()
    run_train(tmp_path, *flags, "--save_steps", "2")
    assert steps == whole[2:] and steps != whole[:2]


def test_a_finished_run_answers_without_opening_an_image(tmp_path, monkeypatch):
    folder = gray_folder(tmp_path / "images")
    shards = write_shards(tmp_path / "shards")
    runs = {
        "folder": ["--train_dir", str(folder), "--max_steps", "2", "--save_strategy", "no"],
        "stream": stream_flags(shards, "--max_steps", "2"),
    }
    finished = {name: run_train(tmp_path, *flags, name=name)[0] for name, flags in runs.items()}

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    for name, flags in runs.items():
        assert run_train(tmp_path, *flags, name=name)[0] == finished[name]


def test_header_check_catches_a_truncated_jpeg(tmp_path):
    cut = truncated_jpeg(tmp_path / "cut.jpg")  # `verify()` passes it
    assert "cut short" in header_problem(cut)
    whole = tmp_path / "whole.jpg"
    PIL.Image.new("RGB", (32, 32), "red").save(whole)
    assert header_problem(whole) is None
    png = tmp_path / "cut.png"
    PIL.Image.new("RGB", (64, 64), "blue").save(png)
    png.write_bytes(png.read_bytes()[:-20])
    assert "cut short" in header_problem(png)


def test_a_finished_stream_answers_without_reading_its_shards(tmp_path, monkeypatch):
    """The class names and columns are in the run's split record: a rerun recognises the run from the shards'
    names and sizes, and answers without opening them (here they hold zeros, which no reader could take)."""
    shards = write_shards(tmp_path / "shards")
    flags = stream_flags(shards, "--max_steps", "2")
    finished, out = run_train(tmp_path, *flags)
    record = json.loads((out / "data_split.json").read_text())
    assert record["class_names"] == [str(i) for i in range(10)]
    assert (record["image_column"], record["label_column"]) == ("jpg", "cls")
    for shard in shards.glob("*.tar"):
        shard.write_bytes(bytes(shard.stat().st_size))
    opened = []
    load = training.load_dataset
    monkeypatch.setattr(
        training, "load_dataset", lambda *args, **kwargs: opened.append(args) or load(*args, **kwargs)
    )
    assert run_train(tmp_path, *flags)[0] == finished and not opened
    # A stream the record does not describe (no held-out files now) is opened: its shards of zeros fail.
    without_held_out = flags[: flags.index("--validation_files")] + flags[flags.index("--streaming") :]
    with pytest.raises(Exception):  # noqa: B017 (whichever error datasets raises on a tar of zeros)
        run_train(tmp_path, *without_held_out)
    assert opened


def test_a_held_out_stream_is_read_as_evaluation_draws_it(tmp_path, monkeypatch):
    """Evaluation reads the held-out shard as a stream, through the Trainer's evaluation loop: not one of its
    images is decoded before the first training step, and each is evaluated once."""
    shards = write_shards(tmp_path / "shards")
    events = []
    decode, step = training.decode_images, training.VitrailTrainer.training_step

    def record_decode(batch, image_col, feature, skip_bad=False):
        events.extend(("decode", name) for name in training.sample_names(batch, image_col))
        return decode(batch, image_col, feature, skip_bad)

    def record_step(self, model, inputs, num_items_in_batch=None):
        events.append(("step", None))
        return step(self, model, inputs, num_items_in_batch)

    evaluated = []
    evaluate = training.VitrailTrainer.evaluate

    def record_evaluate(self, eval_dataset=None, **kwargs):
        evaluated.append(type(self.eval_dataset).__name__)
        return evaluate(self, eval_dataset, **kwargs)

    monkeypatch.setattr(training, "decode_images", record_decode)
    monkeypatch.setattr(training.VitrailTrainer, "training_step", record_step)
    monkeypatch.setattr(training.VitrailTrainer, "evaluate", record_evaluate)
    _, out = run_train(tmp_path, *stream_flags(shards, "--max_steps", "3", "--dataloader_num_workers", "0"))
    assert evaluated == ["IterableDataset"]
    first_step = events.index(("step", None))
    held_out = [i for i, (kind, name) in enumerate(events) if kind == "decode" and name.startswith("val-")]
    assert held_out and min(held_out) > first_step
    assert sum(map(sum, json.loads((out / "confusion_matrix.json").read_text())["matrix"])) == 24


def test_a_batch_of_unreadable_images_is_skipped_and_counted(tmp_path):
    """A whole shard of unreadable training images, and a whole evaluation batch of them (the first 8 of the
    held-out shard): under --skip_bad_images training and evaluation go on with the readable images, every
    unreadable one named and counted; without it the first one read stops the run, named."""
    bad = {f"{i:06d}" for i in range(24, 48)} | {f"{i:06d}" for i in range(96, 104)}
    shards = write_shards(tmp_path / "shards", bad=bad)
    with pytest.raises(
        ValueError, match=r"Cannot read image train-001\.tar/0000[234]\d: .*--skip_bad_images"
    ):
        run_train(
            tmp_path,
            *stream_flags(shards, "--max_steps", "12", "--dataloader_num_workers", "0"),
            name="strict",
        )
    flags = stream_flags(
        shards, "--max_steps", "12", "--skip_bad_images", "true", "--per_device_eval_batch_size", "8"
    )
    metrics, out = run_train(tmp_path, *flags, name="skipping")
    shard_of = {
        **{f"{i:06d}": "train-001.tar" for i in range(24, 48)},
        **{f"{i:06d}": "val-000.tar" for i in range(96, 104)},
    }
    assert sorted(metrics["skipped_images"]) == sorted(f"{shard_of[key]}/{key}" for key in bad)
    assert all("OSError" in reason for reason in metrics["skipped_images"].values())
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 12
    assert sum(map(sum, json.loads((out / "confusion_matrix.json").read_text())["matrix"])) == 16
    assert "32 unreadable images were left out" in (out / "README.md").read_text()


def test_a_batch_with_no_readable_image_takes_no_step(tmp_path):
    """When every row of a batch is a placeholder for unreadable images (a whole mapped chunk of the stream was
    unreadable), the batch is their names alone; the training step records them and leaves no gradient, so the
    optimizer does not move the weights."""
    from transformers import TrainingArguments

    model, _ = training.build_model(
        training.ModelArguments(config_overrides=TINY), [str(i) for i in range(10)]
    )
    trainer = training.VitrailTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    )
    rows = [
        {"pixel_values": np.zeros((1, 8, 8), np.float32), "labels": -100, "placeholder": True,
         "skipped": [[f"train-000.tar/{i:06d}", "OSError: broken"] for i in range(start, start + 64)]}
        for start in (0, 64)
    ]  # fmt: skip
    batch = trainer.data_collator(rows)
    assert batch.keys() == {"bad_images"} and len(batch["bad_images"]) == 128
    loss = trainer.training_step(model.train(), batch)
    assert float(loss) == 0.0 and all(param.grad is None for param in model.parameters())
    assert sorted(trainer.skipped_images) == sorted(batch["bad_images"])
