"""Time to the first optimizer step and steady images per second on folders of JPEG photos: vitrail beside a
baseline that follows transformers' image-classification example, plus the data path alone (decode + resize +
augment, images per second on one core).

    python benchmarks/data_scale.py --sizes 1000 5000 20000 --repeats 3 [--transformers-example PATH] [--steps 20]

About 4 minutes a size and repeat on 2 cores (20 steps of each trainer). The photos are made from the two that
ship in scikit-learn (random crops, resized to 320-500 px, re-encoded at JPEG quality 90), in 4 class folders.
Every trainer runs ViT-Ti/16 at 224 px from random weights, batch 32, on the same photos:

- vitrail: `scripts/train.py --train_dir PHOTOS --variant Ti/16`, its defaults otherwise (data workers: the CPUs);
- the baseline: `benchmarks/imagefolder_trainer.py`, transformers' Trainer on `load_dataset("imagefolder")` with
  torchvision transforms, step for step as `run_image_classification.py` does it, with the Trainer's default of
  0 data workers, and again with as many workers as vitrail uses;
- transformers' `examples/pytorch/image-classification/run_image_classification.py` itself when its path is
  given (it is not part of transformers' wheel or sdist).

Each step's time is taken by an optimizer hook that a small module installs in the child process, so all are
timed alike; the runs of a size are interleaved, and each starts with an empty datasets cache. Figures are
medians over `--repeats` runs with their range, and the 1-minute load average as each run started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HOOK = """
import json, os, time
from torch.optim.optimizer import register_optimizer_step_post_hook
_log = os.environ["STEP_LOG"]
def _hook(optimizer, args, kwargs):
    with open(_log, "a") as f:
        f.write(json.dumps(time.time()) + "\\n")
register_optimizer_step_post_hook(_hook)
"""


def make_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs in 4 class folders, random crops of scikit-learn's sample photos at 320-500 px."""
    import PIL.Image
    from sklearn.datasets import load_sample_images

    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == count:
        return folder
    photos = [PIL.Image.fromarray(array) for array in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo = photos[index % 2]
        width, height = photo.size
        side = int(rng.integers(200, 420))
        left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        size = int(rng.integers(320, 501))
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size))
        target = folder / f"class{index % 4}" / f"{index:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        crop.save(target, quality=90)
    return folder


def tiny_vit(folder: Path) -> Path:
    """A transformers ViT-Ti/16 checkpoint (random weights) for transformers' example, which needs a model path."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def timed_run(command: list[str], work: Path, batch: int) -> dict:
    """Run `command`; the seconds from launch to the first optimizer step, and the images per second after it."""
    hook = work / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "step_hook.py").write_text(HOOK)
    # The hook is installed first, then the script runs as __main__ (a sitecustomize may be shadowed by the venv's).
    launch = "import sys, runpy, step_hook; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    command = [command[0], "-c", launch, *command[1:]]
    log = work / "steps.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "STEP_LOG": str(log), "PYTHONPATH": f"{hook}:{os.environ.get('PYTHONPATH', '')}",
           "HF_DATASETS_CACHE": str(work / "datasets-cache"), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    steady = (len(steps) - 2) * batch / (steps[-1] - steps[1]) if len(steps) > 3 else float("nan")
    return {"first_step_s": steps[0] - started, "steady_img_s": steady}


def data_path_rate(folder: Path, count: int = 256) -> float:
    """Images per second on one core: decode, resize to 224 with vitrail's processor, augment a batch."""
    import PIL.Image
    import torch

    from vitrail.data import AugmentationConfig, BatchAugment
    from vitrail.image_processing_vitrail import VitrailImageProcessor

    torch.set_num_threads(1)
    files = sorted(folder.rglob("*.jpg"))[:count]
    processor = VitrailImageProcessor(size={"height": 224, "width": 224})
    augment = BatchAugment(AugmentationConfig(crop_scale=0.5, hflip=0.5))
    started = time.perf_counter()
    for start in range(0, len(files), 32):
        images = [PIL.Image.open(file).convert("RGB") for file in files[start : start + 32]]
        augment(processor(images, return_tensors="pt")["pixel_values"])
    return len(files) / (time.perf_counter() - started)


def load_average() -> str:
    """The 1-minute load average, beside the core count: the machine may be shared."""
    return f"{os.getloadavg()[0]:.2f}"


def wait_for_quiet(max_load: float | None, patience: float = 180.0) -> None:
    """On a shared machine, wait (at most `patience` seconds) until the 1-minute load average is under `max_load`."""
    deadline = time.time() + patience
    while max_load is not None and os.getloadavg()[0] >= max_load and time.time() < deadline:
        time.sleep(5)


def median_row(runs: list[dict]) -> dict:
    """The median of each figure over repeated runs, with its range and the load each run started under."""
    row = {}
    for key in ("first_step_s", "steady_img_s"):
        values = sorted(run[key] for run in runs)
        row[key] = float(np.median(values))
        row[f"{key}_range"] = [values[0], values[-1]]
    row["load"] = [run["load"] for run in runs]
    return row


# The trainers each size is timed with: (key, label in the table).
LABELS = {
    "vitrail": "vitrail (`scripts/train.py`)",
    "baseline": "transformers Trainer + imagefolder, the example's pipeline (0 data workers, its default)",
    "baseline_workers": "the same, with as many data workers as vitrail uses",
    "transformers_example": "transformers' `run_image_classification.py`",
}


def markdown(rows: list[dict], workers: int) -> str:
    """The table of medians [min-max] per size and trainer."""
    lines = [
        "| photos | trainer | time to first step, s | steady rate, img/s |",
        "|---:|---|---:|---:|",
    ]
    for row in rows:
        for key, label in LABELS.items():
            if key in row:
                run = row[key]
                low, high = run["first_step_s_range"]
                slow, shigh = run["steady_img_s_range"]
                label = label.replace("as many data workers as vitrail uses", f"{workers} data workers")
                lines.append(
                    f"| {row['photos']:,} | {label} | {run['first_step_s']:.1f} [{low:.1f}–{high:.1f}] "
                    f"| {run['steady_img_s']:.1f} [{slow:.1f}–{shigh:.1f}] |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--transformers-example", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each trainer per size; medians reported"
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="before each run, wait (up to 3 min) for a lower load average",
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vitrail-data-scale")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")),
        platform.processor())  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    print(f"CPU: {cpu}, {cores} cores; {time.strftime('%Y-%m-%d')}; load {load_average()}")
    if args.transformers_example is None:
        print("transformers' example not given: pass --transformers-example PATH to time it too.")
    root = Path(__file__).resolve().parents[1]
    # vitrail's default data workers for images processed on the fly: every CPU of the process.
    workers = max(1, cores)
    common = ["--max_steps", str(args.steps), "--per_device_train_batch_size", "32", "--save_strategy", "no",
              "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "50"]  # fmt: skip
    rows = []
    for size in args.sizes:
        folder = make_photos(args.work / f"photos-{size}", size)
        commands = {
            "vitrail": [
                sys.executable,
                str(root / "scripts" / "train.py"),
                "--train_dir",
                str(folder),
                "--variant",
                "Ti/16",
                "--image_size",
                "224",
                "--test_size",
                "0",
                "--validation_size",
                "0",
                "--output_dir",
                str(args.work / f"ours-{size}"),
                "--overwrite_output_dir",
                "true",
                *common,
            ],  # fmt: skip
            "baseline": [
                sys.executable,
                str(root / "benchmarks" / "imagefolder_trainer.py"),
                "--train_dir",
                str(folder),
                "--output_dir",
                str(args.work / f"baseline-{size}"),
                *common,
            ],  # fmt: skip
        }
        commands["baseline_workers"] = [*commands["baseline"], "--dataloader_num_workers", str(workers)]
        if args.transformers_example is not None:
            model = args.work / "vit-ti16"
            if not model.is_dir():
                tiny_vit(model)
            commands["transformers_example"] = [
                sys.executable, str(args.transformers_example.resolve()), "--train_dir", str(folder),
                "--model_name_or_path", str(model), "--ignore_mismatched_sizes", "true", "--do_train",
                "--train_val_split", "0", "--remove_unused_columns", "false", "--trust_remote_code", "false",
                "--output_dir", str(args.work / f"theirs-{size}"), *common,
            ]  # fmt: skip
        runs: dict[str, list[dict]] = {key: [] for key in commands}
        for _ in range(args.repeats):  # interleaved, so that a change in load touches every trainer alike
            for key, command in commands.items():
                # A fresh datasets cache per run: every run starts from the photos alone.
                shutil.rmtree(args.work / "datasets-cache", ignore_errors=True)
                wait_for_quiet(args.max_load)
                runs[key].append({"load": load_average(), **timed_run(command, args.work, 32)})
        row = {"photos": size, "data_path_img_s_core": data_path_rate(folder)}
        row.update({key: median_row(found) for key, found in runs.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(markdown(rows, workers))


if __name__ == "__main__":
    main()
