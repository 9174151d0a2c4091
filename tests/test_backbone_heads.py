"""VitrailBackbone under transformers' heads that take a backbone config: token sequences for the heads that read
tokens (`reshape_hidden_states=False`, as Dinov2Backbone gives them), NCHW maps for the others; each head runs
forward and backward on a tiny vitrail backbone built through `AutoBackbone.from_config`, and DPT and Depth Anything
give exactly what they give on the DINOv2 backbone the vitrail one was converted from."""

import pytest
import torch
import transformers

from vitrail import VitrailBackbone, VitrailConfig, VitrailModel
from vitrail.convert import convert_hf_state_dict, vitrail_config_from_hf

from .conftest import randomise

BACKBONE = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=37, encoder_stride=4, layer_norm_eps=1e-6)  # fmt: skip
ALL_STAGES = [1, 2, 3, 4]


def vitrail_backbone(**overrides) -> VitrailConfig:
    return VitrailConfig(**{**BACKBONE, **overrides})


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---- the token-sequence contract -----------------------------------------------------------------------------------


@pytest.mark.parametrize("apply_layernorm", [True, False])
def test_token_sequences_are_every_token_of_each_stage(apply_layernorm, pixels):
    """`(batch, tokens, hidden)`: class, distillation and register tokens first, then the patches, normed as the
    feature maps are; the NCHW maps are the same tokens without the prefix."""
    options = dict(use_distillation_token=True, num_register_tokens=2, out_indices=[0, 2, -1])
    model = randomise(VitrailModel(vitrail_backbone(**options)))
    tokens = VitrailBackbone(
        vitrail_backbone(**options, reshape_hidden_states=False, apply_layernorm=apply_layernorm)
    )
    maps = VitrailBackbone(vitrail_backbone(**options, apply_layernorm=apply_layernorm))
    for backbone in (tokens, maps):
        backbone.load_state_dict(model.state_dict())
        backbone.eval()
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states
        sequences, grids = tokens(pixels).feature_maps, maps(pixels).feature_maps
    for stage, sequence, grid in zip([0, 2, 4], sequences, grids, strict=True):
        want = model.layernorm(hidden[stage]) if apply_layernorm else hidden[stage]
        assert sequence.shape == (2, 4 + 64, 32)
        torch.testing.assert_close(sequence, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(grid, sequence[:, 4:].transpose(1, 2).reshape(2, 32, 8, 8), atol=0, rtol=0)


def dinov2_backbone(cls_name: str, reshape: bool, **kwargs):
    config_name = cls_name.replace("Backbone", "Config")
    config = getattr(transformers, config_name)(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2,
        layerscale_value=0.5, out_indices=ALL_STAGES, reshape_hidden_states=reshape, **kwargs,
    )  # fmt: skip
    return randomise(getattr(transformers, cls_name)(config), seed=3)


@pytest.mark.parametrize("reshape", [False, True], ids=["tokens", "maps"])
@pytest.mark.parametrize(
    "cls_name, kwargs",
    [("Dinov2Backbone", {}), ("Dinov2WithRegistersBackbone", {"num_register_tokens": 2})],
    ids=["dinov2", "dinov2-registers"],
)
def test_a_converted_dinov2_backbone_gives_what_dinov2_gives(cls_name, kwargs, reshape, tmp_path, pixels):
    """The checkpoint of a Dinov2Backbone opens as a VitrailBackbone with its stages, norm and output form, and its
    feature maps (token sequences with class and register tokens, or NCHW maps) are Dinov2's."""
    reference = dinov2_backbone(cls_name, reshape, **kwargs).eval()
    reference.save_pretrained(tmp_path)
    backbone = VitrailBackbone.from_pretrained(tmp_path)
    assert backbone.out_indices == ALL_STAGES and backbone.config.reshape_hidden_states == reshape
    for size in [(32, 32), (24, 40)]:  # DINOv2 resamples its positions to every input; so does the conversion
        other = torch.nn.functional.interpolate(pixels, size=size)
        with torch.no_grad():
            got, want = backbone(other).feature_maps, reference(other).feature_maps
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Choosing other stages on the way in, as for vitrail checkpoints.
    chosen = VitrailBackbone.from_pretrained(tmp_path, out_indices=[2], reshape_hidden_states=False)
    assert chosen.out_features == ["stage2"] and chosen(pixels).feature_maps[0].ndim == 3


def dinov3_backbone(**kwargs):
    config = transformers.DINOv3ViTConfig(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=37, num_register_tokens=2, out_indices=[1, 3], **kwargs,
    )  # fmt: skip
    return randomise(transformers.DINOv3ViTBackbone(config), seed=4)


def test_a_converted_dinov3_backbone_gives_what_dinov3_gives(tmp_path, pixels):
    """DINOv3ViTBackbone (RoPE, registers): its checkpoint opens as a VitrailBackbone with the same stages and
    feature maps, at any size."""
    reference = dinov3_backbone()
    reference.save_pretrained(tmp_path)
    backbone = VitrailBackbone.from_pretrained(tmp_path)
    assert backbone.out_indices == [1, 3] and backbone.config.rope_type == "axial"
    for size in [(32, 32), (24, 40)]:
        other = torch.nn.functional.interpolate(pixels, size=size)
        with torch.no_grad():
            got, want = backbone(other).feature_maps, reference(other).feature_maps
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("option", [{"reshape_hidden_states": False}, {"apply_layernorm": False}])
def test_dinov3_backbone_outputs_vitrail_does_not_give_are_refused(option, tmp_path):
    """DINOv3ViTBackbone's token sequences leave the prefix tokens out, and without `apply_layernorm` it still
    norms the last stage: both differ from Dinov2Backbone's contract, which VitrailBackbone keeps."""
    dinov3_backbone(**option).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="VitrailBackbone follows Dinov2Backbone"):
        VitrailBackbone.from_pretrained(tmp_path)


# ---- heads that read tokens, against the DINOv2 backbone -----------------------------------------------------------

DPT_HEAD = dict(neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
DEPTH_ANYTHING_HEAD = dict(patch_size=4, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 24, 32],
                           fusion_hidden_size=16, head_hidden_size=8)  # fmt: skip
TOKEN_HEADS = {
    "dpt": ("DPTConfig", "DPTForDepthEstimation", dict(is_hybrid=False, hidden_size=32, **DPT_HEAD)),
    "depth_anything": ("DepthAnythingConfig", "DepthAnythingForDepthEstimation", DEPTH_ANYTHING_HEAD),
    "prompt_depth_anything": (
        "PromptDepthAnythingConfig",
        "PromptDepthAnythingForDepthEstimation",
        DEPTH_ANYTHING_HEAD,
    ),
}


def head_inputs(name: str, pixels) -> dict:
    if name == "prompt_depth_anything":  # a low-resolution depth prompt, as from a phone's LiDAR
        return {"prompt_depth": torch.rand(len(pixels), 1, 8, 8, generator=torch.Generator().manual_seed(4))}
    return {}


@pytest.mark.parametrize("name", list(TOKEN_HEADS))
def test_depth_heads_give_on_vitrail_what_they_give_on_dinov2(name, pixels):
    """The same head weights on a Dinov2Backbone and on the VitrailBackbone converted from it predict the same
    depth; then the vitrail one trains: the loss reaches the backbone's first layer."""
    config_name, model_name, head = TOKEN_HEADS[name]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    dinov2 = dinov2_backbone("Dinov2Backbone", reshape=False).config
    reference = randomise(model_cls(config_cls(backbone_config=dinov2, **head)), seed=5)
    converted = vitrail_config_from_hf(dinov2)
    assert converted.reshape_hidden_states is False and converted.out_indices == ALL_STAGES
    model = model_cls(config_cls(backbone_config=converted, **head))
    assert type(model.backbone) is VitrailBackbone

    state = reference.state_dict()
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    renamed = {f"backbone.{k}": v for k, v in convert_hf_state_dict(backbone, dinov2).items()}
    model.load_state_dict({**{k: v for k, v in state.items() if not k.startswith("backbone.")}, **renamed})
    model.eval()
    inputs = head_inputs(name, pixels)
    with torch.no_grad():
        got, want = model(pixels, **inputs).predicted_depth, reference(pixels, **inputs).predicted_depth
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    model.train()
    model(pixels, **inputs).predicted_depth.square().mean().backward()  # transformers has no depth loss
    assert model.backbone.encoder.layers[0].attention.qkv.weight.grad.abs().sum() > 0


def test_dpt_fails_on_nchw_maps_and_runs_on_tokens(pixels):
    """DPT reads `(batch, tokens, hidden)`: the default NCHW maps break it (transformers' own error), the token
    sequences do not."""
    config_name, model_name, head = TOKEN_HEADS["dpt"]
    for reshape in (True, False):
        backbone = vitrail_backbone(out_indices=ALL_STAGES, reshape_hidden_states=reshape)
        model = getattr(transformers, model_name)(
            getattr(transformers, config_name)(backbone_config=backbone, **head)
        )
        if reshape:
            with pytest.raises(ValueError, match="too many values to unpack"):
                model(pixels)
        else:
            assert model(pixels).predicted_depth.shape[0] == 2


def test_vitpose_runs_on_a_backbone_without_prefix_tokens(pixels):
    """VitPose reads every token of the last stage as a patch and takes the grid from `image_size[0] //
    patch_size[0]`: a backbone without class token, sizes as pairs."""
    backbone = vitrail_backbone(image_size=[32, 32], patch_size=[4, 4], use_cls_token=False, pooling="mean",
                                out_indices=[-1], reshape_hidden_states=False)  # fmt: skip
    model = transformers.VitPoseForPoseEstimation(
        transformers.VitPoseConfig(backbone_config=backbone, num_labels=5)
    )
    assert type(model.backbone) is VitrailBackbone
    heatmaps = model(pixels).heatmaps
    assert heatmaps.shape == (2, 5, 32, 32)
    heatmaps.square().mean().backward()
    assert model.backbone.encoder.layers[0].attention.qkv.weight.grad.abs().sum() > 0


# ---- heads that read NCHW maps ---------------------------------------------------------------------------------------


def detection_labels() -> list[dict]:
    return [
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])} for _ in range(2)
    ]


def detr_like(config_name: str, model_name: str, stages=(4,), **extra):
    def build():
        config = getattr(transformers, config_name)(
            backbone_config=vitrail_backbone(out_indices=list(stages)), use_timm_backbone=False,
            use_pretrained_backbone=False, d_model=32, encoder_layers=1, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
            num_queries=5, num_labels=3, **extra,
        )  # fmt: skip
        return getattr(transformers, model_name)(config)

    return build, lambda model, pixels: model(pixels, labels=detection_labels()).loss


def upernet():
    config = transformers.UperNetConfig(
        backbone_config=vitrail_backbone(out_indices=ALL_STAGES), num_labels=3, hidden_size=16,
        use_auxiliary_head=False,
    )  # fmt: skip
    return transformers.UperNetForSemanticSegmentation(config)


def mask2former():
    config = transformers.Mask2FormerConfig(
        backbone_config=vitrail_backbone(out_indices=ALL_STAGES), feature_size=32, mask_feature_size=32,
        hidden_dim=32, encoder_feedforward_dim=16, dim_feedforward=16, encoder_layers=1, decoder_layers=2,
        num_attention_heads=2, num_queries=5, num_labels=3,
    )  # fmt: skip
    return transformers.Mask2FormerForUniversalSegmentation(config)


def mask2former_loss(model, pixels):
    masks = [
        (torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(i)) > 0.5).float() for i in range(2)
    ]
    return model(pixels, mask_labels=masks, class_labels=[torch.tensor([1])] * 2).loss


MAP_HEADS = {
    "upernet": (upernet, lambda model, pixels: model(pixels, labels=torch.randint(0, 3, (2, 32, 32))).loss),
    "detr": detr_like("DetrConfig", "DetrForObjectDetection"),
    "conditional_detr": detr_like("ConditionalDetrConfig", "ConditionalDetrForObjectDetection"),
    "dab_detr": detr_like("DabDetrConfig", "DabDetrForObjectDetection"),
    "table_transformer": detr_like("TableTransformerConfig", "TableTransformerForObjectDetection"),
    "deformable_detr": detr_like(
        "DeformableDetrConfig", "DeformableDetrForObjectDetection", stages=ALL_STAGES, num_feature_levels=4
    ),
    "mask2former": (mask2former, mask2former_loss),
}


@pytest.mark.parametrize("name", list(MAP_HEADS))
def test_heads_on_feature_maps_train_on_it(name, pixels):
    """Built from a vitrail `backbone_config` (`AutoBackbone.from_config`); the loss reaches the first layer."""
    build, loss_of = MAP_HEADS[name]
    torch.manual_seed(0)
    model = build()
    backbones = [m for m in model.modules() if isinstance(m, VitrailBackbone)]
    assert len(backbones) == 1
    loss = loss_of(model, pixels)
    assert torch.isfinite(loss)
    loss.backward()
    assert backbones[0].encoder.layers[0].attention.qkv.weight.grad.abs().sum() > 0
