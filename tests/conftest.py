"""Shared fixtures: a tiny, deliberately odd-sized config so that shape bugs cannot hide behind round numbers;
and a fresh interpreter that cannot import vitrail, for the Hub-code path."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitrail import VitrailConfig

from .hub_server import patch_client, serve

TINY = dict(
    image_size=30,
    patch_size=2,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    encoder_stride=2,
    layer_norm_eps=1e-6,
)


def tiny_config(**overrides) -> VitrailConfig:
    return VitrailConfig(**{**TINY, **overrides})


def load_script(relative_path: str):
    """A script or benchmark of this repository (not part of the package), imported from its path, e.g.
    `load_script("scripts/convert_checkpoint.py")`. It is registered in `sys.modules` under its file's stem,
    as dataclasses defined in it need."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` in eval mode with every parameter drawn from N(0, 0.3²) by `seed`: weights far from their
    initialisation, so that a wrong position, token or tensor shows clearly in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.fixture
def config() -> VitrailConfig:
    return tiny_config(num_labels=5)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def server():
    """The loopback Hub server (`tests/hub_server.py`), one per test module."""
    with serve() as hub_server:
        yield hub_server


@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    """The server, with this process's huggingface_hub pointed at it and a fresh HF_HOME."""
    patch_client(monkeypatch, server, tmp_path / "hf_home")
    server.unhandled.clear()
    yield server
    server.clear_faults()
    assert server.unhandled == [], "the client used routes the test server does not implement"


# Prepended to every script `run_without_vitrail` runs: vitrail is installed (editable) here, so removing it from
# PYTHONPATH is not enough; blocked in sys.modules, it fails to import, and only a checkpoint's own code can run.
BLOCK_VITRAIL = 'import sys\nsys.modules["vitrail"] = None\n'
DONE = "remote checks done"


def run_without_vitrail(script: str, *args, root: Path, env: dict[str, str]) -> dict:
    """Run the Python source `script` as a user's machine would, where vitrail is not installed, and return the
    JSON report it writes to the path it gets as its last argument (after `args`).

    The process starts in an empty folder under `root` (so neither src/ nor a checkpoint's code is importable by
    accident), without PYTHONPATH and without this process's HF_* settings: `env` gives its own.
    """
    workdir = root / "elsewhere"
    workdir.mkdir()
    report = root / "report.json"
    inherited = {
        key: value
        for key, value in os.environ.items()
        if key != "PYTHONPATH" and not key.startswith(("HF_", "HUGGINGFACE_"))
    }
    result = subprocess.run(
        [sys.executable, "-c", f"{BLOCK_VITRAIL}{script}\nprint({DONE!r})\n", *map(str, args), str(report)],
        cwd=workdir,
        env={**inherited, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert DONE in result.stdout
    return json.loads(report.read_text())
