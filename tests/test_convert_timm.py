"""timm checkpoints into vitrail: small random timm models, every parameter perturbed (a fresh model has identity
norms and zero biases, which would hide a misplaced tensor), saved as timm's `save_for_hf` writes them, then
converted and compared output for output with timm itself. tests/test_timm_coverage.py runs every pretrained
architecture of timm's ViT families the same way; this file checks the converter's parts one by one."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

from vitrail import VitrailConfig, VitrailForImageClassification, VitrailModel  # noqa: E402
from vitrail.convert.common import model_outputs  # noqa: E402
from vitrail.convert.timm import (  # noqa: E402
    TIMM_REFUSALS,
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
ARCH = "vit_base_patch16_224"  # shrunk by TINY; timm records the overrides in config.json's model_args


def make_timm(seed: int = 0, architecture: str = ARCH, **options) -> torch.nn.Module:
    """timm's `architecture` built with TINY and `options`, every parameter perturbed, in eval mode."""
    model = timm.create_model(architecture, pretrained=False, **{**TINY, **options})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def timm_config(model: torch.nn.Module, **model_args) -> dict:
    """config.json as timm's `save_for_hf` writes it for `model`, with `model_args` added."""
    with tempfile.TemporaryDirectory() as folder:
        save_for_hf(model, folder)
        config = json.loads((Path(folder) / "config.json").read_text())
    config["model_args"] = {**config.get("model_args", {}), **model_args}
    return config


def save_folder(folder, model, config: dict | None = None, state: dict | None = None):
    """`model`'s weights (or `state`) as model.safetensors in `folder`, with `config` as config.json if given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def pixels_for(model, size=None) -> torch.Tensor:
    height, width = size or model.patch_embed.img_size
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))


def timm_outputs(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixels) if model.num_classes else model.forward_features(pixels)


def assert_parity(model, reference, size=None) -> None:
    pixels = pixels_for(reference, size)
    diff = (model_outputs(model, pixels) - timm_outputs(reference, pixels)).abs().max().item()
    print(f"max abs diff: {diff:.3e}")
    assert diff <= TOLERANCE


# (id, architecture, timm options): the option sets of timm's ViT checkpoints on the Hub.
PARITY_CASES = [
    ("plain", ARCH, {}),
    ("reg4", ARCH, dict(reg_tokens=4)),
    ("reg4_no_embed_class", ARCH, dict(reg_tokens=4, no_embed_class=True)),
    ("avg_fc_norm", ARCH, dict(global_pool="avg")),
    ("avg_no_fc_norm", ARCH, dict(global_pool="avg", fc_norm=False)),
    ("token_fc_norm", ARCH, dict(global_pool="token", fc_norm=True)),
    ("layer_scale", ARCH, dict(init_values=1e-5)),
    ("qk_norm", ARCH, dict(qk_norm=True)),
    ("no_qkv_bias", ARCH, dict(qkv_bias=False)),
    ("no_class_token_avg", ARCH, dict(class_token=False, global_pool="avg")),
    ("no_pos_embed", ARCH, dict(pos_embed="none")),
    ("non_square", ARCH, dict(img_size=(24, 40))),
    ("backbone", ARCH, dict(num_classes=0)),
    ("backbone_avg_fc_norm", ARCH, dict(num_classes=0, global_pool="avg", reg_tokens=2)),
    ("gelu_tanh", ARCH, dict(act_layer="gelu_tanh")),
    ("quick_gelu", ARCH, dict(act_layer="quick_gelu")),
    ("swiglu_packed_dinov2", "vit_small_patch14_dinov2", dict(patch_size=14, img_size=28, mlp_ratio=2.0)),
    ("deit3_no_embed_class", "deit3_small_patch16_224", dict(mlp_ratio=2.0)),
    # Eva's layout with SwiGLU's separate gate (`fc1_g`) and value (`fc1_x`), joined into vitrail's `[gate; value]`.
    ("eva_swiglu", "eva02_tiny_patch14_224", dict(use_rot_pos_emb=False, qkv_bias=False, swiglu_align_to=8)),
    # The other ViT families' options, each through the architecture that has it.
    ("clip_pre_norm", "vit_base_patch16_clip_224", {}),
    ("siglip_map_gelu_tanh", "vit_base_patch16_siglip_224", {}),
    ("aimv2_rmsnorm_patch_norm_no_biases", "aimv2_large_patch14_224", {}),
    ("eva02_rope_qv_bias_inner_norms", "eva02_tiny_patch14_224", {}),
    ("eva02_separate_qkv", "eva02_tiny_patch14_224", dict(qkv_fused=False)),
    ("rope_mixed_learned_frequencies", "vit_base_patch16_rope_mixed_224", {}),
    ("dinov3_centered_half_rope", "vit_small_patch16_dinov3", {}),
    ("pe_core_map_own_heads", "vit_pe_core_tiny_patch16_384", {}),
    ("beit_table", "beit_base_patch16_224", {}),
    ("relpos_mlp", "vit_relpos_small_patch16_224", {}),
    ("relpos_mlp_shared", "vit_srelpos_small_patch16_224", {}),
]


@pytest.mark.parametrize(
    "architecture, options", [c[1:] for c in PARITY_CASES], ids=[c[0] for c in PARITY_CASES]
)
def test_parity_with_timm(tmp_path, architecture, options):
    reference = make_timm(architecture=architecture, **options)
    model = load_timm_checkpoint(save_folder(tmp_path, reference, timm_config(reference)))
    assert type(model) is (VitrailForImageClassification if reference.num_classes else VitrailModel)
    assert_parity(model, reference)


def test_config_is_read_from_timms_modules(tmp_path):
    reference = make_timm(
        reg_tokens=3, init_values=1e-6, qk_norm=True, img_size=(16, 40), act_layer="gelu_tanh"
    )
    config = vitrail_config_from_timm(reference.state_dict(), timm_config=timm_config(reference))
    assert config.hidden_size == 32 and config.num_hidden_layers == 2 and config.num_attention_heads == 4
    assert config.intermediate_size == 37 and config.patch_size == 8 and list(config.image_hw) == [16, 40]
    assert config.num_register_tokens == 3 and config.prefix_position_embeddings == "all"
    assert config.layer_scale_init_value == 1e-6 and config.qk_norm and config.layer_norm_eps == 1e-6
    assert config.hidden_act == "gelu_pytorch_tanh" and config.pooling == "cls" and not config.use_fc_norm
    assert config.position_interpolation == "bicubic_antialias" and not config.dynamic_image_size
    assert config.num_labels == 5 and config.id2label[0] == "LABEL_0"
    named = vitrail_config_from_timm(
        reference.state_dict(), timm_config=timm_config(reference), id2label=dict(enumerate("abcde"))
    )
    assert named.id2label[4] == "e" and named.label2id["a"] == 0
    dynamic = make_timm(dynamic_img_size=True, global_pool="avg")
    config = vitrail_config_from_timm(dynamic.state_dict(), timm_config=timm_config(dynamic))
    assert config.dynamic_image_size and config.pooling == "mean" and config.use_fc_norm


def test_labels_from_label_names(tmp_path):
    reference = make_timm()
    config = timm_config(reference)
    config["label_names"] = ["tench", "goldfish", "shark", "tiger shark", "hammerhead"]
    model = load_timm_checkpoint(save_folder(tmp_path, reference, config))
    assert model.config.id2label[3] == "tiger shark" and model.config.label2id["tench"] == 0


def test_bare_weight_file_with_the_architecture_named(tmp_path):
    """No config.json: `architecture=` names timm's model (here the full-size DeiT-Ti, timm's defaults)."""
    reference = make_timm(
        architecture="deit_tiny_patch16_224", **{k: None for k in TINY if k != "num_classes"}
    )
    file = save_folder(tmp_path, reference) / "model.safetensors"
    with pytest.raises(ValueError, match="which needs its architecture.*architecture="):
        load_timm_checkpoint(file)
    model = load_timm_checkpoint(file, architecture="deit_tiny_patch16_224.fb_in1k")
    assert model.config.hidden_size == 192 and model.config.num_labels == 5  # the head's rows
    assert_parity(model, reference)


@pytest.mark.parametrize(
    "architecture, options, key",
    [
        (ARCH, dict(global_pool="avgmax"), "pool_max"),
        (ARCH, dict(global_pool="avg", pool_include_prefix=True), "pool_prefix"),
        (ARCH, dict(attn_layer="diff"), "diff_attention"),
        (ARCH, dict(reg_tokens=1, global_pool="map"), "pool_map"),
        ("vit_small_r26_s32_224", dict(img_size=64, patch_size=1), "hybrid"),
        ("vit_base_patch16_rpn_224", {}, "post_norm"),
        ("vit_base_patch16_sapiens2", dict(num_kv_heads=(4, 4)), "layer_scale"),
        ("vit_large_patch16_sapiens2", dict(num_kv_heads=(4, 2)), "grouped_query"),
        (
            "samvit_base_patch16",
            dict(img_size=64, global_attn_indexes=(1,), window_size=2, neck_chans=8),
            "sam",
        ),
        ("qwen3_vit_88m", dict(img_size=64), "vlm"),
    ],
    ids=[
        "avgmax",
        "pool_include_prefix",
        "diff",
        "map_patches_only",
        "hybrid",
        "post_norm",
        "layer_scale_on_attention_only",
        "grouped_query",
        "sam",
        "vlm",
    ],  # fmt: skip
)
def test_what_vitrail_lacks_is_refused_by_name(tmp_path, architecture, options, key):
    """One sentence of TIMM_REFUSALS names the feature, before any weight is read (they are not blamed)."""
    args = dict(depth=2, embed_dim=32, num_heads=4, num_classes=5, img_size=32, patch_size=8)
    reference = timm.create_model(architecture, pretrained=False, **{**args, **options})
    save_for_hf(reference, tmp_path, safe_serialization=True)
    with pytest.raises(NotImplementedError, match=f"^timm's .*{re.escape(TIMM_REFUSALS[key])}") as refused:
        load_timm_checkpoint(tmp_path)
    assert "vitrail cannot reproduce that, so nothing is converted" in str(refused.value)


def test_hybrid_is_refused_by_name_through_from_pretrained(tmp_path):
    """A hybrid's convolutional stem (MobileCLIP's) has BatchNorm counters, integer tensors: the stem is named, the
    weights are not called damaged."""
    reference = timm.create_model("vit_base_mci_224", pretrained=False, depth=1, num_classes=5, img_size=64)
    assert any(v.dtype == torch.int64 for v in reference.state_dict().values())
    save_for_hf(reference, tmp_path, safe_serialization=True)
    with pytest.raises(NotImplementedError, match=re.escape(TIMM_REFUSALS["hybrid"])):
        VitrailForImageClassification.from_pretrained(tmp_path)


# (TIMM_REFUSALS key = the VitrailConfig field, timm options needing it)
NEW_FIELDS = [
    ("pre_norm", dict(pre_norm=True)),
    ("final_norm", dict(final_norm=False)),
    ("proj_bias", dict(proj_bias=False)),
    ("mlp_norm", dict(scale_mlp_norm=True)),
    ("attention_norm", dict(scale_attn_norm=True)),
    ("map_intermediate_size", dict(global_pool="map", class_token=False)),
    ("patch_embedding_norm", dict(embed_norm_layer="layernorm")),
    ("norm_type", dict(norm_layer="rmsnorm")),
]


@pytest.mark.parametrize("field, options", NEW_FIELDS, ids=[f[0] for f in NEW_FIELDS])
def test_an_option_loads_once_vitrail_has_its_field(tmp_path, field, options):
    """A timm option vitrail reproduces through a VitrailConfig field loads with parity where the field exists,
    and is refused naming it where it does not."""
    reference = make_timm(**options)
    folder = save_folder(tmp_path, reference, timm_config(reference))
    if field in VitrailConfig.__dataclass_fields__:
        assert_parity(load_timm_checkpoint(folder), reference)
    else:
        with pytest.raises(NotImplementedError, match=re.escape(TIMM_REFUSALS[field])):
            load_timm_checkpoint(folder)


def test_without_timm_the_converter_asks_for_it(tmp_path, monkeypatch):
    reference = make_timm()
    folder = save_folder(tmp_path, reference, timm_config(reference))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install timm"):
        load_timm_checkpoint(folder)


def test_an_architecture_timm_does_not_know_is_named(tmp_path):
    reference = make_timm()
    config = {**timm_config(reference), "architecture": "vit_from_the_future_patch16"}
    with pytest.raises(ValueError, match="has no architecture 'vit_from_the_future_patch16': upgrade timm"):
        load_timm_checkpoint(save_folder(tmp_path, reference, config))


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda s: s.update({"blocks.1.attn.mystery_scale": torch.ones(4)}),
            r"unexpected \['blocks.1.attn.myst",
        ),
        (lambda s: s.pop("blocks.1.attn.proj.bias"), r"missing \['blocks.1.attn.proj.bias'\]"),
        (
            lambda s: s.update(pos_embed=s["pos_embed"][:, 1:]),
            r"pos_embed': \(\(1, 16, 32\), \(1, 17, 32\)\)",
        ),
    ],
    ids=["unknown_tensor", "missing_tensor", "wrong_shape"],
)
def test_weights_that_are_not_timms_model_are_named(tmp_path, edit, match):
    reference = make_timm()
    state = dict(reference.state_dict())
    edit(state)
    with pytest.raises(ValueError, match=f"The weights are not those of timm's {ARCH}.*{match}"):
        load_timm_checkpoint(save_folder(tmp_path, reference, timm_config(reference), state=state))


def test_config_json_contradicting_the_weights_is_refused(tmp_path):
    reference = make_timm()
    config = timm_config(reference, embed_dim=64)
    with pytest.raises(ValueError, match="model_args.*must be those the weights were saved with"):
        load_timm_checkpoint(save_folder(tmp_path, reference, config))


def test_rename_engine_still_checks_every_tensor():
    reference = make_timm()
    state = reference.state_dict()
    config = vitrail_config_from_timm(state, timm_config=timm_config(reference))
    both_norms = {**state, "fc_norm.weight": state["norm.weight"], "fc_norm.bias": state["norm.bias"]}
    with pytest.raises(ValueError, match=r"already filled: \['fc_norm.bias', 'fc_norm.weight'\]"):
        convert_timm_state_dict(both_norms, config)


def test_pickle_needs_allow_pickle(tmp_path):
    reference = make_timm(reg_tokens=1)
    (tmp_path / "config.json").write_text(json.dumps(timm_config(reference)))
    file = tmp_path / "model.pth"
    torch.save({"state_dict": reference.state_dict()}, file)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_timm_checkpoint(file)
    assert_parity(load_timm_checkpoint(file, allow_pickle=True), reference)
    # A timm Hub folder with only pytorch_model.bin, through from_pretrained: the same policy.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(timm_config(reference)))
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin is a pickle.*allow_pickle=True"):
        VitrailForImageClassification.from_pretrained(folder)
    assert_parity(VitrailForImageClassification.from_pretrained(folder, allow_pickle=True), reference)


def test_convert_state_dict_direct():
    reference = make_timm(num_classes=0)
    config = vitrail_config_from_timm(reference.state_dict(), timm_config=timm_config(reference))
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
        converted = open_source(save_folder(tmp_path, reference, timm_config(reference)))
    model = converted.model
    pixels = pixels_for(reference)
    assert (model_outputs(model, pixels) - converted.reference(pixels)).abs().max() <= TOLERANCE
    bigger = pixels_for(reference, (48, 56))
    model.set_image_size((48, 56))
    diff = (model_outputs(model, bigger) - converted.reference(bigger)).abs().max().item()
    print(f"max abs diff at 48x56 {options}: {diff:.3e}")
    assert diff <= TOLERANCE
    assert converted.processor is not None
    assert "read from its modules" in caplog.text


def test_open_source_backbone_reference_is_forward_features(tmp_path):
    reference = make_timm(num_classes=0, global_pool="avg")
    converted = open_source(save_folder(tmp_path, reference, timm_config(reference)))
    pixels = pixels_for(reference)
    want = timm_outputs(reference, pixels)
    assert converted.reference(pixels).shape == want.shape == (2, 17, 32)
    assert (model_outputs(converted.model, pixels) - want).abs().max() <= TOLERANCE


# ---- distilled DeiT (timm VisionTransformerDistilled) -------------------------------------------------------------

DEIT_ARCH = "deit_tiny_distilled_patch16_224"


def test_distilled_deit_parity(tmp_path):
    """Both heads land where timm has them: the logits are timm's eval-mode average, and each head alone matches
    timm's `head` / `head_dist` on its own token of timm's features."""
    reference = make_timm(architecture=DEIT_ARCH)
    converted = open_source(save_folder(tmp_path, reference, timm_config(reference)))
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
    print("distilled: " + ", ".join(f"{k} {v:.3e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE
    assert (want - (want_cls + want_dist) / 2).abs().max() <= TOLERANCE  # timm's eval output is the average
    assert torch.equal(model.vitrail.embeddings.distillation_token, reference.dist_token)


def test_distilled_backbone_is_a_vitrail_model(tmp_path):
    reference = make_timm(architecture=DEIT_ARCH, num_classes=0)
    converted = open_source(save_folder(tmp_path, reference, timm_config(reference)))
    model = converted.model
    assert type(model) is VitrailModel and model.config.use_distillation_token
    assert torch.equal(model.embeddings.distillation_token, reference.dist_token)
    pixels = pixels_for(reference)
    want = timm_outputs(reference, pixels)
    assert want.shape == (2, 18, 32)  # cls, dist, 16 patches
    assert (model_outputs(model, pixels) - want).abs().max() <= TOLERANCE
    assert (converted.reference(pixels) - want).abs().max() <= TOLERANCE


def test_distilled_reference_at_another_size(tmp_path):
    """VisionTransformerDistilled resamples its positions at run time with dynamic_img_size=True (cls and dist rows
    kept); vitrail's set_image_size does the same once."""
    reference = make_timm(architecture=DEIT_ARCH)
    converted = open_source(save_folder(tmp_path, reference, timm_config(reference)))
    bigger = pixels_for(reference, (48, 56))
    converted.model.set_image_size((48, 56))
    diff = (model_outputs(converted.model, bigger) - converted.reference(bigger)).abs().max().item()
    print(f"distilled at 48x56: {diff:.3e}")
    assert diff <= TOLERANCE


def test_distilled_with_parts_timm_never_runs_is_refused(tmp_path):
    """timm's VisionTransformerDistilled builds register tokens and fc_norm when asked, then never uses them;
    vitrail would, so the logits would differ."""
    reference = make_timm(architecture=DEIT_ARCH, reg_tokens=2)
    with pytest.raises(NotImplementedError, match=re.escape(TIMM_REFUSALS["distilled_unused"])):
        load_timm_checkpoint(save_folder(tmp_path, reference, timm_config(reference)))


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
