"""Export of the classifier: `torch.export` and ONNX (onnxruntime against PyTorch within 1e-4), with a dynamic
batch always and a dynamic height and width when the config has `dynamic_image_size=True`; and
scripts/export_onnx.py, run as a user runs it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from vitrail import VitrailForImageClassification
from vitrail.export import check_inputs, export_onnx, export_program, onnx_max_difference

from .conftest import load_script, randomise, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # the bar for onnxruntime against PyTorch
# Batch sizes other than the example's (2). For the dynamic model, (batch, height, width): the native 30 x 20, the
# 2 x 2-patch minimum, and non-square sizes below and above the native one with a side no patch divides (padding).
BATCHES = (1, 3, 5)
DYNAMIC = ((1, 30, 20), (3, 4, 4), (2, 21, 29), (5, 17, 9), (1, 61, 42))


def inputs(sizes, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, height, width, generator=generator) for batch, height, width in sizes]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A fixed-size classifier (30 x 30) and a dynamic-size one (native 30 x 20, two register tokens), saved."""
    root = tmp_path_factory.mktemp("export")
    made = {
        "fixed": randomise(VitrailForImageClassification(tiny_config(num_labels=5)), seed=0),
        "dynamic": randomise(
            VitrailForImageClassification(
                tiny_config(num_labels=5, image_size=(30, 20), num_register_tokens=2, dynamic_image_size=True)
            ),
            seed=1,
        ),
    }
    for name, model in list(made.items()):
        model.save_pretrained(root / name)
        made[f"{name}_dir"] = root / name
    return made


# One export each (~8 s of CPU here), shared by the tests that read the file.
@pytest.fixture(scope="module")
def onnx_fixed(models, tmp_path_factory) -> Path:
    return export_onnx(models["fixed"], tmp_path_factory.mktemp("onnx") / "fixed.onnx")


@pytest.fixture(scope="module")
def onnx_dynamic(models, tmp_path_factory) -> Path:
    return export_onnx(models["dynamic"], tmp_path_factory.mktemp("onnx") / "dynamic.onnx", dynamic_size=True)


def test_torch_export_fixed_size_dynamic_batch(models):
    model = models["fixed"]
    program = export_program(model).module()
    for pixels in inputs((batch, 30, 30) for batch in BATCHES):
        with torch.no_grad():
            torch.testing.assert_close(program(pixels), model(pixels).logits, atol=1e-5, rtol=0)
    with pytest.raises(AssertionError, match="size"):  # the size is part of the fixed-size graph
        program(torch.randn(2, 3, 32, 30))


def test_torch_export_dynamic_size(models):
    model = models["dynamic"]
    program = export_program(model, dynamic_size=True).module()
    for pixels in inputs(DYNAMIC):
        with torch.no_grad():
            expected = model(pixels).logits
            torch.testing.assert_close(program(pixels), expected, atol=1e-5, rtol=0)


def test_dynamic_size_refused_without_dynamic_image_size(models):
    with pytest.raises(ValueError, match="dynamic_image_size=True"):
        export_program(models["fixed"], dynamic_size=True)


def input_dims(path: Path) -> list:
    (graph_input,) = onnx.load(str(path)).graph.input
    return [dim.dim_param or dim.dim_value for dim in graph_input.type.tensor_type.shape.dim]


def test_onnx_fixed_size_dynamic_batch(models, onnx_fixed):
    assert Path(f"{onnx_fixed}.data").is_file()  # the weights, beside the graph
    batch, channels, height, width = input_dims(onnx_fixed)
    assert isinstance(batch, str) and (channels, height, width) == (3, 30, 30)
    difference = onnx_max_difference(
        onnx_fixed, models["fixed"], inputs((batch, 30, 30) for batch in BATCHES)
    )
    assert difference < TOLERANCE


def test_onnx_dynamic_size(models, onnx_dynamic):
    batch, channels, height, width = input_dims(onnx_dynamic)
    assert all(isinstance(dim, str) for dim in (batch, height, width)) and channels == 3
    assert onnx_max_difference(onnx_dynamic, models["dynamic"], inputs(DYNAMIC)) < TOLERANCE


def test_check_inputs_cover_what_is_promised(models):
    """The script's own check: batches 1 and 3 and, with a dynamic size, a smaller size with a side no patch
    divides and a larger non-square one."""
    config = models["dynamic"].config
    assert [tuple(x.shape) for x in check_inputs(config, dynamic_size=False)] == [
        (1, 3, 30, 20),
        (3, 3, 30, 20),
    ]
    assert [tuple(x.shape) for x in check_inputs(config, dynamic_size=True)][2:] == [
        (2, 3, 21, 19),
        (1, 3, 60, 30),
    ]


@pytest.mark.slow  # reason: a fresh interpreter imports torch, transformers, onnxruntime and exports: 15-30 s here
def test_script(models, tmp_path):
    """As a user runs it: exit 0, the file written, the measured difference printed and below the bar."""
    output = tmp_path / "out" / "model.onnx"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_onnx.py"), "--model", str(models["dynamic_dir"])]
        + ["--output", str(output), "--dynamic-size"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert output.is_file() and isinstance(input_dims(output)[2], str)
    measured = float(re.search(r"max abs logit difference: (\S+)", result.stdout).group(1))
    assert measured < TOLERANCE


def test_script_fails_on_a_mismatch(onnx_fixed, tmp_path, monkeypatch, capsys):
    """A graph that computes something else (the fixed model's, checked against a reloaded copy with other
    weights) is caught by onnxruntime's real run: exit status 1."""
    script = load_script("scripts/export_onnx.py")
    other = tmp_path / "other"
    randomise(VitrailForImageClassification(tiny_config(num_labels=5)), seed=7).save_pretrained(other)
    monkeypatch.setattr(script, "export_onnx", lambda model, path, dynamic_size: onnx_fixed)
    assert script.main(["--model", str(other), "--output", str(tmp_path / "unused.onnx")]) == 1
    measured = float(re.search(r"max abs logit difference: (\S+)", capsys.readouterr().out).group(1))
    assert measured > 0.1


def test_script_refuses_dynamic_size_for_a_fixed_size_checkpoint(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("scripts/export_onnx.py").main(
            ["--model", str(models["fixed_dir"]), "--output", str(tmp_path / "m.onnx"), "--dynamic-size"]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "dynamic_image_size=True" in error and "30x30" in error
    assert not (tmp_path / "m.onnx").exists()


def test_script_names_a_missing_model_folder(tmp_path, capsys):
    missing = tmp_path / "runs" / "nope"
    with pytest.raises(SystemExit) as exit_info:
        load_script("scripts/export_onnx.py").main(
            ["--model", str(missing), "--output", str(tmp_path / "m.onnx")]
        )
    assert exit_info.value.code == 2
    assert f"--model {missing}: no such file or folder" in capsys.readouterr().err
