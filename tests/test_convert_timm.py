"""timm VisionTransformer checkpoints into vitrail: tiny random timm models, every parameter perturbed (a fresh
model has identity norms and zero biases, which would hide a misplaced tensor), saved as timm writes them, then
converted and compared output for output with timm itself."""

from __future__ import annotations

import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from vitrail import VitrailForImageClassification, VitrailModel  # noqa: E402
from vitrail.convert.common import model_outputs  # noqa: E402
from vitrail.convert.timm import (  # noqa: E402
    TimmFacts,
    _heads_from_name,
    convert_timm_state_dict,
    is_timm_config,
    load_timm_checkpoint,
    open_source,
    timm_image_processor,
    vitrail_config_from_timm,
)

from .conftest import load_script  # noqa: E402

TOLERANCE = 1e-5
# 37 hidden MLP units: an odd size so that a transposed or mis-split tensor cannot pass by shape.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=37 / 32, num_classes=5)
# A name timm does not know: everything comes from the weights and config.json.
UNKNOWN_ARCH = "vitrail_test_tiny"


def make_timm(seed: int = 0, cls=VisionTransformer, **options) -> VisionTransformer:
    """A tiny timm model (`cls`: VisionTransformer or VisionTransformerDistilled) with every parameter perturbed."""
    model = cls(**{**TINY, **options}).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def timm_config(model: VisionTransformer, architecture: str = UNKNOWN_ARCH, **model_args) -> dict:
    """config.json as timm's push_to_hub writes it."""
    height, width = model.patch_embed.img_size
    return {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": model.global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, height, width],
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
    }


def save_folder(folder, model: VisionTransformer, config: dict | None = None, state: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def pixels_for(model: VisionTransformer, size=None) -> torch.Tensor:
    height, width = size or model.patch_embed.img_size
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))


def timm_outputs(model: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixels) if model.num_classes else model.forward_features(pixels)


# (id, timm options): the option sets timm's VisionTransformer checkpoints on the Hub use.
PARITY_CASES = [
    ("plain", {}),
    ("reg4", dict(reg_tokens=4)),
    ("reg4_no_embed_class", dict(reg_tokens=4, no_embed_class=True)),
    ("avg_fc_norm", dict(global_pool="avg")),
    ("avg_no_fc_norm", dict(global_pool="avg", fc_norm=False)),
    ("token_fc_norm", dict(global_pool="token", fc_norm=True)),
    ("no_embed_class", dict(no_embed_class=True)),
    ("layer_scale", dict(init_values=1e-5)),
    ("qk_norm", dict(qk_norm=True)),
    ("no_qkv_bias", dict(qkv_bias=False)),
    ("no_class_token_avg", dict(class_token=False, global_pool="avg")),
    ("no_pos_embed", dict(pos_embed="none")),
    ("non_square", dict(img_size=(24, 40))),
    ("backbone", dict(num_classes=0)),
    ("backbone_avg_fc_norm", dict(num_classes=0, global_pool="avg", reg_tokens=2)),
]


@pytest.mark.parametrize("options", [c[1] for c in PARITY_CASES], ids=[c[0] for c in PARITY_CASES])
def test_parity_with_timm(tmp_path, options):
    reference = make_timm(**options)
    folder = save_folder(tmp_path / "timm", reference, timm_config(reference, num_heads=4))
    model = load_timm_checkpoint(folder)
    expected_cls = VitrailForImageClassification if reference.num_classes else VitrailModel
    assert type(model) is expected_cls
    pixels = pixels_for(reference)
    diff = (model_outputs(model, pixels) - timm_outputs(reference, pixels)).abs().max().item()
    print(f"max abs diff {options}: {diff:.3e}")
    assert diff <= TOLERANCE


def test_bare_safetensors_file_with_arguments(tmp_path):
    """No config.json: the head count and the pooling come from the arguments."""
    reference = make_timm(global_pool="avg", fc_norm=False)
    file = tmp_path / "weights.safetensors"
    save_file(reference.state_dict(), file)
    model = load_timm_checkpoint(file, num_heads=4, global_pool="avg")
    assert model.config.pooling == "mean" and not model.config.use_fc_norm
    pixels = pixels_for(reference)
    assert (model_outputs(model, pixels) - timm_outputs(reference, pixels)).abs().max() <= TOLERANCE


def test_config_mapping(tmp_path):
    reference = make_timm(reg_tokens=3, init_values=1e-6, qk_norm=True, img_size=(16, 40))
    config = vitrail_config_from_timm(
        reference.state_dict(), timm_config=timm_config(reference, num_heads=4, init_values=1e-6)
    )
    assert config.hidden_size == 32 and config.num_hidden_layers == 2 and config.num_attention_heads == 4
    assert config.intermediate_size == 37 and config.patch_size == 8 and list(config.image_hw) == [16, 40]
    assert config.num_register_tokens == 3 and config.prefix_position_embeddings == "all"
    assert config.layer_scale_init_value == 1e-6 and config.qk_norm and config.layer_norm_eps == 1e-6
    assert config.position_interpolation == "bicubic_antialias" and config.pooling == "cls"
    assert config.num_labels == 5 and config.id2label[0] == "LABEL_0"
    named = vitrail_config_from_timm(
        reference.state_dict(),
        timm_config=timm_config(reference, num_heads=4),
        id2label=dict(enumerate("abcde")),
    )
    assert named.id2label[4] == "e" and named.label2id["a"] == 0


def test_labels_from_label_names(tmp_path):
    reference = make_timm()
    config = timm_config(reference, num_heads=4)
    config["label_names"] = ["tench", "goldfish", "shark", "tiger shark", "hammerhead"]
    model = load_timm_checkpoint(save_folder(tmp_path, reference, config))
    assert model.config.id2label[3] == "tiger shark" and model.config.label2id["tench"] == 0


def test_architecture_known_to_timm(tmp_path):
    """A timm architecture name: the head count, activation and epsilon are read from timm's own model, and the
    reference is `timm.create_model` of that name."""
    arch = "vit_small_patch16_224.augreg_in21k_ft_in1k"  # 6 heads, not given anywhere else
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, mlp_ratio=2.0, num_classes=5)
    reference = make_timm(**{**args, "num_heads": 6})
    config = timm_config(
        reference, architecture=arch, **{k: v for k, v in args.items() if k != "num_classes"}
    )
    converted = open_source(save_folder(tmp_path, reference, config))
    assert converted.model.config.num_attention_heads == 6
    assert any("create_model" in note for note in converted.notes)
    pixels = pixels_for(reference)
    assert (model_outputs(converted.model, pixels) - converted.reference(pixels)).abs().max() <= TOLERANCE
    assert (model_outputs(converted.model, pixels) - timm_outputs(reference, pixels)).abs().max() <= TOLERANCE


def test_heads_from_size_word():
    assert _heads_from_name("vit_base_patch16_224.augreg2_in21k_ft_in1k", 768) == 12
    assert _heads_from_name("vit_tiny_patch16_384", 192) == 3
    assert _heads_from_name("vit_large_patch14_reg4_dinov2.lvd142m", 1024) == 16
    assert _heads_from_name("vit_base_patch16_224", 1024) is None  # the width contradicts the name
    assert _heads_from_name("vit_betwixt_patch16_reg4_gap_256", 640) is None  # no size word known


def test_missing_num_heads_is_a_clear_error(tmp_path):
    reference = make_timm()
    file = tmp_path / "weights.safetensors"
    save_file(reference.state_dict(), file)
    with pytest.raises(ValueError, match="num_heads"):
        load_timm_checkpoint(file)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(global_pool="map"), "attn_pool"),
        (dict(pre_norm=True), "norm_pre"),
        (dict(global_pool="avgmax"), "maximum"),
        (dict(final_norm=False), "final_norm"),
        (dict(proj_bias=False), "proj_bias"),
        (dict(scale_mlp_norm=True), "scale_mlp_norm"),
    ],
    ids=["map", "pre_norm", "avgmax", "no_final_norm", "no_proj_bias", "scale_mlp_norm"],
)
def test_unsupported_timm_options_are_refused(tmp_path, options, match):
    reference = VisionTransformer(**{**TINY, **options})
    folder = save_folder(tmp_path, reference, timm_config(reference, num_heads=4))
    with pytest.raises(NotImplementedError, match=match):
        load_timm_checkpoint(folder)


def test_gated_mlp_is_refused(tmp_path):
    from timm.layers import SwiGLUPacked

    reference = VisionTransformer(**{**TINY, "mlp_ratio": 2.0}, mlp_layer=SwiGLUPacked)
    with pytest.raises(NotImplementedError, match="gated MLP"):
        vitrail_config_from_timm(reference.state_dict(), num_heads=4)


def test_unknown_tensor_is_named(tmp_path):
    reference = make_timm()
    state = {**reference.state_dict(), "blocks.1.attn.mystery_scale": torch.ones(4)}
    folder = save_folder(tmp_path, reference, timm_config(reference, num_heads=4), state=state)
    with pytest.raises(ValueError, match="blocks.1.attn.mystery_scale"):
        load_timm_checkpoint(folder)


def test_non_square_grid_without_config_is_refused(tmp_path):
    reference = make_timm(img_size=(16, 40))  # 2 x 5 patches + 1 class token = 11 positions, not a square
    with pytest.raises(ValueError, match="input_size"):
        vitrail_config_from_timm(reference.state_dict(), num_heads=4)


def test_config_json_contradicting_the_weights_is_refused(tmp_path):
    reference = make_timm()
    config = timm_config(reference, num_heads=4, embed_dim=64)
    with pytest.raises(ValueError, match="embed_dim"):
        load_timm_checkpoint(save_folder(tmp_path, reference, config))


def test_facts_are_read_from_the_tensors():
    reference = make_timm(
        reg_tokens=3, init_values=1e-6, qk_norm=True, qkv_bias=False, img_size=(16, 40), global_pool="avg"
    )
    assert TimmFacts.read(reference.state_dict()) == TimmFacts(
        width=32, depth=2, patch=(8, 8), channels=3, mlp_width=37, num_classes=5, class_token=True,
        distilled=False, registers=3, positions=2 * 5 + 4, fc_norm=True, qk_norm=True, qkv_bias=False,
        layer_scale=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "said, key",
    [
        ({"model_args": {"pre_norm": True}}, "pre_norm"),
        ({"model_args": {"final_norm": False}}, "final_norm"),
        ({"model_args": {"proj_bias": False}}, "proj_bias"),
        ({"model_args": {"reg_tokens": 2}}, "reg_tokens"),
        ({"model_args": {"patch_size": 16}}, "patch_size"),
        ({"num_classes": 7}, "num_classes"),
        ({"num_features": 64}, "num_features"),
    ],
)
def test_config_json_is_reconciled_with_the_tensors(said, key):
    """Whatever config.json says about an option the tensors show must agree with them, in one comparison."""
    state = make_timm().state_dict()
    timm_config = {**said, "model_args": {"num_heads": 4, **said.get("model_args", {})}}
    with pytest.raises(ValueError, match=f"config.json says {key}=.*the weights say"):
        vitrail_config_from_timm(state, timm_config=timm_config)


def test_inconsistent_state_dicts_are_named_by_the_rename_engine(tmp_path):
    """What the engine checks for every format is not checked again here, and is still refused by name."""
    reference = make_timm()
    state = reference.state_dict()
    config = vitrail_config_from_timm(state, num_heads=4)
    both_norms = {**state, "fc_norm.weight": state["norm.weight"], "fc_norm.bias": state["norm.bias"]}
    with pytest.raises(ValueError, match=r"already filled: \['fc_norm.bias', 'fc_norm.weight'\]"):
        convert_timm_state_dict(both_norms, config)
    gap = {k.replace("blocks.1.", "blocks.2."): v for k, v in state.items()}  # blocks 0 and 2
    folder = save_folder(tmp_path, reference, timm_config(reference, num_heads=4), state=gap)
    with pytest.raises(ValueError, match=r"missing \['vitrail.encoder.layers.1.attention.proj.bias'"):
        load_timm_checkpoint(folder)


def test_pickle_needs_allow_pickle(tmp_path):
    reference = make_timm(reg_tokens=1)
    file = tmp_path / "model.pth"
    torch.save({"state_dict": reference.state_dict()}, file)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_timm_checkpoint(file, num_heads=4)
    model = load_timm_checkpoint(file, num_heads=4, allow_pickle=True)
    pixels = pixels_for(reference)
    assert (model_outputs(model, pixels) - timm_outputs(reference, pixels)).abs().max() <= TOLERANCE
    # A timm Hub folder with only pytorch_model.bin, through from_pretrained: the same policy.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(timm_config(reference, num_heads=4, reg_tokens=1)))
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin is a pickle.*allow_pickle=True"):
        VitrailForImageClassification.from_pretrained(folder)
    model = VitrailForImageClassification.from_pretrained(folder, allow_pickle=True)
    assert (model_outputs(model, pixels) - timm_outputs(reference, pixels)).abs().max() <= TOLERANCE


def test_convert_state_dict_direct(tmp_path):
    reference = make_timm(num_classes=0)
    config = vitrail_config_from_timm(reference.state_dict(), num_heads=4)
    converted = convert_timm_state_dict(reference.state_dict(), config, VitrailModel)
    assert "embeddings.cls_token" in converted and "layernorm.weight" in converted
    with pytest.raises(ValueError, match="no head"):
        convert_timm_state_dict(reference.state_dict(), config, VitrailForImageClassification)


def test_is_timm_config():
    assert is_timm_config({"architecture": "vit_base_patch16_224", "num_classes": 1000})
    assert not is_timm_config({"model_type": "vit", "architectures": ["ViTForImageClassification"]})
    assert not is_timm_config({"architecture": "x", "model_type": "vitrail"})
    assert is_timm_config({"architecture": "x", "model_type": "timm_wrapper"})  # as transformers reads it


@pytest.mark.parametrize(
    "options",
    [{}, dict(reg_tokens=4), dict(reg_tokens=2, no_embed_class=True, global_pool="avg")],
    ids=["cls", "reg4_all", "reg2_no_embed_class_avg"],
)
def test_reference_at_another_size_matches_set_image_size(tmp_path, options, caplog):
    """timm resamples its positions at run time (dynamic_img_size); vitrail's set_image_size resamples the table
    once with the same antialiased bicubic: both give the same outputs at 48 x 56 px (6 x 7 patches vs 4 x 4)."""
    reference = make_timm(**options)
    with caplog.at_level(logging.INFO):
        converted = open_source(save_folder(tmp_path, reference, timm_config(reference, num_heads=4)))
    model = converted.model
    pixels = pixels_for(reference)
    assert (model_outputs(model, pixels) - converted.reference(pixels)).abs().max() <= TOLERANCE
    bigger = pixels_for(reference, (48, 56))
    model.set_image_size((48, 56))
    diff = (model_outputs(model, bigger) - converted.reference(bigger)).abs().max().item()
    print(f"max abs diff at 48x56 {options}: {diff:.3e}")
    assert diff <= TOLERANCE
    assert converted.processor is not None


def test_open_source_backbone_reference_is_forward_features(tmp_path):
    reference = make_timm(num_classes=0, global_pool="avg")
    converted = open_source(save_folder(tmp_path, reference, timm_config(reference, num_heads=4)))
    pixels = pixels_for(reference)
    want = timm_outputs(reference, pixels)
    assert converted.reference(pixels).shape == want.shape == (2, 17, 32)
    assert (model_outputs(converted.model, pixels) - want).abs().max() <= TOLERANCE


# ---- distilled DeiT (timm VisionTransformerDistilled) -------------------------------------------------------------

DEIT_ARCH = "deit_tiny_distilled_patch16_224"  # timm's name; model_args shrink it to TINY
TINY_ARGS = {k: v for k, v in TINY.items() if k != "num_classes"}


def make_distilled(seed: int = 0, **options) -> VisionTransformerDistilled:
    return make_timm(seed, cls=VisionTransformerDistilled, **options)


@pytest.mark.parametrize(
    "architecture", [DEIT_ARCH, UNKNOWN_ARCH], ids=["deit_tiny_distilled", "unknown_name"]
)
def test_distilled_deit_parity(tmp_path, architecture):
    """Both heads land where timm has them: the logits are timm's eval-mode average, and each head alone matches
    timm's `head` / `head_dist` on its own token of timm's features."""
    reference = make_distilled()
    config = timm_config(reference, architecture, **TINY_ARGS)
    converted = open_source(save_folder(tmp_path, reference, config))
    model = converted.model
    assert type(model) is VitrailForImageClassification
    assert model.config.use_distillation_token and model.config.prefix_position_embeddings == "all"
    assert model.config.pooling == "cls" and not model.config.use_fc_norm
    pixels = pixels_for(reference)
    with torch.no_grad():
        out = model(pixel_values=pixels)
        features = reference.forward_features(pixels)
        want_cls, want_dist = reference.head(features[:, 0]), reference.head_dist(features[:, 1])
        want = reference(pixels)
    diffs = {
        "logits": (out.logits - want).abs().max().item(),
        "cls_logits": (out.cls_logits - want_cls).abs().max().item(),
        "distillation_logits": (out.distillation_logits - want_dist).abs().max().item(),
        "reference": (out.logits - converted.reference(pixels)).abs().max().item(),
    }
    print(f"distilled {architecture}: " + ", ".join(f"{k} {v:.3e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE
    assert (want - (want_cls + want_dist) / 2).abs().max() <= TOLERANCE  # timm's eval output is the average
    vitrail_dist = model.vitrail.embeddings.distillation_token
    assert torch.equal(vitrail_dist, reference.dist_token)
    assert any("VisionTransformerDistilled" in n or "create_model" in n for n in converted.notes)


def test_distilled_backbone_is_a_vitrail_model(tmp_path):
    reference = make_distilled(num_classes=0)
    folder = save_folder(tmp_path, reference, timm_config(reference, DEIT_ARCH, **TINY_ARGS))
    converted = open_source(folder)
    model = converted.model
    assert type(model) is VitrailModel and model.config.use_distillation_token
    assert torch.equal(model.embeddings.distillation_token, reference.dist_token)
    pixels = pixels_for(reference)
    want = timm_outputs(reference, pixels)
    assert want.shape == (2, 18, 32)  # cls, dist, 16 patches
    diff = (model_outputs(model, pixels) - want).abs().max().item()
    print(f"distilled backbone: {diff:.3e}")
    assert diff <= TOLERANCE
    assert (converted.reference(pixels) - want).abs().max() <= TOLERANCE
    # No config.json: everything is read off the tensors.
    config = vitrail_config_from_timm(reference.state_dict(), num_heads=4)
    assert config.use_distillation_token and config.num_labels == 0 and list(config.image_hw) == [32, 32]


def test_distilled_reference_at_another_size(tmp_path):
    """VisionTransformerDistilled resamples its positions at run time with dynamic_img_size=True (cls and dist rows
    kept); vitrail's set_image_size does the same once."""
    reference = make_distilled()
    converted = open_source(save_folder(tmp_path, reference, timm_config(reference, **TINY_ARGS)))
    bigger = pixels_for(reference, (48, 56))
    converted.model.set_image_size((48, 56))
    diff = (model_outputs(converted.model, bigger) - converted.reference(bigger)).abs().max().item()
    print(f"distilled at 48x56: {diff:.3e}")
    assert diff <= TOLERANCE


def _drop(*keys):
    return lambda state: [state.pop(k) for k in keys]


def _norm_to_fc_norm(state):
    state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (_drop("head_dist.weight", "head_dist.bias"), ValueError, "head_dist"),
        (_drop("dist_token"), ValueError, "dist_token"),
        (lambda s: s.update(reg_token=torch.zeros(1, 2, 32)), NotImplementedError, "reg_token"),
        (_norm_to_fc_norm, NotImplementedError, "fc_norm"),
        (lambda s: s.update(pos_embed=s["pos_embed"][:, 2:]), NotImplementedError, "no_embed_class"),
    ],
    ids=["no_head_dist", "head_dist_without_token", "registers", "fc_norm", "no_embed_class"],
)
def test_distilled_inconsistencies_are_refused(edit, error, match):
    state = dict(make_distilled().state_dict())
    edit(state)
    with pytest.raises(error, match=match):
        vitrail_config_from_timm(state, timm_config={"model_args": {"num_heads": 4}})


def test_distilled_architecture_must_match_the_weights(tmp_path):
    reference = make_timm()
    config = timm_config(reference, DEIT_ARCH, **TINY_ARGS)
    with pytest.raises(ValueError, match="VisionTransformerDistilled"):
        load_timm_checkpoint(save_folder(tmp_path, reference, config))


# ---- preprocessing ------------------------------------------------------------------------------------------------


def _photo() -> PIL.Image.Image:
    from sklearn.datasets import load_sample_images

    return PIL.Image.fromarray(load_sample_images().images[0])  # china.jpg, 640 x 427


def _synthetic(width: int, height: int) -> PIL.Image.Image:
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def _processor_diff(pretrained_cfg: dict, image: PIL.Image.Image) -> float:
    want = create_transform(**resolve_data_config(pretrained_cfg=pretrained_cfg), is_training=False)(image)
    got = timm_image_processor(pretrained_cfg)(image, return_tensors="pt")["pixel_values"][0]
    assert got.shape == want.shape
    return (got - want).abs().max().item()


# Bicubic: the resize and the crop are the same PIL operations on both sides and the normalisation the same float32
# arithmetic, so the pixels agree exactly (measured 0.0); 1e-6 leaves room for a different operation order only.
PIXEL_TOLERANCE = 1e-6
# Bilinear: vitrail resizes with torch's antialiased kernel (as transformers' torchvision backend), timm's transform
# with PIL; a few pixels differ by one 8-bit level, i.e. 1/255 over the smallest ImageNet std (measured 1.751e-02).
BILINEAR_TOLERANCE = 1 / 255 / 0.224 + 1e-6


@pytest.mark.parametrize(
    "pretrained_cfg, size",
    [
        # 300 x 200 -> shorter side floor(224 / 0.875) = 256, 384 x 256, crop margins 160 and 32.
        (dict(input_size=[3, 224, 224], interpolation="bicubic", crop_pct=0.875), (300, 200)),
        # timm's ImageNet-21k fine-tunes: crop_pct 0.9 -> 248; 248 x 372, margins 24 and 148.
        (
            dict(
                input_size=[3, 224, 224], interpolation="bicubic", crop_pct=0.9, mean=[0.5] * 3, std=[0.5] * 3
            ),
            (248, 372),
        ),
        # squash: 640 x 427 -> exactly 80 x 60 (floor(64 / 0.8), floor(48 / 0.8)), margins 16 and 12.
        (
            dict(input_size=[3, 64, 48], interpolation="bilinear", crop_pct=0.8, crop_mode="squash"),
            (640, 427),
        ),
        (
            dict(input_size=[3, 224, 224], interpolation="bicubic", crop_pct=1.0, crop_mode="squash"),
            (640, 427),
        ),
    ],
    ids=["center_0.875", "center_0.9", "squash_non_square", "squash_1.0"],
)
def test_processor_matches_timm_transform(pretrained_cfg, size):
    image = _photo().resize(size) if size != (640, 427) else _photo()
    diff = _processor_diff(pretrained_cfg, image)
    print(f"max abs pixel diff {pretrained_cfg.get('crop_mode', 'center')} {size}: {diff:.3e}")
    assert diff <= (BILINEAR_TOLERANCE if pretrained_cfg["interpolation"] == "bilinear" else PIXEL_TOLERANCE)


def test_processor_odd_crop_margin():
    """640 x 427 at crop_pct 0.9: resized to 371 x 248, a horizontal margin of 147 px. torchvision puts the crop at
    round(73.5) = 74, transformers' center_crop at 73."""
    cfg = dict(input_size=[3, 224, 224], interpolation="bicubic", crop_pct=0.9)
    assert _processor_diff(cfg, _photo()) <= PIXEL_TOLERANCE


def test_processor_refuses_what_it_cannot_do():
    with pytest.raises(NotImplementedError, match="border"):
        timm_image_processor(dict(input_size=[3, 224, 224], crop_mode="border"))
    with pytest.raises(NotImplementedError, match="non-square"):
        timm_image_processor(dict(input_size=[3, 224, 160], crop_mode="center"))
    with pytest.raises(NotImplementedError, match="random"):
        timm_image_processor(dict(input_size=[3, 224, 224], interpolation="random"))


# ---- the front doors: from_pretrained, load_image_processor and the script --------------------------------------


def test_from_pretrained_opens_a_timm_folder(tmp_path):
    from vitrail.convert import load_image_processor

    reference = make_timm(reg_tokens=2, global_pool="avg")
    folder = save_folder(tmp_path / "timm", reference, timm_config(reference, num_heads=TINY["num_heads"]))
    model = VitrailForImageClassification.from_pretrained(folder)
    pixels = pixels_for(reference)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, timm_outputs(reference, pixels), atol=1e-5, rtol=0)
    assert isinstance(VitrailModel.from_pretrained(folder), VitrailModel)
    processor = load_image_processor(folder)
    assert processor.center_crop_rounding == "round" and processor.crop_size["height"] == TINY["img_size"]


def test_script_from_timm(tmp_path, capsys):
    script = load_script("scripts/convert_checkpoint.py")
    reference = make_timm(no_embed_class=True, reg_tokens=1)
    src = save_folder(tmp_path / "timm", reference, timm_config(reference, num_heads=TINY["num_heads"]))
    size = TINY["img_size"] + 2 * TINY["patch_size"]
    argv = [
        "--from",
        "timm",
        "--input",
        str(src),
        "--output",
        str(tmp_path / "out"),
        "--image-size",
        str(size),
    ]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert f"(resampled to {size}x{size}): 0.000e+00" in out and "max abs logit difference: 0.000e+00" in out
    saved = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert saved["crop_size"] == {"height": size, "width": size} and saved["center_crop_rounding"] == "round"
