"""Training and data reliability (issue 10): runs killed while saving, reruns with other settings, bad output
folders, bad images and folder layouts, the stored data split, and flags that would train nothing."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_training import QUIET, ROOT, TINY, make_image_folder, run_train
from vitrail.data import image_folder_dataset
from vitrail.run_folder import checkpoint_problem, find_resume_checkpoint, write_atomic
from vitrail.training import DataArguments, ModelArguments, build_model, load_splits

GRAY = TINY  # the tiny model of tests/test_training.py reads 1-channel 8x8 images
RGB = TINY.replace("num_channels=1", "num_channels=3")


def gray_folder(root: Path, classes=("cat", "dog", "owl"), per_class=8) -> Path:
    """Small 8x8 grayscale PNGs whose class shows in their brightness."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = (rng.integers(0, 60, (8, 8)) + 80 * index).astype(np.uint8)
            PIL.Image.fromarray(array).save(root / name / f"{i}.png")
    return root


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut short: `Image.verify()` passes it, decoding fails ("image file is truncated")."""
    rng = np.random.default_rng(1)
    PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with PIL.Image.open(path) as image:
        image.verify()  # the old check let it through
    return path


# ---- killed while saving a checkpoint ---------------------------------------------------------------------------

# Runs one training per phase, each in a process forked from this one (so that torch and transformers are imported
# once), optionally armed to SIGKILL itself at a point inside the save of checkpoint-N.
DRIVER = r"""
import json, logging, os, signal, sys, traceback

import safetensors.torch
import transformers.modeling_utils as modeling_utils
from transformers import Trainer
from transformers.trainer_callback import TrainerState

from vitrail.training import parse_args, train


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point, step):
    target = f"checkpoint-{step}"
    if point == "half_weights":  # a model.safetensors cut off half-way
        real_save = modeling_utils.safe_save_file

        def save_file(tensors, filename, metadata=None):
            if target not in str(filename):
                return real_save(tensors, filename, metadata=metadata)
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as file:
                file.write(data[: len(data) // 2])
            die()

        modeling_utils.safe_save_file = save_file
    elif point == "before_optimizer":  # weights written, optimizer and scheduler not
        real_optimizer = Trainer._save_optimizer_and_scheduler

        def save_optimizer(self, output_dir):
            if target in str(output_dir):
                die()
            return real_optimizer(self, output_dir)

        Trainer._save_optimizer_and_scheduler = save_optimizer
    elif point == "half_state":  # optimizer, scheduler, RNG written; trainer_state.json cut off
        real_state = TrainerState.save_to_json

        def save_state(self, json_path):
            real_state(self, json_path)
            if target in str(json_path):
                with open(json_path, "r+") as file:
                    file.truncate(os.path.getsize(json_path) // 2)
                die()

        TrainerState.save_to_json = save_state


args, phases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
codes = []
for index, (output_dir, point, step) in enumerate(phases):
    pid = os.fork()
    if pid == 0:
        log = os.open(f"{output_dir}.{index}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        logging.basicConfig(level=logging.WARNING)
        code = 0
        try:
            if point:
                arm(point, step)
            train(*parse_args(["--output_dir", output_dir, *args]))
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


def test_kill_inside_checkpoint_saves_then_rerun_matches_an_uninterrupted_run(tmp_path):
    """One run is killed three times, each at another point inside a checkpoint save (the first kill leaves no
    complete checkpoint at all); each rerun of the same command skips the incomplete checkpoint and resumes from
    the newest complete one. The final weights and step count equal those of an uninterrupted run, bit for bit:
    resume restores the RNG and the data order, and two uninterrupted runs agree bit for bit on this CPU."""
    data = gray_folder(tmp_path / "data")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [
        "--train_dir", str(data), "--config_overrides", GRAY + ",hidden_dropout_prob=0.1", *QUIET,
        "--test_size", "0.25", "--validation_size", "0", "--per_device_train_batch_size", "4", "--max_steps", "8",
        "--save_strategy", "steps", "--save_steps", "2", "--rotation", "10", "--learning_rate", "3e-3",
    ]  # fmt: skip  # 18 training images: 5 steps an epoch, so resumes land mid-epoch and at its start
    run = str(tmp_path / "run")
    phases = [
        [str(tmp_path / "reference"), None, 0],
        [str(tmp_path / "again"), None, 0],
        [run, "half_weights", 2],
        [run, "before_optimizer", 4],
        [run, "half_state", 6],
        [run, None, 0],
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(driver), json.dumps(args), json.dumps(phases)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    logs = [Path(f"{out}.{i}.log").read_text() for i, (out, _, _) in enumerate(phases)]
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads(result.stdout.strip().splitlines()[-1])
    assert codes == [0, 0, -signal.SIGKILL, -signal.SIGKILL, -signal.SIGKILL, 0], "\n".join(logs)[-5000:]

    # What each kill left, and what each rerun made of it.
    assert "checkpoint-2, it is incomplete" in logs[3] and "model.safetensors is unreadable" in logs[3]
    assert "Resuming from" not in logs[3]  # the first kill left no complete checkpoint: from step 0
    assert "checkpoint-4, it is incomplete" in logs[4] and "optimizer.pt is missing" in logs[4]
    assert f"Resuming from {run}/checkpoint-2" in logs[4]
    assert (
        "checkpoint-6, it is incomplete" in logs[5] and "trainer_state.json is missing or cut off" in logs[5]
    )
    assert f"Resuming from {run}/checkpoint-4" in logs[5]

    reference, again, final = (
        load_file(Path(out) / "model.safetensors") for out, _, _ in phases[:2] + phases[-1:]
    )
    assert reference.keys() == again.keys() == final.keys()
    for name in reference:
        assert torch.equal(reference[name], again[name]), f"two uninterrupted runs differ at {name}"
    for name in reference:
        assert torch.equal(reference[name], final[name]), f"the resumed run differs at {name}"
    steps = [
        json.loads((Path(out) / "trainer_state.json").read_text())["global_step"] for out, _, _ in phases
    ]
    assert steps[0] == steps[-1] == 8
    assert checkpoint_problem(Path(run) / "checkpoint-6") is None  # rewritten whole by the last rerun
