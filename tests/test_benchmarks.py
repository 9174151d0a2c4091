"""benchmarks/peers.py: its quick mode prints the table it promises, and bad arguments are refused by name;
benchmarks/data_scale.py runs. Nothing here asserts a timing: the numbers depend on the machine."""

import collections
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--variant", "Ti/16", "--image-size", "32", "--layers", "2", "--batch", "2", "--quick"]
NUMBER = r"\d[\d,]*(\.\d+)?"
VALUE = rf"{NUMBER} \[{NUMBER}–{NUMBER}\]"  # median [min–max]


@pytest.fixture
def process_settings():
    """The benchmark sets torch's thread count and transformers' log level and progress bars for the whole
    process: put them back, or the tests after it run on one thread and miss transformers' warnings."""
    threads = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)
    if bars:
        transformers.logging.enable_progress_bar()


def table_rows(report: str) -> dict[str, list[str]]:
    """The markdown table's body as {first cell: other cells}."""
    lines = [line for line in report.splitlines() if line.startswith("|")]
    header, rule, *body = lines
    assert header.split(" | ")[1:] == [
        "vitrail",
        "transformers",
        "timm",
        "vitrail ÷ transformers",
        "vitrail ÷ timm",
        "notes |",
    ]
    assert rule == "|---|--:|--:|--:|--:|--:|---|"
    rows = {}
    for line in body:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert len(cells) == 7, line
        rows[cells[0]] = cells[1:]
    return rows


def test_quick_table_on_a_tiny_variant(process_settings, capsys):
    """Every promised row is there, each model cell is a median with its spread (and a GEMM share for model
    rows), each ratio cell too; timm has no processor or pipeline, and says so; bf16 rows are measured only where
    the CPU has native bf16."""
    module = load_script("benchmarks/peers.py")
    report = module.main([*TINY, "--threads", "1", "--sdpa-backends", "math"])
    assert report in capsys.readouterr().out
    header = report.split("\n\n")[0]
    assert re.search(r"CPU: .+, flags: ", header) and "torch threads 1" in header
    assert f"torch {torch.__version__}, transformers " in header and ", timm " in header
    assert re.search(rf"GEMM 2048² float32: {NUMBER} GFLOP/s", header)
    assert "model: Ti/16 at 32 px, 2 layers" in header and "batch 2; 2 rounds" in header

    rows = table_rows(report)
    native = module.native_bf16("cpu", module.cpu_description()[1])
    model_rows = [
        "inference fp32, ms/batch",
        "inference fp32, SDPA math backend only, ms/batch",
        "training step fp32 (fwd+bwd+AdamW), ms/step",
        "inference bf16 (bf16 weights), ms/batch",
        "inference bf16 (bf16 weights), SDPA math backend only, ms/batch",
        "training step bf16 (fwd+bwd+AdamW, autocast), ms/step",
    ]
    other_rows = [
        "image processor, 8 photo crops -> 32x32, img/s",
        'pipeline("image-classification"), 2 PIL images, batch 2, img/s',
        "from_pretrained, Ti/16 checkpoint in a temporary folder, s",
        "from_pretrained, Ti/16 checkpoint in a temporary folder: peak RSS growth (psutil, sampled every 1 ms), MB",
    ]
    if not native:  # the SDPA row is only asked for, never built, where bf16 is emulated
        model_rows.remove("inference bf16 (bf16 weights), SDPA math backend only, ms/batch")
    assert list(rows) == model_rows + other_rows
    for label in model_rows:
        cells = rows[label]
        if "bf16" in label and not native:
            assert cells[:3] == ["not measurable: bf16 emulated"] * 3 and cells[3:5] == ["–", "–"]
            continue
        for cell in cells[:3]:
            assert re.fullmatch(rf"{VALUE} \(\d+%\)", cell), (label, cell)  # median [spread] (share of GEMM)
        for cell in cells[3:5]:
            assert re.fullmatch(VALUE, cell), (label, cell)
        if "SDPA" not in label:
            cap = rf"shared kernels alone {VALUE} ms: ratio cap {NUMBER}× transformers, {NUMBER}× timm"
            assert re.fullmatch(cap, cells[5]), (label, cells[5])
    for label in other_rows:
        cells = rows[label]
        assert (
            re.fullmatch(VALUE, cells[0]) and re.fullmatch(VALUE, cells[1]) and re.fullmatch(VALUE, cells[3])
        )
        if label.startswith(("image processor", "pipeline")):
            assert cells[2].startswith("– (no ") and cells[4] == "–"
        else:
            assert re.fullmatch(VALUE, cells[2]) and re.fullmatch(VALUE, cells[4])
    assert "ViTImageProcessor" in rows[other_rows[0]][5]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["Ti/16", "B/16"])
def test_shared_kernels_are_the_products_forward_flops_counts(variant):
    """The linear maps' FLOPs plus the attention products' add up to `forward_flops`, so the ratio cap rests on
    the same count as the GEMM shares."""
    module = load_script("benchmarks/peers.py")
    config = module.VitrailConfig.from_variant(variant, num_labels=module.NUM_LABELS)
    linear = sum(2 * count * m * k * n for count, m, k, n in module.linear_shapes(config, batch=3))
    tokens = (224 // 16) ** 2 + 1
    attention = 3 * config.num_hidden_layers * 4 * tokens * tokens * config.hidden_size
    assert linear + attention == 3 * module.forward_flops(config)


@pytest.mark.parametrize("training", [False, True])
def test_shared_kernels_run_each_gemm_and_attention_once_per_use(training):
    """One call runs every linear map's GEMM as many times as a forward does (three GEMMs each for a training
    step: output, input gradient, weight gradient) and one SDPA per layer (with its backward for training)."""
    module = load_script("benchmarks/peers.py")
    config = module.VitrailConfig.from_variant("Ti/16", image_size=32, num_hidden_layers=2, num_labels=10)
    call = module.shared_kernels(config, 2, torch.float32, "cpu", training=training)
    with OpCounter() as counter:
        call()
    gemms = sum(counter.counts[name] for name in ("mm", "bmm", "matmul"))
    per_forward = sum(count for count, *_ in module.linear_shapes(config, 2))
    assert gemms == (3 if training else 1) * per_forward
    forward = sum(
        n for name, n in counter.counts.items() if "scaled_dot_product" in name and "backward" not in name
    )
    backward = sum(
        n for name, n in counter.counts.items() if "scaled_dot_product" in name and "backward" in name
    )
    assert forward == 2 and backward == (2 if training else 0)


def test_baseline_processor_is_timed_beside(process_settings, tmp_path):
    """`--baseline-processor FILE` times another copy of image_processing_vitrail.py and reports the ratio."""
    baseline = tmp_path / "old_image_processing_vitrail.py"
    baseline.write_text((ROOT / "src" / "vitrail" / "image_processing_vitrail.py").read_text())
    module = load_script("benchmarks/peers.py")
    args = module.parse_args([*TINY, "--baseline-processor", str(baseline)])
    size = {"height": 32, "width": 32}
    processors = {
        "vitrail": module.VitrailImageProcessor(size=size),
        "transformers": module.ViTImageProcessor(size=size),
    }
    row = module.processor_row(args, processors, module.photo_crops(4))
    assert re.search(
        rf"baseline old_image_processing_vitrail.py: {VALUE} img/s, vitrail ÷ baseline {VALUE}", row.note
    )


def test_emulated_bf16_rows_are_not_measured():
    """Without native bf16 (and without --force-bf16) the bf16 rows say why they hold no numbers."""
    module = load_script("benchmarks/peers.py")
    args = module.parse_args(TINY)
    rows = module.model_rows(args, config=None, peers={}, dtype_name="bfloat16", gemm=None, bf16_ok=False)
    cells = table_rows(module.table(rows))
    assert list(cells) == [
        "inference bf16 (bf16 weights), ms/batch",
        "training step bf16 (fwd+bwd+AdamW, autocast), ms/step",
    ]
    for row in cells.values():
        assert row == ["not measurable: bf16 emulated"] * 3 + ["–", "–", ""]


FP8_ROW = "training step bf16, fp8 linear layers (torchao), ms/step"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the row of a machine without CUDA")
def test_fp8_row_on_a_cpu_says_it_is_not_measurable(process_settings):
    """With --fp8 the bf16 rows end with vitrail's fp8 training step; on a CPU it names the GPU it needs."""
    module = load_script("benchmarks/peers.py")
    args = module.parse_args([*TINY, "--fp8", "--threads", "1"])
    config, peers = module.build_peers(args)
    rows = module.model_rows(args, config, peers, dtype_name="bfloat16", gemm=1e9, bf16_ok=True)
    cells = table_rows(module.table(rows))
    assert list(cells)[-1] == FP8_ROW
    assert cells[FP8_ROW] == ["not measurable: needs an NVIDIA GPU with compute capability >= 8.9"] * 3 + [
        "–",
        "–",
        "",
    ]


def test_fp8_row_times_the_converted_vitrail_where_fp8_runs(process_settings, monkeypatch):
    """Where float8 runs, the row times vitrail's step with the layers `vitrail train --fp8 true` converts, on a
    copy (the bf16 model is left as it was), and gives its speed-up over the bf16 step; the peers have no such
    switch. torch runs float8 matmuls on a CPU too (slowly), which lets this run here with the GPU check off."""
    pytest.importorskip(
        "torchao",
        reason='the float8 conversion is torchao\'s, which is not installed: pip install "vitrail[fp8]"',
    )
    module = load_script("benchmarks/peers.py")
    monkeypatch.setattr(module, "fp8_problem", lambda device: None)
    args = module.parse_args([*TINY, "--fp8", "--threads", "1"])
    config, peers = module.build_peers(args)
    rows = module.model_rows(args, config, peers, dtype_name="bfloat16", gemm=1e9, bf16_ok=True)
    cells = table_rows(module.table(rows))
    vitrail, transformers_cell, timm_cell, *_, note = cells[FP8_ROW]
    assert re.fullmatch(rf"{VALUE} \(\d+%\)", vitrail), vitrail
    assert transformers_cell == timm_cell == "– (no fp8 switch)"
    assert re.fullmatch(rf"speed-up over the bf16 step: {NUMBER}x", note), note
    assert not any("Float8" in type(m).__name__ for m in peers["vitrail"].model.modules())


def test_mfu_is_against_the_dense_bf16_peak_of_the_gpu_named():
    module = load_script("benchmarks/peers.py")
    peaks = {
        "NVIDIA H200": 989e12,
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA A100-SXM4-80GB": None,
    }
    assert {name: module.bf16_dense_peak(name) for name in peaks} == peaks
    row = module.Row(
        "training step fp32 (fwd+bwd+AdamW)", "ms/step", flops=989e9, note="shared kernels alone"
    )
    row.values = {"vitrail": [2e-3, 4e-3, 3e-3], "timm": [1e-3] * 3}  # medians 3 ms and 1 ms
    module.add_mfu(row, 989e12)
    assert row.note == "shared kernels alone; MFU: vitrail 33.3%, timm 100.0%"
    first_call = module.Row(
        "inference bf16, torch.compile: first call (compiles)", "s", values={"vitrail": [9.0]}
    )
    module.add_mfu(first_call, 989e12)
    assert first_call.note == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_says_so(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("benchmarks/peers.py").parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def gpu_flags() -> list[str]:
    """The peers.py flags benchmarks/gpu.sh passes."""
    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    return shlex.split(re.search(r"^PEERS_FLAGS=\((.*?)\)", script, re.DOTALL | re.MULTILINE).group(1))


def test_gpu_script_flags_parse(capsys):
    """gpu.sh asks for CUDA, bf16, compiled inference and every SDPA backend; peers.py accepts those flags (here
    with the device swapped for the CPU), and refuses the CUDA device where there is none."""
    flags = gpu_flags()
    assert flags[:4] == ["--device", "cuda", "--dtype", "bfloat16"]
    module = load_script("benchmarks/peers.py")
    args = module.parse_args([*flags[:1], "cpu", *flags[2:]])
    assert args.dtypes == ["bfloat16"] and args.compile == ["inference"] and args.fp8
    assert args.sdpa_backends == ["flash", "efficient", "cudnn", "math"]
    assert module.parse_args([*flags[:1], "cpu", *flags[2:], "--compile"]).compile == [
        "inference",
        "training",
    ]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            module.parse_args(flags)
        assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="checks the refusal on a machine without a GPU"
)
def test_gpu_script_refuses_without_a_gpu(tmp_path):
    """Without an NVIDIA GPU, gpu.sh stops at once with a message, before it installs anything."""
    env = {**os.environ, "VENV": str(tmp_path / "venv")}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1
    assert "gpu.sh: no NVIDIA GPU here" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_gpu_script_runs_a_python_that_has_the_peers_without_installing(tmp_path):
    """On a machine whose Python already has torch with CUDA and the peers (one without network access, say),
    gpu.sh makes no venv and installs nothing: it runs peers.py with its flags and any given after them,
    vitrail from src/. Here a stand-in `nvidia-smi` and a stand-in Python that records how it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    calls = tmp_path / "calls"
    (bin_dir / "python-with-peers").write_text(
        f'#!/bin/sh\necho "$PYTHONPATH | $*" >> {calls}\nif [ "$1" = -c ]; then echo {tmp_path}/python; fi\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python-with-peers"),
        "VENV": str(tmp_path / "venv"),
    }
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--batch", "64"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "GPU 0: stand-in" in result.stdout and "vitrail from src/" in result.stdout
    check, version, run = calls.read_text().splitlines()
    assert check.startswith(f"{ROOT / 'src'} | -c import torch") and "torch.cuda.is_available()" in check
    assert run == f"{ROOT / 'src'} | benchmarks/peers.py {' '.join(gpu_flags())} --batch 64"
    assert "sys.executable" in version
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variant", "M/16"], r"--variant 'M/16': choose one of \['Ti/16', 'S/16', 'B/16', 'L/16'\]"),
        (["--variant", "B/32"], r"--variant 'B/32'"),
        (
            ["--dtype", "float16"],
            r"--dtype 'float16': write a comma-separated list of \['float32', 'bfloat16'\]",
        ),
        (["--batch", "0"], r"--batch must be at least 1, got 0"),
        (["--rounds", "-1"], r"--rounds must be at least 1"),
        (["--image-size", "30"], r"--image-size 30 is not a multiple of the 16-pixel patch"),
        (["--sdpa-backends", "flash,fast"], r"--sdpa-backends: unknown \['fast'\]"),
        (["--device", "tpu"], r"argument --device: invalid choice: 'tpu'"),
        (["--compile", "backward"], r"--compile: write inference, training or both, got 'backward'"),
        (
            ["--baseline-processor", "no/such/file.py"],
            r"--baseline-processor 'no/such/file.py' is not a file",
        ),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("benchmarks/peers.py").parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_training_step_uses_the_trainers_default_optimizer(tmp_path):
    """The training rows time the AdamW that scripts/train.py gets from the Trainer by default: the fused one."""
    module = load_script("benchmarks/peers.py")
    assert transformers.TrainingArguments(output_dir=str(tmp_path)).optim == "adamw_torch_fused"
    model = torch.nn.Linear(3, 2)
    calls = module.training_calls(
        {"vitrail": module.Peer(model, lambda m, x: m(x))},
        torch.randn(4, 3),
        torch.tensor([0, 1, 0, 1]),
        False,
        "cpu",
    )
    optimizer = calls["vitrail"].args[1]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    before = model.weight.detach().clone()
    calls["vitrail"]()
    assert not torch.equal(before, model.weight)


def test_data_scale_times_a_run_of_ours_and_the_baseline(tmp_path):
    """benchmarks/data_scale.py on 64 photos, 3 steps: it times vitrail and the baseline that always runs
    (transformers' Trainer on an `imagefolder` dataset, the example's pipeline, with 0 and with vitrail's data
    workers), reports a first-step time, a steady rate and a data-path rate for each (its step hook once failed
    to import, which only a run shows), and prints the table; transformers' own example needs its path."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "data_scale.py"),
            "--sizes",
            "64",
            "--steps",
            "4",
            "--work",
            str(tmp_path),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CPU: ") and "--transformers-example PATH" in lines[1]
    row = json.loads(lines[2])
    assert row["photos"] == 64 and row["data_path_img_s_core"] > 0
    assert row.keys() >= {"vitrail", "baseline", "baseline_workers"} and "transformers_example" not in row
    for key in ("vitrail", "baseline", "baseline_workers"):
        assert row[key]["first_step_s"] > 0 and row[key]["steady_img_s"] > 0
    table = [line for line in lines if line.startswith("| 64 |")]
    assert len(table) == 3 and "the example's pipeline (0 data workers" in table[1]
