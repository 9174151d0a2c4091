"""`vitrail train`'s switches for speed on a GPU, checked on a CPU: transformers' compile and fused-optimizer flags
reach the Trainer; `--fp8 true` is refused, naming what is wrong, before any data is read where it cannot run;
the float8 conversion picks the encoder's linear layers, and a converted model's checkpoint stays a plain vitrail
checkpoint. Training in float8 needs a GPU of compute capability 8.9 or later: tests/test_cuda.py runs it there."""

import sys

import pytest
import torch

from vitrail import VitrailConfig, VitrailForImageClassification
from vitrail.cli import _train_parser
from vitrail.training import VitrailTrainer, fp8_layer, parse_args, train, trainer_arguments

from .test_training import TINY

# Sides chosen so that the filter has something to refuse: qkv 48 -> 144 and proj 48 -> 48 are multiples of 16,
# fc1 48 -> 40 and fc2 40 -> 48 are not; the head's 16 classes are, and it is never converted all the same.
CONFIG = dict(
    image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
    intermediate_size=40, num_labels=16,
)  # fmt: skip


def test_compile_and_fused_optimizer_flags_reach_the_trainer(tmp_path):
    """`vitrail train --torch_compile true --torch_compile_mode ... --optim adamw_torch_fused`: the Trainer's
    accelerator compiles with that mode and inductor, and the optimizer is the fused AdamW. Nothing is compiled
    here: compilation starts with the first training step."""
    argv = [
        "--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none", "--torch_compile", "true",
        "--torch_compile_mode", "max-autotune-no-cudagraphs", "--optim", "adamw_torch_fused",
    ]  # fmt: skip
    _, _, training_args = parse_args(argv, _train_parser())
    model = VitrailForImageClassification(VitrailConfig(**CONFIG))
    trainer = VitrailTrainer(model=model, args=trainer_arguments(training_args))
    assert trainer.args.torch_compile and trainer.args.torch_compile_mode == "max-autotune-no-cudagraphs"
    dynamo = trainer.accelerator.state.dynamo_plugin
    assert (dynamo.mode, str(dynamo.backend).lower()) == ("max-autotune-no-cudagraphs", "inductor")
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


def fp8_args(tmp_path, *flags: str, bf16: bool = True):
    """The run folder and parsed arguments of `vitrail train --fp8 true <flags>`. On a CPU transformers refuses
    `--bf16 true` without `--use_cpu true` while parsing, so bf16 is set on the parsed arguments, as on a GPU."""
    out = tmp_path / "run"
    argv = [
        "--output_dir",
        str(out),
        "--config_overrides",
        TINY,
        "--report_to",
        "none",
        "--fp8",
        "true",
        *flags,
    ]
    model_args, data_args, training_args = parse_args(argv)
    training_args.bf16 = bf16
    return out, (model_args, data_args, training_args)


@pytest.fixture
def gpu(monkeypatch):
    """torch reports a CUDA device of the capability the test sets; nothing else of CUDA is touched, as the
    refusals come before the model or data are."""

    def set_capability(capability: tuple[int, int], name: str = "NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return set_capability


@pytest.mark.parametrize("flags", [[], ["--use_cpu", "true"]])
def test_fp8_is_refused_on_cpu_before_any_data_is_read(tmp_path, monkeypatch, flags):
    out, args = fp8_args(tmp_path, *flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"compute capability 8\.9 or later .*H100.*; this run is on CPU"):
        train(*args)
    assert not out.exists()  # refused before the run folder or the data were opened


def test_fp8_is_refused_with_use_cpu_even_beside_a_gpu(tmp_path, gpu):
    out, args = fp8_args(tmp_path, "--use_cpu", "true")
    gpu((9, 0))
    with pytest.raises(ValueError, match="this run is on CPU"):
        train(*args)
    assert not out.exists()


def test_fp8_is_refused_on_a_gpu_below_compute_capability_8_9(tmp_path, gpu):
    out, args = fp8_args(tmp_path)
    gpu((8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"8\.9 or later .*this run's GPU, NVIDIA A100-SXM4-80GB, has 8\.0"):
        train(*args)
    assert not out.exists()


def test_fp8_without_bf16_is_refused(tmp_path, gpu):
    out, args = fp8_args(tmp_path, bf16=False)
    gpu((9, 0))
    with pytest.raises(ValueError, match=r"add --bf16 true"):
        train(*args)
    assert not out.exists()


def test_fp8_without_torchao_is_refused(tmp_path, gpu, monkeypatch):
    out, args = fp8_args(tmp_path)
    gpu((9, 0))
    # A None entry in sys.modules makes `import torchao` raise ImportError, as where it is not installed.
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ValueError, match=r'needs torchao: pip install "vitrail\[fp8\]"'):
        train(*args)
    assert not out.exists()


def test_fp8_filter_picks_the_encoder_linear_layers_with_sides_of_multiples_of_16():
    model = VitrailForImageClassification(VitrailConfig(**CONFIG))
    picked = sorted(name for name, module in model.named_modules() if fp8_layer(module, name))
    assert picked == [
        f"vitrail.encoder.layers.{i}.attention.{name}" for i in range(2) for name in ("proj", "qkv")
    ]
    assert not fp8_layer(model.classifier, "classifier")  # 48 -> 16: sides fit, but never the head


def test_fp8_conversion_keeps_the_state_dict_and_saves_a_plain_checkpoint(tmp_path):
    pytest.importorskip(
        "torchao",
        reason='the float8 conversion is torchao\'s, which is not installed: pip install "vitrail[fp8]"',
    )
    from torchao.float8.float8_linear import Float8Linear

    from vitrail.training import convert_to_fp8

    torch.manual_seed(0)
    model = VitrailForImageClassification(VitrailConfig(**CONFIG))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    convert_to_fp8(model)
    converted = sorted(name for name, module in model.named_modules() if isinstance(module, Float8Linear))
    assert converted == [
        f"vitrail.encoder.layers.{i}.attention.{name}" for i in range(2) for name in ("proj", "qkv")
    ]
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in after.items():
        assert type(tensor) is torch.Tensor and torch.equal(tensor, before[name]), name

    model.save_pretrained(tmp_path)
    plain, info = VitrailForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert not any(type(module).__name__ == "Float8Linear" for module in plain.modules())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_fp8_training_writes_a_plain_checkpoint(tmp_path, monkeypatch):
    """The whole `--fp8 true` path through the Trainer: the encoder's linear layers train in float8 and the saved
    folder is a plain vitrail checkpoint. torch runs float8 matmuls on a CPU too (slowly, and this is no measure of
    their accuracy), so with the GPU check off the path runs here; tests/test_cuda.py runs it on a GPU."""
    pytest.importorskip(
        "torchao",
        reason='the float8 conversion is torchao\'s, which is not installed: pip install "vitrail[fp8]"',
    )
    import json

    from vitrail import training

    monkeypatch.setattr(training, "check_fp8", lambda training_args: None)
    out = tmp_path / "run"
    argv = [
        "--output_dir", str(out), "--config_overrides", TINY, "--report_to", "none", "--disable_tqdm", "true",
        "--use_cpu", "true", "--bf16", "true", "--fp8", "true", "--max_steps", "4", "--save_strategy", "no",
        "--per_device_train_batch_size", "32", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    metrics = train(*parse_args(argv))
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and 0 <= metrics["test_accuracy"] <= 1
    settings = json.loads((out / "run_settings.json").read_text())
    assert '"fp8": true' in json.dumps(settings)  # a rerun without --fp8 is another run
    plain, info = VitrailForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert not any(type(module).__name__ == "Float8Linear" for module in plain.modules())
