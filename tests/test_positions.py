"""Positions inside attention: query/value-only biases (`key_bias=False`), 2D rotary embeddings (`rope_type`) and
relative position biases (`relative_position_bias`).

The math is proved against the references themselves, built tiny with random weights and copied into vitrail
through a name map kept here: timm's `Eva` (EVA-02, Perception Encoder, RoPE-ViT axial and mixed, DINOv3), timm's
`Beit` and `VisionTransformerRelPos`, transformers' `DINOv3ViTModel` and `BeitModel`, at their native grid and at
others where the reference runs there. Then each option through the rest of the model: eager == sdpa, chosen-layer
attentions, the backbone, `torch.export` with a dynamic size, gradient checkpointing, and a save loaded where
vitrail is not installed."""

import math
import re
import textwrap
from functools import partial

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import save_file
from torch import nn

from vitrail import VitrailBackbone, VitrailConfig, VitrailForImageClassification, VitrailModel
from vitrail.export import export_program

from .conftest import randomise, run_without_vitrail, tiny_config

timm = pytest.importorskip("timm", reason="the parity references are timm's own modules")
from timm.models.beit import Beit  # noqa: E402
from timm.models.eva import Eva  # noqa: E402
from timm.models.vision_transformer_relpos import VisionTransformerRelPos  # noqa: E402
from transformers import BeitConfig, BeitModel, DINOv3ViTConfig, DINOv3ViTModel  # noqa: E402

# A non-square native grid (6 x 4 patches of 4 px), so that a swapped axis cannot hide; two other grids, one
# larger and one with the other aspect, for the run-time rules.
NATIVE = (24, 16)
OTHERS = ((32, 20), (16, 28))
SHAPE = dict(
    image_size=NATIVE,
    patch_size=4,
    encoder_stride=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    layer_norm_eps=1e-6,
    num_labels=3,
)


def images(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ---- the name maps (timm -> vitrail) ------------------------------------------------------------------------

TIMM_NAMES = [
    (r"^patch_embed\.proj\.", "vitrail.embeddings.patch_embeddings.projection."),
    (r"^cls_token$", "vitrail.embeddings.cls_token"),
    (r"^reg_token$", "vitrail.embeddings.register_tokens"),
    (r"^pos_embed$", "vitrail.embeddings.position_embeddings"),
    (r"^blocks\.(\d+)\.attn\.", r"vitrail.encoder.layers.\1.attention."),
    (r"^blocks\.(\d+)\.(?:gamma_|ls)(\d)(?:\.gamma)?$", r"vitrail.encoder.layers.\1.layer_scale\2.scale"),
    (r"^blocks\.(\d+)\.", r"vitrail.encoder.layers.\1."),
    (r"\.rel_pos\.", ".relative_position_bias."),
    (r"\.?relative_position_bias_table$", ".relative_position_bias.table"),
    (r"^rel_pos_bias\.", "vitrail.encoder."),
    (r"^shared_rel_pos\.", "vitrail.encoder.relative_position_bias."),
    (r"^norm\.", "vitrail.layernorm."),
    (r"^head\.", "classifier."),
]


def renamed(state: dict, rules) -> dict:
    out = {}
    for name, tensor in state.items():
        for pattern, replacement in rules:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor
    return out


def fold_qkv(state: dict) -> dict:
    """Separate q/k/v projections (timm Eva unfused, transformers) into vitrail's fused `qkv`, a key bias absent
    or present deciding between `q_bias` + `v_bias` and one fused bias."""
    for prefix in sorted({n[: -len("q_proj.weight")] for n in state if n.endswith("q_proj.weight")}):
        weights = [state.pop(f"{prefix}{x}_proj.weight") for x in "qkv"]
        state[f"{prefix}qkv.weight"] = torch.cat(weights)
        biases = {x: state.pop(f"{prefix}{x}_proj.bias", None) for x in "qkv"}
        if biases["k"] is not None:
            state[f"{prefix}qkv.bias"] = torch.cat(list(biases.values()))
        elif biases["q"] is not None:
            state[f"{prefix}q_bias"], state[f"{prefix}v_bias"] = biases["q"], biases["v"]
    return state


def load_into(model: nn.Module, state: dict) -> nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def from_timm(reference: nn.Module, **options) -> VitrailForImageClassification:
    state = renamed(reference.state_dict(), TIMM_NAMES)
    if "rope.freqs" in state:  # RoPE-Mixed: (2, depth, heads, head_dim / 2), one slice per layer
        for i, freqs in enumerate(state.pop("rope.freqs").unbind(1)):
            state[f"vitrail.encoder.layers.{i}.attention.rope_freqs"] = freqs
    model = VitrailForImageClassification(VitrailConfig(**{**SHAPE, **options}))
    return load_into(model, fold_qkv(state))


def timm_eva(**kwargs) -> Eva:
    model = Eva(
        img_size=NATIVE,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=4,
        mlp_ratio=37 / 32,
        num_classes=3,
        global_pool="token",
        use_fc_norm=False,
        init_values=0.1,
        dynamic_img_size=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **kwargs,
    )
    return randomise(model)


# Each timm layout that pretrained EVA-02 / PE / RoPE-ViT / DINOv3 tags use, and the vitrail fields for it.
EVA_LAYOUTS = {
    # EVA-02: q/v biases, a learned absolute table too, RoPE on patch indices rescaled onto the pretraining grid.
    "eva02": (
        dict(use_rot_pos_emb=True, ref_feat_shape=(8, 5)),
        dict(key_bias=False, layer_scale_init_value=0.1, rope_type="axial", rope_reference_grid=(8, 5)),
    ),
    # EVA-02 base/large: separate q, k, v projections (the key without bias).
    "eva02_unfused": (
        dict(use_rot_pos_emb=True, ref_feat_shape=(8, 5), qkv_fused=False),
        dict(key_bias=False, layer_scale_init_value=0.1, rope_type="axial", rope_reference_grid=(8, 5)),
    ),
    # Perception Encoder: full qkv bias, columns first, indices offset by one.
    "pe": (
        dict(attn_type="rope", use_rot_pos_emb=True, ref_feat_shape=(7, 5), rope_grid_offset=1.0,
             rope_grid_indexing="xy"),
        dict(layer_scale_init_value=0.1, rope_type="axial", rope_reference_grid=(7, 5), rope_offset=1.0,
             rope_axis_order="xy"),
    ),
    # RoPE-ViT axial (naver): no absolute positions, base 100.
    "rope_axial": (
        dict(attn_type="rope", use_rot_pos_emb=True, use_abs_pos_emb=False, rope_grid_indexing="xy",
             rope_temperature=100.0),
        dict(layer_scale_init_value=0.1, position_embedding_type="none", rope_type="axial", rope_theta=100.0,
             rope_axis_order="xy"),
    ),
    # RoPE-ViT mixed (naver): learned frequencies per layer and head.
    "rope_mixed": (
        dict(attn_type="rope", use_rot_pos_emb=True, use_abs_pos_emb=False, rope_grid_indexing="xy",
             rope_temperature=10.0, rope_type="mixed"),
        dict(layer_scale_init_value=0.1, position_embedding_type="none", rope_type="mixed", rope_theta=10.0,
             rope_axis_order="xy"),
    ),
    # DINOv3 in timm: registers, centred coordinates, half layout, q/v biases ("qkvb" tags).
    "dinov3": (
        dict(use_rot_pos_emb=True, use_abs_pos_emb=False, rope_type="dinov3", rope_temperature=100,
             rope_rotate_half=True, num_reg_tokens=2),
        dict(key_bias=False, layer_scale_init_value=0.1, position_embedding_type="none", num_register_tokens=2,
             rope_type="axial", rope_theta=100.0, rope_coordinates="centered", rope_layout="half"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("layout", list(EVA_LAYOUTS))
def test_rope_matches_timm_eva_at_every_grid(layout):
    timm_args, options = EVA_LAYOUTS[layout]
    reference = timm_eva(**timm_args)
    model = from_timm(reference, dynamic_image_size=True, **options)
    with torch.no_grad():
        for size in (NATIVE, *OTHERS):
            pixels = images(*size)
            torch.testing.assert_close(
                model(pixels).logits, reference(pixels), atol=1e-5, rtol=0, msg=str(size)
            )
    # The positions matter: without RoPE the same weights give other logits.
    plain = {**options, "rope_type": "none"}
    plain = {k: v for k, v in plain.items() if not k.startswith("rope_") or k == "rope_type"}
    without = load_into(
        VitrailForImageClassification(VitrailConfig(**{**SHAPE, **plain})),
        {name: t for name, t in model.state_dict().items() if not name.endswith("rope_freqs")},
    )
    with torch.no_grad():
        assert (without(images(*NATIVE)).logits - reference(images(*NATIVE))).abs().max() > 1e-3


def test_dinov3_training_augmentation_matches_timm():
    """DINOv3 trains with random coordinate transforms; drawn in the same order from the same seed, they give
    timm's outputs; in eval mode they are off."""
    timm_args, options = EVA_LAYOUTS["dinov3"]
    reference = timm_eva(**timm_args, rope_shift_coords=0.2, rope_jitter_coords=1.3, rope_rescale_coords=2.0)
    model = from_timm(
        reference, rope_train_shift=0.2, rope_train_jitter=1.3, rope_train_rescale=2.0, **options
    )
    pixels = images(*NATIVE)
    with torch.no_grad():
        evaluated = model(pixels).logits
        torch.testing.assert_close(evaluated, reference(pixels), atol=1e-5, rtol=0)
        reference.train(), model.train()
        torch.manual_seed(7)
        expected = reference(pixels)
        torch.manual_seed(7)
        trained = model(pixels).logits
    torch.testing.assert_close(trained, expected, atol=1e-5, rtol=0)
    assert (trained - evaluated).abs().max() > 1e-3


# ---- transformers' DINOv3 -------------------------------------------------------------------------------------


def transformers_dinov3(**kwargs) -> DINOv3ViTModel:
    config = DINOv3ViTConfig(
        image_size=24, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_register_tokens=3, layerscale_value=0.1, **kwargs,
    )  # fmt: skip
    return randomise(DINOv3ViTModel(config))


DINOV3_NAMES = [
    (r"^embeddings\.patch_embeddings\.", "embeddings.patch_embeddings.projection."),
    (r"^model\.layer\.(\d+)\.attention\.o_proj\.", r"encoder.layers.\1.attention.proj."),
    (r"^model\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"encoder.layers.\1.layer_scale\2.scale"),
    (r"^model\.layer\.(\d+)\.mlp\.up_proj\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^model\.layer\.(\d+)\.mlp\.down_proj\.", r"encoder.layers.\1.mlp.fc2."),
    (r"^model\.layer\.", "encoder.layers."),
    (r"^norm\.", "layernorm."),
]
DINOV3_OPTIONS = dict(
    SHAPE, image_size=24, num_labels=0, layer_norm_eps=1e-5, num_register_tokens=3, layer_scale_init_value=0.1,
    position_embedding_type="none", key_bias=False, rope_type="axial", rope_theta=100.0,
    rope_coordinates="centered", rope_layout="half", dynamic_image_size=True,
)  # fmt: skip


def from_transformers_dinov3(reference: DINOv3ViTModel, **options) -> VitrailModel:
    state = renamed(reference.state_dict(), DINOV3_NAMES)
    del state["embeddings.mask_token"]
    return load_into(VitrailModel(VitrailConfig(**{**DINOV3_OPTIONS, **options})), fold_qkv(state))


def test_dinov3_matches_transformers_at_every_grid():
    reference = transformers_dinov3()
    model = from_transformers_dinov3(reference)
    with torch.no_grad():
        for size in ((24, 24), *OTHERS):
            pixels = images(*size)
            expected = reference(pixels).last_hidden_state
            torch.testing.assert_close(model(pixels).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_dinov3_training_augmentation_matches_transformers():
    reference = transformers_dinov3(pos_embed_shift=0.1, pos_embed_jitter=1.5, pos_embed_rescale=2.0)
    model = from_transformers_dinov3(
        reference, rope_train_shift=0.1, rope_train_jitter=1.5, rope_train_rescale=2.0
    )
    reference.train(), model.train()
    pixels = images(24, 24)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = reference(pixels).last_hidden_state
        torch.manual_seed(3)
        torch.testing.assert_close(model(pixels).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_dinov3_key_biases_all_present_fold_into_qkv():
    """transformers' DINOv3 with a key bias too: one fused qkv bias (`key_bias=True`)."""
    reference = transformers_dinov3(key_bias=True)
    model = from_transformers_dinov3(reference, key_bias=True)
    assert model.encoder.layers[0].attention.q_bias is None
    with torch.no_grad():
        pixels = images(24, 24)
        expected = reference(pixels).last_hidden_state
        torch.testing.assert_close(model(pixels).last_hidden_state, expected, atol=1e-5, rtol=0)


# ---- relative position bias -------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared"])
def test_table_matches_timm_beit(shared):
    """BEiT's table (with the class token's three rows and q/v biases) on a non-square grid."""
    reference = randomise(
        Beit(
            img_size=NATIVE, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=37 / 32, num_classes=3,
            global_pool="token", use_abs_pos_emb=False, use_rel_pos_bias=not shared,
            use_shared_rel_pos_bias=shared, init_values=0.1,
        )
    )  # fmt: skip
    model = from_timm(
        reference,
        key_bias=False,
        layer_scale_init_value=0.1,
        position_embedding_type="none",
        relative_position_bias="table",
        relative_position_bias_shared=shared,
    )
    with torch.no_grad():
        pixels = images(*NATIVE)
        torch.testing.assert_close(model(pixels).logits, reference(pixels), atol=1e-5, rtol=0)


def test_table_at_other_grids_matches_transformers_beit():
    """At another grid the table is resampled bilinearly, as transformers' BEiT does for
    `interpolate_pos_encoding=True` (timm's BEiT has no run-time resizing)."""
    reference = randomise(
        BeitModel(
            BeitConfig(
                image_size=24, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, use_relative_position_bias=True, use_mean_pooling=False,
                layer_scale_init_value=0.1,
            )
        )
    )  # fmt: skip
    names = [
        (r"^embeddings\.patch_embeddings\.", "embeddings.patch_embeddings."),
        (r"^layers\.(\d+)\.lambda_(\d)$", r"encoder.layers.\1.layer_scale\2.scale"),
        (r"^layers\.(\d+)\.layernorm_before\.", r"encoder.layers.\1.norm1."),
        (r"^layers\.(\d+)\.layernorm_after\.", r"encoder.layers.\1.norm2."),
        (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layers.\1.attention.proj."),
        (r"^layers\.(\d+)\.relative_position_bias\.relative_position_bias_table$",
         r"encoder.layers.\1.attention.relative_position_bias.table"),
        (r"^layers\.", "encoder.layers."),
    ]  # fmt: skip
    config = VitrailConfig(
        **{**SHAPE, "image_size": 24, "num_labels": 0, "layer_norm_eps": 1e-12},
        key_bias=False,
        layer_scale_init_value=0.1,
        position_embedding_type="none",
        relative_position_bias="table",
        dynamic_image_size=True,
    )
    model = load_into(VitrailModel(config), fold_qkv(renamed(reference.state_dict(), names)))
    with torch.no_grad():
        for size in ((24, 24), *OTHERS):
            pixels = images(*size)
            expected = reference(pixels, interpolate_pos_encoding=True).last_hidden_state
            torch.testing.assert_close(model(pixels).last_hidden_state, expected, atol=1e-5, rtol=0)


RELPOS = {
    "avg": (dict(), dict(pooling="mean", use_cls_token=False)),
    "cls": (dict(class_token=True, global_pool="token", qkv_bias=False), dict(qkv_bias=False)),
    "shared": (dict(shared_rel_pos=True), dict(pooling="mean", use_cls_token=False,
                                                relative_position_bias_shared=True)),
}  # fmt: skip


@pytest.mark.parametrize("variant", list(RELPOS))
def test_mlp_matches_timm_relpos_vit_at_every_grid(variant):
    timm_args, options = RELPOS[variant]
    reference = randomise(
        VisionTransformerRelPos(
            img_size=NATIVE, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=37 / 32, num_classes=3,
            rel_pos_dim=24, init_values=0.1, **timm_args,
        )
    )  # fmt: skip
    model = from_timm(
        reference,
        layer_scale_init_value=0.1,
        position_embedding_type="none",
        relative_position_bias="mlp",
        relative_position_bias_hidden_size=24,
        dynamic_image_size=True,
        **options,
    )
    with torch.no_grad():
        for size in (NATIVE, *OTHERS):
            reference.set_input_size(img_size=size)  # timm recomputes the log offsets for the new grid
            pixels = images(*size)
            torch.testing.assert_close(
                model(pixels).logits, reference(pixels), atol=1e-5, rtol=0, msg=str(size)
            )


def test_set_image_size_keeps_the_run_time_rule():
    """A table made native for a new size gives what the dynamic model computed there."""
    config = tiny_config(num_labels=3, relative_position_bias="table", dynamic_image_size=True)
    model = randomise(VitrailForImageClassification(config))
    pixels = images(22, 34)
    with torch.no_grad():
        dynamic = model(pixels).logits
        model.set_image_size((22, 34))
        table = model.vitrail.encoder.layers[0].attention.relative_position_bias.table
        assert table.shape == ((2 * 11 - 1) * (2 * 17 - 1) + 3, 4)
        torch.testing.assert_close(
            model(pixels, interpolate_pos_encoding=False).logits, dynamic, atol=1e-6, rtol=0
        )


# ---- through the rest of the model --------------------------------------------------------------------------

# Every option at once where they combine: a BEiT-style table (class token only) with axial RoPE and q/v biases;
# learned frequencies with a shared MLP bias and registers.
COMBINED = {
    "table-axial": dict(
        key_bias=False, rope_type="axial", rope_coordinates="centered", rope_layout="half",
        relative_position_bias="table",
    ),
    "mlp-mixed": dict(
        num_register_tokens=2, rope_type="mixed", rope_axis_order="xy", rope_reference_grid=(8, 8),
        relative_position_bias="mlp", relative_position_bias_shared=True,
    ),
}  # fmt: skip


def combined(name: str, **overrides) -> VitrailForImageClassification:
    config = VitrailConfig(**{**SHAPE, "dynamic_image_size": True, **COMBINED[name], **overrides})
    return randomise(VitrailForImageClassification(config), seed=1)


@pytest.mark.parametrize("name", list(COMBINED))
def test_eager_equals_sdpa_and_attentions_come_from_eager(name, tmp_path):
    combined(name).save_pretrained(tmp_path)
    eager = VitrailForImageClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = VitrailForImageClassification.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    pixels = images(*OTHERS[0])
    with torch.no_grad():
        torch.testing.assert_close(eager(pixels).logits, sdpa(pixels).logits, atol=1e-5, rtol=0)
        chosen = sdpa(pixels, output_attentions=[-1]).attentions
        every = eager(pixels, output_attentions=True).attentions
    assert chosen[0] is None and chosen[1].shape == (2, 4, every[1].shape[-1], every[1].shape[-1])
    torch.testing.assert_close(chosen[1], every[1], atol=1e-6, rtol=0)


def test_relative_bias_refuses_kernels_without_per_head_masks():
    model = combined("table-axial").eval()
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="relative position bias .* 'flex_attention' attention kernel"):
        model(images(*NATIVE))


def test_backbone_feature_maps_at_another_grid():
    model = combined("mlp-mixed").vitrail
    backbone = VitrailBackbone(model.config).eval()
    backbone.load_state_dict(model.state_dict())
    pixels = images(*OTHERS[1])
    with torch.no_grad():
        maps = backbone(pixels).feature_maps
        tokens = model(pixels).last_hidden_state[:, 3:]  # cls + 2 registers
    assert maps[-1].shape == (2, 32, 4, 7)
    torch.testing.assert_close(maps[-1], tokens.transpose(1, 2).reshape(2, 32, 4, 7), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(COMBINED))
def test_torch_export_with_a_dynamic_size(name):
    model = combined(name)
    program = export_program(model, dynamic_size=True).module()
    with torch.no_grad():
        for size in (NATIVE, (12, 36), (28, 20)):
            pixels = images(*size)
            torch.testing.assert_close(program(pixels), model(pixels).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_same_gradients(reentrant):
    """Learned frequencies, the shared bias (computed once, outside the checkpointed layers), q/v biases and the
    training-time coordinate transform (drawn once per pass) all get the gradients of a plain pass."""
    model = combined("mlp-mixed", key_bias=False, rope_train_rescale=2.0, rope_train_shift=0.1).train()
    pixels, labels = images(*NATIVE), torch.tensor([0, 2])

    def grads():
        model.zero_grad()
        torch.manual_seed(11)
        model(pixels, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in model.vitrail.encoder.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in ("encoder.relative_position_bias.mlp.fc1.weight", "layers.1.attention.rope_freqs", "q_bias"):
        assert any(name in key and plain[key].abs().sum() > 0 for key in plain), name
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)


REMOTE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    folder, references, report_path = sys.argv[1:4]
    ref = load_file(references)
    diffs = {}
    for name in ("table-axial", "mlp-mixed"):
        model = AutoModelForImageClassification.from_pretrained(str(Path(folder) / name), trust_remote_code=True)
        with torch.no_grad():
            diffs[name] = float((model.eval()(ref[f"{name}-pixels"]).logits - ref[name]).abs().max())
    Path(report_path).write_text(json.dumps({"diffs": diffs, "module": type(model).__module__}))
    """
)


def test_saved_models_load_without_vitrail(tmp_path):
    references = {}
    for name in COMBINED:
        model = combined(name, key_bias=False)
        model.save_pretrained(tmp_path / "models" / name)
        pixels = images(*OTHERS[0])
        with torch.no_grad():
            references[name], references[f"{name}-pixels"] = model(pixels).logits, pixels
    save_file(references, tmp_path / "references.safetensors")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "TRANSFORMERS_VERBOSITY": "error"}
    report = run_without_vitrail(
        REMOTE, tmp_path / "models", tmp_path / "references.safetensors", root=tmp_path, env=env
    )
    assert report["module"].startswith("transformers_modules.")
    assert max(report["diffs"].values()) <= 1e-5, report


# ---- each option as documented ------------------------------------------------------------------------------


def test_key_bias_false_keeps_query_and_value_biases_only():
    attention = VitrailModel(tiny_config(key_bias=False)).encoder.layers[0].attention
    assert attention.qkv.bias is None and attention.q_bias.shape == attention.v_bias.shape == (32,)
    plain = VitrailModel(tiny_config(key_bias=False, qkv_bias=False)).encoder.layers[0].attention
    assert plain.qkv.bias is None and plain.q_bias is None and plain.v_bias is None


def test_rope_rotates_patches_by_relative_offset_only():
    """The defining property: with the same query and key everywhere, the score of two patches depends on their
    offset only; prefix tokens (here the class token and a register) are not rotated."""
    attention = (
        VitrailModel(tiny_config(rope_type="axial", num_register_tokens=1)).encoder.layers[0].attention
    )
    coordinates = torch.tensor(
        [[0.0, 0.0], [1.0, 2.0], [5.0, 3.0], [6.0, 5.0]]
    )  # pairs 0-1 and 2-3: same offset
    states = torch.randn(8).expand(1, 1, 6, 8)
    query, key = attention.rotate(states, states, coordinates)
    assert torch.equal(query[:, :, :2], states[:, :, :2]) and torch.equal(key[:, :, :2], states[:, :, :2])
    scores = query[0, 0, 2:] @ key[0, 0, 2:].T
    torch.testing.assert_close(scores[0, 1], scores[2, 3], atol=1e-5, rtol=0)
    assert (scores[0, 1] - scores[0, 2]).abs() > 1e-4


def test_rope_coordinates_follow_each_convention():
    from vitrail.modeling_vitrail import rope_coordinates

    index = rope_coordinates(tiny_config(rope_type="axial", rope_offset=1.0), (2, 3))
    assert index.tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    columns_first = rope_coordinates(tiny_config(rope_type="axial", rope_axis_order="xy"), (2, 3))
    assert columns_first.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]
    reference = rope_coordinates(tiny_config(rope_type="axial", rope_reference_grid=(4, 6)), (2, 3))
    assert reference[-1].tolist() == [2.0, 4.0]  # (1 / 2 * 4, 2 / 3 * 6)
    centered = rope_coordinates(tiny_config(rope_type="axial", rope_coordinates="centered"), (2, 4))
    torch.testing.assert_close(centered[0], torch.tensor([-0.5, -0.75]) * 2 * math.pi)
    torch.testing.assert_close(centered[-1], torch.tensor([0.5, 0.75]) * 2 * math.pi)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(rope_theta=100.0), r"`rope_theta=100.0` sets up rotary .* `rope_type='none'`"),
        (dict(rope_type="axial", num_attention_heads=16), r"head width .* = 2\) must be divisible by 4"),
        (dict(rope_type="axial", rope_theta=0.0), "must be positive"),
        (
            dict(rope_type="axial", rope_coordinates="centered", rope_reference_grid=8),
            "leave `rope_reference",
        ),
        (dict(rope_type="axial", rope_reference_grid=[8, 8, 8]), r"\(rows, cols\) pair"),
        (dict(rope_type="mixed", rope_train_jitter=0.5), r"`rope_train_jitter` is a scale factor"),
        (dict(rope_type="mixed", rope_train_shift=-1.0), r"`rope_train_shift` must be a finite number >= 0"),
        (dict(rope_type="rotary"), r"Unknown `rope_type` 'rotary'"),
        (dict(relative_position_bias_shared=True), "`relative_position_bias='none'` turns off"),
        (dict(relative_position_bias="table", relative_position_bias_hidden_size=64), "leave it at 128"),
        (dict(relative_position_bias="mlp", relative_position_bias_hidden_size=0), "positive integer"),
        (dict(relative_position_bias="table", num_register_tokens=1), "class token only"),
    ],
)
def test_bad_position_options_are_named(overrides, match):
    with pytest.raises(StrictDataclassError, match=match):
        tiny_config(**overrides)
