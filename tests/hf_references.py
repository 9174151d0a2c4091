"""Tiny random transformers references of every model type vitrail converts, shared by the conversion tests
(tests/test_convert_hf_types.py) and the transformers coverage sweep (benchmarks/hf_coverage.py). Each is built
tiny, every parameter perturbed, so that parity covers every tensor."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from safetensors.torch import save_file

from vitrail import VitrailForImageClassification, VitrailForMaskedImageModeling, VitrailModel

SHAPE = dict(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37)  # fmt: skip
LABELS = dict(id2label={0: "cat", 1: "dog", 2: "emu"}, label2id={"cat": 0, "dog": 1, "emu": 2})
PATCHES = 15 * 15


def perturbed(model):
    """Every parameter moved off its initialisation (LayerNorms off identity, biases off zero, MAE's frozen sin-cos
    table too), so parity covers every tensor."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def mae_encoder(model, pixels, **kwargs):
    """MAE's encoder with nothing masked and the patches in order: `mask_ratio=0` keeps them all, and `noise` that
    increases along the sequence makes MAE's shuffle the identity."""
    encoder = getattr(model, "vit", model)
    encoder.config.mask_ratio = 0.0
    rows, cols = (size // 2 for size in pixels.shape[-2:])
    noise = torch.arange(rows * cols, dtype=torch.float32).expand(len(pixels), -1)
    return encoder(pixels, noise=noise, **kwargs).last_hidden_state


@dataclass
class Case:
    """A transformers model built tiny, what vitrail converts it into, and how the two outputs are compared."""

    build: Callable[[], torch.nn.Module]
    vitrail_class: type
    output: str  # "logits", "last_hidden_state" or "reconstruction"
    run: Callable | None = None  # the reference's output when it is not `model(pixels).<output>`
    layouts: tuple[str, ...] = ("hub", "v5")
    config: dict = field(default_factory=dict)  # VitrailConfig fields the conversion must give
    pooler: bool = False  # compare `pooler_output` too (the reference's own pooling)
    # SimMIM in transformers reshapes to a square grid: square there; None where the source takes one size only
    other_size: tuple[int, int] | None = (38, 26)
    resamples: bool = False  # the reference takes any size by itself (no `interpolate_pos_encoding` argument)


def _hf(cls_name: str, config_name: str, **kwargs):
    return lambda: perturbed(
        getattr(transformers, cls_name)(getattr(transformers, config_name)(**SHAPE, **kwargs))
    )


MAE_DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                   decoder_intermediate_size=20)  # fmt: skip
CASES = {
    "vit_mae": Case(_hf("ViTMAEModel", "ViTMAEConfig"), VitrailModel, "last_hidden_state", mae_encoder),
    "vit_mae-pretraining": Case(
        _hf("ViTMAEForPreTraining", "ViTMAEConfig", **MAE_DECODER),
        VitrailModel,
        "last_hidden_state",
        mae_encoder,
    ),
    "vit_msn": Case(_hf("ViTMSNModel", "ViTMSNConfig"), VitrailModel, "last_hidden_state"),
    "vit_msn-head": Case(
        _hf("ViTMSNForImageClassification", "ViTMSNConfig", **LABELS), VitrailForImageClassification, "logits"
    ),
    "ijepa": Case(
        lambda: perturbed(transformers.IJepaModel(transformers.IJepaConfig(**SHAPE), add_pooling_layer=True)),
        VitrailModel,
        "last_hidden_state",
        config=dict(use_cls_token=False, pooling="mean", prefix_position_embeddings="none"),
    ),
    "ijepa-head": Case(
        _hf("IJepaForImageClassification", "IJepaConfig", **LABELS),
        VitrailForImageClassification,
        "logits",
        config=dict(use_cls_token=False, pooling="mean"),
    ),
    "vit-simmim": Case(
        _hf("ViTForMaskedImageModeling", "ViTConfig", encoder_stride=2),
        VitrailForMaskedImageModeling,
        "reconstruction",
        other_size=(26, 26),
    ),
    "deit-simmim": Case(
        _hf("DeiTForMaskedImageModeling", "DeiTConfig", encoder_stride=2),
        VitrailForMaskedImageModeling,
        "reconstruction",
        config=dict(num_register_tokens=1, prefix_position_embeddings="all"),
        other_size=(26, 26),
    ),
}


# ---- vision towers of image-text models ------------------------------------------------------------------------

TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)


def tower(cls_name: str, config_name: str, **kwargs):
    """A tower class built tiny; `config_name` is its vision config, or its two-tower config (vision and text
    configs tiny), whose classes the vision tower is read out of."""
    config_cls = getattr(transformers, config_name)
    if "vision_config" in config_cls.sub_configs:
        text = {**TEXT, "vocab_size": 99} if config_name == "AltCLIPConfig" else TEXT
        config = config_cls(vision_config=SHAPE, text_config=text, **kwargs)
    else:
        config = config_cls(**SHAPE, **kwargs)
    return lambda: perturbed(getattr(transformers, cls_name)(config))


def vision_tower(model, pixels, **kwargs):
    return model.vision_model(pixels, **kwargs).last_hidden_state


CLIP_TOWER = dict(patch_embedding_bias=False, pre_norm=True, use_cls_token=True)
TOWER_CASES = {
    f"{name}": Case(tower(cls, config), VitrailModel, "last_hidden_state", config=dict(CLIP_TOWER, pooling="cls",
                    use_fc_norm=True), pooler=True)
    for name, cls, config in [
        ("clip_vision_model", "CLIPVisionModel", "CLIPVisionConfig"),
        ("clip_vision_model-projection", "CLIPVisionModelWithProjection", "CLIPVisionConfig"),
        ("altclip_vision_model", "AltCLIPVisionModel", "AltCLIPVisionConfig"),
        ("chinese_clip_vision_model", "ChineseCLIPVisionModel", "ChineseCLIPVisionConfig"),
        ("metaclip_2_vision_model", "MetaClip2VisionModel", "MetaClip2VisionConfig"),
        ("owlvit_vision_model", "OwlViTVisionModel", "OwlViTVisionConfig"),
        ("owlv2_vision_model", "Owlv2VisionModel", "Owlv2VisionConfig"),
        ("clipseg_vision_model", "CLIPSegVisionModel", "CLIPSegVisionConfig"),
    ]
}  # fmt: skip
TOWER_CASES.update(
    {
        f"{name}": Case(tower(cls, config), VitrailModel, "last_hidden_state", vision_tower, pooler=True)
        for name, cls, config in [
            ("clip", "CLIPModel", "CLIPConfig"),
            ("altclip", "AltCLIPModel", "AltCLIPConfig"),
            ("chinese_clip", "ChineseCLIPModel", "ChineseCLIPConfig"),
            ("metaclip_2", "MetaClip2Model", "MetaClip2Config"),
            ("siglip", "SiglipModel", "SiglipConfig"),
        ]
    }
)
TOWER_CASES.update(
    {
        "clip-head": Case(
            tower("CLIPForImageClassification", "CLIPConfig", **LABELS),
            VitrailForImageClassification,
            "logits",
            config=dict(CLIP_TOWER, pooling="mean", final_norm=False),
        ),
        "metaclip_2-head": Case(
            tower("MetaClip2ForImageClassification", "MetaClip2Config", **LABELS),
            VitrailForImageClassification,
            "logits",
        ),
        "git_vision_model": Case(
            tower("GitVisionModel", "GitVisionConfig"),
            VitrailModel,
            "last_hidden_state",
            config=dict(CLIP_TOWER, pooling="cls", use_fc_norm=False),
        ),
        "siglip_vision_model": Case(
            tower("SiglipVisionModel", "SiglipVisionConfig"),
            VitrailModel,
            "last_hidden_state",
            config=dict(use_cls_token=False, pooling="map", prefix_position_embeddings="none"),
            pooler=True,
        ),
        "siglip_vision_model-no-head": Case(
            tower("SiglipVisionModel", "SiglipVisionConfig", vision_use_head=False),
            VitrailModel,
            "last_hidden_state",
            config=dict(use_cls_token=False, pooling="mean"),
        ),
        "siglip-head": Case(
            tower("SiglipForImageClassification", "SiglipConfig", **LABELS),
            VitrailForImageClassification,
            "logits",
            config=dict(use_cls_token=False, pooling="mean"),
        ),
    }
)
AIMV2 = dict(norm_type="rmsnorm", patch_embedding_norm=True, use_cls_token=False, mlp_type="swiglu")
TOWER_CASES.update(
    {
        "aimv2_vision_model": Case(
            tower("Aimv2VisionModel", "Aimv2VisionConfig"),
            VitrailModel,
            "last_hidden_state",
            config=dict(AIMV2, pooling="map", qkv_bias=False, proj_bias=False, mlp_bias=False),
            pooler=True,
            other_size=None,  # AIMv2's learned positions serve one size
        ),
        "aimv2_vision_model-biases": Case(
            tower("Aimv2VisionModel", "Aimv2VisionConfig", qkv_bias=True, mlp_bias=True),
            VitrailModel,
            "last_hidden_state",
            config=dict(AIMV2, qkv_bias=True, proj_bias=True, mlp_bias=True),
            pooler=True,
            other_size=None,
        ),
        "aimv2_vision_model-no-head": Case(
            tower("Aimv2VisionModel", "Aimv2VisionConfig", use_head=False),
            VitrailModel,
            "last_hidden_state",
            config=dict(AIMV2, pooling="mean"),
            other_size=None,
        ),
        "aimv2": Case(
            tower("Aimv2Model", "Aimv2Config"),
            VitrailModel,
            "last_hidden_state",
            vision_tower,
            pooler=True,
            other_size=None,
        ),
    }
)
CASES.update(TOWER_CASES)

# ---- positions inside attention: BEiT's relative position tables, DINOv3's 2D RoPE ------------------------------

BEIT = dict(key_bias=False, layer_scale_init_value=0.1, relative_position_bias="table")
CASES.update(
    {
        "beit": Case(
            _hf("BeitModel", "BeitConfig", use_relative_position_bias=True),
            VitrailModel,
            "last_hidden_state",
            config=dict(BEIT, pooling="mean", use_fc_norm=True, position_embedding_type="none"),
            pooler=True,
        ),
        "beit-head-shared-absolute": Case(
            _hf("BeitForImageClassification", "BeitConfig", use_shared_relative_position_bias=True,
                use_absolute_position_embeddings=True, **LABELS),
            VitrailForImageClassification,
            "logits",
            config=dict(BEIT, relative_position_bias_shared=True, position_embedding_type="learned"),
        ),
        "beit-cls-no-layerscale": Case(
            _hf("BeitModel", "BeitConfig", use_relative_position_bias=True, use_mean_pooling=False,
                layer_scale_init_value=0.0),
            VitrailModel,
            "last_hidden_state",
            config=dict(pooling="cls", use_fc_norm=False, layer_scale_init_value=None),
            pooler=True,
        ),
        "data2vec-vision-head": Case(
            _hf("Data2VecVisionForImageClassification", "Data2VecVisionConfig", use_relative_position_bias=True,
                **LABELS),
            VitrailForImageClassification,
            "logits",
            config=BEIT,
        ),
    }
)  # fmt: skip
DINOV3 = dict(rope_type="axial", rope_coordinates="centered", rope_layout="half", position_embedding_type="none",
              dynamic_image_size=True)  # fmt: skip
CASES.update(
    {
        "dinov3_vit": Case(
            _hf("DINOv3ViTModel", "DINOv3ViTConfig", num_register_tokens=2, layerscale_value=0.5),
            VitrailModel,
            "last_hidden_state",
            config=dict(DINOV3, key_bias=False, num_register_tokens=2, layer_scale_init_value=0.5),
            pooler=True,
            resamples=True,
        ),
        "dinov3_vit-gated-key-bias": Case(
            _hf("DINOv3ViTModel", "DINOv3ViTConfig", use_gated_mlp=True, hidden_act="silu", key_bias=True,
                rope_theta=10.0),
            VitrailModel,
            "last_hidden_state",
            config=dict(DINOV3, key_bias=True, mlp_type="swiglu", rope_theta=10.0),
            pooler=True,
            resamples=True,
        ),
        "dinov3_vit-no-biases": Case(
            _hf("DINOv3ViTModel", "DINOv3ViTConfig", query_bias=False, value_bias=False, proj_bias=False,
                mlp_bias=False),
            VitrailModel,
            "last_hidden_state",
            config=dict(DINOV3, qkv_bias=False, proj_bias=False, mlp_bias=False),
            resamples=True,
        ),
    }
)  # fmt: skip


def reference_output(case: Case, model, pixels, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if case.run is not None:
            return case.run(model, pixels, **kwargs)
        return getattr(model(pixels, **kwargs), case.output)


def save(model, folder, layout: str):
    """`save_pretrained` (the Hub layout), or the 5.x in-memory names (`state_dict()`) written by hand."""
    if layout == "hub":
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


# ---- timm models saved through transformers' TimmWrapper ---------------------------------------------------------

TIMM_ARGS = dict(img_size=30, patch_size=2, embed_dim=32, depth=2, num_heads=4)
TIMM_ARCHITECTURES = {
    "vit_small_patch16_224": {},
    "vit_base_patch16_reg4_gap_256": {},  # registers, mean pooling with fc_norm
    "deit_tiny_distilled_patch16_224": {},  # the distillation token and its head
}


def timm_wrapper(head: bool, architecture: str, **config):
    cls = transformers.TimmWrapperForImageClassification if head else transformers.TimmWrapperModel
    args = {**TIMM_ARGS, **TIMM_ARCHITECTURES[architecture]}
    return perturbed(
        cls(
            transformers.TimmWrapperConfig(architecture=architecture, model_args=args, num_labels=3, **config)
        )
    )


# ---- one reference per model type --------------------------------------------------------------------------------

DINO = {**{k: v for k, v in SHAPE.items() if k != "intermediate_size"}, "mlp_ratio": 2}
BASE_CASES = {
    "vit": Case(
        _hf("ViTForImageClassification", "ViTConfig", **LABELS), VitrailForImageClassification, "logits"
    ),
    "deit": Case(
        _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", **LABELS),
        VitrailForImageClassification,
        "logits",
    ),
    "dinov2": Case(
        lambda: perturbed(
            transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**DINO, **LABELS))
        ),
        VitrailForImageClassification,
        "logits",
        resamples=True,
    ),
    "dinov2_with_registers": Case(
        lambda: perturbed(
            transformers.Dinov2WithRegistersForImageClassification(
                transformers.Dinov2WithRegistersConfig(**DINO, num_register_tokens=2, **LABELS)
            )
        ),
        VitrailForImageClassification,
        "logits",
        resamples=True,
    ),
    "timm_wrapper": Case(
        lambda: timm_wrapper(True, "vit_base_patch16_reg4_gap_256"),
        VitrailForImageClassification,
        "logits",
        layouts=("hub",),
        other_size=None,  # timm resamples only when built with dynamic_img_size=True
    ),
}
# The model type of each reference the coverage sweep builds: the type saved with its richest class (a head where
# transformers has one, the full two-tower model for image-text types).
TYPE_CASES = {
    **{name: BASE_CASES[name] for name in BASE_CASES},
    **{name: CASES[name] for name in ("vit_mae", "vit_msn", "ijepa", "beit", "dinov3_vit")},
    "data2vec-vision": CASES["data2vec-vision-head"],
    **{
        name: CASES[name]
        for name in CASES
        if name.endswith("_vision_model")
        or name in ("clip", "altclip", "chinese_clip", "metaclip_2", "siglip")
    },
    "aimv2": CASES["aimv2"],
}
