"""Training and data reliability (issue 10): runs killed while saving, reruns with other settings, bad output
folders, bad images and folder layouts, the stored data split, and flags that would train nothing."""

import json
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from tests.hub_server import USER
from tests.test_training import QUIET, ROOT, TINY, run_train
from vitrail import run_folder, training
from vitrail.data import image_folder_dataset
from vitrail.evaluate_checkpoint import EvaluateArguments, evaluate_checkpoint
from vitrail.hub import HubError, checkpoint_files
from vitrail.run_folder import check_foreign_files, checkpoint_problem, find_resume_checkpoint, write_atomic
from vitrail.training import (
    DataArguments,
    ModelArguments,
    VitrailTrainer,
    build_model,
    check_arguments,
    check_model_source,
    load_splits,
    parse_args,
    train,
)

GRAY = TINY  # the tiny model of tests/test_training.py reads 1-channel 8x8 images


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
    elif point == "after_training":  # the last checkpoint saved, nothing written to the output folder yet
        real_train = Trainer.train

        def train_then_die(self, *args, **kwargs):
            real_train(self, *args, **kwargs)
            die()

        Trainer.train = train_then_die
    elif point == "before_card":  # weights, trainer state and plots in the output folder; no card, no results
        import vitrail.model_card

        vitrail.model_card.render_model_card = lambda **kwargs: die()


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


# Both kinds of training budget, each ending inside an epoch (where the Trainer's resume arithmetic went wrong).
BUDGETS = {
    # 18 training images, batch 4: 5 steps an epoch; 16 steps end with the 1st step of the 4th epoch.
    "max_steps": (["--max_steps", "16", "--test_size", "0.25", "--validation_size", "0"], 16),
    # 15 training images, batch 4: 4 steps an epoch; 2.5 epochs end after 10 steps, half-way through the 3rd. Each
    # epoch ends with an evaluation, and the kill at checkpoint-4 falls on an epoch's end.
    "num_train_epochs": (
        [
            "--num_train_epochs",
            "2.5",
            "--test_size",
            "0.25",
            "--validation_size",
            "0.125",
            "--eval_strategy",
            "epoch",
        ],
        10,
    ),
}


def untimed(record: dict) -> dict:
    """A log entry or results without the values that measure time."""
    return {k: v for k, v in record.items() if not k.endswith(("_runtime", "_per_second", "_wall_time"))}


@pytest.mark.parametrize("budget", BUDGETS)
def test_killed_runs_rerun_to_the_weights_and_losses_of_an_uninterrupted_run(tmp_path, budget):
    """One run is killed five times: three times at another point inside a checkpoint save (the first kill leaves
    no complete checkpoint at all), then after its last checkpoint, once before anything reached the output folder
    and once with everything but the card and the results there. Each rerun of the same command resumes from the
    newest complete checkpoint; from the last one it takes no step (the Trainer alone took one more, with a cosine
    schedule's non-zero rate past the end). The weights, the step count, every logged value (losses, gradient
    norms, learning rates, evaluations) and the results equal those of an uninterrupted run, bit for bit: resume
    restores the RNG and the data order, and two uninterrupted runs agree bit for bit on this CPU."""
    flags, last = BUDGETS[budget]
    data = gray_folder(tmp_path / "data")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [
        "--train_dir", str(data), "--config_overrides", GRAY + ",hidden_dropout_prob=0.1", *QUIET, *flags,
        "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2", "--rotation", "10",
        "--learning_rate", "3e-3", "--lr_scheduler_type", "cosine",
    ]  # fmt: skip
    run = str(tmp_path / "run")
    phases = [
        [str(tmp_path / "reference"), None, 0],
        [str(tmp_path / "again"), None, 0],
        [run, "half_weights", 2],
        [run, "before_optimizer", 4],
        [run, "half_state", 6],
        [run, "after_training", 0],
        [run, "before_card", 0],
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
    killed = -signal.SIGKILL
    assert codes == [0, 0, killed, killed, killed, killed, killed, 0], "\n".join(logs)[-5000:]

    # What each kill left, and what each rerun made of it.
    assert "checkpoint-2, it is incomplete" in logs[3] and "model.safetensors is unreadable" in logs[3]
    assert "Resuming from" not in logs[3]  # the first kill left no complete checkpoint: from step 0
    assert "checkpoint-4, it is incomplete" in logs[4] and "optimizer.pt is missing" in logs[4]
    assert f"Resuming from {run}/checkpoint-2" in logs[4]
    assert (
        "checkpoint-6, it is incomplete" in logs[5] and "trainer_state.json is missing or cut off" in logs[5]
    )
    assert f"Resuming from {run}/checkpoint-4" in logs[5]
    for log in logs[6:]:
        assert f"Resuming from {run}/checkpoint-{last}" in log

    outputs = [Path(out) for out, _, _ in phases[:2] + phases[-1:]]
    reference, again, final = (load_file(out / "model.safetensors") for out in outputs)
    assert reference.keys() == again.keys() == final.keys()
    for name in reference:
        assert torch.equal(reference[name], again[name]), f"two uninterrupted runs differ at {name}"
    for name in reference:
        assert torch.equal(reference[name], final[name]), f"the resumed run differs at {name}"
    states = [json.loads((out / "trainer_state.json").read_text()) for out in outputs]
    assert [state["global_step"] for state in states] == [last] * 3
    histories = [[untimed(entry) for entry in state["log_history"]] for state in states]
    assert histories[0] == histories[1] == histories[2]
    logged_steps = [entry["step"] for entry in histories[0] if "loss" in entry]
    assert logged_steps == sorted(set(range(2, last + 1, 2)) | set(range(5, last + 1, 5)) | {last})
    results = [untimed(json.loads((out / "all_results.json").read_text())) for out in outputs]
    assert results[0] == results[1] == results[2]
    # The whole run's mean loss, not the Trainer's mean over the steps since the last resume.
    losses = [entry["loss"] for entry in histories[0] if "loss" in entry]
    assert min(losses) < results[2]["train_loss"] < max(losses)
    configs = [json.loads((out / "config.json").read_text()) for out in outputs]
    assert configs[0] == configs[2]
    assert (Path(run) / "README.md").is_file()
    assert checkpoint_problem(Path(run) / "checkpoint-6") is None  # rewritten whole by a rerun


def test_a_rerun_from_the_last_checkpoint_ends_with_the_best_model(tmp_path, monkeypatch):
    """With `--load_best_model_at_end`, a run killed after its last checkpoint ends, rerun, with the best
    checkpoint's weights, as the uninterrupted run did (the rerun takes no step, so the Trainer does not load it)."""
    args = [
        "--train_dir", str(gray_folder(tmp_path / "data")), "--config_overrides", GRAY, *QUIET, "--test_size",
        "0.25", "--validation_size", "0.125", "--per_device_train_batch_size", "4", "--max_steps", "6",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--learning_rate", "3e-3", "--load_best_model_at_end", "true",
        # The best by this metric is the highest validation loss: an early checkpoint, not the last.
        "--metric_for_best_model", "loss", "--greater_is_better", "true",
    ]  # fmt: skip
    reference = tmp_path / "reference"
    train(*parse_args(["--output_dir", str(reference), *args]))
    best = json.loads((reference / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert Path(best).name != "checkpoint-6"

    real_train = VitrailTrainer.train

    def killed_after_training(self, *args, **kwargs):
        real_train(self, *args, **kwargs)
        raise KeyboardInterrupt("killed")

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(VitrailTrainer, "train", killed_after_training)
        with pytest.raises(KeyboardInterrupt):
            train(*parse_args(["--output_dir", str(run), *args]))
    assert not (run / "model.safetensors").exists() and (run / "checkpoint-6").is_dir()
    train(*parse_args(["--output_dir", str(run), *args]))
    expected, final = load_file(reference / "model.safetensors"), load_file(run / "model.safetensors")
    last = load_file(run / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(expected[name], final[name]) for name in expected)
    assert not all(torch.equal(last[name], final[name]) for name in last)


def test_checkpoint_checks_name_what_is_missing(finished, tmp_path, caplog):
    """Each file the Trainer writes is checked whole, without unpickling; resume falls back past a bad one."""
    out = tmp_path / "run"
    shutil.copytree(finished.out, out)
    assert checkpoint_problem(out / "checkpoint-4") is None
    damaged = out / "checkpoint-4"
    optimizer = (damaged / "optimizer.pt").read_bytes()
    (damaged / "optimizer.pt").write_bytes(optimizer[: len(optimizer) - 100])
    assert checkpoint_problem(damaged) == "optimizer.pt is cut off"
    (damaged / "optimizer.pt").write_bytes(optimizer)
    (damaged / "rng_state.pth").unlink()
    assert checkpoint_problem(damaged) == "the RNG state is missing or cut off"
    with caplog.at_level(logging.WARNING, logger="vitrail.run_folder"):
        assert find_resume_checkpoint(out) == str(out / "checkpoint-2")
    assert "checkpoint-4, it is incomplete" in caplog.text and "RNG state" in caplog.text
    with pytest.raises(
        ValueError, match=r"--resume_from_checkpoint .*checkpoint-4 is incomplete: the RNG state"
    ):
        finished.rerun(out, "--resume_from_checkpoint", str(damaged))


def test_write_atomic_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    target = tmp_path / "all_results.json"
    target.write_text("old")

    def interrupted(source, destination):
        raise OSError("interrupted")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="interrupted"):
        write_atomic(target, "new")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]  # no temporary file left
    monkeypatch.undo()
    write_atomic(target, "new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


# ---- reruns in the same output folder ---------------------------------------------------------------------------


class Finished:
    """A finished tiny run on a gray image folder, with checkpoint-2 and checkpoint-4."""

    def __init__(self, root: Path):
        self.data = gray_folder(root / "data")
        self.out = root / "run"
        self.args = [
            "--train_dir", str(self.data), "--config_overrides", GRAY, *QUIET, "--test_size", "0.25",
            "--validation_size", "0.125", "--per_device_train_batch_size", "8", "--max_steps", "4",
            "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "3e-3",
        ]  # fmt: skip
        self.metrics = train(*parse_args(["--output_dir", str(self.out), *self.args]))

    def rerun(self, out: Path, *extra: str) -> dict:
        return train(*parse_args(["--output_dir", str(out), *self.args, *extra]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Finished:
    return Finished(tmp_path_factory.mktemp("finished"))


def test_rerun_with_other_settings_is_refused_before_training(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished.out, out)
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    with pytest.raises(ValueError) as refused:
        finished.rerun(out, "--learning_rate", "5e-3", "--seed", "1")
    message = str(refused.value)
    assert f"--output_dir {out} holds a run with other settings" in message
    assert "learning_rate: 0.003 -> 0.005" in message and "seed: 42 -> 1" in message
    assert "--overwrite_output_dir" in message and "another --output_dir" in message
    # Dropping the last, short batch changes the steps of an epoch.
    with pytest.raises(ValueError, match=r"schedule\.dataloader_drop_last: null -> true"):
        finished.rerun(out, "--dataloader_drop_last", "true")
    # A wider model: the same message, not a size-mismatch traceback from loading checkpoint-4.
    with pytest.raises(ValueError, match=r"holds a run with other settings:\n.*hidden_size: 32 -> 48"):
        finished.rerun(out, "--config_overrides", GRAY.replace("hidden_size=32", "hidden_size=48"))
    # The same, resumed explicitly: the checkpoint's model is compared.
    with pytest.raises(ValueError, match=r"checkpoint-2 holds another model:\n.*hidden_size: 32 -> 48"):
        finished.rerun(out, "--config_overrides", GRAY.replace("hidden_size=32", "hidden_size=48"),
                       "--resume_from_checkpoint", str(out / "checkpoint-2"))  # fmt: skip
    # Other data (one image more) is another run too.
    PIL.Image.new("L", (8, 8)).save(finished.data / "cat" / "extra.png")
    try:
        with pytest.raises(ValueError, match=r"(?s)holds a run with other settings:.*split\.train\.sha256"):
            finished.rerun(out)
    finally:
        (finished.data / "cat" / "extra.png").unlink()
    assert before == {path: path.stat().st_mtime_ns for path in out.rglob("*")}  # nothing written
    # Checkpoints without a record (a folder from an older vitrail) cannot be checked: refused too.
    (out / "run_settings.json").unlink()
    with pytest.raises(ValueError, match=r"whose settings were not recorded .* --resume_from_checkpoint"):
        finished.rerun(out)


def test_rerun_of_a_finished_run_returns_its_results(finished, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(finished.out, out)
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    with caplog.at_level(logging.WARNING, logger="vitrail.run_folder"):
        metrics = finished.rerun(out)
    assert metrics == finished.metrics == json.loads((out / "all_results.json").read_text())
    assert "already holds this run, finished" in caplog.text
    assert before == {path: path.stat().st_mtime_ns for path in out.rglob("*")}  # nothing trained or written


def test_overwrite_output_dir_starts_again(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished.out, out)
    (out / "notes.txt").write_text("mine")
    finished.rerun(out, "--learning_rate", "5e-3", "--max_steps", "2", "--save_strategy", "no",
                   "--overwrite_output_dir")  # fmt: skip
    assert not list(out.glob("checkpoint-*"))  # the old run's checkpoints are gone ...
    assert (out / "notes.txt").read_text() == "mine"  # ... files vitrail did not write are kept
    assert json.loads((out / "run_settings.json").read_text())["schedule"]["learning_rate"] == 5e-3
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_a_folder_of_the_users_files_is_refused_before_data_is_read(tmp_path, monkeypatch):
    """A new run in a folder without a run record that holds a card and a config (a model of the user's) would
    replace them: refused, naming them, before any data is read; `--overwrite_output_dir` replaces them."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("# my model")
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with monkeypatch.context() as patched:
        patched.setattr(training, "load_splits", not_reached)
        with pytest.raises(ValueError) as refused:
            run_train(tmp_path, "--max_steps", "1", "--save_strategy", "no")
    message = str(refused.value)
    assert f"--output_dir {out} holds config.json, README.md, but no run_settings.json" in message
    assert "another --output_dir" in message and "--overwrite_output_dir deletes them" in message
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.json", "notes.txt"]
    assert (out / "README.md").read_text() == "# my model"

    run_train(tmp_path, "--max_steps", "1", "--save_strategy", "no", "--overwrite_output_dir", "true")
    assert "vitrail" in (out / "README.md").read_text() and (out / "notes.txt").read_text() == "mine"
    check_foreign_files(out)  # a run's folder now: its record makes the files the run's own

    # Today's behaviour stays for an empty folder, one with other files only, and one that a run killed between
    # writing the split record and the run record left (data_split.json alone).
    for name, files in (("empty", []), ("other", ["notes.txt", "data.csv"]), ("split", ["data_split.json"])):
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_text("")
        check_foreign_files(tmp_path / name)


def test_a_kill_while_recording_the_run_leaves_a_folder_that_reruns(tmp_path, monkeypatch):
    """The split record is written before the run record: a kill between the two leaves a folder that the same
    command runs in (the other order left a record without its split, which a rerun refused)."""
    real_write = run_folder.write_json_atomic
    written = []

    def killed_at_the_second(path, value):
        written.append(Path(path).name)
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        real_write(path, value)

    monkeypatch.setattr(run_folder, "write_json_atomic", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, "--max_steps", "1", "--save_strategy", "no")
    assert written == ["data_split.json", "run_settings.json"]
    monkeypatch.undo()
    metrics, out = run_train(tmp_path, "--max_steps", "1", "--save_strategy", "no")
    assert json.loads((out / "all_results.json").read_text()) == metrics


def push_flags(repo_id: str) -> list[str]:
    return ["--push_to_hub", "true", "--hub_model_id", repo_id]


def test_a_failed_push_is_pushed_by_the_rerun(hub, tmp_path, caplog):
    """The final push fails (HTTP 500): the run is finished, its record says the push did not land, a rerun without
    --push_to_hub says so, and the same command once the Hub is back pushes the folder as it is. Another rerun
    makes no commit: the files are unchanged."""
    repo_id = f"{USER}/failed-push"
    out = tmp_path / "run"
    args = [
        "--output_dir", str(out), "--train_dir", str(gray_folder(tmp_path / "data")), "--config_overrides", GRAY,
        *QUIET, "--test_size", "0.25", "--validation_size", "0", "--max_steps", "2", "--save_strategy", "no",
    ]  # fmt: skip
    hub.fail_next(r"^POST /api/models/.*/commit/", status=500)
    with pytest.raises(HubError, match=r"server failed \(HTTP 500\)"):
        train(*parse_args([*args, *push_flags(repo_id)]))
    record = json.loads((out / "hub_push.json").read_text())
    assert (record["repo_id"], record["landed"], record["commit"]) == (repo_id, False, None)
    assert "HTTP 500" in record["error"]
    results = json.loads((out / "all_results.json").read_text())

    with caplog.at_level(logging.WARNING, logger="vitrail.run_folder"):
        assert train(*parse_args(args)) == results
    assert f"Its push to {repo_id} did not land (HubError: " in caplog.text and "--push_to_hub" in caplog.text

    assert train(*parse_args([*args, *push_flags(repo_id)])) == results  # finished: pushed, not trained
    record = json.loads((out / "hub_push.json").read_text())
    assert record["landed"] is True and record["error"] is None and record["commit"] == hub.head(repo_id).sha
    pushed = {name: data for name, data in hub.files(repo_id).items() if name != ".gitattributes"}
    assert pushed == {name: (out / name).read_bytes() for name in checkpoint_files(out)}
    assert "hub_push.json" not in pushed and repo_id.encode() in pushed["README.md"]

    commits = hub.commit_count(repo_id)
    train(*parse_args([*args, *push_flags(repo_id)]))
    assert hub.commit_count(repo_id) == commits
    assert json.loads((out / "hub_push.json").read_text())["landed"] is True


def test_a_finished_run_rerun_with_push_to_hub_is_pushed(finished, hub, tmp_path):
    """A run finished without --push_to_hub is pushed by a rerun with it (the same run: push flags are not run
    settings); the card it pushes names the repo, where the folder's card named the folder."""
    repo_id = f"{USER}/pushed-later"
    out = tmp_path / "run"
    shutil.copytree(finished.out, out)
    assert repo_id.encode() not in (out / "README.md").read_bytes()
    assert finished.rerun(out, *push_flags(repo_id)) == finished.metrics
    card = hub.files(repo_id)["README.md"]
    assert f'repo = "{repo_id}"'.encode() in card and card == (out / "README.md").read_bytes()
    assert json.loads((out / "hub_push.json").read_text())["landed"] is True


def test_unusable_output_dir_is_found_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "load_splits", not_reached)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--output_dir .*file/run cannot be a folder: .*file is a file"):
        run_train(tmp_path, name="file/run")
    # A folder that refuses writes. Root writes into read-only folders, so the refusal is the file system's
    # answer, as a read-only mount or a full disk would give it, whoever runs the test.
    (tmp_path / "locked").mkdir()
    write_text = Path.write_text

    def refuse(path, *args, **kwargs):
        if path.parent.name == "run" and path.parent.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.raises(ValueError, match=r"--output_dir .*locked/run is not writable \(Permission denied\)"):
        run_train(tmp_path, name="locked/run")


def not_reached(*args, **kwargs):
    raise AssertionError("data was loaded: the check came too late")


# ---- data -----------------------------------------------------------------------------------------------------


def test_truncated_jpeg_is_named_before_training_or_skipped(tmp_path, monkeypatch):
    data = gray_folder(tmp_path / "data")
    truncated_jpeg(data / "dog" / "cut.jpg")
    # Caught by its header check (the JPEG end marker is missing), before any pixel is decoded.
    with pytest.raises(ValueError, match=r"Cannot read image .*dog/cut\.jpg: .*cut short \(truncated\)"):
        run_train(tmp_path, "--train_dir", str(data))
    assert not (tmp_path / "run" / "run_settings.json").exists()  # refused before the run started

    metrics, out = run_train(
        tmp_path, "--train_dir", str(data), "--skip_bad_images", "true", "--max_steps", "2",
        "--save_strategy", "no", "--test_size", "0.25", "--validation_size", "0", name="skipping",
    )  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert list(results["skipped_images"]) == ["data/dog/cut.jpg"]
    assert "truncated" in results["skipped_images"]["data/dog/cut.jpg"]
    assert (
        "1 unreadable image was left out of the data (`--skip_bad_images`): `data/dog/cut.jpg`"
        in (out / "README.md").read_text()
    )
    split = json.loads((out / "data_split.json").read_text())
    # The record describes the listing (made before any file is read); the left-out image is in the results.
    assert split["train"]["size"] + split["test"]["size"] == 25


@pytest.mark.parametrize("cache", ["true", "false"])
def test_an_image_read_later_is_named(tmp_path, cache):
    """Data that is not an image folder is decoded while caching (before training) or, with
    `--cache_pixels false`, while training: either way the error names the file."""
    data = gray_folder(tmp_path / "hub-like")
    truncated_jpeg(data / "dog" / "cut.jpg")
    with pytest.raises(
        ValueError, match=r"Cannot read image .*dog/cut\.jpg: OSError: image file is truncated"
    ):
        run_train(
            tmp_path, "--dataset_name", str(data), "--cache_pixels", cache, "--num_train_epochs", "1",
            "--save_strategy", "no", "--test_size", "0.25", "--validation_size", "0",
        )  # fmt: skip


def record_decodes_and_steps(monkeypatch) -> list[str]:
    """A list that fills, in the main process, with "decode" for each image decoded and "step" for each step."""
    events = []
    decode, step = training.decode_images, training.VitrailTrainer.training_step

    def record_decode(batch, image_col, feature, skip_bad=False):
        events.extend(["decode"] * len(batch[image_col]))
        return decode(batch, image_col, feature, skip_bad)

    def record_step(self, model, inputs, num_items_in_batch=None):
        events.append("step")
        return step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(training, "decode_images", record_decode)
    monkeypatch.setattr(training.VitrailTrainer, "training_step", record_step)
    return events


@pytest.mark.parametrize("cache", ["true", "false"])
def test_an_image_that_fails_to_decode_is_skipped_and_named(tmp_path, monkeypatch, cache):
    """Under --skip_bad_images, an image that fails to decode when it is first read, by the pixel cache (which
    fills as training reads images, so that no more than the first batches are decoded before the first step) or on
    the fly, is left out of every batch and named in the results."""
    data = gray_folder(tmp_path / "hub-like")
    truncated_jpeg(data / "dog" / "cut.jpg")
    events = record_decodes_and_steps(monkeypatch)
    metrics, _ = run_train(
        tmp_path, "--dataset_name", str(data), "--cache_pixels", cache, "--num_train_epochs", "2",
        "--per_device_train_batch_size", "4", "--save_strategy", "no", "--test_size", "0.25",
        "--validation_size", "0", "--skip_bad_images", "true", "--dataloader_num_workers", "0",
    )  # fmt: skip
    (name,) = metrics["skipped_images"]
    assert name.endswith("dog/cut.jpg") and "truncated" in metrics["skipped_images"][name]
    assert events.index("step") <= 8  # two batches: accelerate's loader reads one ahead
    if cache == "true":  # each image decoded once, though read in two epochs and one evaluation
        assert events.count("decode") == 25


def test_with_data_workers_the_pixel_cache_is_filled_once_before_training(tmp_path, monkeypatch):
    """Workers read the cache as the main process left it: asked for workers, the cache is filled in the main
    process before the first step (one tensor the workers share, each image decoded once), not in each worker."""
    data = gray_folder(tmp_path / "hub-like")
    events = record_decodes_and_steps(monkeypatch)
    run_train(
        tmp_path, "--dataset_name", str(data), "--cache_pixels", "true", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "4", "--save_strategy", "no", "--test_size", "0.25",
        "--validation_size", "0", "--dataloader_num_workers", "2",
    )  # fmt: skip
    images = sum(1 for path in data.rglob("*") if path.is_file())
    assert events.count("decode") == images and "decode" not in events[events.index("step") :]


def test_folder_layouts_are_followed_or_named(tmp_path, caplog):
    data = gray_folder(tmp_path / "data")
    gray_folder(tmp_path / "elsewhere", classes=("bat",))
    (data / "bat").symlink_to(tmp_path / "elsewhere" / "bat", target_is_directory=True)
    (data / "cat" / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (data / "dog" / "notes.txt").write_text("labels")
    (data / "owl" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with caplog.at_level(logging.WARNING, logger="vitrail.data"):
        splits, skipped = image_folder_dataset(str(data))
    # The symlinked class is in.
    assert splits["train"].features["label"].names == ["bat", "cat", "dog", "owl"]
    assert len(splits["train"]) == 32 and not skipped
    assert (
        "skipped 3 files: cat/photo.heic (unsupported format), dog/notes.txt (unsupported format), "
        "owl/gone.png (dangling symlink)"
    ) in caplog.text

    (data / "yak").mkdir()
    (data / "yak" / "readme.txt").write_text("no images yet")
    with pytest.raises(ValueError, match=r"class folder\(s\) yak hold no usable image"):
        image_folder_dataset(str(data))

    nested = tmp_path / "nested"
    gray_folder(nested / "train")
    with pytest.raises(ValueError) as refused:
        image_folder_dataset(str(nested))
    message = str(refused.value)
    assert "images nested more than one folder deep (24, e.g. train/cat/0.png)" in message
    assert f"Lay it out as {nested}/<class name>/<image file>" in message and str(nested / "train") in message

    deep = gray_folder(tmp_path / "tiff")
    PIL.Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 100_000).save(deep / "cat" / "deep.tif")
    with pytest.raises(
        ValueError, match=r"Cannot read image .*cat/deep\.tif: PIL mode 'I' holds 32-bit values"
    ):
        image_folder_dataset(str(deep))

    lonely = gray_folder(tmp_path / "lonely")
    gray_folder(tmp_path / "lonely-emu", classes=("emu",), per_class=1)
    shutil.move(tmp_path / "lonely-emu" / "emu", lonely / "emu")
    with pytest.raises(ValueError, match=r"Class 'emu' \(emu/0\.png\) has a single image"):
        load_splits(DataArguments(train_dir=str(lonely)))

    train_dir = gray_folder(tmp_path / "train", classes=("cat", "dog"))
    validation_dir = gray_folder(tmp_path / "validation", classes=("cat", "dog", "owl", "yak"))
    with pytest.raises(
        ValueError, match=r"--validation_dir .* has classes that --train_dir .* lacks: owl, yak"
    ):
        image_folder_dataset(str(train_dir), str(validation_dir))


def test_split_is_stored_and_evaluation_refuses_another(finished, tmp_path, caplog):
    record = json.loads((finished.out / "data_split.json").read_text())
    assert (record["split_seed"], record["test_size"], record["validation_size"]) == (0, 0.25, 0.125)
    assert [record[key]["size"] for key in ("train", "validation", "test")] == [15, 3, 6]
    assert all(len(record[key]["sha256"]) == 64 for key in ("train", "validation", "test"))
    data = {"train_dir": str(finished.data), "test_size": 0.25, "validation_size": 0.125}

    scored = evaluate_checkpoint(
        EvaluateArguments(model=str(finished.out), output_dir=str(tmp_path / "same")), DataArguments(**data)
    )
    assert scored["test_accuracy"] == pytest.approx(finished.metrics["test_accuracy"])
    other = EvaluateArguments(model=str(finished.out), output_dir=str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"(?s)test split here is not the one stored.*split_seed: 0 -> 1"):
        evaluate_checkpoint(other, DataArguments(**data, split_seed=1))
    other.allow_split_mismatch = True
    with caplog.at_level(logging.WARNING, logger="vitrail.evaluate_checkpoint"):
        evaluate_checkpoint(other, DataArguments(**data, split_seed=1))
    assert "test split here is not the one stored" in caplog.text


def test_evaluation_processes_uncached_data_too(finished, tmp_path):
    """Data too big to cache (here forced with `--cache_pixels false`) is processed from the image column while
    it is scored: the Trainer must keep that column."""
    data = {
        "train_dir": str(finished.data),
        "test_size": 0.25,
        "validation_size": 0.125,
        "cache_pixels": False,
    }
    scored = evaluate_checkpoint(
        EvaluateArguments(model=str(finished.out), output_dir=str(tmp_path / "eval")), DataArguments(**data)
    )
    assert scored["test_accuracy"] == pytest.approx(finished.metrics["test_accuracy"])


# ---- flags ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_train_epochs", "-1"], r"--num_train_epochs -1\.0 trains nothing"),
        (["--num_train_epochs", "0"], r"--num_train_epochs 0\.0 trains nothing"),
        (["--max_steps", "0"], r"--max_steps 0: give a positive number of optimizer steps, or -1"),
        (["--max_steps", "-5"], r"--max_steps -5: give a positive number"),
        (["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size 0: give at least 1"),
        (["--test_size", "1.5"], r"--test_size 1\.5: give a fraction"),
        (["--model_name_or_path", "MISSING"], r"--model_name_or_path .*missing: no such file or folder"),
        # From scratch too: the flag silently won.
        (
            ["--image_size", "16", "--config_overrides", "image_size=8"],
            r"--image_size 16 and --config_overrides image_size=8 disagree; give the value once: drop image_size= "
            r"from --config_overrides, or drop --image_size\.",
        ),
        (
            ["--config_overrides", "label2id=cat"],
            r"--config_overrides sets label2id, but the labels come from the data",
        ),
    ],
)
def test_flags_are_refused_before_anything_runs(tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(training, "load_splits", not_reached)
    flags = [str(tmp_path / "missing") if flag == "MISSING" else flag for flag in flags]
    with pytest.raises(ValueError, match=message):
        run_train(tmp_path, *flags)
    assert not (tmp_path / "run").exists()


def test_evaluation_refuses_split_fractions_before_loading_anything(monkeypatch):
    """The split flags are checked as train.py checks them, before the checkpoint (here a Hub id) is loaded."""
    import vitrail.evaluate_checkpoint

    monkeypatch.setattr(vitrail.evaluate_checkpoint, "load_splits", not_reached)
    with pytest.raises(ValueError, match=r"--test_size 0\.6 and --validation_size 0\.4 leave no data"):
        evaluate_checkpoint(
            EvaluateArguments(model="google/vit-base-patch16-224"),
            DataArguments(test_size=0.6, validation_size=0.4),
        )


def test_model_source_must_exist_or_be_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match=r"--model_name_or_path runs/digitz: no such file or folder"):
        check_model_source("runs/digitz")  # a valid repo id, but runs/ is a local folder
    check_model_source("google/vit-base-patch16-224")  # left to the Hub client


def test_config_overrides_with_a_checkpoint(finished):
    model, processor = build_model(
        ModelArguments(model_name_or_path=str(finished.out), config_overrides="image_size=12"), ["a", "b"]
    )
    assert model.config.image_size == 12 and processor.size == {"height": 12, "width": 12}
    assert model.vitrail.embeddings.position_embeddings.shape == (1, 36, 32)  # resampled, not re-initialised
    conflicting = ModelArguments(
        model_name_or_path=str(finished.out), image_size=8, config_overrides="image_size=12"
    )
    with pytest.raises(ValueError, match=r"--image_size 8 and --config_overrides image_size=12 disagree"):
        check_arguments(conflicting)
    with pytest.raises(ValueError, match=r"--config_overrides hidden_size=48 changes the shapes of"):
        build_model(
            ModelArguments(model_name_or_path=str(finished.out), config_overrides="hidden_size=48"), ["a"]
        )


@pytest.mark.parametrize("validation_size", ["0.25", "0"])
def test_test_size_zero_trains_without_a_test_split(tmp_path, capsys, validation_size):
    script = runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="train_script")
    out = tmp_path / "run"
    metrics = script["main"](
        ["--output_dir", str(out), "--train_dir", str(gray_folder(tmp_path / "data")), "--config_overrides", GRAY,
         *QUIET, "--test_size", "0", "--validation_size", validation_size, "--max_steps", "2",
         "--save_strategy", "no"]
    )  # fmt: skip
    assert not [key for key in metrics if key.startswith("test_")]
    assert json.loads((out / "data_split.json").read_text())["test"] is None
    card = (out / "README.md").read_text()
    printed = capsys.readouterr().out.splitlines()[-1]
    if validation_size == "0":
        assert "No evaluation results were recorded." in card and "eval_accuracy" not in metrics
        assert printed.startswith("train_runtime=")
    else:
        assert "No test split was held out (`--test_size 0`)" in card and "validation split" in card
        assert f"{metrics['eval_accuracy']:.2%}" in card and (out / "confusion_matrix.png").is_file()
        assert printed.startswith(f"eval_accuracy={metrics['eval_accuracy']:.4f}")


def test_pretraining_reruns_share_the_checks(tmp_path, caplog):
    """scripts/pretrain_mim.py resumes past an incomplete checkpoint, reports a finished run, refuses changes."""
    from vitrail.pretraining import PretrainArguments, pretrain

    def run(*extra: str) -> dict:
        _, data_args, training_args = parse_args(
            ["--output_dir", str(tmp_path / "mim"), *QUIET, "--max_train_samples", "64", "--max_steps", "4",
             "--per_device_train_batch_size", "16", "--save_strategy", "steps", "--save_steps", "2", *extra]
        )  # fmt: skip
        overrides = TINY.replace(",pooling=mean,use_cls_token=false", "")
        return pretrain(PretrainArguments(config_overrides=overrides), data_args, training_args)

    metrics = run()
    (tmp_path / "mim" / "all_results.json").unlink()  # as if killed while saving checkpoint-4:
    (tmp_path / "mim" / "checkpoint-4" / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="vitrail.run_folder"):
        again = run()
    assert "checkpoint-4, it is incomplete" in caplog.text and "Resuming from" in caplog.text
    assert (
        again["train_loss"] > 0
        and json.loads((tmp_path / "mim" / "trainer_state.json").read_text())["global_step"] == 4
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitrail.run_folder"):
        assert run() == again
    assert "already holds this run, finished" in caplog.text
    with pytest.raises(ValueError, match=r"schedule\.learning_rate: 5e-05 -> 0\.001"):
        run("--learning_rate", "1e-3")
    _, data_args, training_args = parse_args(["--output_dir", str(tmp_path / "conflict"), *QUIET])
    with pytest.raises(ValueError, match=r"--image_size 16 and --config_overrides image_size=8 disagree"):
        pretrain(PretrainArguments(config_overrides=TINY, image_size=16), data_args, training_args)
    assert not (tmp_path / "conflict").exists()  # refused before the folder was made
    assert metrics.keys() == again.keys()


def test_pretraining_is_reproducible(tmp_path):
    """Two pretraining runs with the same seed write the same weights: the encoder is initialised from the seed."""
    from vitrail.pretraining import PretrainArguments, pretrain

    overrides = TINY.replace(",pooling=mean,use_cls_token=false", "")
    for name in ("first", "second"):
        _, data_args, training_args = parse_args(
            ["--output_dir", str(tmp_path / name), *QUIET, "--max_train_samples", "32", "--max_steps", "1",
             "--per_device_train_batch_size", "16", "--save_strategy", "no", "--validation_size", "0"]
        )  # fmt: skip
        pretrain(PretrainArguments(config_overrides=overrides), data_args, training_args)
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in ("first", "second"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
