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

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from ..configuration_vitrail import VitrailConfig, _pair
from ..modeling_vitrail import VitrailForImageClassification, VitrailModel
from .common import Converted, Drop, Rename, expected_shapes, model_outputs, read_weights, rename_state_dict

logger = logging.getLogger("vitrail.convert")

P = "(weight|bias)"  # the parameter group in rows below

# ---- layer tables: (source suffix, vitrail suffix, slot) inside layer N; `{p}` is weight or bias -----------------

_QKV_HUB = (
    ("attention.attention.query.{p}", "attention.qkv.{p}", (0, 3)),
    ("attention.attention.key.{p}", "attention.qkv.{p}", (1, 3)),
    ("attention.attention.value.{p}", "attention.qkv.{p}", (2, 3)),
    ("attention.output.dense.{p}", "attention.proj.{p}", None),
)
_QKV_V5 = (
    ("attention.q_proj.{p}", "attention.qkv.{p}", (0, 3)),
    ("attention.k_proj.{p}", "attention.qkv.{p}", (1, 3)),
    ("attention.v_proj.{p}", "attention.qkv.{p}", (2, 3)),
    ("attention.o_proj.{p}", "attention.proj.{p}", None),
)
_VIT_NORMS = (
    ("layernorm_before.{p}", "norm1.{p}", None),
    ("layernorm_after.{p}", "norm2.{p}", None),
)
_DINOV2_COMMON = (
    ("norm1.{p}", "norm1.{p}", None),
    ("norm2.{p}", "norm2.{p}", None),
    ("layer_scale1.lambda1", "layer_scale1.scale", None),
    ("layer_scale2.lambda1", "layer_scale2.scale", None),
    ("mlp.fc1.{p}", "mlp.fc1.{p}", None),
    ("mlp.fc2.{p}", "mlp.fc2.{p}", None),
)

# layout -> (prefix of layer N, rows)
VIT_LAYERS = {
    "hub": (
        "encoder.layer.",
        (
            *_QKV_HUB,
            *_VIT_NORMS,
            ("intermediate.dense.{p}", "mlp.fc1.{p}", None),
            ("output.dense.{p}", "mlp.fc2.{p}", None),
        ),
    ),
    "v5": (
        "layers.",
        (*_QKV_V5, *_VIT_NORMS, ("mlp.fc1.{p}", "mlp.fc1.{p}", None), ("mlp.fc2.{p}", "mlp.fc2.{p}", None)),
    ),
}
DINOV2_LAYERS = {
    "hub": (
        "encoder.layer.",
        (
            *_QKV_HUB,
            *_DINOV2_COMMON,
            # SwiGLU (giant): one fused input projection, rows [gate; value], as vitrail's fc1.
            ("mlp.weights_in.{p}", "mlp.fc1.{p}", None),
            ("mlp.weights_out.{p}", "mlp.fc2.{p}", None),
        ),
    ),
    "v5": (
        "encoder.layer.",
        (
            *_QKV_V5,
            *_DINOV2_COMMON,
            ("mlp.gate_proj.{p}", "mlp.fc1.{p}", (0, 2)),
            ("mlp.up_proj.{p}", "mlp.fc1.{p}", (1, 2)),
            ("mlp.down_proj.{p}", "mlp.fc2.{p}", None),
        ),
    ),
}

# ---- rows outside the layers ----------------------------------------------------------------------------------

_EMBEDDINGS = (
    Rename(r"embeddings\.cls_token", "{backbone}embeddings.cls_token"),
    Rename(r"embeddings\.position_embeddings", "{backbone}embeddings.position_embeddings"),
    Rename(
        rf"embeddings\.patch_embeddings\.projection\.{P}",
        "{backbone}embeddings.patch_embeddings.projection.{0}",
    ),
    Rename(rf"layernorm\.{P}", "{backbone}layernorm.{0}"),
)
_CLASSIFIER = (Rename(rf"classifier\.{P}", "classifier.{0}"),)
_DEIT_AS_REGISTER = Rename(
    r"embeddings\.distillation_token",
    "{backbone}embeddings.register_tokens",
    note="DeiT: no head reads the distillation token, so it becomes register token 0 with its own position "
    "(num_register_tokens=1, prefix_position_embeddings='all').",
)
_DEIT_DISTILLED = (
    Rename(
        r"embeddings\.distillation_token",
        "{backbone}embeddings.distillation_token",
        note="Distilled DeiT: distillation token and its head kept; logits are the mean of both heads.",
    ),
    Rename(rf"cls_classifier\.{P}", "classifier.{0}"),
    Rename(rf"distillation_classifier\.{P}", "distillation_classifier.{0}"),
)
_DINOV2_REGISTERS = (Rename(r"embeddings\.register_tokens", "{backbone}embeddings.register_tokens"),)

_POOLER = Drop(
    rf"pooler\.dense\.{P}",
    "transformers' ViT pooler (tanh(dense(cls))) has no vitrail counterpart; vitrail's pooler_output is the "
    "normalised class token, and no transformers classification head reads the pooler",
)
_MASK_TOKEN = Drop(
    r"embeddings\.mask_token",
    "DINOv2's mask token serves only its self-supervised pre-training; VitrailModel carries a mask token only "
    "for SimMIM (VitrailForMaskedImageModeling), where it is trained anew",
)


@dataclass(frozen=True)
class Family:
    """One transformers model family: its backbone prefix, layer tables and rows outside the layers."""

    prefix: str
    layers: dict
    rows: tuple[Rename, ...]
    drops: tuple[Drop, ...] = ()


FAMILIES = {
    "vit": Family("vit.", VIT_LAYERS, _EMBEDDINGS + _CLASSIFIER, (_POOLER,)),
    "deit": Family("deit.", VIT_LAYERS, _EMBEDDINGS + _CLASSIFIER + (_DEIT_AS_REGISTER,), (_POOLER,)),
    "deit_distilled": Family("deit.", VIT_LAYERS, _EMBEDDINGS + _DEIT_DISTILLED, (_POOLER,)),
    "dinov2": Family("dinov2.", DINOV2_LAYERS, _EMBEDDINGS + _CLASSIFIER, (_MASK_TOKEN,)),
    "dinov2_with_registers": Family(
        "dinov2_with_registers.", DINOV2_LAYERS, _EMBEDDINGS + _CLASSIFIER + _DINOV2_REGISTERS, (_MASK_TOKEN,)
    ),
}
SUPPORTED_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers")
_DISTILLED_ARCHITECTURE = "DeiTForImageClassificationWithTeacher"


def _is_distilled(hf_config, state=None) -> bool:
    if _DISTILLED_ARCHITECTURE in (getattr(hf_config, "architectures", None) or []):
        return True
    return state is not None and any(k.endswith("distillation_classifier.weight") for k in state)


def family_of(hf_config, state=None) -> str:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"Cannot convert transformers model_type {model_type!r}: vitrail converts {list(SUPPORTED_MODEL_TYPES)}."
        )
    return "deit_distilled" if model_type == "deit" and _is_distilled(hf_config, state) else model_type


def hf_rename_rows(family: str, layout: str) -> list[Rename]:
    """Every `Rename` row of one family in one layout: rows outside the layers, then the layer rows."""
    spec = FAMILIES[family]
    layers, rows = spec.layers[layout]
    expanded = []
    for src, dst, slot in rows:
        source = re.escape(layers) + r"(\d+)\." + re.escape(src).replace(r"\{p\}", P)
        target = "{backbone}encoder.layers.{0}." + dst.replace("{p}", "{1}")
        expanded.append(Rename(source, target, slot=slot))
    return [*spec.rows, *expanded]


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
    (h, w), (ph, pw) = _pair(fields["image_size"]), _pair(fields["patch_size"])
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
        patch = hf_config.patch_size
        fields.update(
            _dinov2_mlp(hf_config),
            encoder_stride=patch if isinstance(patch, int) else patch[0],
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


def _target_class(hf_config, state=None):
    return VitrailForImageClassification if _wants_head(hf_config, state) else VitrailModel


def convert_hf_state_dict(state: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Rename a transformers ViT / DeiT / DINOv2 state dict (either layout) to vitrail's names, checking it
    completely (see `vitrail.convert.common.rename_state_dict` for what is checked)."""
    family = family_of(hf_config, state)
    config = vitrail_config_from_hf(hf_config, state)
    target_cls = _target_class(hf_config, state)
    layout = detect_hf_layout(state)
    logger.info(
        "Converting %d tensors (%s, %s layout) into %s.", len(state), family, layout, target_cls.__name__
    )
    return rename_state_dict(
        state,
        hf_rename_rows(family, layout),
        expected_shapes(target_cls, config),
        drops=FAMILIES[family].drops,
        backbone="vitrail." if target_cls is VitrailForImageClassification else "",
        strip_prefix=FAMILIES[family].prefix,
        source_name=f"{family} checkpoint ({layout} layout)",
    )


# ---- folders ---------------------------------------------------------------------------------------------------


def load_hf_checkpoint(
    path: str | Path, allow_pickle: bool = False
) -> VitrailForImageClassification | VitrailModel:
    """Load a local transformers ViT / DeiT / DINOv2 folder (config.json + safetensors weights) as a vitrail model
    in eval mode: classification checkpoints give `VitrailForImageClassification`, backbones `VitrailModel`.
    `pytorch_model.bin` is read only with `allow_pickle=True`."""
    folder = Path(path)
    hf_config = AutoConfig.from_pretrained(folder)
    state = read_weights(folder, allow_pickle)
    converted = convert_hf_state_dict(state, hf_config)
    model = _target_class(hf_config, state)(vitrail_config_from_hf(hf_config, state))
    model.load_state_dict(converted, strict=True)
    return model.eval()


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
    """The converted model, its processor and transformers' own model as the reference, for
    `scripts/convert_checkpoint.py --from hf`."""
    import json

    import transformers

    folder = Path(path)
    model = load_hf_checkpoint(folder, allow_pickle=allow_pickle)
    processor_file = folder / "preprocessor_config.json"
    processor = (
        image_processor_from_hf(json.loads(processor_file.read_text())) if processor_file.is_file() else None
    )
    hf_config = AutoConfig.from_pretrained(folder)
    architecture = (hf_config.architectures or ["AutoModel"])[0]
    reference_model = getattr(transformers, architecture).from_pretrained(folder).eval()
    native = model.config.image_hw

    def reference(pixels: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if tuple(pixels.shape[-2:]) != native and not hf_config.model_type.startswith("dinov2"):
            kwargs["interpolate_pos_encoding"] = True  # DINOv2 always resamples its table
        return model_outputs(reference_model, pixels, **kwargs)

    notes = (
        []
        if processor is not None
        else [f"No preprocessor_config.json in {folder}: no image processor saved."]
    )
    return Converted(model=model, processor=processor, reference=reference, notes=notes)


__all__ = [
    "DINOV2_LAYERS",
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "VIT_LAYERS",
    "convert_hf_state_dict",
    "detect_hf_layout",
    "hf_rename_rows",
    "image_processor_from_hf",
    "load_hf_checkpoint",
    "open_source",
    "vitrail_config_from_hf",
]
