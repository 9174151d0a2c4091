"""The opt-in compile path: `torch.compile(model)` for inference and training, and `--torch_compile true` with
scripts/train.py, give eager's numbers on CPU."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitrail import VitrailConfig, VitrailForImageClassification
from vitrail.training import parse_args, train

# Odd sizes so that a swapped axis cannot pass: 30 px in 6-px patches (25 tokens + class), MLP 37.
CONFIG = dict(
    image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=37, num_labels=5,
)  # fmt: skip
TOLERANCE = 1e-5

# Slow: inductor compiles each graph with the C++ compiler, ~10-25 s per test here with a warm cache, more without.
pytestmark = pytest.mark.slow


@pytest.fixture
def model() -> VitrailForImageClassification:
    torch.manual_seed(0)
    return VitrailForImageClassification(VitrailConfig(**CONFIG))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 30, 30, generator=generator), torch.tensor([0, 3, 4])


def test_compiled_inference_matches_eager(model):
    """`torch.compile(model)` (inductor) gives the eager logits, also for a second batch size (a recompile)."""
    model.eval()
    compiled = torch.compile(model)
    pixels, _ = inputs()
    with torch.inference_mode():
        for batch in (pixels, pixels[:1]):
            torch.testing.assert_close(
                compiled(pixel_values=batch).logits, model(pixel_values=batch).logits, atol=TOLERANCE, rtol=0
            )


def test_compiled_training_step_matches_eager(model):
    """One step through the compiled model gives eager's loss and gradients; after an optimizer step the compiled
    model computes with the updated weights (they are graph inputs, not baked-in constants)."""
    pixels, labels = inputs()
    eager, twin = model.train(), copy.deepcopy(model).train()
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
    compiled = torch.compile(twin)
    results = []
    for module, forward in ((eager, eager), (twin, compiled)):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        loss = F.cross_entropy(forward(pixel_values=pixels).logits, labels)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters()}
        optimizer.step()
        with torch.no_grad():
            after = forward(pixel_values=pixels).logits
        results.append((loss.detach(), grads, after))
    (loss, grads, after), (compiled_loss, compiled_grads, compiled_after) = results
    torch.testing.assert_close(compiled_loss, loss, atol=TOLERANCE, rtol=0)
    assert grads.keys() == compiled_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=TOLERANCE, rtol=0, msg=name)
    assert (after - before).abs().max() > 0.01  # the step changed the model
    torch.testing.assert_close(compiled_after, after, atol=TOLERANCE, rtol=0)


def test_train_script_with_torch_compile(tmp_path):
    """`--torch_compile true`, transformers' flag, trains vitrail with the Trainer: finite losses, and the saved
    checkpoint (parameter names without the compiled wrapper's prefix) loads and predicts."""
    tiny = (
        "image_size=8,patch_size=2,encoder_stride=2,num_channels=1,hidden_size=32,num_hidden_layers=2,"
        "num_attention_heads=4,intermediate_size=64,pooling=mean,use_cls_token=false,layer_norm_eps=1e-6"
    )
    out = tmp_path / "run"
    metrics = train(
        *parse_args(
            [
                "--output_dir", str(out), "--config_overrides", tiny, "--torch_compile", "true",
                "--max_steps", "3", "--per_device_train_batch_size", "32", "--save_strategy", "no",
                "--max_train_samples", "96", "--max_eval_samples", "64", "--report_to", "none",
                "--disable_tqdm", "true", "--use_cpu", "true",
            ]
        )
    )  # fmt: skip
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["test_loss"])
    reloaded = VitrailForImageClassification.from_pretrained(out)
    assert not any("_orig_mod" in name for name in reloaded.state_dict())
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.rand(2, 1, 8, 8)).logits).all()
