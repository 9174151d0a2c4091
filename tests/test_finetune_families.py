"""Fine-tuning checkpoints of other ViT families with `scripts/train.py --model_name_or_path`: shrunk CLIP towers
(pre-norm, bias-free patch embedding, quick GELU, CLIP's mean and std) and SigLIP towers (attention-pooling head,
tanh GELU, no class token, mean and std 0.5), with random weights, each as timm saves it (`save_for_hf`) and as
transformers saves its `CLIPVisionModel` / `SiglipVisionModel` (`save_pretrained`, with its image processor).
Each is converted on load, gets a head for the digits' ten classes, trains a few steps at another image size, and
ends as a vitrail checkpoint that keeps the source's architecture options and preprocessing, pushes to the loopback
Hub, and opens where vitrail is not installed with the same logits."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from safetensors.torch import save_file

timm = pytest.importorskip("timm", reason="two of the sources are timm models saved by timm")
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

from vitrail import VitrailConfig, VitrailForImageClassification, VitrailImageProcessor  # noqa: E402
from vitrail.training import parameter_groups  # noqa: E402

from .conftest import load_script, run_without_vitrail  # noqa: E402
from .hub_server import USER, client_env  # noqa: E402

TOLERANCE = 1e-5
STEPS = 3
SIZE = 24  # the sources are made for 32 px: fine-tuning at 24 resamples their positions to a 3 x 3 grid
# Shrunk as benchmarks/timm_coverage.py shrinks timm's zoo: 2 blocks, width 32, 4 heads, a 4 x 4 patch grid, and an
# odd MLP width (37) so that a transposed tensor cannot pass by shape.
SHRUNK = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=37 / 32, num_classes=5)


class Family(NamedTuple):
    """A source checkpoint kind: `save(folder)` writes one; the fine-tuned checkpoint keeps the config fields
    `kept` and the source's `mean` and `std`, and its model card shows the `card_rows`."""

    save: Callable[[Path], Path]
    kept: dict
    mean: tuple
    std: tuple
    card_rows: tuple[str, ...]


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every parameter moved off its initialisation (a fresh model's unit norms and zero biases would
    hide a misplaced tensor)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def timm_source(architecture: str) -> Callable[[Path], Path]:
    """Writes a shrunk, perturbed `architecture` with timm's own `save_for_hf`: config.json (architecture,
    model_args, pretrained_cfg) and model.safetensors."""

    def save(folder: Path) -> Path:
        model = perturbed(timm.create_model(architecture, pretrained=False, **SHRUNK))
        save_for_hf(model, folder, safe_serialization=True)
        return folder

    return save


def transformers_source(model_class: str, processor_class: str, **processor_args) -> Callable[[Path], Path]:
    """Writes a shrunk, perturbed transformers vision tower (no head) with `save_pretrained`, and its image
    processor for the tower's 32 px."""

    def save(folder: Path) -> Path:
        config_class = getattr(transformers, model_class).config_class
        config = config_class(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=37)  # fmt: skip
        perturbed(getattr(transformers, model_class)(config)).save_pretrained(folder)
        getattr(transformers, processor_class)(**processor_args).save_pretrained(folder)
        return folder

    return save


FAMILIES = {
    "timm-clip": Family(
        timm_source("vit_base_patch16_clip_quickgelu_224"),
        kept=dict(pre_norm=True, patch_embedding_bias=False, hidden_act="quick_gelu", pooling="cls",
                  use_cls_token=True, layer_norm_eps=1e-5),
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        card_rows=("| Pre norm | True |", "| Patch embedding bias | False |", "| Hidden act | quick_gelu |"),
    ),
    "timm-siglip": Family(
        timm_source("vit_so400m_patch16_siglip_256"),
        kept=dict(pooling="map", use_cls_token=False, hidden_act="gelu_pytorch_tanh", pre_norm=False,
                  map_intermediate_size=37),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        card_rows=("| Pooling | map |", "| Hidden act | gelu_pytorch_tanh |"),
    ),
    "transformers-clip": Family(
        transformers_source("CLIPVisionModel", "CLIPImageProcessor", size={"shortest_edge": 32},
                            crop_size={"height": 32, "width": 32}),
        kept=dict(pre_norm=True, patch_embedding_bias=False, hidden_act="quick_gelu", pooling="cls",
                  use_fc_norm=True, layer_norm_eps=1e-5),
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        card_rows=("| Pre norm | True |", "| Patch embedding bias | False |", "| Use fc norm | True |"),
    ),
    "transformers-siglip": Family(
        transformers_source("SiglipVisionModel", "SiglipImageProcessor", size={"height": 32, "width": 32}),
        kept=dict(pooling="map", use_cls_token=False, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        card_rows=("| Pooling | map |", "| Hidden act | gelu_pytorch_tanh |"),
    ),
}  # fmt: skip

QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--logging_steps", "1"]


# Runs where vitrail cannot be imported: the Auto classes open the pushed repo with the code it carries.
REMOTE = textwrap.dedent(
    """
    import json
    import sys

    import PIL.Image
    import torch
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    repo_id, reference_path, image_path, report_path = sys.argv[1:]
    reference = load_file(reference_path)
    model = AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True)
    with torch.no_grad():
        logits = model(reference["inputs"]).logits
        pixels = processor(PIL.Image.open(image_path), return_tensors="pt")["pixel_values"]
        image_logits = model(pixels).logits
    report = {
        "classes": [type(model).__module__, type(model).__name__, type(processor).__name__],
        "logits_diff": (logits - reference["logits"]).abs().max().item(),
        "pixels_diff": (pixels - reference["pixels"]).abs().max().item(),
        "image_logits_diff": (image_logits - reference["image_logits"]).abs().max().item(),
        "vitrail_modules": sorted(n for n, m in sys.modules.items() if m and n.startswith("vitrail")),
    }
    json.dump(report, open(report_path, "w"))
    """
)


@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tuned_family_trains_pushes_and_loads_without_vitrail(hub, tmp_path, family):
    """scripts/train.py fine-tunes the converted source and pushes the result (see the module docstring)."""
    source = FAMILIES[family].save(tmp_path / "source")
    kept, mean, std = FAMILIES[family].kept, FAMILIES[family].mean, FAMILIES[family].std
    out, repo_id = tmp_path / "run", f"{USER}/{family}-digits"
    script = load_script("scripts/train.py")
    metrics = script.main([
        "--output_dir", str(out), "--model_name_or_path", str(source), *QUIET, "--max_steps", str(STEPS),
        "--image_size", str(SIZE), "--per_device_train_batch_size", "16", "--max_train_samples", "64",
        "--max_eval_samples", "32", "--learning_rate", "1e-3", "--weight_decay", "0.05", "--layer_decay", "0.75", "--save_strategy", "no",
        "--push_to_hub", "true", "--hub_model_id", repo_id,
    ])  # fmt: skip

    # The steps ran, with finite losses.
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == STEPS and len(losses) == STEPS
    assert all(math.isfinite(loss) for loss in [*losses, metrics["train_loss"], metrics["test_loss"]])

    # A vitrail checkpoint with the source's architecture options, a head for the ten digits, and the source's
    # preprocessing, made for the new size (the 8 px digits are resized up and cropped to it).
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], len(config["id2label"]), config["image_size"]) == ("vitrail", 10, SIZE)
    assert {name: config[name] for name in kept} == kept
    preprocessing = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessing["image_processor_type"] == "VitrailImageProcessor"
    assert preprocessing["image_mean"] == pytest.approx(mean)
    assert preprocessing["image_std"] == pytest.approx(std)
    assert (
        preprocessing["num_channels"] == 3 and preprocessing["resample"] == 3
    )  # bicubic, as all four have it
    card = (out / "README.md").read_text()
    assert f"Fine-tuned from `{source}`" in card
    assert [row for row in FAMILIES[family].card_rows if row not in card] == []

    # Every tensor of the converted source (positions resampled as the run did) moved; the head is new.
    start = VitrailForImageClassification.from_pretrained(source, image_size=SIZE).state_dict()
    model = VitrailForImageClassification.from_pretrained(out).eval()
    trained = model.state_dict()
    backbone = sorted(name for name in start if name.startswith("vitrail."))
    assert backbone == sorted(name for name in trained if name.startswith("vitrail."))
    assert [name for name in backbone if torch.equal(start[name], trained[name])] == []
    assert trained["classifier.weight"].shape == (10, config["hidden_size"])

    # The push landed, and a process without vitrail opens the repo with the same processor and logits.
    assert json.loads((out / "hub_push.json").read_text())["landed"] is True
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (41, 37, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    inputs = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    pixels = VitrailImageProcessor.from_pretrained(out)(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = {"inputs": inputs, "logits": model(inputs).logits, "pixels": pixels,
                     "image_logits": model(pixels).logits}  # fmt: skip
    save_file(reference, tmp_path / "reference.safetensors")
    report = run_without_vitrail(
        REMOTE, repo_id, tmp_path / "reference.safetensors", tmp_path / "image.png",
        root=tmp_path, env=client_env(hub, tmp_path / "remote_home"),
    )  # fmt: skip
    module, model_class, processor_class = report["classes"]
    assert module.startswith("transformers_modules.") and report["vitrail_modules"] == []
    assert (model_class, processor_class) == ("VitrailForImageClassification", "VitrailImageProcessor")
    assert report["pixels_diff"] == 0.0
    assert report["logits_diff"] <= TOLERANCE and report["image_logits_diff"] <= TOLERANCE


def test_parameter_groups_place_the_new_parameters():
    """The MAP head trains at the head's rate, the pre-norm at the embeddings'; the learned RoPE frequencies,
    relative position tables, query/value biases and the MAP query get no weight decay (as timm exempts them),
    the MAP head's linear weights do."""
    config = VitrailConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, num_labels=3, pooling="map", use_cls_token=False, pre_norm=True, key_bias=False,
        rope_type="mixed", relative_position_bias="table",
    )  # fmt: skip
    model = VitrailForImageClassification(config)
    groups = parameter_groups(model, weight_decay=0.05, learning_rate=1e-3, layer_decay=0.5)
    by_name = {name: group for group in groups for name in group["names"]}
    assert by_name.keys() == dict(model.named_parameters()).keys()
    layer = "vitrail.encoder.layers.1.attention."
    exempt = [f"{layer}rope_freqs", f"{layer}relative_position_bias.table", f"{layer}q_bias", f"{layer}v_bias",
              "vitrail.attention_pool.latent", "vitrail.embeddings.pre_norm.weight"]  # fmt: skip
    assert {name: by_name[name]["weight_decay"] for name in exempt} == dict.fromkeys(exempt, 0.0)
    for name in (
        "vitrail.attention_pool.q.weight",
        "vitrail.attention_pool.mlp.fc1.weight",
        f"{layer}qkv.weight",
    ):
        assert by_name[name]["weight_decay"] == 0.05, name
    assert by_name["vitrail.attention_pool.kv.weight"]["lr"] == by_name["classifier.weight"]["lr"] == 1e-3
    assert by_name[f"{layer}rope_freqs"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert by_name["vitrail.embeddings.pre_norm.weight"]["lr"] == pytest.approx(1e-3 * 0.5**3)
