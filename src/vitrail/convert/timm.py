"""timm Vision Transformers into vitrail, read from the model timm itself builds.

A timm checkpoint on the Hub is a folder: config.json (`architecture`, `num_classes`, optional `model_args`,
`pretrained_cfg`, `label_names`) and model.safetensors, the model's state dict. timm builds the model of that
config on the meta device (`timm.create_model(architecture, pretrained=False, num_classes=..., **model_args)`: no
memory, no download), and its modules say everything the conversion needs: the model class (`VisionTransformer`,
its distilled DeiT, `Eva`, `Beit`, `VisionTransformerRelPos`), the block, attention and MLP types, every norm and
its epsilon, the activation, biases, prefix tokens, positions (learned tables, rotary embeddings, relative position
biases) and pooling. `vitrail_config_from_timm` reads them into a
`VitrailConfig`; the weights must be exactly the state dict of that model (names and shapes), and `TIMM_RENAMES`
moves them to vitrail's names.

What vitrail cannot reproduce is refused before any weight is read, by the sentences of `TIMM_REFUSALS` naming
each feature. A key of that table that is also a `VitrailConfig` field (`pre_norm`, `norm_type`, ...) names an
option vitrail reproduces once the field exists: the refusal then lifts by itself, and the tensors already have
their rows in `TIMM_RENAMES`.

timm's distilled DeiT (`VisionTransformerDistilled`) keeps its distillation token (`use_distillation_token=True`,
positions for the class and distillation tokens) and `head_dist` becomes `distillation_classifier`, so that the
logits are timm's eval-mode average of both heads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..configuration_vitrail import VitrailConfig
from ..modeling_vitrail import VitrailForImageClassification, VitrailModel
from .common import Converted, Plan, Rename, describe, fused_qkv, in_layers, read_weights

logger = logging.getLogger(__name__)

# ---- tables ------------------------------------------------------------------------------------------------------
# timm's fused qkv has rows [q; k; v] like vitrail's; separate q/k/v projections are joined in that order, and
# SwiGLU's separate gate (`fc1_g`) and value (`fc1_x`) projections become vitrail's fused `[gate; value]` fc1. Rows
# for tensors of options a config does not build are never used.

TIMM_RENAMES: tuple[Rename, ...] = (
    Rename("cls_token", "{backbone}embeddings.cls_token"),
    Rename("dist_token", "{backbone}embeddings.distillation_token"),
    Rename("reg_token", "{backbone}embeddings.register_tokens"),
    Rename("pos_embed", "{backbone}embeddings.position_embeddings"),
    Rename("patch_embed.proj.{p}", "{backbone}embeddings.patch_embeddings.projection.{p}"),
    Rename("patch_embed.norm.{p}", "{backbone}embeddings.patch_embeddings.norm.{p}"),
    Rename("norm_pre.{p}", "{backbone}embeddings.pre_norm.{p}"),
    *in_layers(
        "blocks.{n}.",
        (
            Rename("norm1.{p}", "norm1.{p}"),
            Rename("norm2.{p}", "norm2.{p}"),
            Rename("attn.qkv.{p}", "attention.qkv.{p}"),
            *fused_qkv("attn.q_proj.{p}", "attn.k_proj.{p}", "attn.v_proj.{p}"),
            Rename("attn.q_bias", "attention.q_bias"),
            Rename("attn.rope_freqs", "attention.rope_freqs"),
            Rename("attn.relative_position_bias_table", "attention.relative_position_bias.table"),
            *(
                Rename(f"attn.rel_pos.mlp.{fc}.{{p}}", f"attention.relative_position_bias.mlp.{fc}.{{p}}")
                for fc in ("fc1", "fc2")
            ),
            Rename("attn.v_bias", "attention.v_bias"),
            Rename("attn.q_norm.{p}", "attention.q_norm.{p}"),
            Rename("attn.k_norm.{p}", "attention.k_norm.{p}"),
            Rename("attn.norm.{p}", "attention.norm.{p}"),
            Rename("attn.proj.{p}", "attention.proj.{p}"),
            Rename("ls1.gamma", "layer_scale1.scale"),
            Rename("ls2.gamma", "layer_scale2.scale"),
            Rename("gamma_1", "layer_scale1.scale"),
            Rename("gamma_2", "layer_scale2.scale"),
            Rename("mlp.fc1.{p}", "mlp.fc1.{p}"),
            Rename("mlp.fc1_g.{p}", "mlp.fc1.{p}", slot=(0, 2)),
            Rename("mlp.fc1_x.{p}", "mlp.fc1.{p}", slot=(1, 2)),
            Rename("mlp.norm.{p}", "mlp.norm.{p}"),
            Rename("mlp.fc2.{p}", "mlp.fc2.{p}"),
        ),
    ),
    Rename("rel_pos_bias.relative_position_bias_table", "{backbone}encoder.relative_position_bias.table"),
    *(
        Rename(f"shared_rel_pos.mlp.{fc}.{{p}}", f"{{backbone}}encoder.relative_position_bias.mlp.{fc}.{{p}}")
        for fc in ("fc1", "fc2")
    ),
    Rename("norm.{p}", "{backbone}layernorm.{p}"),
    Rename(
        "fc_norm.{p}",
        "{backbone}layernorm.{p}",
        note="timm's fc_norm (the final norm on the pooled vector) became vitrail's layernorm with use_fc_norm=True.",
    ),
    Rename("attn_pool.latent", "{backbone}attention_pool.latent"),
    *(
        Rename(f"attn_pool.{part}.{{p}}", f"{{backbone}}attention_pool.{part}.{{p}}")
        for part in ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2")
    ),
    Rename("head.{p}", "classifier.{p}"),
    Rename("head_dist.{p}", "distillation_classifier.{p}"),
)

# Every timm feature vitrail does not reproduce, by the sentence that refuses it. A key that is a `VitrailConfig`
# field names an option vitrail gains with that field (refused only while the field is missing, see the module
# docstring); the other keys are refused for good.
TIMM_REFUSALS: dict[str, str] = {
    # options of the ViT families, each a VitrailConfig field
    "pre_norm": "a norm on the token sequence before the first block (timm `pre_norm`, CLIP's `ln_pre`)",
    "patch_embedding_bias": "a patch embedding without bias",
    "patch_embedding_norm": "a norm on the patch embedding (timm `embed_norm_layer`, AIMv2)",
    "final_norm": "no final norm (timm `final_norm=False`)",
    "attention_norm": "a norm inside attention before its output projection (timm `scale_attn_norm`, EVA-02)",
    "mlp_norm": "a norm inside the MLP before fc2 (timm `scale_mlp_norm`, EVA-02)",
    "proj_bias": "an attention output projection without bias (timm `proj_bias=False`)",
    "mlp_bias": "MLP layers without biases",
    "key_bias": "query and value biases without a key bias (BEiT, EVA)",
    "norm_type": "RMSNorm",
    "map_intermediate_size": "attention pooling (a MAP head: a learned query attends over the tokens, as in SigLIP)",
    "map_num_heads": "attention pooling with a head count other than the blocks' (timm `attn_pool_num_heads`)",
    "rope_type": "rotary position embeddings (RoPE: EVA-02, DINOv3, Perception Encoder, timm's rope ViTs)",
    "relative_position_bias": "a relative position bias in attention (BEiT, timm's relpos ViTs)",
    "rope_kind": "rotary position embeddings of a kind vitrail lacks (in pixels, MRoPE, period bounds)",
    "relative_position_kind": "a relative position bias of a kind vitrail lacks (timm's swin or rw MLP, bias table)",
    # features outside what vitrail aims to reproduce
    "hybrid": "a convolutional stem before the patch embedding (timm's hybrid ViTs)",
    "sam": "SAM's image encoder (windowed attention with relative positions and a convolutional neck)",
    "vlm": "a vision-language model's vision tower with its own patch-merging blocks (Qwen3-VL, DeepSeek, Gemma 4)",
    "naflex": "NaFlexViT's variable-resolution patch embedding and position resampling",
    "model_class": "a timm model class vitrail does not read",
    "parallel": "attention and MLP run in parallel within a block (timm's parallel-scaling and parallel-things blocks)",
    "post_norm": "norms after the residual branches (post-norm blocks)",
    "diff_attention": "differential attention (timm `DiffAttention`)",
    "gated_attention": "a sigmoid gate on the attention output (timm `gated` attention)",
    "grouped_query": "grouped-query attention (fewer key/value heads than query heads)",
    "head_dim": "attention heads whose widths do not add up to the model width",
    "qkv_bias": "query, key and value biases of a pattern other than all, none, or query and value",
    "mlp": "an MLP other than timm's `Mlp`, `SwiGLU` and `GluMlp`",
    "gate_last": "a gated MLP whose gate is the second half of fc1 (timm `GluMlp(gate_last=True)`)",
    "activation": "an MLP activation other than GELU, tanh GELU, QuickGELU, SiLU, ReLU and sigmoid",
    "norm_kind": "a normalisation layer other than LayerNorm and RMSNorm",
    "norm_bias": "a LayerNorm without bias",
    "norm_eps": "norms with different epsilons",
    "layer_scale": "LayerScale on one residual branch only",
    "both_norms": "both a final norm on the tokens and another on the pooled vector",
    "pool_max": "max pooling over tokens (timm `global_pool='max'` / `'avgmax'`)",
    "pool_prefix": "average pooling that includes the class and register tokens (timm `pool_include_prefix`)",
    "pool_map": "attention pooling other than one latent query over every token",
    "pool_prr": "PRR attention pooling (timm `global_pool='prr'`)",
    "pool_none": "a head on every token (timm `global_pool=''` with classes)",
    "head": "a classification head other than one linear layer",
    "positions": "a position table with rows for some of the prefix tokens only",
    "distilled_unused": "a distilled DeiT with register tokens or fc_norm, which timm builds but never uses",
}

# timm's activation modules -> vitrail's `hidden_act` (transformers' ACT2FN names).
_ACTIVATIONS = {"GELUTanh": "gelu_pytorch_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "ReLU": "relu",
                "Sigmoid": "sigmoid"}  # fmt: skip
# timm's model classes `_read` reads, and others it names.
_READ_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "Eva", "Beit", "VisionTransformerRelPos")
_OTHER_CLASSES = {"VisionTransformerSAM": "sam", "NaFlexVit": "naflex"}
_INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def is_timm_config(config_dict: Mapping) -> bool:
    """True for a timm Hub config.json: it names an `architecture` and has no transformers `model_type` (or the
    `"timm_wrapper"` label transformers' config reader gives timm configs)."""
    return (
        isinstance(config_dict, Mapping)
        and "architecture" in config_dict
        and config_dict.get("model_type") in (None, "timm_wrapper")
    )


# ---- timm's model, read -----------------------------------------------------------------------------------------


def _model_args(timm_config: Mapping, state: Mapping | None = None, **overrides) -> tuple[str, dict]:
    """The architecture and the `create_model` arguments that build the model of `timm_config`: its `model_args`,
    its `num_classes` (else the weights' head rows, else 0), and `overrides` that are not None."""
    architecture = timm_config.get("architecture")
    if not architecture:
        raise ValueError(
            "A timm checkpoint is read through the model timm builds for it, which needs its architecture: put the "
            "Hub folder's config.json (with `architecture`) next to the weights, or pass `architecture=`."
        )
    args = dict(timm_config.get("model_args") or {})
    if "num_classes" not in args and ("num_classes" in timm_config or state is not None):
        head = (state or {}).get("head.weight")
        args["num_classes"] = timm_config.get("num_classes", 0 if head is None else head.shape[0])
    return architecture.split(".")[0], {**args, **{k: v for k, v in overrides.items() if v is not None}}


def timm_model(architecture: str, args: Mapping) -> nn.Module:
    """timm's model of `architecture` built with `args` on the meta device (no memory, no download)."""
    if importlib.util.find_spec("timm") is None:
        raise ImportError(
            "Converting a timm checkpoint reads the model timm builds for it: `pip install timm`."
        )
    import timm

    if not timm.is_model(architecture):
        raise ValueError(
            f"timm {timm.__version__} has no architecture {architecture!r}: upgrade timm (`pip install -U timm`), "
            "or check config.json's `architecture`."
        )
    try:
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False, **args)
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:  # model_args timm itself rejects
        raise ValueError(f"timm cannot build {architecture!r} with {dict(args)}: {error}") from error


def _size(pair) -> int | list[int]:
    return int(pair[0]) if pair[0] == pair[1] else [int(n) for n in pair]


def _present(module) -> bool:
    return module is not None and not isinstance(module, nn.Identity)


# The VitrailConfig fields of `TIMM_REFUSALS` at their defaults (today's vitrail); `_read` names them only when a
# model needs another value.
_FIELD_DEFAULTS = {"pre_norm": False, "patch_embedding_bias": True, "patch_embedding_norm": False,
                   "final_norm": True, "attention_norm": False, "mlp_norm": False, "proj_bias": True,
                   "mlp_bias": True, "key_bias": True, "norm_type": "layernorm"}  # fmt: skip


def _activation(module) -> str | None:
    """vitrail's `hidden_act` for timm's activation `module`, None for one vitrail lacks."""
    if getattr(module, "approximate", "none") == "tanh":
        return "gelu_pytorch_tanh"
    return "gelu" if type(module).__name__ == "GELU" else _ACTIVATIONS.get(type(module).__name__)


def _rope(model: nn.Module, attn: nn.Module) -> dict | None:
    """The `rope_*` fields of timm's rotary embedding `model.rope` as `attn` applies it: {} without one, None for a
    kind vitrail lacks. Eva builds EVA-02's and Perception Encoder's as `RotaryEmbeddingCat` on patch indices,
    RoPE-Mixed's as `RotaryEmbeddingMixed` (learned frequencies), DINOv3's as `RotaryEmbeddingDinoV3`."""
    rope = getattr(model, "rope", None)
    if rope is None:
        return {}
    kind = type(rope).__name__
    if kind == "RotaryEmbeddingCat" and rope.grid_type == "index" and not rope.linear_bands:
        ref = rope.ref_feat_shape
        fields = {
            "rope_type": "axial",
            "rope_offset": float(rope.grid_offset),
            "rope_reference_grid": ref and list(ref),
        }
    elif kind == "RotaryEmbeddingMixed":
        fields = {"rope_type": "mixed"}
    elif kind == "RotaryEmbeddingDinoV3" and rope.temperature and rope.normalize_coords == "separate":
        if rope.min_period is not None or rope.max_period is not None or rope.grid_offset:
            return None
        fields = {"rope_type": "axial", "rope_coordinates": "centered"}
    else:
        return None
    return {
        **fields,
        "rope_theta": float(rope.temperature),
        "rope_axis_order": "yx" if rope.grid_indexing == "ij" else "xy",
        "rope_layout": "half" if getattr(attn, "rotate_half", False) else "interleaved",
        **{
            f"rope_train_{name}": getattr(rope, f"{name}_coords", None)
            for name in ("shift", "jitter", "rescale")
        },
    }


def _relative_position(model: nn.Module, attn: nn.Module) -> dict | None:
    """The `relative_position_bias*` fields of BEiT's tables and timm's relpos MLPs, per layer or shared: {}
    without one, None for a kind vitrail lacks."""
    shared_table = getattr(model, "rel_pos_bias", None)
    if shared_table is not None or getattr(attn, "relative_position_bias_table", None) is not None:
        return {"relative_position_bias": "table", "relative_position_bias_shared": shared_table is not None}
    shared = getattr(model, "shared_rel_pos", None)
    module = shared if shared is not None else getattr(attn, "rel_pos", None)
    if module is None:
        return {}
    if type(module).__name__ != "RelPosMlp" or module.mode != "cr":
        return None
    return {
        "relative_position_bias": "mlp",
        "relative_position_bias_shared": shared is not None,
        "relative_position_bias_hidden_size": module.mlp.fc1.out_features,
    }


def _read(model: nn.Module) -> tuple[dict, list[str]]:
    """The `VitrailConfig` fields that reproduce timm's `model`, and the `TIMM_REFUSALS` keys of what vitrail does
    not reproduce (fields that are such keys count only while `VitrailConfig` lacks them)."""
    kind = type(model).__name__
    if kind in _OTHER_CLASSES or kind.startswith(("Qwen3", "Deepseek", "Gemma4")):
        return {}, [_OTHER_CLASSES.get(kind, "vlm")]
    if kind not in _READ_CLASSES:
        return {}, ["model_class"]
    from timm.layers import AttentionPoolLatent, GluMlp, Mlp, PatchEmbed, SwiGLU

    patch, blocks = model.patch_embed, list(model.blocks)
    if type(patch) is not PatchEmbed:
        return {}, ["hybrid" if hasattr(patch, "backbone") else "model_class"]
    for word, key in (("Parallel", "parallel"), ("Post", "post_norm")):
        if word in type(blocks[0]).__name__:
            return {}, [key]
    block, attn_pool = blocks[0], getattr(model, "attn_pool", None)
    attn, mlp, heads = block.attn, block.mlp, block.attn.num_heads

    # Query, key and value biases: timm's fused qkv, separate projections, or EVA's and BEiT's q_bias and v_bias.
    if getattr(attn, "qkv", None) is None:
        biases = tuple(getattr(attn, f"{x}_proj").bias is not None for x in "qkv")
    elif getattr(attn, "q_bias", None) is not None:
        biases = (True, False, getattr(attn, "v_bias", None) is not None)
    else:
        biases = (attn.qkv.bias is not None,) * 3
    # The MLP: timm's Mlp, SwiGLU with separate gate and value (fc1_g, fc1_x), or GluMlp packing both in fc1.
    fc1 = mlp.fc1_g if isinstance(mlp, SwiGLU) else getattr(mlp, "fc1", None)
    gated = isinstance(mlp, (SwiGLU, GluMlp))
    hidden_act = _activation(getattr(mlp, "act", None))
    # Every norm: one kind, one epsilon.
    places = [block.norm1, block.norm2, getattr(attn, "q_norm", None), getattr(attn, "norm", None),
              getattr(mlp, "norm", None), patch.norm, getattr(model, "norm_pre", None), model.norm,
              getattr(model, "fc_norm", None), getattr(attn_pool, "norm", None)]  # fmt: skip
    norms = [m for m in places if _present(m)]
    layer_norms = all(isinstance(m, nn.LayerNorm) for m in norms)
    rms_norms = all(type(m).__name__ in ("RmsNorm", "RMSNorm") for m in norms)
    eps = {float(m.eps) for m in norms}
    # LayerScale: timm's `ls1.gamma`, Eva's and BEiT's `gamma_1`.
    scales = [
        _present(getattr(block, f"ls{i}", None)) or getattr(block, f"gamma_{i}", None) is not None
        for i in (1, 2)
    ]
    init_values = getattr(getattr(block, "ls1", block), "init_values", None)
    # Prefix tokens and the rows of the position table they own.
    cls_token = getattr(model, "cls_token", None) is not None
    distilled = getattr(model, "dist_token", None) is not None
    registers = 0 if getattr(model, "reg_token", None) is None else model.reg_token.shape[1]
    prefix = int(cls_token) + int(distilled) + registers
    positions = getattr(model, "pos_embed", None)
    rows = 0 if positions is None else positions.shape[1] - patch.num_patches
    prefix_positions = (
        "none" if rows == 0 else {prefix: "cls" if prefix == 1 and cls_token else "all"}.get(rows)
    )
    # The final norm, the pooling and the heads.
    norm, fc_norm = _present(model.norm), _present(getattr(model, "fc_norm", None))
    pool, num_classes = model.global_pool, getattr(model, "num_classes", 0)
    include_prefix = prefix and getattr(model, "pool_include_prefix", False)
    latent = isinstance(attn_pool, AttentionPoolLatent)
    map_other = latent and (  # vitrail's MAP head: one latent query, the blocks' activation, biased linears
        attn_pool.latent_len != 1
        or attn_pool.pos_embed is not None
        or _present(attn_pool.q_norm)
        or _activation(attn_pool.mlp.act) != hidden_act
        or any(m.bias is None for m in (attn_pool.q, attn_pool.kv, attn_pool.proj, attn_pool.mlp.fc1))
        or (
            kind != "Eva" and prefix and not include_prefix
        )  # over every token; timm's ViT pools only patches
    )
    heads_linear = all(
        isinstance(h, (nn.Linear, nn.Identity))
        for h in (model.head, getattr(model, "head_dist", None))
        if h is not None
    )

    rope, relative = _rope(model, attn), _relative_position(model, attn)
    lacks = {
        "diff_attention": type(attn).__name__ == "DiffAttention",
        "head_dim": attn.proj.in_features != model.embed_dim,
        "gated_attention": getattr(attn, "gate", None) is not None,
        "grouped_query": any(getattr(b.attn, "num_kv_heads", heads) != heads for b in blocks),
        "qkv_bias": len(set(biases)) > 1 and biases != (True, False, True),
        "rope_kind": rope is None,
        "relative_position_kind": relative is None,
        "mlp": not isinstance(mlp, (Mlp, SwiGLU, GluMlp)),
        "gate_last": isinstance(mlp, GluMlp) and mlp.gate_last,
        "activation": hidden_act is None,
        "mlp_bias": fc1 is not None and (fc1.bias is None) != (mlp.fc2.bias is None),
        "norm_kind": not layer_norms and not rms_norms,
        "norm_bias": layer_norms and any(m.bias is None for m in norms),
        "norm_eps": len(eps) > 1,
        "layer_scale": scales[0] != scales[1],
        "positions": prefix_positions is None,
        "both_norms": norm and fc_norm,
        "pool_map": map_other,
        "pool_prr": (attn_pool is not None and not latent) or pool == "prr",
        "pool_max": pool in ("max", "avgmax"),
        "pool_prefix": pool == "avg" and include_prefix,
        "pool_none": pool == "" and num_classes > 0 and attn_pool is None,
        "head": not heads_linear,
        "distilled_unused": distilled and (registers or fc_norm),
    }
    if lacks["mlp"]:
        return {}, ["mlp"]
    options = {
        "pre_norm": _present(getattr(model, "norm_pre", None)),
        "patch_embedding_bias": patch.proj.bias is not None,
        "patch_embedding_norm": _present(patch.norm),
        "final_norm": norm or fc_norm,
        "attention_norm": _present(getattr(attn, "norm", None)),
        "mlp_norm": _present(getattr(mlp, "norm", None)),
        "proj_bias": attn.proj.bias is not None,
        "mlp_bias": fc1.bias is not None,
        "key_bias": biases != (True, False, True),
        "norm_type": "rmsnorm" if rms_norms and norms else "layernorm",
    }
    fields = {key: value for key, value in options.items() if value != _FIELD_DEFAULTS[key]}
    if latent:
        fields.update(pooling="map", map_intermediate_size=attn_pool.mlp.fc1.out_features)
        if attn_pool.num_heads != heads:
            fields["map_num_heads"] = attn_pool.num_heads
    fields.update({**(rope or {}), **(relative or {})})
    fields.update(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        intermediate_size=fc1.out_features // 2 if isinstance(mlp, GluMlp) else fc1.out_features,
        hidden_act=hidden_act or "gelu",
        mlp_type="swiglu" if gated else "mlp",
        layer_norm_eps=min(eps, default=1e-6),
        image_size=_size(patch.img_size),
        patch_size=_size(patch.patch_size),
        num_channels=patch.proj.in_channels,
        encoder_stride=patch.patch_size[0],
        qkv_bias=biases[0],
        qk_norm=_present(getattr(attn, "q_norm", None)),
        pooling=fields.get("pooling")
        or {"token": "cls", "avg": "mean"}.get(pool, "cls" if cls_token else "mean"),
        use_cls_token=cls_token,
        use_distillation_token=distilled,
        num_register_tokens=registers,
        position_embedding_type="none" if positions is None else "learned",
        prefix_position_embeddings=prefix_positions or "none",
        use_fc_norm=fc_norm,
        # Only the initial value of new LayerScale vectors; the converted ones are loaded.
        layer_scale_init_value=(init_values or 1e-5) if scales[0] else None,
        dynamic_image_size=bool(getattr(model, "dynamic_img_size", False)),
        position_interpolation="bicubic_antialias",  # timm's resample_abs_pos_embed
        num_labels=num_classes,
    )
    return fields, [key for key, lacking in lacks.items() if lacking]


def _refuse(model: nn.Module, architecture: str, fields: dict, lacks: list[str]) -> None:
    """Raise `NotImplementedError` naming every feature of timm's `model` vitrail does not reproduce."""
    missing = [k for k in fields if k in TIMM_REFUSALS and k not in VitrailConfig.__dataclass_fields__]
    keys = list(dict.fromkeys(lacks + missing))
    if keys:
        raise NotImplementedError(
            f"timm's {architecture} ({type(model).__name__}) has {'; and '.join(TIMM_REFUSALS[k] for k in keys)}. "
            "vitrail cannot reproduce that, so nothing is converted."
        )


def _fit(model: nn.Module, architecture: str, args: Mapping, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights that are not exactly the state dict of timm's model (names and shapes)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        differ = {k: (got[k], want[k]) for k in set(got) & set(want) if got[k] != want[k]}
        raise ValueError(
            f"The weights are not those of timm's {architecture} built with {dict(args)}: missing "
            f"{sorted(set(want) - set(got))[:8]}, unexpected {sorted(set(got) - set(want))[:8]}, shapes (weights, "
            f"model) {dict(sorted(differ.items())[:8])}. config.json's `architecture` and `model_args` must be "
            "those the weights were saved with."
        )


def _labels(timm_config: Mapping, num_classes: int) -> dict[int, str]:
    names = timm_config.get("label_names")
    if names and len(names) == num_classes:
        return dict(enumerate(names)) if isinstance(names, list) else {int(k): v for k, v in names.items()}
    if names:
        logger.warning(
            "config.json has %d label_names for %d classes; using LABEL_i.", len(names), num_classes
        )
    return {i: f"LABEL_{i}" for i in range(num_classes)}


def _config(
    timm_config: Mapping, weights: Callable[[], dict], id2label: Mapping[int, str] | None = None, **overrides
) -> tuple[VitrailConfig, dict[str, torch.Tensor]]:
    """The config of timm's model for `timm_config`, refusing what vitrail does not reproduce before `weights()`
    is called (unless the head size must be read from them), and the weights, checked against that model."""
    said = "num_classes" in timm_config or "num_classes" in (timm_config.get("model_args") or {})
    state = None if said else weights()
    architecture, args = _model_args(timm_config, state, **overrides)
    model = timm_model(architecture, args)
    fields, lacks = _read(model)
    _refuse(model, architecture, fields, lacks)
    state = weights() if state is None else state
    _fit(model, architecture, args, state)
    num_classes = fields.pop("num_labels")
    if id2label is not None and len(id2label) != num_classes:
        raise ValueError(f"id2label has {len(id2label)} labels, the head {num_classes} classes.")
    id2label = {int(k): str(v) for k, v in (id2label or _labels(timm_config, num_classes)).items()}
    labels = (
        {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        if id2label
        else {"num_labels": 0}
    )
    logger.info("timm's %s (%s) read from its modules.", architecture, type(model).__name__)
    return VitrailConfig(**fields, **labels), state


def _unwrapped(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without a `module.` (DataParallel) prefix on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _plan(state: Mapping[str, torch.Tensor], config: VitrailConfig) -> Plan:
    """The conversion of `state`, first reshaped where one timm tensor is not one vitrail tensor: RoPE-Mixed's
    frequencies of every layer split per layer, and EVA's separate query and value biases (`q_proj.bias`,
    `v_proj.bias`, no key bias) named as in its fused layout (`q_bias`, `v_bias`); `TIMM_RENAMES` does the rest."""
    state = dict(state)
    if (
        "rope.freqs" in state
    ):  # RoPE-Mixed's frequencies, (2, depth, heads, head_dim / 2): one slice per layer
        for n, freqs in enumerate(state.pop("rope.freqs").unbind(1)):
            state[f"blocks.{n}.attn.rope_freqs"] = freqs
    for name in [k for k in state if k.endswith(".attn.q_proj.bias")]:
        stem = name[: -len("q_proj.bias")]
        if f"{stem}k_proj.bias" not in state:
            state[f"{stem}q_bias"], state[f"{stem}v_bias"] = state.pop(name), state.pop(f"{stem}v_proj.bias")
    return Plan(state, config, head=config.num_labels > 0, rows=TIMM_RENAMES, source_name="timm checkpoint")


def vitrail_config_from_timm(
    state_dict: Mapping[str, torch.Tensor],
    *,
    timm_config: dict | None = None,
    num_heads: int | None = None,
    global_pool: str | None = None,
    id2label: Mapping[int, str] | None = None,
) -> VitrailConfig:
    """The `VitrailConfig` reproducing the timm model of `timm_config` (the Hub folder's config.json; at least its
    `architecture`), whose weights `state_dict` must be.

    `num_heads` and `global_pool` override `model_args` (timm's own arguments). Labels come from `label_names`
    unless `id2label` is given; a model without a head gives `num_labels=0`. Raises `NotImplementedError` naming
    the features vitrail does not reproduce (`TIMM_REFUSALS`), `ValueError` when the weights are not that model's,
    `ImportError` without timm.
    """
    state = _unwrapped(state_dict)
    return _config(timm_config or {}, lambda: state, id2label, num_heads=num_heads, global_pool=global_pool)[
        0
    ]


def check_timm_config(timm_config: Mapping) -> None:
    """Refuse, before any weight is read, a timm config.json whose model vitrail does not reproduce (a hybrid's
    BatchNorm counters, for one, are not weights to check)."""
    architecture, args = _model_args(timm_config)
    model = timm_model(architecture, args)
    _refuse(model, architecture, *_read(model))


def convert_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: VitrailConfig, target_cls=None
) -> dict[str, torch.Tensor]:
    """Rename a timm state dict to vitrail's names for `target_cls` (default: the classifier when `config` has
    labels, else `VitrailModel`), checking every tensor (see `rename_state_dict`)."""
    plan = _plan(_unwrapped(state_dict), config)
    if target_cls not in (None, plan.model_class):
        raise ValueError(
            f"The timm checkpoint has {'a' if plan.head else 'no'} head (a classifier, `head.*`): convert it into "
            f"{plan.model_class.__name__} (`vitrail.convert.fit_to_class` then adds or leaves out a head)."
        )
    return plan.state_dict()


# ---- files -------------------------------------------------------------------------------------------------------


def _read_source(path: str | Path, allow_pickle: bool, architecture: str | None):
    """(timm config.json or {"architecture": architecture}, a function reading the weights, the weight file when
    it is a safetensors file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    timm_config = {}
    config_file = folder / "config.json"
    if config_file.is_file():
        loaded = json.loads(config_file.read_text())
        if is_timm_config(loaded):
            timm_config = loaded
        elif path.is_dir():
            raise ValueError(
                f"{config_file} is not a timm config.json (it has a model_type or no architecture); use the "
                "converter for its format."
            )
    if architecture:
        timm_config = {**timm_config, "architecture": architecture}
    weight_file = path / "model.safetensors" if path.is_dir() else path
    safetensors = weight_file if weight_file.suffix == ".safetensors" and weight_file.is_file() else None
    return timm_config, lambda: _unwrapped(read_weights(path, allow_pickle=allow_pickle)), safetensors


def _open(path, allow_pickle, architecture, num_heads, global_pool):
    timm_config, weights, weight_file = _read_source(path, allow_pickle, architecture)
    config, state = _config(timm_config, weights, num_heads=num_heads, global_pool=global_pool)
    return _plan(state, config).load(), timm_config, state, weight_file


def load_timm_checkpoint(
    path: str | Path,
    *,
    num_heads: int | None = None,
    global_pool: str | None = None,
    allow_pickle: bool = False,
    architecture: str | None = None,
) -> VitrailForImageClassification | VitrailModel:
    """A timm checkpoint as a vitrail model in eval mode.

    `path` is a timm Hub folder (config.json + model.safetensors) or a weight file (`.safetensors`; a timm
    `config.json` beside it is used). `architecture` names timm's architecture when no config.json does (or
    overrides it); `num_heads` and `global_pool` override its `model_args`. Pickles (`.pth`, `.bin`) are read only
    with `allow_pickle=True`. A checkpoint with a head gives `VitrailForImageClassification` (labels from
    `label_names`), one without gives `VitrailModel`.
    """
    return _open(path, allow_pickle, architecture, num_heads, global_pool)[0]


# ---- preprocessing ------------------------------------------------------------------------------------------------


def timm_image_processor(pretrained_cfg: Mapping):
    """A `VitrailImageProcessor` doing timm's evaluation transform
    (`create_transform(**resolve_data_config(pretrained_cfg=...), is_training=False)`).

    - `crop_mode="center"` (timm's default) with a square `input_size`: resize the shorter side to
      `floor(size / crop_pct)` (the longer side truncated, as torchvision's Resize does), center crop.
    - `crop_mode="squash"`: resize to exactly `floor(H / crop_pct) x floor(W / crop_pct)`, center crop.
    - then scale to [0, 1] and normalise with `mean` / `std`.

    `crop_mode="border"` (pad instead of crop), center cropping to a non-square size (timm's ResizeKeepRatio) and
    random interpolation raise `NotImplementedError`.
    """
    from ..image_processing_vitrail import VitrailImageProcessor

    channels, height, width = (list(pretrained_cfg.get("input_size") or [3, 224, 224]) + [None] * 3)[:3]
    crop_pct = pretrained_cfg.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    crop_mode = pretrained_cfg.get("crop_mode") or "center"
    interpolation = pretrained_cfg.get("interpolation") or "bilinear"
    if interpolation not in _INTERPOLATIONS:
        raise NotImplementedError(
            f"timm interpolation {interpolation!r} has no fixed PIL filter; choose one of {sorted(_INTERPOLATIONS)}."
        )
    if channels not in (1, 3):
        raise NotImplementedError(f"input_size has {channels} channels; the processor makes 1 or 3.")
    mean = list(pretrained_cfg.get("mean") or (0.485, 0.456, 0.406))
    std = list(pretrained_cfg.get("std") or (0.229, 0.224, 0.225))
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if crop_mode == "squash":
        size = {"height": scaled[0], "width": scaled[1]}
    elif crop_mode == "center":
        if height != width:
            raise NotImplementedError(
                f"timm center-crops a non-square input_size {height}x{width} after ResizeKeepRatio, which "
                "VitrailImageProcessor cannot do; build the processor by hand (e.g. crop_mode='squash')."
            )
        size = {"shortest_edge": scaled[0]}
    else:
        raise NotImplementedError(
            f"timm crop_mode={crop_mode!r} (resize the longer side and pad) has no VitrailImageProcessor "
            "counterpart; only 'center' and 'squash' convert."
        )
    return VitrailImageProcessor(
        size=size,
        resample=_INTERPOLATIONS[interpolation],
        do_center_crop=True,
        crop_size={"height": height, "width": width},
        image_mean=mean,
        image_std=std,
        num_channels=channels,
        # torchvision's CenterCrop places an odd margin at round((H - h) / 2), transformers' at floor.
        center_crop_rounding="round",
    )


# ---- the timm reference -----------------------------------------------------------------------------------------

# vitrail's `hidden_act` -> timm's `act_layer`, for `timm_model_like`.
_TIMM_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "silu": "silu",
}


def timm_model_like(config: VitrailConfig, num_classes: int, image_hw: tuple[int, int] | None = None):
    """timm's `VisionTransformer` (`VisionTransformerDistilled` with a distillation token) of `config`'s
    architecture, randomly initialised, taking any input size as vitrail's `dynamic_image_size` does: positions
    resampled at run time, partial patches padded. `image_hw` overrides the size its position table is made for."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    model_cls = VisionTransformerDistilled if config.use_distillation_token else VisionTransformer
    return model_cls(
        img_size=image_hw or config.image_hw,
        patch_size=config.patch_hw,
        in_chans=config.num_channels,
        num_classes=num_classes,
        global_pool="token" if config.pooling == "cls" else "avg",
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=(config.intermediate_size + 0.5) / config.hidden_size,  # timm takes int(width * ratio)
        qkv_bias=config.qkv_bias,
        qk_norm=config.qk_norm,
        init_values=config.layer_scale_init_value,
        class_token=config.use_cls_token,
        pos_embed="none" if config.position_embedding_type == "none" else "learn",
        no_embed_class=config.prefix_position_embeddings == "none",
        reg_tokens=config.num_register_tokens,
        fc_norm=config.use_fc_norm,
        act_layer=_TIMM_ACTIVATIONS[config.hidden_act],
        dynamic_img_size=True,
        dynamic_img_pad=True,
    )


def _timm_reference(
    timm_config: dict, state: dict, weight_file: Path | None, **overrides
) -> Callable[[torch.Tensor], torch.Tensor]:
    """timm's own model with the same weights, built to take any input size where the architecture can (its own
    position resampling): pixels -> its logits, or its `forward_features` tokens for a model without a head."""
    import timm

    architecture, args = _model_args(timm_config, state, **overrides)
    try:
        model = timm.create_model(architecture, pretrained=False, **args, dynamic_img_size=True)
    except TypeError:  # an architecture without run-time resampling
        model = timm.create_model(architecture, pretrained=False, **args)
    if weight_file is not None:
        timm.models.load_checkpoint(model, str(weight_file), strict=True)
    else:
        model.load_state_dict(state, strict=True)
    model.eval()

    def reference(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(pixels) if args["num_classes"] else model.forward_features(pixels)

    return reference


def open_source(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    num_heads: int | None = None,
    global_pool: str | None = None,
    architecture: str | None = None,
) -> Converted:
    """The converted model, its processor (from config.json's `pretrained_cfg`, else None) and timm's own model as
    the reference, for `scripts/convert_checkpoint.py --from timm`. The reference maps pixels of any size to timm's
    logits (its `forward_features` tokens for a checkpoint without a head)."""
    model, timm_config, state, weight_file = _open(path, allow_pickle, architecture, num_heads, global_pool)
    notes = [f"timm {timm_config['architecture']}: {describe(model.config)}."]
    processor = None
    if timm_config.get("pretrained_cfg"):
        try:
            processor = timm_image_processor(timm_config["pretrained_cfg"])
        except NotImplementedError as error:
            notes.append(f"No image processor: {error}")
    reference = _timm_reference(timm_config, state, weight_file, num_heads=num_heads, global_pool=global_pool)
    notes.append(f"reference: timm.create_model({timm_config['architecture']!r}), weights loaded by timm.")
    return Converted(model=model, processor=processor, reference=reference, notes=notes)


__all__ = [
    "TIMM_REFUSALS",
    "TIMM_RENAMES",
    "check_timm_config",
    "convert_timm_state_dict",
    "is_timm_config",
    "load_timm_checkpoint",
    "open_source",
    "timm_image_processor",
    "timm_model",
    "timm_model_like",
    "vitrail_config_from_timm",
]
