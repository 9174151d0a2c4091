"""The `vitrail` command: its subcommands, their flags and help, exit statuses, missing extras, `info`.

Running the jobs themselves is tested where each job is (test_training.py, test_predict.py, ...); the installed
command end to end is in test_package.py. A missing extra is simulated the way Python sees an uninstalled
package: `sys.modules[name] = None` makes `import name` raise and `importlib.util.find_spec(name)` answer None.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import vitrail
from vitrail import VitrailForImageClassification, VitrailImageProcessor
from vitrail.cli import BASE, COMMANDS, EXTRAS, main

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")

# The flags each script took before the command existed (the scripts now call the same parsers).
SCRIPT_FLAGS = {
    "predict": "--model --top-k --attention-map --json --batch-size --device",
    "convert": "--from --input --output --image-size --allow-pickle --num-heads --global-pool --source-image-size",
    "push": "--private --revision --commit-message --token --include --timeout",
    "pull": "--revision --local-dir --token --timeout --overwrite",
    "export": "--model --output --dynamic-size --tolerance",
    "evaluate": "--model --split --output_dir --allow_split_mismatch --train_dir --split_seed",
    "pretrain": "--output_dir --mask_ratio --mask_patch_size --config_overrides --train_dir --push_to_hub",
    "train": "--output_dir --config_overrides --model_name_or_path --variant --image_size --rotation --translate "
    "--scale_jitter --mixup_alpha --cutmix_alpha --rand_augment --layer_decay --skip_bad_images "
    "--overwrite_output_dir --label_smoothing_factor --use_cpu --bf16 --push_to_hub --hub_model_id",
    "info": "--json",
}


def help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def block(monkeypatch, *modules: str) -> None:
    """Make `modules` look uninstalled for this test, with their submodules that are already imported."""
    for module in modules:
        for name in [name for name in sys.modules if name.startswith(f"{module}.")]:
            monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, module, None)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"vitrail {vitrail.__version__}\n"
    pyproject = (ROOT / "pyproject.toml").read_text()  # the wheel's version is read from the same attribute
    assert 'version = { attr = "vitrail.__version__" }' in pyproject and 'dynamic = ["version"]' in pyproject


def test_every_subcommand_has_help_with_the_flags_the_scripts_had(capsys):
    assert set(COMMANDS) == set(SCRIPT_FLAGS)
    listing = help_of([], capsys)
    for name, job in COMMANDS.items():
        assert re.search(rf"^  {name} +\S", listing, re.MULTILINE), f"`vitrail --help` does not list {name}"
        text = help_of([name], capsys)
        assert text.startswith(f"usage: vitrail {name} ")
        assert job.__doc__.splitlines()[0] in text  # the job's description
        missing = set(SCRIPT_FLAGS[name].split()) - set(FLAG.findall(text))
        assert not missing, f"vitrail {name} lost {sorted(missing)}"


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["fit"], "invalid choice: 'fit'"),
        (["--nope"], "the following arguments are required: COMMAND"),
        (["predict", "x.png"], "the following arguments are required: --model"),
        (["predict", "x.png", "--model", "m", "--top-k", "0"], "--top-k and --batch-size must be positive"),
        (["convert", "--from", "onnx", "--input", "a", "--output", "b"], "invalid choice: 'onnx'"),
        (["export", "--model", "m"], "the following arguments are required: --output"),
        (["info", "--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_bad_flags_exit_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, extra, blocked",
    [
        (["train", "--output_dir", "{tmp}/out"], "train", ["sklearn", "matplotlib"]),
        (["pretrain", "--output_dir", "{tmp}/out"], "train", ["datasets"]),
        (["evaluate", "--model", "{tmp}/out"], "train", ["accelerate", "evaluate"]),
        (["export", "--model", "{tmp}/out", "--output", "{tmp}/out/m.onnx"], "export", ["onnxruntime"]),
        (
            ["predict", "x.png", "--model", "{tmp}/out", "--attention-map", "{tmp}/out"],
            "train",
            ["matplotlib"],
        ),
    ],
)
def test_a_missing_extra_is_named_with_its_pip_install(argv, extra, blocked, tmp_path, monkeypatch):
    block(monkeypatch, *blocked)
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(tmp=tmp_path) for arg in argv])
    message = exit_info.value.code  # a string: Python prints it on stderr and exits with status 1
    assert isinstance(message, str) and f'pip install "vitrail[{extra}]"' in message
    names = {module: name for name, module in EXTRAS[extra].items()}
    assert f"missing: {', '.join(names[m] for m in blocked)})" in message
    assert not (tmp_path / "out").exists()  # stopped before doing anything


def test_a_base_install_predicts(tmp_path, monkeypatch, capsys):
    """Without either extra, `vitrail predict` classifies (only `--attention-map` needs matplotlib)."""
    block(monkeypatch, *EXTRAS["train"].values(), *EXTRAS["export"].values())
    torch.manual_seed(0)
    VitrailForImageClassification(tiny_config(num_labels=3)).save_pretrained(tmp_path / "model")
    VitrailImageProcessor(size={"height": 30, "width": 30}).save_pretrained(tmp_path / "model")
    import PIL.Image

    PIL.Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    assert main(["predict", str(tmp_path / "red.png"), "--model", str(tmp_path / "model"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["file"].endswith("red.png") and len(record["labels"]) == 3


def test_a_module_missing_inside_a_job_is_named(tmp_path, monkeypatch):
    """An optional module a flag asks for (`--rand_augment` runs torchvision's RandAugment) stops the job with the
    package to install, not a traceback."""
    block(monkeypatch, "torchvision")
    argv = [
        "train", "--output_dir", str(tmp_path / "out"), "--config_overrides", "image_size=8,patch_size=2,"
        "num_channels=1,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=16",
        "--rand_augment", "true", "--max_steps", "1", "--max_train_samples", "20", "--report_to", "none",
        "--use_cpu", "true",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == (
        "vitrail train needs torchvision for the flags given: pip install torchvision (the release built for your "
        "torch)"
    )


def test_extras_are_the_ones_pyproject_declares():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> list[str]:
        return [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in requirements]

    assert names(project["dependencies"]) == list(BASE)
    extras = project["optional-dependencies"]
    for extra, members in EXTRAS.items():
        assert names(extras[extra]) == list(members)
    assert "vitrail[train,export,docs]" in extras["dev"]  # dev is everything the tests need (docs: the site)
    assert project["scripts"] == {"vitrail": "vitrail.cli:main"}
    # No upper bound that only reflects the CI machines: the tested releases are in constraints.txt.
    torch_requirement = next(r for r in project["dependencies"] if r.startswith("torch"))
    assert "<" not in torch_requirement
    constraints = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==\S+$", constraints, re.MULTILINE)
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_info_reports_versions_cpu_gpu_and_extras(monkeypatch, capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vitrail"] == vitrail.__version__
    assert Path(report["location"]) == Path(vitrail.__file__).resolve().parent
    assert report["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(report["packages"]) == set(BASE)
    assert report["cpu"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert len(report["gpu"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["extras"]["train"]["installed"] and report["extras"]["export"]["installed"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set(re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo.read_text(), re.MULTILINE)[1].split())
        assert set(report["cpu"]["flags"]) <= flags
        assert ("avx2" in report["cpu"]["flags"]) == ("avx2" in flags)

    block(monkeypatch, "onnx", "onnxscript")
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert 'extra export: not installed (missing: onnx, onnxscript); pip install "vitrail[export]"' in text
    assert f"vitrail {vitrail.__version__} (" in text and "extra train: installed (datasets " in text
