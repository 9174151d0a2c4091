"""The wheel alone: built from this checkout, installed into a fresh environment outside it, it runs the jobs.

No network: the wheel is built with the test environment's own build backend (`pip wheel --no-build-isolation`),
and the fresh environment reaches its dependencies through a `.pth` file naming the test environment's
site-packages folders. A path in a `.pth` file only extends `sys.path`: the `.pth` files inside those folders
(an editable install of vitrail among them) are not run, so the checkout's source stays out of reach, which the
test checks. The jobs run from a scratch folder, with no PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "image_size=8,patch_size=2,encoder_stride=2,num_channels=1,hidden_size=32,num_hidden_layers=2,"
    "num_attention_heads=4,intermediate_size=64,pooling=mean,use_cls_token=false"
)
BASE = {"torch", "transformers", "safetensors", "huggingface-hub", "numpy", "pillow"}


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def build_wheel(dist: Path, scratch: Path) -> Path:
    """`pip wheel` on a copy of what the build reads, so that no build/ or egg-info lands in the checkout."""
    source = scratch / "source"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
    done = subprocess.run([*command, "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"building the wheel failed (the dev extra brings the build backend: setuptools>=77):\n{done.stderr}"
    )
    (wheel,) = dist.glob("vitrail-*.whl")
    return wheel


def fresh_environment(home: Path) -> tuple[Path, dict[str, str]]:
    """A new venv whose `.pth` file names the test environment's site-packages folders; returns its bin folder
    and the environment variables for processes run in it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True, timeout=120)
    bin_dir = home / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    layered = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    Path(purelib, "test_environment.pth").write_text("\n".join(layered) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home.parent / "hf_home"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return bin_dir, env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, and the bin folder and environment of a fresh venv it is installed in."""
    scratch = tmp_path_factory.mktemp("package")
    wheel = build_wheel(scratch / "dist", scratch)
    bin_dir, env = fresh_environment(scratch / "env")
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall"]
    run([*pip, "--disable-pip-version-check", "-q", str(wheel)], scratch, env)
    return wheel, bin_dir, env


def test_the_wheel_carries_the_package_data_the_license_and_the_command(installed):
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        licenses = [n for n in names if n.startswith(f"{info}/") and Path(n).name == "LICENSE"]
        assert len(licenses) == 1 and archive.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
    assert {n.split("/")[0] for n in names} == {"vitrail", info}  # no tests/, scripts/ or benchmarks/
    assert {
        "vitrail/model_cards/vitrail_image_classification.md",  # every training run renders its card from it
        "vitrail/data.py",  # the embedded digits' loader
        "vitrail/metrics/classification.py",  # the offline `evaluate` module
        "vitrail/cli.py",
        "vitrail/__main__.py",
    } <= names
    assert "vitrail = vitrail.cli:main" in entry_points
    assert "License-Expression: Apache-2.0" in metadata
    base = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    unconditional = {r.split(">")[0].split("<")[0].split("=")[0].strip() for r in base if "extra ==" not in r}
    assert unconditional == BASE
    assert "Requires-Dist: torch>=2.4\n" in metadata  # no upper bound: the tested pin is in constraints.txt
    for extra in ("train", "export", "dev"):
        assert f"Provides-Extra: {extra}\n" in metadata


def test_the_installed_command_trains_and_predicts_from_another_folder(installed, tmp_path):
    """`python -m vitrail info`, then `vitrail train` on the embedded digits for two steps and `vitrail predict`
    on what it wrote (the console script), each run in the fresh environment from a folder outside the checkout."""
    wheel, bin_dir, env = installed
    vitrail = str(bin_dir / "vitrail")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    python = str(bin_dir / "python")
    report = json.loads(run([python, "-m", "vitrail", "info", "--json"], elsewhere, env))
    assert report["vitrail"] == wheel.name.split("-")[1]
    location = Path(report["location"]).resolve()
    assert location.is_relative_to(bin_dir.parent.resolve()), (
        f"vitrail imported from {location}, not the wheel"
    )
    assert report["extras"]["train"]["installed"] and report["extras"]["export"]["installed"]

    out = run(
        [vitrail, "train", "--output_dir", "run", "--config_overrides", TINY, "--max_steps", "2",
         "--per_device_train_batch_size", "16", "--save_strategy", "no", "--report_to", "none",
         "--disable_tqdm", "true", "--use_cpu", "true"],
        elsewhere, env,
    )  # fmt: skip
    assert out.strip().splitlines()[-1].startswith("test_accuracy=")
    run_dir = elsewhere / "run"
    card = (run_dir / "README.md").read_text()  # rendered from the template the wheel carries
    assert "model-index" in card and "vitrail/model_cards/vitrail_image_classification.md" in card
    results = json.loads((run_dir / "all_results.json").read_text())
    assert 0.0 <= results["test_accuracy"] <= 1.0 and (run_dir / "confusion_matrix.png").is_file()

    from sklearn.datasets import load_digits

    digit = load_digits().images[0]  # 8x8, levels 0..16
    PIL.Image.fromarray((digit * 255 / 16).astype(np.uint8)).save(elsewhere / "digit.png")
    out = run([vitrail, "predict", "digit.png", "--model", "run", "--top-k", "3", "--json"], elsewhere, env)
    (line,) = out.strip().splitlines()
    prediction = json.loads(line)
    labels = set(json.loads((run_dir / "config.json").read_text())["id2label"].values())
    assert prediction["file"] == "digit.png" and len(prediction["labels"]) == 3
    assert set(prediction["labels"]) <= labels and prediction["scores"] == sorted(prediction["scores"])[::-1]
