"""transformers checkpoints into vitrail: ViT, DeiT (plain and distilled), DINOv2 (with and without registers),
MAE, MSN, I-JEPA, SimMIM models, BEiT and data2vec-vision, DINOv3, the vision towers of CLIP and its kin, SigLIP and
AIMv2, and timm models saved through transformers' TimmWrapper classes.

A transformers checkpoint comes in one of two key layouts:

- `"hub"`: the names of google/vit-*, facebook/deit-* and facebook/dinov2-* on the Hub, which transformers 5.x
  still writes by default (`save_original_format=True`): `encoder.layer.N.attention.attention.query`, ...
- `"v5"`: transformers 5.x in-memory module names (`attention.q_proj`, `mlp.gate_proj`, ...), what
  `model.state_dict()` returns.

Each family is declared once below: rows outside the layers, one table of layer rows per layout, and the tensors
dropped with their reason. `vitrail.convert.common.rename_state_dict` then places every tensor exactly once.

How each family maps onto vitrail's config:

- ViT: class token with the only prefix position, class-token pooling. MSN (`vit_msn`) is the same model.
- DeiT: the distillation token follows the class token and owns a position (`prefix_position_embeddings="all"`).
  A DeiT fine-tuned without its teacher (`DeiTForImageClassification`) has no head reading that token, so it
  becomes one register token; a distilled one (`DeiTForImageClassificationWithTeacher`) keeps it as
  `use_distillation_token=True` with its second head, and the logits are the mean of both heads, as transformers
  computes them at inference.
- DINOv2: LayerScale, eps 1e-6, registers without positions, SwiGLU MLP for the giant model, and the linear head on
  `[class token; mean of patch tokens]` (`pooling="cls_mean"`). transformers' DINOv2 resamples its 518-px position
  table to every input, so converted DINOv2 models get `dynamic_image_size=True`.
- MAE (`vit_mae`): a ViT whose position table is a fixed sin-cos table stored in the checkpoint; it is loaded as a
  learned table (its values, whatever they are, so fine-tuning may move it, as MAE's own fine-tuning does). The
  converted model is MAE's encoder seeing every patch in order (`mask_ratio=0`, `noise` increasing along the
  patches); the pixel decoder of `ViTMAEForPreTraining` is dropped with its reason.
- I-JEPA: no class token, positions for the patches only, and `IJepaForImageClassification`'s head on the mean of
  the tokens (`pooling="mean"`).
- SimMIM (`ViTForMaskedImageModeling`, `DeiTForMaskedImageModeling`): the mask token and the 1x1-convolution +
  pixel-shuffle decoder are vitrail's masked-image-modeling ones, giving `VitrailForMaskedImageModeling`.
- TimmWrapper: timm's config.json and timm's tensors under `timm_model.`; the prefix is taken off and the timm
  converter (`vitrail.convert.timm`) does the rest.
- Vision towers (alone, or read out of the full image-text checkpoint, whose text tower and projections are
  dropped with their reason): CLIP, AltCLIP, Chinese-CLIP, MetaCLIP 2, OWL-ViT and CLIPSeg have a bias-free patch
  convolution, a class embedding, a LayerNorm before the encoder (`pre_norm`) and the post-LayerNorm on the pooled
  class token only (`use_fc_norm`, class-token pooling); their classification heads read the mean of the un-normed
  patch tokens (`pooling="mean"`, `final_norm=False`). GIT's tower normalises every token. SigLIP has no class
  token, normalises every token and pools by attention (`pooling="map"`, its packed [q; k; v] split into `q` and
  `kv`); its classifier reads the token mean. AIMv2: RMSNorm (also on the patch tokens), SwiGLU, biases as
  configured, and an attention-pooling head written in MAP's parameters (see `_aimv2_head_as_map`).
- BEiT, data2vec-vision: query and value biases only (`key_bias=False`), LayerScale, a relative position bias table
  per layer or shared (`relative_position_bias="table"`), an optional absolute table, and mean pooling through
  `pooler.layernorm` (`use_fc_norm`) or the normed class token. Their masked-image-modeling and segmentation heads
  are refused by name.
- DINOv3: 2D RoPE on centred coordinates (`rope_type="axial"`, `rope_layout="half"`), no position table,
  registers, LayerScale, SwiGLU and biases as configured; it takes any size (`dynamic_image_size=True`).
- Position resampling follows the source (`position_interpolation`): plain bicubic for ViT, DeiT, DINOv2, MAE, MSN
  and I-JEPA, antialiased bicubic for DINOv2 with registers, so a converted model matches its source at every
  resolution.

Types with a Vision Transformer inside that vitrail does not convert are listed in `REFUSED_MODEL_TYPES`, each
with what is missing; loading one raises `NotImplementedError` with that sentence.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from ..configuration_vitrail import VitrailConfig
from ..modeling_vitrail import VitrailForImageClassification, VitrailModel, VitrailPreTrainedModel
from .common import (
    Converted,
    Drop,
    Plan,
    Refuse,
    Rename,
    fused_qkv,
    height_width,
    in_layers,
    model_outputs,
    read_weights,
    refuse,
    unnest,
    weight_files,
)
from .timm import is_timm_config

logger = logging.getLogger(__name__)

# The model type transformers' config reader gives a timm checkpoint saved through `TimmWrapperModel` or
# `TimmWrapperForImageClassification` (tensors under `timm_model.`).
TIMM_WRAPPER = "timm_wrapper"

# ---- layer rows, inside layer N ------------------------------------------------------------------------------

_HUB_ATTENTION = (
    *fused_qkv(
        "attention.attention.query.{p}", "attention.attention.key.{p}", "attention.attention.value.{p}"
    ),
    Rename("attention.output.dense.{p}", "attention.proj.{p}"),
)
_V5_ATTENTION = (
    *fused_qkv("attention.q_proj.{p}", "attention.k_proj.{p}", "attention.v_proj.{p}"),
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
_UNUSED_MASK_TOKEN = Drop(
    "embeddings.mask_token",
    "a mask token outside a masked-image-modeling model is read by no head; VitrailModel carries one only for "
    "SimMIM (VitrailForMaskedImageModeling)",
)
_MAE_DECODER = Drop(
    "decoder.*",
    "MAE's pixel decoder (ViTMAEForPreTraining) serves only its pre-training and has no vitrail counterpart; the "
    "encoder is converted, and it sees every patch in order, as ViTMAEModel with mask_ratio=0.0 and noise=arange",
)
# SimMIM (ViTForMaskedImageModeling, DeiTForMaskedImageModeling): a 1x1 convolution and a pixel shuffle, which is
# vitrail's masked-image-modeling decoder, parameter for parameter.
_SIMMIM = (
    Rename("embeddings.mask_token", "{backbone}embeddings.mask_token"),
    Rename("decoder.0.{p}", "decoder.0.{p}"),
)
# I-JEPA has no class token: its position table covers the patches only.
_PATCH_EMBEDDINGS = tuple(row for row in _EMBEDDINGS if "cls_token" not in row.source)


@dataclass(frozen=True)
class Family:
    """One transformers model family: its layer rows per layout, rows outside the layers, tensors dropped, and the
    `base_model_prefix` its head classes put before the backbone's names."""

    layers: dict[str, tuple[Rename, ...]]
    rows: tuple[Rename, ...]
    drops: tuple[Drop, ...] = ()
    prefix: str = "vit"


FAMILIES = {
    "vit": Family(VIT_LAYERS, _EMBEDDINGS + _CLASSIFIER, (_POOLER, _UNUSED_MASK_TOKEN)),
    "vit_mim": Family(VIT_LAYERS, _EMBEDDINGS + _SIMMIM, (_POOLER,)),
    "deit": Family(
        VIT_LAYERS, _EMBEDDINGS + _CLASSIFIER + (_DEIT_AS_REGISTER,), (_POOLER, _UNUSED_MASK_TOKEN), "deit"
    ),
    "deit_distilled": Family(
        VIT_LAYERS, _EMBEDDINGS + _DEIT_DISTILLED, (_POOLER, _UNUSED_MASK_TOKEN), "deit"
    ),
    "deit_mim": Family(VIT_LAYERS, _EMBEDDINGS + (_DEIT_AS_REGISTER, *_SIMMIM), (_POOLER,), "deit"),
    "dinov2": Family(DINOV2_LAYERS, _EMBEDDINGS + _CLASSIFIER, (_MASK_TOKEN,), "dinov2"),
    "dinov2_with_registers": Family(
        DINOV2_LAYERS, _EMBEDDINGS + _CLASSIFIER + _DINOV2_REGISTERS, (_MASK_TOKEN,), "dinov2_with_registers"
    ),
    "vit_mae": Family(VIT_LAYERS, _EMBEDDINGS, (_MAE_DECODER,)),
    "vit_msn": Family(VIT_LAYERS, _EMBEDDINGS + _CLASSIFIER, (_UNUSED_MASK_TOKEN,)),
    "ijepa": Family(VIT_LAYERS, _PATCH_EMBEDDINGS + _CLASSIFIER, (_POOLER, _UNUSED_MASK_TOKEN), "ijepa"),
}

# ---- vision towers of image-text models: CLIP and its kin, SigLIP ------------------------------------------------
# transformers writes these names as they are (one layout). The tower sits under `vision_model.` in the full
# two-tower checkpoints and in some tower classes, at the root in others: the prefix is taken off where present.


def _as_token(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(1, 1, -1)  # CLIP's class embedding (D,) -> (1, 1, D)


def _as_table(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.unsqueeze(0)  # an nn.Embedding's weight (N, D) -> (1, N, D)


_TOWER_LAYER = (
    *fused_qkv("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"),
    Rename("self_attn.out_proj.{p}", "attention.proj.{p}"),
    Rename("layer_norm1.{p}", "norm1.{p}"),
    Rename("layer_norm2.{p}", "norm2.{p}"),
    *_MLP,
)
# `encoder.layers.N` as the Hub's checkpoints have it; transformers 5.x writes `encoder.layer.N` for AltCLIP's
# tower, renaming its text tower's layers.
_TOWER_LAYER_ROWS = in_layers("encoder.layers.{n}.", _TOWER_LAYER) + in_layers(
    "encoder.layer.{n}.", _TOWER_LAYER
)
TOWER_LAYERS = {"hub": _TOWER_LAYER_ROWS, "v5": _TOWER_LAYER_ROWS}
_TOWER_EMBEDDINGS = (
    Rename("embeddings.patch_embedding.{p}", "{backbone}embeddings.patch_embeddings.projection.{p}"),
    Rename(
        "embeddings.position_embedding.weight",
        "{backbone}embeddings.position_embeddings",
        transform=_as_table,
    ),
)
_CLIP_EMBEDDINGS = (
    *_TOWER_EMBEDDINGS,
    Rename("embeddings.class_embedding", "{backbone}embeddings.cls_token", transform=_as_token),
    Rename("pre_layrnorm.{p}", "{backbone}embeddings.pre_norm.{p}"),
    Rename("pre_layernorm.{p}", "{backbone}embeddings.pre_norm.{p}"),  # OWL-ViT's spelling
)
_POST_NORM = Rename("post_layernorm.{p}", "{backbone}layernorm.{p}")
# SigLIP's attention-pooling head; `_unpack_attention` splits nn.MultiheadAttention's packed [q; k; v] first.
_SIGLIP_HEAD = (
    Rename("head.probe", "{backbone}attention_pool.latent"),
    Rename("head.attention.q.{p}", "{backbone}attention_pool.q.{p}"),
    Rename("head.attention.kv.{p}", "{backbone}attention_pool.kv.{p}"),
    Rename("head.attention.out_proj.{p}", "{backbone}attention_pool.proj.{p}"),
    Rename("head.layernorm.{p}", "{backbone}attention_pool.norm.{p}"),
    Rename("head.mlp.fc1.{p}", "{backbone}attention_pool.mlp.fc1.{p}"),
    Rename("head.mlp.fc2.{p}", "{backbone}attention_pool.mlp.fc2.{p}"),
)
_TWO_TOWER = (
    "the text tower and the projections into the joint image-text space; vitrail converts the vision tower"
)
_OTHER_TOWER = (
    Drop("text_model.*", _TWO_TOWER),
    Drop("text_projection.*", _TWO_TOWER),
    Drop("visual_projection.*", _TWO_TOWER),
    Drop("logit_scale", _TWO_TOWER),
    Drop("logit_bias", _TWO_TOWER),
)
_UNREAD_POST_NORM = Drop(
    "post_layernorm.{p}",
    "CLIPForImageClassification's head reads the mean of the patch tokens before the post-LayerNorm, which serves "
    "only the pooler; the converted model has no final norm (final_norm=False), as the head sees it",
)
_UNREAD_SIGLIP_HEAD = Drop(
    "head.*",
    "SiglipForImageClassification's head reads the mean of the tokens; the tower's attention-pooling head is not "
    "used by it",
)

FAMILIES.update(
    {
        # CLIP, AltCLIP, Chinese-CLIP, MetaCLIP 2, OWL-ViT (v1, v2): a bias-free patch convolution, a class
        # embedding, a LayerNorm before the encoder, and the post-LayerNorm on the pooled class token only.
        "clip_vision": Family(TOWER_LAYERS, _CLIP_EMBEDDINGS + (_POST_NORM,), _OTHER_TOWER, "vision_model"),
        "clip_head": Family(
            TOWER_LAYERS, _CLIP_EMBEDDINGS + _CLASSIFIER, (*_OTHER_TOWER, _UNREAD_POST_NORM), "vision_model"
        ),
        # GIT's CLIP tower applies the post-LayerNorm to every token and has no pooler.
        "git_vision": Family(TOWER_LAYERS, _CLIP_EMBEDDINGS + (_POST_NORM,), _OTHER_TOWER, "vision_model"),
        # SigLIP: no class token, positions for the patches, the post-LayerNorm on every token, attention pooling.
        "siglip_vision": Family(
            TOWER_LAYERS, _TOWER_EMBEDDINGS + (_POST_NORM, *_SIGLIP_HEAD), _OTHER_TOWER, "vision_model"
        ),
        "siglip_head": Family(
            TOWER_LAYERS,
            _TOWER_EMBEDDINGS + (_POST_NORM, *_CLASSIFIER),
            (*_OTHER_TOWER, _UNREAD_SIGLIP_HEAD),
            "vision_model",
        ),
    }
)
# AIMv2: RMSNorm everywhere (also on the patch tokens), SwiGLU, biases as configured, no class token, and an
# attention-pooling head that `_aimv2_head_as_map` writes in vitrail's MAP parameters.
_AIMV2_LAYER = (
    *fused_qkv("attention.q_proj.{p}", "attention.k_proj.{p}", "attention.v_proj.{p}"),
    Rename("attention.out_proj.{p}", "attention.proj.{p}"),
    Rename("rms_norm1.weight", "norm1.weight"),
    Rename("rms_norm2.weight", "norm2.weight"),
    Rename("ffn.gate_proj.{p}", "mlp.fc1.{p}", slot=(0, 2)),
    Rename("ffn.up_proj.{p}", "mlp.fc1.{p}", slot=(1, 2)),
    Rename("ffn.down_proj.{p}", "mlp.fc2.{p}"),
)
_AIMV2_ROWS = in_layers("encoder.layers.{n}.", _AIMV2_LAYER) + in_layers("encoder.layer.{n}.", _AIMV2_LAYER)
AIMV2_LAYERS = {"hub": _AIMV2_ROWS, "v5": _AIMV2_ROWS}
_AIMV2_EMBEDDINGS = (
    Rename("embeddings.patch_embed.{p}", "{backbone}embeddings.patch_embeddings.projection.{p}"),
    Rename("embeddings.rms_norm.weight", "{backbone}embeddings.patch_embeddings.norm.weight"),
    Rename(
        "embeddings.position_embedding.weight",
        "{backbone}embeddings.position_embeddings",
        transform=_as_table,
    ),
    Rename("rms_norm.weight", "{backbone}layernorm.weight"),
)
_AIMV2_HEAD = (
    Rename("head.cls_token", "{backbone}attention_pool.latent"),
    Rename("head.output_proj.{p}", "{backbone}attention_pool.proj.{p}"),
    *(
        Rename(f"head.{part}.{{p}}", f"{{backbone}}attention_pool.{part}.{{p}}")
        for part in ("q", "kv", "norm", "mlp.fc1", "mlp.fc2")
    ),
)
FAMILIES["aimv2_vision"] = Family(AIMV2_LAYERS, _AIMV2_EMBEDDINGS + _AIMV2_HEAD, _OTHER_TOWER, "vision_model")
TOWER_LAYER_TABLES = (TOWER_LAYERS, AIMV2_LAYERS)
TOWER_FAMILIES = tuple(name for name, spec in FAMILIES.items() if spec.layers in TOWER_LAYER_TABLES)

# model type -> the family its tower belongs to (a classification checkpoint's family ends in `_head`).
TOWER_TYPES = {
    **dict.fromkeys(
        (
            "clip_vision_model",
            "clip",
            "altclip_vision_model",
            "altclip",
            "chinese_clip_vision_model",
            "chinese_clip",
            "metaclip_2_vision_model",
            "metaclip_2",
            "owlvit_vision_model",
            "owlv2_vision_model",
            "clipseg_vision_model",  # CLIPSeg's tower, CLIP's saved alone
        ),
        "clip",
    ),
    "git_vision_model": "git",
    **dict.fromkeys(("siglip_vision_model", "siglip"), "siglip"),
    **dict.fromkeys(("aimv2_vision_model", "aimv2"), "aimv2"),
}


# ---- BEiT and data2vec-vision: relative position bias tables, query/value-only biases, LayerScale ---------------

_BEIT_HUB = (
    *fused_qkv(
        "attention.attention.query.weight",
        "attention.attention.key.weight",
        "attention.attention.value.weight",
        "attention.qkv.weight",
    ),
    Rename("attention.attention.query.bias", "attention.q_bias"),
    Rename("attention.attention.value.bias", "attention.v_bias"),
    Rename(
        "attention.attention.relative_position_bias.relative_position_bias_table",
        "attention.relative_position_bias.table",
    ),
    Rename("attention.output.dense.{p}", "attention.proj.{p}"),
    Rename("intermediate.dense.{p}", "mlp.fc1.{p}"),
    Rename("output.dense.{p}", "mlp.fc2.{p}"),
)
_BEIT_V5 = (
    *fused_qkv(
        "attention.q_proj.weight",
        "attention.k_proj.weight",
        "attention.v_proj.weight",
        "attention.qkv.weight",
    ),
    Rename("attention.q_proj.bias", "attention.q_bias"),
    Rename("attention.v_proj.bias", "attention.v_bias"),
    Rename("relative_position_bias.relative_position_bias_table", "attention.relative_position_bias.table"),
    Rename("attention.o_proj.{p}", "attention.proj.{p}"),
    *_MLP,
)
_BEIT_BLOCK = (
    *_VIT_NORMS,
    Rename("lambda_1", "layer_scale1.scale"),
    Rename("lambda_2", "layer_scale2.scale"),
)
BEIT_LAYERS = {
    "hub": in_layers("encoder.layer.{n}.", _BEIT_HUB + _BEIT_BLOCK),
    "v5": in_layers("layers.{n}.", _BEIT_V5 + _BEIT_BLOCK),
}
_BEIT_ROWS = (
    *_EMBEDDINGS,  # class token, patch convolution, the absolute position table where there is one, final norm
    Rename("pooler.layernorm.{p}", "{backbone}layernorm.{p}"),  # the norm of mean pooling (use_fc_norm)
    Rename(
        "encoder.relative_position_bias.relative_position_bias_table",
        "{backbone}encoder.relative_position_bias.table",
    ),
    Rename(
        "shared_position_bias.relative_position_bias_table", "{backbone}encoder.relative_position_bias.table"
    ),
    *_CLASSIFIER,
)
# Heads other than the classifier read more than vitrail has: refused by name.
_BEIT_MIM_HEAD = "BEiT's masked-image-modeling head, which predicts the ids of a visual tokenizer"
_BEIT_SEGMENTATION_HEADS = (
    "BEiT's semantic-segmentation heads (UperNet decode head, FPNs); put VitrailBackbone under transformers' "
    "UperNetForSemanticSegmentation instead"
)
BEIT_REFUSED = (Refuse("lm_head.*", _BEIT_MIM_HEAD), Refuse("decode_head.*", _BEIT_SEGMENTATION_HEADS))
FAMILIES.update(
    {
        "beit": Family(BEIT_LAYERS, _BEIT_ROWS, (_UNUSED_MASK_TOKEN,), "beit"),
        "data2vec-vision": Family(BEIT_LAYERS, _BEIT_ROWS, (_UNUSED_MASK_TOKEN,), "data2vec_vision"),
    }
)


# ---- DINOv3: 2D RoPE, registers, LayerScale, optional SwiGLU and key bias --------------------------------------


def _dinov3_layers(gated: bool, fused_bias: bool) -> dict[str, tuple[Rename, ...]]:
    """DINOv3's layer rows, under the names it saves (`layer.N`) and holds in memory (`model.layer.N`): its MLP plain
    (`up_proj`, `down_proj`) or gated (`gate_proj`, `up_proj`, `down_proj`); its biases query and value only
    (`key_bias=False`) or all three (one fused `qkv` bias)."""
    if fused_bias:
        biases = tuple(
            Rename(f"attention.{name}_proj.bias", "attention.qkv.bias", slot=(index, 3))
            for index, name in enumerate("qkv")
        )
    else:
        biases = (
            Rename("attention.q_proj.bias", "attention.q_bias"),
            Rename("attention.v_proj.bias", "attention.v_bias"),
        )
    if gated:
        mlp = (
            Rename("mlp.gate_proj.{p}", "mlp.fc1.{p}", slot=(0, 2)),
            Rename("mlp.up_proj.{p}", "mlp.fc1.{p}", slot=(1, 2)),
        )
    else:
        mlp = (Rename("mlp.up_proj.{p}", "mlp.fc1.{p}"),)
    rows = (
        *(
            Rename(f"attention.{name}_proj.weight", "attention.qkv.weight", slot=(i, 3))
            for i, name in enumerate("qkv")
        ),
        *biases,
        Rename("attention.o_proj.{p}", "attention.proj.{p}"),
        Rename("norm1.{p}", "norm1.{p}"),
        Rename("norm2.{p}", "norm2.{p}"),
        Rename("layer_scale1.lambda1", "layer_scale1.scale"),
        Rename("layer_scale2.lambda1", "layer_scale2.scale"),
        *mlp,
        Rename("mlp.down_proj.{p}", "mlp.fc2.{p}"),
    )
    table = in_layers("layer.{n}.", rows) + in_layers("model.layer.{n}.", rows)
    return {"hub": table, "v5": table}


_DINOV3_ROWS = (
    Rename("embeddings.cls_token", "{backbone}embeddings.cls_token"),
    Rename("embeddings.register_tokens", "{backbone}embeddings.register_tokens"),
    Rename("embeddings.patch_embeddings.{p}", "{backbone}embeddings.patch_embeddings.projection.{p}"),
    Rename("norm.{p}", "{backbone}layernorm.{p}"),
)
_DINOV3_MASK_TOKEN = Drop(
    "embeddings.mask_token",
    "DINOv3's mask token serves only its self-supervised pre-training; VitrailModel carries a mask token only "
    "for SimMIM (VitrailForMaskedImageModeling)",
)
FAMILIES.update(
    {
        "dinov3_vit" + "_gated" * gated + "_qkv_bias" * fused: Family(
            _dinov3_layers(gated, fused), _DINOV3_ROWS, (_DINOV3_MASK_TOKEN,), "dinov3_vit"
        )
        for gated in (False, True)
        for fused in (False, True)
    }
)
ONE_LAYOUT = (*(FAMILIES[name].layers for name in FAMILIES if name.startswith("dinov3_vit")),)


SUPPORTED_MODEL_TYPES = (
    "vit",
    "deit",
    "dinov2",
    "dinov2_with_registers",
    "vit_mae",
    "vit_msn",
    "ijepa",
    *TOWER_TYPES,
    "beit",
    "data2vec-vision",
    "dinov3_vit",
    TIMM_WRAPPER,
)

_SAM = "SAM's windowed encoder with relative positions and its convolutional neck"
_BLIP = (
    "BLIP's vision pooler, which applies the post-LayerNorm to the class token twice, where vitrail's pooling "
    "normalises it once"
)
# transformers model types with a Vision Transformer inside that vitrail does not convert, and what is missing.
REFUSED_MODEL_TYPES = {
    **dict.fromkeys(
        ("vivit", "timesformer", "videomae", "vjepa2"),
        "a video transformer (tubelet or divided space-time attention); vitrail is an image model",
    ),
    "vit_hybrid": "a hybrid model whose tokens come from a BiT convolutional stem, not from a patch convolution",
    "dpt": "a depth or segmentation model (DPT's neck and head on its own encoder); vitrail serves as DPT's "
    "backbone instead (VitrailBackbone with reshape_hidden_states=False)",
    "yolos": "YOLOS's detection tokens with their own position table and its detection heads",
    "vitdet": "ViTDet's windowed attention with relative position tables, which vitrail's layers do not do",
    "sam_vision_model": _SAM,
    "vitpose_backbone": "VitPose's patch convolution padded by 2 pixels (patches straddle the border) and, in its "
    "multi-dataset models, a mixture-of-experts MLP",
    **dict.fromkeys(
        ("siglip2_vision_model", "siglip2"),
        "SigLIP 2's NaFlex inputs: images its processor cuts into patches at their own aspect ratio "
        "((batch, patches, channels x patch x patch) with `spatial_shapes` and a padding mask), and a position table "
        "resized to each image bilinearly with antialiasing, where vitrail takes images and resamples positions "
        "bicubically",
    ),
    **dict.fromkeys(
        ("blip_vision_model", "blip", "blip_2_vision_model", "blip-2"),
        _BLIP,
    ),
    **dict.fromkeys(
        ("mlcd_vision_model", "mlcd"),
        "MLCD's learned rotary angle for the class token (`class_pos_emb`); vitrail's 2D RoPE rotates patch tokens "
        "only",
    ),
    **dict.fromkeys(
        ("owlvit", "owlv2"),
        "OWL-ViT's text tower and detection heads; vitrail converts its vision tower saved alone "
        "(`OwlViTVisionModel` / `Owlv2VisionModel`)",
    ),
    "git": "GIT's text decoder (a captioning model); vitrail converts its vision tower saved alone (`GitVisionModel`)",
    # Vision encoders that transformers configures as Vision Transformers (`image_size`, `patch_size`, ...).
    **dict.fromkeys(
        (
            "sam_hq_vision_model",
            "deepseek_ocr2_sam_vision_model",
            "unlimited_ocr_sam_vision_model",
            "got_ocr2_vision",
        ),
        _SAM,
    ),
    **dict.fromkeys(("instructblip_vision_model", "instructblipvideo_vision_model"), _BLIP),
    **dict.fromkeys(
        ("lw_detr_vit", "rf_detr_dinov2", "sam3_vit_model"),
        "attention within windows of patches in some layers (a detection or segmentation backbone), which "
        "vitrail's layers do not do",
    ),
    **dict.fromkeys(
        ("eomt", "eomt_dinov3"),
        "EoMT's segmentation queries, which join the tokens in the encoder's last layers, and its mask head",
    ),
    "xclip_vision_model": "X-CLIP's video encoder (cross-frame message tokens and a multi-frame integration "
    "transformer); vitrail is an image model",
    "videomt": "a video segmentation model (queries inside the encoder and mask heads); vitrail is an image model",
    "groupvit_vision_model": "GroupViT's group tokens and grouping blocks, which merge patch tokens between stages",
    "mgp-str": "MGP-STR's scene-text recognition heads (character, BPE and WordPiece readouts)",
    "seggpt": "SegGPT's in-context segmentation (prompt and input images encoded together) and its pixel decoder",
    "vilt": "ViLT's single-stream image-text encoder (text tokens and patches in one sequence)",
    "radio": "RADIO's several class tokens and its position table made for `max_img_size` and cut to each input",
    "pixio": "Pixio's several class tokens (`n_cls_tokens`), where vitrail has one",
    "sapiens2": "Sapiens 2's grouped-query attention (`num_key_value_heads_per_layer`) and its layers that do not "
    "attend over the whole image (full attention only in the first and last layers)",
    "tipsv2_vision_model": "TIPSv2's vision tower, which vitrail has no conversion table for",
    "flava_image_model": "FLAVA's image encoder, which vitrail has no conversion table for",
    **dict.fromkeys(
        (
            "idefics2_vision",
            "idefics3_vision",
            "smolvlm_vision",
            "granite_docling_vision",
            "minicpm_ocr_vision",
            "minicpmv4_6_vision",
            "minicpmv4_7_vision",
            "minimax_m3_vl_vision",
            "molmo2_vision",
            "ovis2_vision",
            "ovis2_5_vision",
            "paddleocr_vl_vision",
            "phi4_multimodal_vision",
            "pixtral",
            "pp_chart2table_vision",
            "pp_formulanet_vision",
            "qianfan_ocr_vision",
            "slanext_vision",
            "step3p5_vision",
            "unlimited_ocr_vision_encoder",
            "llama4_vision_model",
            "janus_vision_model",
            "internvl_vision",
            "kosmos_2_vision_model",
        ),
        "a vision-language model's own vision encoder, made for that model's inputs and language side, which "
        "vitrail has no conversion table for (vitrail converts the CLIP, SigLIP and AIMv2 towers)",
    ),
}


# transformers head classes over a converted backbone whose heads vitrail cannot reproduce, and what they are.
REFUSED_ARCHITECTURES = {
    **dict.fromkeys(("BeitForMaskedImageModeling", "Data2VecVisionForMaskedImageModeling"), _BEIT_MIM_HEAD),
    **dict.fromkeys(
        ("BeitForSemanticSegmentation", "Data2VecVisionForSemanticSegmentation"), _BEIT_SEGMENTATION_HEADS
    ),
}


def check_architectures(architectures) -> None:
    """Refuse, before any weight is read, a checkpoint whose head class `REFUSED_ARCHITECTURES` names."""
    for name in architectures or ():
        if name in REFUSED_ARCHITECTURES:
            raise NotImplementedError(
                f"vitrail does not convert {name} checkpoints: they hold {REFUSED_ARCHITECTURES[name]}."
            )


def _is_distilled(hf_config, state=None) -> bool:
    if "DeiTForImageClassificationWithTeacher" in (getattr(hf_config, "architectures", None) or []):
        return True
    return state is not None and any(k.endswith("distillation_classifier.weight") for k in state)


def _is_simmim(hf_config, state=None) -> bool:
    if any(a.endswith("ForMaskedImageModeling") for a in getattr(hf_config, "architectures", None) or []):
        return True
    return state is not None and "decoder.0.weight" in state


def refusal(model_type: str | None) -> str:
    """The sentence that refuses a transformers model type vitrail does not convert, naming what is missing."""
    reason = REFUSED_MODEL_TYPES.get(model_type)
    if reason is None:
        return (
            f"transformers model type {model_type!r} is not a Vision Transformer vitrail converts; vitrail converts "
            f"{list(SUPPORTED_MODEL_TYPES)}."
        )
    return f"vitrail does not convert transformers {model_type!r} checkpoints: they hold {reason}."


def family_of(hf_config, state=None) -> str:
    """The key of `FAMILIES` for a transformers config (and its tensors, which tell a distilled DeiT and a SimMIM
    model)."""
    model_type = getattr(hf_config, "model_type", None)
    check_architectures(getattr(hf_config, "architectures", None))
    if model_type in TOWER_TYPES:
        tower = TOWER_TYPES[model_type]
        if tower in ("git", "aimv2"):  # no classification head in transformers
            return f"{tower}_vision"
        return f"{tower}_head" if _wants_head(hf_config, state) else f"{tower}_vision"
    if model_type == "dinov3_vit":
        biases = (hf_config.query_bias, hf_config.key_bias, hf_config.value_bias)
        if biases not in ((True, False, True), (True, True, True), (False, False, False)):
            raise NotImplementedError(
                f"DINOv3 with (query, key, value) biases {biases}: vitrail's attention has all three, none, or the "
                "query's and value's only (`key_bias=False`)."
            )
        return "dinov3_vit" + "_gated" * hf_config.use_gated_mlp + "_qkv_bias" * all(biases)
    if model_type not in FAMILIES:
        raise NotImplementedError(refusal(model_type))
    if model_type in ("vit", "deit") and _is_simmim(hf_config, state):
        return f"{model_type}_mim"
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


def _tower_config(family: str, hf_config, state=None) -> VitrailConfig:
    """The `VitrailConfig` of a CLIP-like or SigLIP vision tower (alone, or in its two-tower or classification
    checkpoint, whose labels it takes)."""
    vision = getattr(hf_config, "vision_config", None) or hf_config
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
             "image_size", "patch_size", "num_channels")  # fmt: skip
    fields = {name: getattr(vision, name) for name in names}
    if hasattr(vision, "layer_norm_eps"):
        fields["layer_norm_eps"] = vision.layer_norm_eps
    fields.update(
        attention_probs_dropout_prob=vision.attention_dropout,
        initializer_range=getattr(vision, "initializer_range", 0.02),
        encoder_stride=height_width(vision.patch_size)[0],
        position_interpolation="bicubic",  # their `interpolate_pos_encoding`
        id2label={int(k): v for k, v in hf_config.id2label.items()},
        label2id=dict(hf_config.label2id),
    )
    if family.startswith(("clip", "git")):
        fields.update(use_cls_token=True, patch_embedding_bias=False, pre_norm=True)
        if family == "clip_vision":  # pooler: the post-LayerNorm on the class token; tokens un-normed
            fields.update(pooling="cls", use_fc_norm=True)
        elif family == "clip_head":  # the head: the mean of the un-normed patch tokens
            fields.update(pooling="mean", final_norm=False)
    elif family == "aimv2_vision":
        if vision.is_native:
            raise NotImplementedError(
                "AIMv2's native-resolution variant (`is_native=True`) computes sin-cos positions for each input with "
                "frequencies 10000^(-i/d) over d = hidden_size // 4 slots, which vitrail's sin-cos positions do not "
                "use (they spread the frequencies over d - 1 steps); convert a fixed-resolution AIMv2."
            )
        head = vision.use_head
        fields.update(
            layer_norm_eps=vision.rms_norm_eps,
            norm_type="rmsnorm",
            patch_embedding_norm=True,
            use_cls_token=False,
            prefix_position_embeddings="none",
            mlp_type="swiglu",
            qkv_bias=vision.qkv_bias,
            proj_bias=vision.qkv_bias,
            mlp_bias=vision.mlp_bias,
            pooling="map" if head else "mean",
            # AIMv2's pool has no MLP: vitrail's is written as one of width 1 whose output is zero.
            map_intermediate_size=1 if head else None,
        )
    else:
        head = state is None or "head.probe" in {k.removeprefix("vision_model.") for k in state}
        pooled = (
            "map"
            if family == "siglip_vision" and getattr(vision, "vision_use_head", True) and head
            else "mean"
        )
        fields.update(use_cls_token=False, pooling=pooled, prefix_position_embeddings="none")
    return VitrailConfig(position_embedding_type="learned", **fields)


def _backbone_fields(hf_config) -> dict:
    """A backbone config's choices (Dinov2Backbone, DINOv3ViTBackbone): its stages, named as vitrail's, and what its
    feature maps are."""
    if not getattr(
        hf_config, "stage_names", None
    ):  # not a backbone config (data2vec-vision's out_indices index
        return {}  # its segmentation heads' hidden states)
    return dict(
        out_indices=list(hf_config.out_indices),
        apply_layernorm=getattr(hf_config, "apply_layernorm", True),
        reshape_hidden_states=getattr(hf_config, "reshape_hidden_states", True),
    )


def _beit_config(hf_config) -> VitrailConfig:
    """BEiT / data2vec-vision: q/v biases, LayerScale, a relative position bias table per layer or shared, an
    optional absolute position table, and mean pooling through `pooler.layernorm` (vitrail's `use_fc_norm`) or the
    normed class token."""
    fields = {name: getattr(hf_config, name) for name in _SHARED_CONFIG_FIELDS if name != "qkv_bias"}
    relative = hf_config.use_relative_position_bias or hf_config.use_shared_relative_position_bias
    mean = hf_config.use_mean_pooling
    fields.update(
        intermediate_size=hf_config.intermediate_size,
        encoder_stride=height_width(hf_config.patch_size)[0],
        drop_path_rate=hf_config.drop_path_rate,
        layer_scale_init_value=hf_config.layer_scale_init_value or None,  # 0 or less: no LayerScale
        key_bias=False,
        position_embedding_type="learned" if hf_config.use_absolute_position_embeddings else "none",
        relative_position_bias="table" if relative else "none",
        relative_position_bias_shared=hf_config.use_shared_relative_position_bias,
        pooling="mean" if mean else "cls",
        use_fc_norm=mean,
        position_interpolation="bicubic",
        id2label={int(k): v for k, v in hf_config.id2label.items()},
        label2id=dict(hf_config.label2id),
        **_backbone_fields(hf_config),
    )
    return VitrailConfig(**fields)


def _dinov3_config(hf_config) -> VitrailConfig:
    """DINOv3: 2D RoPE on centred coordinates (theta `rope_theta`, pairs `(i, i + d/2)`), no position table,
    registers, LayerScale, biases and gated MLP as configured; it takes any input size, as transformers' does."""
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
             "layer_norm_eps", "image_size", "patch_size", "num_channels", "initializer_range", "drop_path_rate",
             "num_register_tokens", "proj_bias", "mlp_bias")  # fmt: skip
    fields = {name: getattr(hf_config, name) for name in names}
    fields.update(
        attention_probs_dropout_prob=hf_config.attention_dropout,
        encoder_stride=height_width(hf_config.patch_size)[0],
        layer_scale_init_value=hf_config.layerscale_value,
        qkv_bias=hf_config.query_bias,
        key_bias=hf_config.key_bias,
        mlp_type="swiglu" if hf_config.use_gated_mlp else "mlp",
        position_embedding_type="none",
        prefix_position_embeddings="none",
        rope_type="axial",
        rope_theta=hf_config.rope_theta,
        rope_coordinates="centered",
        rope_layout="half",
        rope_train_shift=hf_config.pos_embed_shift,
        rope_train_jitter=hf_config.pos_embed_jitter,
        rope_train_rescale=hf_config.pos_embed_rescale,
        dynamic_image_size=True,
        pooling="cls",
        out_indices=list(hf_config.out_indices),
    )
    backbone = "DINOv3ViTBackbone" in (hf_config.architectures or [])
    if backbone and not (hf_config.reshape_hidden_states and hf_config.apply_layernorm):
        raise NotImplementedError(
            "This DINOv3ViTBackbone gives token sequences without the prefix tokens (`reshape_hidden_states=False`) "
            "or un-normed stages but a normed last one (`apply_layernorm=False`); VitrailBackbone follows "
            "Dinov2Backbone there (every token; the norm on all stages or none). Save it with "
            "`reshape_hidden_states=True` and `apply_layernorm=True`, then choose vitrail's options when loading."
        )
    return VitrailConfig(**fields)


def vitrail_config_from_hf(hf_config, state=None) -> VitrailConfig:
    """The `VitrailConfig` that reproduces a transformers ViT, DeiT, DINOv2, MAE, MSN, I-JEPA, CLIP-like or SigLIP
    config (see the module docstring)."""
    family = family_of(hf_config, state)
    if FAMILIES[family].layers in TOWER_LAYER_TABLES:
        return _tower_config(family, hf_config, state)
    if family in ("beit", "data2vec-vision"):
        return _beit_config(hf_config)
    if family.startswith("dinov3_vit"):
        return _dinov3_config(hf_config)
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
        fields.update(_backbone_fields(hf_config))
    else:
        fields.update(
            intermediate_size=hf_config.intermediate_size,
            # MAE, MSN and I-JEPA configs have no decoder stride; a SimMIM decoder would need the patch's.
            encoder_stride=getattr(hf_config, "encoder_stride", ph),
            pooling="cls",
            position_interpolation="bicubic",
        )
        if family in ("deit", "deit_mim"):
            fields.update(num_register_tokens=1, prefix_position_embeddings="all")
        elif family == "deit_distilled":
            fields.update(use_distillation_token=True, prefix_position_embeddings="all")
        elif family == "ijepa":
            # No class token; IJepaForImageClassification's head reads the mean of all (patch) tokens.
            fields.update(use_cls_token=False, pooling="mean", prefix_position_embeddings="none")
    fields = {"use_cls_token": True, "position_embedding_type": "learned", **fields}
    return VitrailConfig(**fields)


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


def _unpack_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`nn.MultiheadAttention`'s packed `in_proj_weight` / `in_proj_bias` (rows [q; k; v], SigLIP's pooling head)
    split into `q.weight` (rows [q]) and `kv.weight` (rows [k; v]), the parts vitrail's attention pool has."""
    out = {}
    for name, tensor in state.items():
        stem, _, kind = name.rpartition(".in_proj_")
        if not stem or kind not in ("weight", "bias"):
            out[name] = tensor
            continue
        query, key_value = tensor.split([len(tensor) // 3, 2 * len(tensor) // 3])
        out[f"{stem}.q.{kind}"], out[f"{stem}.kv.{kind}"] = query, key_value
        logger.info("Split %s (rows [q; k; v]) into %s.q.%s and %s.kv.%s.", name, stem, kind, stem, kind)
    return out


def _aimv2_head_as_map(state: dict[str, torch.Tensor], config: VitrailConfig) -> dict[str, torch.Tensor]:
    """AIMv2's pooling head in the parameters of vitrail's MAP head, which computes the same: its learned query
    attends through `k_proj` / `v_proj` (joined as `kv`, zero biases where it has none) and `output_proj`. The
    parts AIMv2 lacks are written so that they change nothing: the query projection is the identity, and the
    residual MLP (width 1) has a zero output layer, so `x + mlp(norm(x)) = x`."""
    prefix = "vision_model.head." if "vision_model.head.cls_token" in state else "head."
    if f"{prefix}cls_token" not in state:
        return state
    out = {
        name: t for name, t in state.items() if not name.startswith((f"{prefix}k_proj", f"{prefix}v_proj"))
    }
    width = config.hidden_size
    like = state[f"{prefix}cls_token"]
    zeros = like.new_zeros(width)
    key, value = state[f"{prefix}k_proj.weight"], state[f"{prefix}v_proj.weight"]
    out[f"{prefix}kv.weight"] = torch.cat([key, value])
    biases = [state.get(f"{prefix}{name}_proj.bias", zeros) for name in ("k", "v")]
    out[f"{prefix}kv.bias"] = torch.cat(biases)
    out[f"{prefix}q.weight"], out[f"{prefix}q.bias"] = torch.eye(width, dtype=like.dtype), zeros.clone()
    out[f"{prefix}norm.weight"] = like.new_ones(width)
    out[f"{prefix}mlp.fc1.weight"], out[f"{prefix}mlp.fc1.bias"] = like.new_zeros(1, width), like.new_zeros(1)
    out[f"{prefix}mlp.fc2.weight"], out[f"{prefix}mlp.fc2.bias"] = like.new_zeros(width, 1), zeros.clone()
    logger.info(
        "AIMv2's pooling head written as vitrail's attention pool: k_proj and v_proj joined into kv, the query "
        "projection the identity, the pool's residual MLP (width 1) with a zero output, so nothing is added."
    )
    return out


def _plan(state: dict[str, torch.Tensor], hf_config) -> Plan:
    family = family_of(hf_config, state)
    config = vitrail_config_from_hf(hf_config, state)
    if family == "aimv2_vision":
        state, layout = _aimv2_head_as_map(state, config), "hub"
    elif FAMILIES[family].layers is TOWER_LAYERS:
        state, layout = _unpack_attention(state), "hub"  # one layout
    elif FAMILIES[family].layers in ONE_LAYOUT:
        layout = "hub"  # its rows hold every naming transformers uses
        empty = [
            name for name, tensor in state.items() if name.endswith("register_tokens") and not tensor.numel()
        ]
        state = {name: tensor for name, tensor in state.items() if name not in empty}
        for name in empty:  # DINOv3 keeps a (1, 0, D) tensor when it has no registers
            logger.info("Dropped %s: it holds no register token (num_register_tokens=0).", name)
    else:
        layout = detect_hf_layout(state)
    if family in ("beit", "data2vec-vision"):
        prefix = f"{FAMILIES[family].prefix}."
        refuse((name.removeprefix(prefix) for name in state), BEIT_REFUSED, f"{family} checkpoint")
    return Plan(
        state,
        config,
        head=_wants_head(hf_config, state),
        masked_image_modeling=family.endswith("_mim"),
        rows=hf_rename_rows(family, layout),
        drops=FAMILIES[family].drops,
        strip_prefix=f"{FAMILIES[family].prefix}.",
        source_name=f"{family} checkpoint"
        + (
            "" if family in TOWER_FAMILIES or FAMILIES[family].layers in ONE_LAYOUT else f" ({layout} layout)"
        ),
    )


def convert_hf_state_dict(state: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Rename a transformers ViT / DeiT / DINOv2 / MAE / MSN / I-JEPA state dict (either layout) to vitrail's names,
    checking it completely (see `vitrail.convert.common.rename_state_dict` for what is checked)."""
    return _plan(state, hf_config).state_dict()


# ---- folders ---------------------------------------------------------------------------------------------------


def load_hf_checkpoint(path: str | Path, allow_pickle: bool = False) -> VitrailPreTrainedModel:
    """Load a local transformers folder (config.json + safetensors weights) of a type in `SUPPORTED_MODEL_TYPES` as
    a vitrail model in eval mode: classification checkpoints give `VitrailForImageClassification`, SimMIM ones
    (`ViTForMaskedImageModeling`, `DeiTForMaskedImageModeling`) `VitrailForMaskedImageModeling`, backbones
    `VitrailModel`. A timm model saved through transformers' `TimmWrapper*` classes goes to the timm converter
    (`load_timm_wrapper_checkpoint`). `pytorch_model.bin` is read only with `allow_pickle=True`."""
    config_dict = json.loads((Path(path) / "config.json").read_text())
    if is_timm_config(config_dict):
        return load_timm_wrapper_checkpoint(path, allow_pickle=allow_pickle)
    # What vitrail cannot convert is refused by name before any weight is read (a config alone is enough).
    if config_dict.get("model_type") in REFUSED_MODEL_TYPES:
        raise NotImplementedError(f"{path}: {refusal(config_dict['model_type'])}")
    check_architectures(config_dict.get("architectures"))
    return _plan(read_weights(path, allow_pickle), AutoConfig.from_pretrained(path)).load()


_TIMM_PREFIX = "timm_model."


def _tensor_names(folder: Path, allow_pickle: bool) -> list[str]:
    """The names of a folder's tensors, without reading the tensors (pickles are opened on the meta device)."""
    names = []
    for file in weight_files(folder, allow_pickle=allow_pickle):
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as weights:
                names.extend(weights.keys())
        else:
            names.extend(unnest(torch.load(file, map_location="meta", weights_only=True)))
    return names


def load_timm_wrapper_checkpoint(path: str | Path, allow_pickle: bool = False) -> VitrailPreTrainedModel:
    """A timm folder as a vitrail model in eval mode, saved by timm or through transformers' `TimmWrapperModel` /
    `TimmWrapperForImageClassification`. Both write timm's config.json (`architecture`, `model_args`,
    `pretrained_cfg`, labels; transformers' config reader labels either `model_type="timm_wrapper"`); the
    wrapper's tensors are timm's under `timm_model.`. The prefix is taken off and the timm converter does the rest
    (a `TimmWrapperModel` has no head, so it gives `VitrailModel`); a folder timm saved goes to
    `vitrail.convert.timm.load_timm_checkpoint` as it is."""
    from .timm import convert_timm_state_dict, load_timm_checkpoint, vitrail_config_from_timm

    folder = Path(path)
    if not any(name.startswith(_TIMM_PREFIX) for name in _tensor_names(folder, allow_pickle)):
        return load_timm_checkpoint(folder, allow_pickle=allow_pickle)
    timm_config = json.loads((folder / "config.json").read_text())
    state = read_weights(folder, allow_pickle)
    stray = sorted(name for name in state if not name.startswith(_TIMM_PREFIX))
    if stray:
        raise ValueError(
            f"{folder} is a transformers TimmWrapper checkpoint, whose tensors all start with {_TIMM_PREFIX!r}, but "
            f"{stray[:8]} do not: the weights do not belong to this config."
        )
    state = {name[len(_TIMM_PREFIX) :]: tensor for name, tensor in state.items()}
    logger.info("TimmWrapper checkpoint: %r prefix taken off %d tensors.", _TIMM_PREFIX, len(state))
    if "head.weight" not in state:
        # `TimmWrapperModel` builds its timm model with `num_classes=0` but saves the config's class count.
        timm_config = {**timm_config, "num_classes": 0}
        timm_config.pop("label_names", None)
    config = vitrail_config_from_timm(state, timm_config=timm_config)
    converted = convert_timm_state_dict(state, config)
    head = any(name.startswith("classifier.") for name in converted)
    model = (VitrailForImageClassification if head else VitrailModel)(config)
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
# Fields whose default is what vitrail does anyway (BEiT's `do_reduce_labels` concerns segmentation masks only).
_PROCESSOR_NO_OPS = {"image_processor_type", "processor_class", "do_convert_rgb", "do_reduce_labels"}
# Processors that rescale to [0, 1] before resizing, so they resize floats where vitrail resizes 8-bit levels.
_RESIZE_FLOATS = ("DINOv3ViTImageProcessor",)


def image_processor_from_hf(preprocessor_config: dict):
    """A `VitrailImageProcessor` doing what a transformers `preprocessor_config.json` says (ViT, DeiT, BiT for
    DINOv2, CLIP, SigLIP, BEiT, DINOv3 processors: resize, center crop, rescale, normalize)."""
    from ..image_processing_vitrail import VitrailImageProcessor

    kwargs = {k: preprocessor_config[k] for k in _PROCESSOR_FIELDS if preprocessor_config.get(k) is not None}
    ignored = sorted(set(preprocessor_config) - set(kwargs) - set(_PROCESSOR_FIELDS) - _PROCESSOR_NO_OPS)
    if ignored:
        logger.info("Preprocessor fields not carried over: %s.", ignored)
    kind = preprocessor_config.get("image_processor_type") or ""
    if kind.removesuffix("Fast") in _RESIZE_FLOATS:
        logger.warning(
            "%s rescales to [0, 1] before resizing and VitrailImageProcessor resizes the 8-bit image: pixels can "
            "differ by one 8-bit level where the resized value rounds the other way.",
            kind,
        )
    return VitrailImageProcessor(**kwargs)


def open_source(path: str | Path, *, allow_pickle: bool = False) -> Converted:
    """The converted model, its processor (from `preprocessor_config.json`, or a TimmWrapper's `pretrained_cfg`;
    else None) and transformers' own model as the reference, for `scripts/convert_checkpoint.py --from hf`."""
    import transformers

    from . import load_image_processor

    folder = Path(path)
    hf_config = AutoConfig.from_pretrained(folder)
    model = load_hf_checkpoint(folder, allow_pickle=allow_pickle)
    processor = load_image_processor(folder)
    architecture = (hf_config.architectures or ["AutoModel"])[0]
    model_type, options = hf_config.model_type, {}
    if model_type == "vit_mae":
        # The encoder without MAE's random masking: nothing masked, and `noise` in patch order keeps the order.
        architecture, options = "ViTMAEModel", {"mask_ratio": 0.0}
    elif model_type == TIMM_WRAPPER:
        # timm resamples its position table at run time when built with `dynamic_img_size=True`.
        options = {"model_args": {**(hf_config.model_args or {}), "dynamic_img_size": True}}
    reference_model = getattr(transformers, architecture).from_pretrained(folder, **options).eval()
    if not hasattr(model, "classifier") and hasattr(reference_model, "vision_model"):
        reference_model = reference_model.vision_model  # the tower of an image-text model
    native = model.config.image_hw

    def reference(pixels: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        # DINOv2 and DINOv3 take any size, timm models as built above; the others resample only when asked, and
        # AIMv2 cannot.
        other_size = tuple(pixels.shape[-2:]) != native
        if other_size and model_type.startswith("aimv2"):
            raise ValueError(
                "transformers' AIMv2 takes its native size only: there is no reference for a resampled model."
            )
        if other_size and not model_type.startswith(("dinov2", "dinov3", TIMM_WRAPPER)):
            kwargs["interpolate_pos_encoding"] = True
        if model_type == "vit_mae":
            (rows, cols), count = model.config.patch_hw, len(pixels)
            patches = (pixels.shape[-2] // rows) * (pixels.shape[-1] // cols)
            kwargs["noise"] = torch.arange(patches, dtype=torch.float32).expand(count, patches)
        return model_outputs(reference_model, pixels, **kwargs)

    return Converted(model=model, processor=processor, reference=reference)


__all__ = [
    "DINOV2_LAYERS",
    "FAMILIES",
    "REFUSED_ARCHITECTURES",
    "REFUSED_MODEL_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "TIMM_WRAPPER",
    "VIT_LAYERS",
    "check_architectures",
    "convert_hf_state_dict",
    "detect_hf_layout",
    "family_of",
    "hf_rename_rows",
    "image_processor_from_hf",
    "load_hf_checkpoint",
    "load_timm_wrapper_checkpoint",
    "open_source",
    "refusal",
    "vitrail_config_from_hf",
]
