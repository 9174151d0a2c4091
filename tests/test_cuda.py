"""vitrail on a CUDA device: what a CPU cannot check. Skipped, saying why, where torch sees no CUDA device (CI has
none); on a GPU machine run `pytest -s tests/test_cuda.py` (`-s` shows the measured differences). README ("Performance", GPU) gives the last run's outcome.

- parity with transformers' ViT on the GPU, eager and sdpa, in fp32 with TF32 off;
- bf16 under each SDPA backend (flash, memory-efficient, cuDNN, math) against the fp32 model;
- `scripts/train.py`'s training, with `--bf16`, on the GPU: it learns the digits, and the checkpoint it writes
  scores the same in fp32 (`scripts/evaluate_checkpoint.py`'s function); the main job's batch augmentation, MixUp
  and CutMix run on the GPU batch;
- `--fp8 true` (compute capability 8.9 or later, torchao installed): the same run learns the digits about as well
  as in bf16, and writes a checkpoint that loads into a plain vitrail model.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitrail import VitrailForImageClassification
from vitrail.convert import convert_hf_state_dict

from .conftest import randomise, tiny_config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: run on a GPU machine (pytest tests/test_cuda.py)",
)

# Head width 64, as flash attention wants; 64 px in 16-px patches: 16 patches and a class token.
SHAPE = dict(image_size=64, patch_size=16, encoder_stride=16, hidden_size=192, num_hidden_layers=3,
             num_attention_heads=3, intermediate_size=301, num_labels=7)  # fmt: skip


@pytest.fixture
def no_tf32():
    """fp32 on the GPU means fp32: TF32 matmuls and convolutions would round to 10 bits of mantissa."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def images(batch: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, SHAPE["image_size"], SHAPE["image_size"], generator=generator)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_parity_with_transformers_vit_on_cuda(attn, no_tf32):
    from transformers import ViTConfig, ViTForImageClassification

    hf_shape = {k: v for k, v in SHAPE.items() if k != "encoder_stride"}
    reference = randomise(ViTForImageClassification(ViTConfig(**hf_shape, attn_implementation=attn)))
    model = VitrailForImageClassification(tiny_config(**SHAPE, attn_implementation=attn)).eval()
    model.load_state_dict(convert_hf_state_dict(reference.state_dict(), reference.config), strict=True)
    pixels = images().cuda()
    with torch.no_grad():
        want = reference.cuda()(pixels, output_hidden_states=True)
        got = model.cuda()(pixels, output_hidden_states=True)
    # Same arithmetic, other kernels (one fused qkv GEMM against three): float32 rounding, not 1e-5 of the CPU test.
    print(f"{attn}: logits differ by at most {(got.logits - want.logits).abs().max():.2e}")
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "backend",
    [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH],
)
def test_bf16_under_each_sdpa_backend_stays_near_fp32(backend, no_tf32):
    model = randomise(VitrailForImageClassification(tiny_config(**SHAPE))).cuda()
    pixels = images().cuda()
    with torch.no_grad():
        want = model(pixels).logits
        bf16 = VitrailForImageClassification(tiny_config(**SHAPE)).eval().cuda().to(torch.bfloat16)
        bf16.load_state_dict(model.state_dict())
        with sdpa_kernel(backend):
            got = bf16(pixels.to(torch.bfloat16)).logits.float()
    # bf16 keeps 8 bits of mantissa: a few percent of the logits' scale after three layers, far from a wrong kernel.
    scale = want.abs().max()
    print(f"{backend}: bf16 logits within {(got - want).abs().max() / scale:.2%} of the fp32 logits' scale")
    assert (got - want).abs().max() < 0.05 * scale, (
        f"{backend}: {(got - want).abs().max():.3g} vs scale {scale:.3g}"
    )
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_training_on_cuda_learns_and_the_checkpoint_scores_the_same_in_fp32(tmp_path):
    """The CPU test's 800-step run (tests/test_training.py), on the GPU with bf16 autocast."""
    from vitrail.evaluate_checkpoint import EvaluateArguments, evaluate_checkpoint
    from vitrail.training import DataArguments, parse_args, train

    from .test_training import TINY

    out = tmp_path / "run"
    recipe = (
        "--report_to none --disable_tqdm true --bf16 true --num_train_epochs 20 --learning_rate 3e-3 "
        "--per_device_train_batch_size 32 --lr_scheduler_type cosine --warmup_steps 0.1 --eval_strategy epoch "
        "--save_strategy no"
    )
    metrics = train(*parse_args(["--output_dir", str(out), "--config_overrides", TINY, *recipe.split()]))
    assert metrics["test_accuracy"] > 0.75
    scored = evaluate_checkpoint(
        EvaluateArguments(model=str(out), output_dir=str(tmp_path / "eval")), DataArguments()
    )
    # Training evaluated under bf16 autocast; this scores the saved weights in fp32: a few of the 360 test images
    # near a decision boundary may change class, no more.
    print(
        f"test accuracy {metrics['test_accuracy']:.4f} (bf16 autocast), {scored['test_accuracy']:.4f} (fp32)"
    )
    assert scored["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=5 / 360)


def test_batch_augmentation_and_mixing_run_on_the_gpu_batch(tmp_path):
    """The main job's geometric augmentation (Makefile), MixUp and CutMix transform batches the data loader has
    already put on the GPU. Two epochs: this checks that they run there, not what they teach."""
    from vitrail.training import parse_args, train

    from .test_training import TINY

    recipe = (
        "--report_to none --disable_tqdm true --bf16 true --num_train_epochs 2 --save_strategy no "
        "--rotation 11 --translate 0.15 --scale_jitter 0.1 --mixup_alpha 0.2 --cutmix_alpha 0.2"
    )
    metrics = train(*parse_args(["--output_dir", str(tmp_path), "--config_overrides", TINY, *recipe.split()]))
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and 0 <= metrics["test_accuracy"] <= 1


def fp8_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"fp8 needs compute capability 8.9 or later; {torch.cuda.get_device_name()} has less"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return 'fp8 training needs torchao: pip install "vitrail[fp8]"'
    return None


@pytest.mark.skipif(fp8_unavailable() is not None, reason=fp8_unavailable() or "")
def test_fp8_training_learns_as_bf16_does_and_saves_a_plain_checkpoint(tmp_path):
    """The 800-step bf16 run above, and the same with `--fp8 true`: finite losses, fp8's test accuracy within 5
    points (18 of the 360 test images) of bf16's, and the fp8 checkpoint loads into a plain vitrail model with no
    key missing or left over and scores in fp32 as its run did, give or take 5 points."""
    from vitrail.evaluate_checkpoint import EvaluateArguments, evaluate_checkpoint
    from vitrail.training import DataArguments, parse_args, train

    from .test_training import TINY

    recipe = (
        "--report_to none --disable_tqdm true --bf16 true --num_train_epochs 20 --learning_rate 3e-3 "
        "--per_device_train_batch_size 32 --lr_scheduler_type cosine --warmup_steps 0.1 --save_strategy no"
    )
    results = {}
    for name, extra in [("bf16", []), ("fp8", ["--fp8", "true"])]:
        argv = ["--output_dir", str(tmp_path / name), "--config_overrides", TINY, *recipe.split(), *extra]
        results[name] = train(*parse_args(argv))
    print({name: (m["train_loss"], m["test_accuracy"]) for name, m in results.items()})
    for metrics in results.values():
        assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert results["bf16"]["test_accuracy"] > 0.75
    assert results["fp8"]["test_accuracy"] == pytest.approx(results["bf16"]["test_accuracy"], abs=18 / 360)

    plain, info = VitrailForImageClassification.from_pretrained(tmp_path / "fp8", output_loading_info=True)
    assert not any(info.values()), info
    assert not any(type(module).__name__ == "Float8Linear" for module in plain.modules())
    scored = evaluate_checkpoint(
        EvaluateArguments(model=str(tmp_path / "fp8"), output_dir=str(tmp_path / "eval")), DataArguments()
    )
    print(
        f"fp8 run {results['fp8']['test_accuracy']:.4f}, its checkpoint in fp32 {scored['test_accuracy']:.4f}"
    )
    assert scored["test_accuracy"] == pytest.approx(results["fp8"]["test_accuracy"], abs=18 / 360)
