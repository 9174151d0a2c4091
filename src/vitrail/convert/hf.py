"""transformers checkpoints into vitrail: ViT, DeiT (plain and distilled), DINOv2 (with and without registers).

A transformers checkpoint comes in one of two key layouts:

- `"hub"`: the names of google/vit-*, facebook/deit-* and facebook/dinov2-* on the Hub, which transformers 5.x
  still writes by default (`save_original_format=True`): `encoder.layer.N.attention.attention.query`, ...
- `"v5"`: transformers 5.x in-memory module names (`attention.q_proj`, `mlp.gate_proj`, ...), what
  `model.state_dict()` returns.

Each family is declared once below: rows outside the layers, one table of layer rows per layout, and the tensors
dropped with their reason. `vitrail.convert.common.rename_state_dict` then places every tensor exactly once.

How each family maps onto vitrail's config:

- ViT: class token with the only prefix position, class-token pooling.
- DeiT: the distillation token follows the class token and owns a position (`prefix_position_embeddings="all"`).
  A DeiT fine-tuned without its teacher (`DeiTForImageClassification`) has no head reading that token, so it
  becomes one register token; a distilled one (`DeiTForImageClassificationWithTeacher`) keeps it as
  `use_distillation_token=True` with its second head, and the logits are the mean of both heads, as transformers
  computes them at inference.
- DINOv2: LayerScale, eps 1e-6, registers without positions, SwiGLU MLP for the giant model, and the linear head on
  `[class token; mean of patch tokens]` (`pooling="cls_mean"`). transformers' DINOv2 resamples its 518-px position
  table to every input, so converted DINOv2 models get `dynamic_image_size=True`.
- Position resampling follows the source (`position_interpolation`): plain bicubic for ViT, DeiT and DINOv2,
  antialiased bicubic for DINOv2 with registers, so a converted model matches its source at every resolution.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from ..configuration_vitrail import VitrailConfig
from ..modeling_vitrail import VitrailForImageClassification, VitrailModel
from .common import Converted, Drop, Plan, Rename, height_width, in_layers, model_outputs, read_weights

logger = logging.getLogger(__name__)

# ---- layer rows, inside layer N ------------------------------------------------------------------------------

_HUB_ATTENTION = (
    Rename("attention.attention.query.{p}", "attention.qkv.{p}", slot=(0, 3)),
    Rename("attention.attention.key.{p}", "attention.qkv.{p}", slot=(1, 3)),
    Rename("attention.attention.value.{p}", "attention.qkv.{p}", slot=(2, 3)),
    Rename("attention.output.dense.{p}", "attention.proj.{p}"),
)
_V5_ATTENTION = (
    Rename("attention.q_proj.{p}", "attention.qkv.{p}", slot=(0, 3)),
    Rename("attention.k_proj.{p}", "attention.qkv.{p}", slot=(1, 3)),
    Rename("attention.v_proj.{p}", "attention.qkv.{p}", slot=(2, 3)),
    Rename("attention.o_proj.{p}", "attention.proj.{p}"),
)
_VIT_NORMS = (Rename("layernorm_before.{p}", "norm1.{p}"), Rename("layernorm_after.{p}", "norm2.{p}"))
_MLP = (Rename("mlp.fc1.{p}", "mlp.fc1.{p}"), Rename("mlp.fc2.{p}", "mlp.fc2.{p}"))
_DINOV2_BLOCK = (
    Rename("norm1.{p}", "norm1.{p}"),
    Rename("norm2.{p}", "norm2.{p}"),
    Rename("layer_scale1.lambda1", "layer_scale1.scale"),
    Rename("layer_scale2.lambda1", "layer_scale2.scale"),
    *_MLP,
)

# layout -> the rows of every layer
VIT_LAYERS = {
    "hub": in_layers(
        "encoder.layer.{n}.",
        (
            *_HUB_ATTENTION,
            *_VIT_NORMS,
            Rename("intermediate.dense.{p}", "mlp.fc1.{p}"),
            Rename("output.dense.{p}", "mlp.fc2.{p}"),
        ),
    ),
    "v5": in_layers("layers.{n}.", (*_V5_ATTENTION, *_VIT_NORMS, *_MLP)),
}
DINOV2_LAYERS = {
    "hub": in_layers(
        "encoder.layer.{n}.",
        (
            *_HUB_ATTENTION,
            *_DINOV2_BLOCK,
            # SwiGLU (giant): one fused input projection, rows [gate; value], as vitrail's fc1.
            Rename("mlp.weights_in.{p}", "mlp.fc1.{p}"),
            Rename("mlp.weights_out.{p}", "mlp.fc2.{p}"),
        ),
    ),
    "v5": in_layers(
        "encoder.layer.{n}.",
        (
            *_V5_ATTENTION,
            *_DINOV2_BLOCK,
            Rename("mlp.gate_proj.{p}", "mlp.fc1.{p}", slot=(0, 2)),
            Rename("mlp.up_proj.{p}", "mlp.fc1.{p}", slot=(1, 2)),
            Rename("mlp.down_proj.{p}", "mlp.fc2.{p}"),
        ),
    ),
}

# ---- rows outside the layers ----------------------------------------------------------------------------------

_EMBEDDINGS = (
    Rename("embeddings.cls_token", "{backbone}embeddings.cls_token"),
    Rename("embeddings.position_embeddings", "{backbone}embeddings.position_embeddings"),
    Rename(
        "embeddings.patch_embeddings.projection.{p}", "{backbone}embeddings.patch_embeddings.projection.{p}"
    ),
    Rename("layernorm.{p}", "{backbone}layernorm.{p}"),
)
_CLASSIFIER = (Rename("classifier.{p}", "classifier.{p}"),)
_DEIT_AS_REGISTER = Rename(
    "embeddings.distillation_token",
    "{backbone}embeddings.register_tokens",
    note="DeiT: no head reads the distillation token, so it becomes register token 0 with its own position "
    "(num_register_tokens=1, prefix_position_embeddings='all').",
)
_DEIT_DISTILLED = (
    Rename(
        "embeddings.distillation_token",
        "{backbone}embeddings.distillation_token",
        note="Distilled DeiT: distillation token and its head kept; logits are the mean of both heads.",
    ),
    Rename("cls_classifier.{p}", "classifier.{p}"),
    Rename("distillation_classifier.{p}", "distillation_classifier.{p}"),
)
_DINOV2_REGISTERS = (Rename("embeddings.register_tokens", "{backbone}embeddings.register_tokens"),)

_POOLER = Drop(
    "pooler.dense.{p}",
    "transformers' ViT pooler (tanh(dense(cls))) has no vitrail counterpart; vitrail's pooler_output is the "
    "normalised class token, and no transformers classification head reads the pooler",
)
_MASK_TOKEN = Drop(
    "embeddings.mask_token",
    "DINOv2's mask token serves only its self-supervised pre-training; VitrailModel carries a mask token only "
    "for SimMIM (VitrailForMaskedImageModeling), where it is trained anew",
)


@dataclass(frozen=True)
class Family:
    """One transformers model family: its layer rows per layout and rows outside the layers."""

    layers: dict[str, tuple[Rename, ...]]
    rows: tuple[Rename, ...]
    drops: tuple[Drop, ...] = ()


FAMILIES = {
    "vit": Family(VIT_LAYERS, _EMBEDDINGS + _CLASSIFIER, (_POOLER,)),
    "deit": Family(VIT_LAYERS, _EMBEDDINGS + _CLASSIFIER + (_DEIT_AS_REGISTER,), (_POOLER,)),
    "deit_distilled": Family(VIT_LAYERS, _EMBEDDINGS + _DEIT_DISTILLED, (_POOLER,)),
    "dinov2": Family(DINOV2_LAYERS, _EMBEDDINGS + _CLASSIFIER, (_MASK_TOKEN,)),
    "dinov2_with_registers": Family(
        DINOV2_LAYERS, _EMBEDDINGS + _CLASSIFIER + _DINOV2_REGISTERS, (_MASK_TOKEN,)
    ),
}
SUPPORTED_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers")


def _is_distilled(hf_config, state=None) -> bool:
    if "DeiTForImageClassificationWithTeacher" in (getattr(hf_config, "architectures", None) or []):
        return True
    return state is not None and any(k.endswith("distillation_classifier.weight") for k in state)


def family_of(hf_config, state=None) -> str:
    """The key of `FAMILIES` for a transformers config (and its tensors, which tell a distilled DeiT)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"Cannot convert transformers model_type {model_type!r}: vitrail converts {list(SUPPORTED_MODEL_TYPES)}."
        )
    return "deit_distilled" if model_type == "deit" and _is_distilled(hf_config, state) else model_type


def hf_rename_rows(family: str, layout: str) -> list[Rename]:
    """Every `Rename` row of one family in one layout: rows outside the layers, then the layer rows."""
    spec = FAMILIES[family]
    return [*spec.rows, *spec.layers[layout]]


# ---- config ----------------------------------------------------------------------------------------------------

# Fields that mean the same in ViTConfig / DeiTConfig / Dinov2Config and VitrailConfig.
_SHARED_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
)


def _wants_head(hf_config, state=None) -> bool:
    architectures = getattr(hf_config, "architectures", None) or []
    if any("ForImageClassification" in a for a in architectures):
        return True
    if any(a.endswith("Model") for a in architectures):
        return False
    return state is not None and any(k.endswith("classifier.weight") for k in state)


def _dinov2_mlp(hf_config) -> dict:
    hidden = int(hf_config.hidden_size * hf_config.mlp_ratio)
    if getattr(hf_config, "use_swiglu_ffn", False):
        # DINOv2's SwiGLU keeps the parameter count of a 4x MLP: 2/3 of the width, rounded up to a multiple of 8.
        return {
            "mlp_type": "swiglu",
            "hidden_act": "silu",
            "intermediate_size": (int(hidden * 2 / 3) + 7) // 8 * 8,
        }
    return {"intermediate_size": hidden}


def vitrail_config_from_hf(hf_config, state=None) -> VitrailConfig:
    """The `VitrailConfig` that reproduces a transformers ViT, DeiT or DINOv2 config (see the module docstring)."""
    family = family_of(hf_config, state)
    fields = {name: getattr(hf_config, name) for name in _SHARED_CONFIG_FIELDS}
    for name in ("image_size", "patch_size"):
        if isinstance(fields[name], (list, tuple)):
            fields[name] = list(fields[name])
    # transformers' patch convolution drops a partial last row/column of pixels, so its position table covers
    # floor(image / patch) patches: the size that table was made for is the whole-patch part of the image.
    (h, w), (ph, pw) = height_width(fields["image_size"]), height_width(fields["patch_size"])
    if h % ph or w % pw:
        fields["image_size"] = [h // ph * ph, w // pw * pw]
        logger.info(
            "image_size %s is not a multiple of patch_size %s; transformers' position table covers %dx%d patches, "
            "so the converted model's image_size is %s.",
            hf_config.image_size, hf_config.patch_size, h // ph, w // pw, fields["image_size"],
        )  # fmt: skip
    fields["id2label"] = {int(k): v for k, v in hf_config.id2label.items()}
    fields["label2id"] = dict(hf_config.label2id)
    if getattr(hf_config, "problem_type", None) is not None:
        fields["problem_type"] = hf_config.problem_type
    if family.startswith("dinov2"):
        fields.update(
            _dinov2_mlp(hf_config),
            encoder_stride=ph,
            drop_path_rate=hf_config.drop_path_rate,
            layer_scale_init_value=hf_config.layerscale_value,
            num_register_tokens=getattr(hf_config, "num_register_tokens", 0),
            pooling="cls_mean" if _wants_head(hf_config, state) else "cls",
            prefix_position_embeddings="cls",
            dynamic_image_size=True,
            position_interpolation="bicubic_antialias" if family == "dinov2_with_registers" else "bicubic",
        )
    else:
        fields.update(
            intermediate_size=hf_config.intermediate_size,
            encoder_stride=hf_config.encoder_stride,
            pooling="cls",
            position_interpolation="bicubic",
        )
        if family == "deit":
            fields.update(num_register_tokens=1, prefix_position_embeddings="all")
        elif family == "deit_distilled":
            fields.update(use_distillation_token=True, prefix_position_embeddings="all")
    return VitrailConfig(use_cls_token=True, position_embedding_type="learned", **fields)


# ---- state dict ------------------------------------------------------------------------------------------------


def detect_hf_layout(keys) -> str:
    """`"hub"` (`attention.attention.query` ...) or `"v5"` (`attention.q_proj` ...)."""
    hub = any(".attention.attention.query." in k for k in keys)
    v5 = any(".attention.q_proj." in k for k in keys)
    if hub and v5:
        raise ValueError(
            "The checkpoint mixes transformers' Hub layout (attention.attention.query ...) and its 5.x in-memory "
            "layout (attention.q_proj ...); convert a state dict written in one layout."
        )
    if not (hub or v5):
        raise ValueError(
            "No transformer layers found: neither `attention.attention.query` nor `attention.q_proj` keys exist."
        )
    return "hub" if hub else "v5"


def _plan(state: dict[str, torch.Tensor], hf_config) -> Plan:
    family, layout = family_of(hf_config, state), detect_hf_layout(state)
    return Plan(
        state,
        vitrail_config_from_hf(hf_config, state),
        head=_wants_head(hf_config, state),
        rows=hf_rename_rows(family, layout),
        drops=FAMILIES[family].drops,
        strip_prefix=f"{hf_config.model_type}.",  # each family's base_model_prefix is its model_type
        source_name=f"{family} checkpoint ({layout} layout)",
    )


def convert_hf_state_dict(state: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Rename a transformers ViT / DeiT / DINOv2 state dict (either layout) to vitrail's names, checking it
    completely (see `vitrail.convert.common.rename_state_dict` for what is checked)."""
    return _plan(state, hf_config).state_dict()


# ---- folders ---------------------------------------------------------------------------------------------------


def load_hf_checkpoint(
    path: str | Path, allow_pickle: bool = False
) -> VitrailForImageClassification | VitrailModel:
    """Load a local transformers ViT / DeiT / DINOv2 folder (config.json + safetensors weights) as a vitrail model
    in eval mode: classification checkpoints give `VitrailForImageClassification`, backbones `VitrailModel`.
    `pytorch_model.bin` is read only with `allow_pickle=True`."""
    return _plan(read_weights(path, allow_pickle), AutoConfig.from_pretrained(path)).load()


# Preprocessor fields copied as they are; transformers' ViT/DeiT/Bit processors and vitrail's share their meaning.
_PROCESSOR_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)
# Fields whose default is what vitrail does anyway.
_PROCESSOR_NO_OPS = {"image_processor_type", "processor_class", "do_convert_rgb"}


def image_processor_from_hf(preprocessor_config: dict):
    """A `VitrailImageProcessor` doing what a transformers ViT / DeiT / DINOv2 `preprocessor_config.json` says."""
    from ..image_processing_vitrail import VitrailImageProcessor

    kwargs = {k: preprocessor_config[k] for k in _PROCESSOR_FIELDS if k in preprocessor_config}
    ignored = sorted(set(preprocessor_config) - set(kwargs) - _PROCESSOR_NO_OPS)
    if ignored:
        logger.info("Preprocessor fields not carried over: %s.", ignored)
    return VitrailImageProcessor(**kwargs)


def open_source(path: str | Path, *, allow_pickle: bool = False) -> Converted:
    """The converted model, its processor (from `preprocessor_config.json`, else None) and transformers' own model
    as the reference, for `scripts/convert_checkpoint.py --from hf`."""
    import transformers

    folder = Path(path)
    hf_config = AutoConfig.from_pretrained(folder)
    model = _plan(read_weights(folder, allow_pickle), hf_config).load()
    processor_file = folder / "preprocessor_config.json"
    processor = (
        image_processor_from_hf(json.loads(processor_file.read_text())) if processor_file.is_file() else None
    )
    architecture = (hf_config.architectures or ["AutoModel"])[0]
    reference_model = getattr(transformers, architecture).from_pretrained(folder).eval()
    native = model.config.image_hw

    def reference(pixels: torch.Tensor) -> torch.Tensor:
        # DINOv2 resamples its table to every input; ViT and DeiT only when asked.
        resample = tuple(pixels.shape[-2:]) != native and not hf_config.model_type.startswith("dinov2")
        return model_outputs(
            reference_model, pixels, **({"interpolate_pos_encoding": True} if resample else {})
        )

    return Converted(model=model, processor=processor, reference=reference)


__all__ = [
    "DINOV2_LAYERS",
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "VIT_LAYERS",
    "convert_hf_state_dict",
    "detect_hf_layout",
    "family_of",
    "hf_rename_rows",
    "image_processor_from_hf",
    "load_hf_checkpoint",
    "open_source",
    "vitrail_config_from_hf",
]
