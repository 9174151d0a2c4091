"""timm `VisionTransformer` checkpoints into vitrail.

A timm checkpoint is a plain state dict (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.attn.qkv`, ...),
usually in a Hub folder next to a `config.json` such as
`{"architecture": "vit_base_patch16_224.augreg2_in21k_ft_in1k", "num_classes": 1000, "global_pool": "token",
"pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 0.9, ...}, "label_names": [...], "model_args": {...}}`.

Almost the whole architecture is read off the tensors: width, depth, patch size, MLP size, grid, class and
register tokens, whether prefix tokens own positions (`no_embed_class`), `fc_norm`, `qk_norm`, LayerScale, biases.
What the tensors cannot say comes, in order, from explicit arguments, the config.json (`model_args`, then its
top-level fields), timm itself when it is installed and knows the architecture name (the model is built on the
meta device and read), and finally documented defaults -- each guess is logged. The head count resolves the same
way, ending with the architecture's size word (`vit_base_...` -> 12 heads) when the width agrees with that size.

timm's distilled DeiT (`VisionTransformerDistilled`, e.g. `deit_base_distilled_patch16_224`) converts too: its
`dist_token` becomes vitrail's distillation token (`use_distillation_token=True`, token order `[cls, distillation,
patches]`, `pos_embed` rows for both tokens: `prefix_position_embeddings="all"`) and `head_dist` the
`distillation_classifier`, so that the logits are timm's eval-mode average `(head(cls) + head_dist(dist)) / 2`. A
distilled backbone (`num_classes=0`) becomes a `VitrailModel` that keeps the token.

Every timm option vitrail cannot reproduce raises, naming the tensor or option: attention pooling
(`global_pool="map"`), `pre_norm` (`norm_pre`), gated MLPs, `proj_bias=False`, a bias-free patch embedding, a patch
norm, `scale_attn_norm` / `scale_mlp_norm`, `final_norm=False`, max pooling, `pool_include_prefix`. Nothing that
affects the outputs is dropped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..configuration_vitrail import VitrailConfig
from ..modeling_vitrail import VitrailForImageClassification, VitrailModel
from .common import Converted, Drop, Rename, expected_shapes, read_weights, rename_state_dict

logger = logging.getLogger(__name__)

# ---- rename table ----------------------------------------------------------------------------------------------
# timm names -> vitrail names. `{backbone}` is "vitrail." for the classifier and "" for the bare VitrailModel.
# timm's fused qkv has rows [q; k; v] like vitrail's, so every tensor is copied as it is.

_LAYER = r"blocks\.(\d+)\."
_LAYER_TARGET = "{backbone}encoder.layers.{0}."

TIMM_RENAMES: tuple[Rename, ...] = (
    Rename(r"cls_token", "{backbone}embeddings.cls_token"),
    Rename(r"dist_token", "{backbone}embeddings.distillation_token"),
    Rename(r"reg_token", "{backbone}embeddings.register_tokens"),
    Rename(r"pos_embed", "{backbone}embeddings.position_embeddings"),
    Rename(r"patch_embed\.proj\.(weight|bias)", "{backbone}embeddings.patch_embeddings.projection.{0}"),
    Rename(_LAYER + r"norm1\.(weight|bias)", _LAYER_TARGET + "norm1.{1}"),
    Rename(_LAYER + r"norm2\.(weight|bias)", _LAYER_TARGET + "norm2.{1}"),
    Rename(_LAYER + r"attn\.qkv\.(weight|bias)", _LAYER_TARGET + "attention.qkv.{1}"),
    Rename(_LAYER + r"attn\.q_norm\.(weight|bias)", _LAYER_TARGET + "attention.q_norm.{1}"),
    Rename(_LAYER + r"attn\.k_norm\.(weight|bias)", _LAYER_TARGET + "attention.k_norm.{1}"),
    Rename(_LAYER + r"attn\.proj\.(weight|bias)", _LAYER_TARGET + "attention.proj.{1}"),
    Rename(_LAYER + r"ls1\.gamma", _LAYER_TARGET + "layer_scale1.scale"),
    Rename(_LAYER + r"ls2\.gamma", _LAYER_TARGET + "layer_scale2.scale"),
    Rename(_LAYER + r"mlp\.fc1\.(weight|bias)", _LAYER_TARGET + "mlp.fc1.{1}"),
    Rename(_LAYER + r"mlp\.fc2\.(weight|bias)", _LAYER_TARGET + "mlp.fc2.{1}"),
    Rename(r"norm\.(weight|bias)", "{backbone}layernorm.{0}"),
    Rename(
        r"fc_norm\.(weight|bias)",
        "{backbone}layernorm.{0}",
        note="timm's fc_norm (final norm on the pooled vector) became vitrail's layernorm with use_fc_norm=True.",
    ),
    Rename(r"head\.(weight|bias)", "classifier.{0}"),
    Rename(r"head_dist\.(weight|bias)", "distillation_classifier.{0}"),
)

# Every tensor of a supported timm VisionTransformer affects its outputs, so nothing is dropped.
TIMM_DROPPED: tuple[Drop, ...] = ()

# Tensors of timm options vitrail has no counterpart for: (regex, what it is and what to do). Checked before
# renaming so that the error says what the tensor *is*, not only that it is unknown.
TIMM_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (
        r"attn_pool\..*",
        "attention pooling (timm `global_pool='map'` / 'prr', as in SigLIP); vitrail pools with the class token "
        "or a mean. Convert only the backbone by removing the attn_pool.* and head.* tensors and passing "
        "global_pool='avg' (the pooled output then differs from timm's)",
    ),
    (
        r"norm_pre\..*",
        "a LayerNorm before the blocks (timm `pre_norm=True`, as in CLIP); vitrail has no pre-norm",
    ),
    (r"patch_embed\.norm\..*", "a LayerNorm inside the patch embedding (timm `embed_norm_layer`)"),
    (
        _LAYER + r"attn\.norm\..*",
        "a LayerNorm inside attention before its output projection (timm `scale_attn_norm=True`)",
    ),
    (_LAYER + r"mlp\.norm\..*", "a LayerNorm inside the MLP (timm `scale_mlp_norm=True`)"),
    (
        _LAYER + r"mlp\.fc1_[gx]\..*",
        "a SwiGLU MLP with separate gate and value projections (timm `mlp_layer=SwiGLU`)",
    ),
)

# Keys timm may put in config.json's `model_args` that this module understands; any other key raises.
_KNOWN_MODEL_ARGS = {
    "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "proj_bias", "init_values", "class_token", "pos_embed", "no_embed_class",
    "reg_tokens", "pre_norm", "final_norm", "fc_norm", "pool_include_prefix", "dynamic_img_size",
    "dynamic_img_pad", "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
    "drop_path_rate", "weight_init", "fix_init",
}  # fmt: skip

# Head counts of timm's size words, with the width each implies (timm vision_transformer.py model definitions).
# The word is trusted only when the checkpoint's width is that width.
TIMM_SIZE_HEADS: dict[str, tuple[int, int]] = {
    "tiny": (192, 3),
    "small": (384, 6),
    "medium": (512, 8),
    "base": (768, 12),
    "large": (1024, 16),
    "huge": (1280, 16),
    "giant": (1408, 16),
    "gigantic": (1664, 16),
}

_INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def is_timm_config(config_dict: Mapping) -> bool:
    """True for a timm Hub config.json: it names an `architecture` and has no transformers `model_type` (or the
    `"timm_wrapper"` label transformers' config reader gives timm configs)."""
    return (
        isinstance(config_dict, Mapping)
        and "architecture" in config_dict
        and config_dict.get("model_type") in (None, "timm_wrapper")
    )


# ---- reading the architecture off the tensors -----------------------------------------------------------------


def _strip_wrapper(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a `module.` (DataParallel) prefix that every key carries."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _check_supported_tensors(state: Mapping[str, torch.Tensor]) -> None:
    for pattern, what in TIMM_UNSUPPORTED:
        hits = sorted(k for k in state if re.fullmatch(pattern, k))
        if hits:
            raise NotImplementedError(
                f"The timm checkpoint has {hits[:4]}{' ...' if len(hits) > 4 else ''}: {what}. vitrail cannot "
                "reproduce it, and dropping the tensors would change the outputs, so nothing is converted."
            )
    if "patch_embed.proj.weight" not in state or not any(k.startswith("blocks.") for k in state):
        raise ValueError(
            "This is not a timm VisionTransformer state dict: `patch_embed.proj.weight` and `blocks.N.*` are "
            f"expected; first keys: {sorted(state)[:8]}."
        )
    if "patch_embed.proj.bias" not in state:
        raise NotImplementedError(
            "`patch_embed.proj.bias` is missing: the timm model has a bias-free patch embedding (timm sets that "
            "with `pre_norm=True`); vitrail's patch projection always has a bias. Add a zero "
            "`patch_embed.proj.bias` tensor only if you are sure the model was trained without one."
        )
    if "blocks.0.attn.proj.bias" not in state:
        raise NotImplementedError(
            "`blocks.0.attn.proj.bias` is missing: the timm model was built with `proj_bias=False`; vitrail's "
            "attention output projection always has a bias. (Zero biases would reproduce it: add "
            "`blocks.N.attn.proj.bias = zeros` for every block if you want that.)"
        )
    has_norm = "norm.weight" in state
    has_fc_norm = "fc_norm.weight" in state
    if has_norm and has_fc_norm:
        raise ValueError(
            "The checkpoint has both `norm.*` and `fc_norm.*`; timm builds only one of them (the final norm goes "
            "after pooling when `fc_norm` is used), so this state dict is inconsistent."
        )
    if not (has_norm or has_fc_norm):
        raise NotImplementedError(
            "The checkpoint has neither `norm.*` nor `fc_norm.*`: the timm model was built with "
            "`final_norm=False`; vitrail always applies a final LayerNorm."
        )
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] != fc2.shape[1]:
        raise NotImplementedError(
            f"`blocks.0.mlp.fc1` makes {fc1.shape[0]} features but `fc2` reads {fc2.shape[1]}: a gated MLP "
            "(timm `GluMlp` / `SwiGLUPacked`). vitrail has `mlp_type='swiglu'`, but timm's gate order and "
            "activation cannot be confirmed from the weights, so this converter refuses it."
        )
    _check_distilled(state)


def _check_distilled(state: Mapping[str, torch.Tensor]) -> None:
    """A distillation token must come as timm's `VisionTransformerDistilled` builds it: after a class token, with
    a second head exactly when there is a first one, the final norm on every token, and no register tokens."""
    has_dist, has_head_dist = "dist_token" in state, "head_dist.weight" in state
    if has_head_dist and not has_dist:
        raise ValueError(
            "The checkpoint has `head_dist.*` but no `dist_token`: a distillation head needs timm's distillation "
            "token (VisionTransformerDistilled), so this state dict is inconsistent."
        )
    if not has_dist:
        return
    if "head.weight" in state and not has_head_dist:
        raise ValueError(
            "The checkpoint has `dist_token` and `head.*` but no `head_dist.*`; timm's VisionTransformerDistilled "
            "always has both heads (or neither, with num_classes=0), so this state dict is inconsistent."
        )
    if has_head_dist and "head.weight" not in state:
        raise ValueError(
            "The checkpoint has `head_dist.*` but no `head.*`; timm builds both heads or neither."
        )
    if "pos_embed" not in state:
        raise ValueError(
            "The checkpoint has `dist_token` but no `pos_embed`; timm's VisionTransformerDistilled always has "
            "learned positions (even with pos_embed='none'), so this state dict is inconsistent."
        )
    if "cls_token" not in state:
        raise ValueError(
            "The checkpoint has `dist_token` but no `cls_token`; timm's VisionTransformerDistilled places the "
            "distillation token after a class token."
        )
    if "reg_token" in state:
        raise NotImplementedError(
            "The checkpoint has `dist_token` and `reg_token`: timm's VisionTransformerDistilled builds register "
            "tokens with `reg_tokens=N` but never puts them into the sequence (its _pos_embed concatenates only "
            "the class and distillation tokens), so vitrail's registers would change the outputs. Remove "
            "`reg_token` if that is the model you mean."
        )
    if "fc_norm.weight" in state:
        raise NotImplementedError(
            "The checkpoint has `dist_token` and `fc_norm.*`: timm's VisionTransformerDistilled with fc_norm=True "
            "never applies `fc_norm` (its forward_head reads tokens 0 and 1 without it), so the model has no final "
            "norm; vitrail always applies one."
        )


def _depth(state: Mapping[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"The timm checkpoint's blocks are not numbered 0..N-1: {sorted(indices)}.")
    return len(indices)


def _pair(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    value = list(value)
    if len(value) == 3:  # pretrained_cfg input_size (C, H, W)
        value = value[1:]
    return int(value[0]), int(value[1])


def _timm_meta_model(architecture: str | None, model_args: dict, num_classes: int):
    """The named timm model built on the meta device (no memory, no download), or None when timm is missing or
    does not know the name."""
    if not architecture:
        return None
    try:
        import timm
    except ImportError:
        return None
    if not timm.is_model(architecture):
        logger.info(
            "timm does not know the architecture %r; reading everything from the weights.", architecture
        )
        return None
    with torch.device("meta"):
        return timm.create_model(architecture, pretrained=False, **{**model_args, "num_classes": num_classes})


def _from_meta_model(meta) -> dict:
    """What the tensors cannot say, read from a timm model: heads, activation, norm epsilon, pooling. Raises when
    the model uses a part vitrail cannot reproduce."""
    from timm.layers import Mlp
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    name = type(meta).__name__
    if type(meta) not in (VisionTransformer, VisionTransformerDistilled):
        raise NotImplementedError(
            f"timm builds this architecture as {name}; only VisionTransformer and VisionTransformerDistilled "
            "convert."
        )
    block = meta.blocks[0]
    for part, got, want in (
        ("block", block, Block),
        ("attention", block.attn, Attention),
        ("MLP", block.mlp, Mlp),
    ):
        if type(got) is not want:
            raise NotImplementedError(
                f"This timm architecture uses {type(got).__name__} as its {part}; vitrail reproduces only timm's "
                f"{want.__name__}."
            )
    act = block.mlp.act
    if isinstance(act, torch.nn.GELU):
        hidden_act = "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    elif type(act).__name__ == "QuickGELU":
        hidden_act = "quick_gelu"
    elif isinstance(act, torch.nn.SiLU):
        hidden_act = "silu"
    else:
        raise NotImplementedError(f"The timm MLP activation {type(act).__name__} has no vitrail counterpart.")
    norms = [
        m for m in (block.norm1, block.norm2, block.attn.q_norm, meta.norm, meta.fc_norm) if m is not None
    ]
    norms = [m for m in norms if not isinstance(m, torch.nn.Identity)]
    if any(not isinstance(m, torch.nn.LayerNorm) for m in norms):
        kinds = sorted({type(m).__name__ for m in norms})
        raise NotImplementedError(
            f"This timm architecture normalises with {kinds}; vitrail has only LayerNorm."
        )
    eps = {m.eps for m in norms}
    if len(eps) != 1:
        raise NotImplementedError(f"This timm architecture mixes LayerNorm epsilons {sorted(eps)}.")
    return {
        "num_heads": block.attn.num_heads,
        "hidden_act": hidden_act,
        "layer_norm_eps": eps.pop(),
        "global_pool": meta.global_pool,
        "pool_include_prefix": bool(getattr(meta, "pool_include_prefix", False)),
        "dynamic_img_size": bool(getattr(meta, "dynamic_img_size", False)),
        "dynamic_img_pad": bool(getattr(meta.patch_embed, "dynamic_img_pad", False)),
        "img_size": tuple(meta.patch_embed.img_size),
        "distilled": type(meta) is VisionTransformerDistilled,
    }


def _heads_from_name(architecture: str | None, width: int) -> int | None:
    match = re.match(r"(?:vit|deit3?|eva)_([a-z]+)_", architecture or "")
    if not match or match.group(1) not in TIMM_SIZE_HEADS:
        return None
    size_width, heads = TIMM_SIZE_HEADS[match.group(1)]
    if size_width != width:
        logger.warning(
            "The architecture name %r says %r (width %d), but the weights are %d wide; not trusting the name for "
            "the head count.",
            architecture,
            match.group(1),
            size_width,
            width,
        )
        return None
    logger.info("num_heads=%d from the size word %r of %r.", heads, match.group(1), architecture)
    return heads


def _grid(
    num_positions: int, prefix: int, patch: tuple[int, int], img_sizes: list[tuple[int, int]]
) -> tuple[tuple[int, int], bool]:
    """`(image_size, no_embed_class)` from the position count: the table holds `num_patches` rows, plus one per
    prefix token unless timm's `no_embed_class`. Image sizes named by the config are tried first; a square grid is
    the fallback, and is refused when both layouts give a square."""
    layouts = [False, True] if prefix else [True]
    for image_size in img_sizes:
        patches = (image_size[0] // patch[0]) * (image_size[1] // patch[1])
        for no_embed_class in layouts:
            if num_positions == patches + (0 if no_embed_class else prefix):
                return image_size, no_embed_class
    squares = []
    for no_embed_class in layouts:
        side = math.isqrt(num_positions - (0 if no_embed_class else prefix))
        if side * side == num_positions - (0 if no_embed_class else prefix) and side > 0:
            squares.append(((side * patch[0], side * patch[1]), no_embed_class))
    if len(squares) == 1:
        if img_sizes:
            logger.warning(
                "pos_embed has %d rows, which fits none of the configured image sizes %s; using a square grid.",
                num_positions,
                img_sizes,
            )
        return squares[0]
    if not squares:
        raise ValueError(
            f"`pos_embed` has {num_positions} rows ({prefix} prefix token(s)), which is no square patch grid: the "
            "image is not square. Put timm's config.json (with `pretrained_cfg.input_size` or `model_args.img_size`) "
            "next to the weights."
        )
    raise ValueError(
        f"`pos_embed` has {num_positions} rows: with {prefix} prefix token(s) that is a square grid both with and "
        "without prefix positions (timm `no_embed_class`). Put timm's config.json (with "
        "`pretrained_cfg.input_size` or `model_args.img_size`) next to the weights to decide."
    )


def _labels(timm_config: dict, num_classes: int) -> dict:
    names = timm_config.get("label_names")
    if names and len(names) == num_classes:
        id2label = {i: str(n) for i, n in enumerate(names)}
    else:
        if names:
            logger.warning(
                "config.json has %d label_names for %d classes; using LABEL_i.", len(names), num_classes
            )
        id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _resolve_pooling(candidates, has_cls: bool, has_fc_norm: bool, num_classes: int) -> tuple[str, str]:
    """(timm global_pool, vitrail pooling). `candidates` in order of precedence: the argument, config.json,
    model_args, timm's model; with none, a guess from the tensors (logged). fc_norm works with either pooling:
    vitrail's `use_fc_norm` normalises whatever vector is pooled, as timm's `fc_norm` does."""
    pool = next((c for c in candidates if c is not None), None)
    if pool is None:
        pool = "token" if has_cls and not has_fc_norm else "avg"
        if has_cls and num_classes:
            logger.warning(
                "No config.json names timm's global_pool; guessing %r from the tensors (fc_norm %s). Token and "
                "average pooling use the same tensors: pass global_pool= if the guess is wrong.",
                pool,
                "present" if has_fc_norm else "absent",
            )
    if pool in ("map", "prr"):
        raise NotImplementedError(
            f"timm global_pool={pool!r} is attention pooling (an attn_pool module); vitrail pools with the class "
            "token or a mean."
        )
    if pool in ("avgmax", "max"):
        raise NotImplementedError(
            f"timm global_pool={pool!r} takes a maximum over tokens; vitrail pools with the class token ('token') "
            "or the mean of the patch tokens ('avg')."
        )
    if pool not in ("token", "avg", ""):
        raise ValueError(f"Unknown timm global_pool {pool!r}.")
    if pool == "" and num_classes:
        raise NotImplementedError(
            "timm global_pool='' with a head classifies every token separately; vitrail's head reads one pooled "
            "vector. Pass global_pool='token' or 'avg' if the head was trained on one of those."
        )
    if pool == "token" and not has_cls:
        raise ValueError("global_pool='token' needs a class token, but the checkpoint has no `cls_token`.")
    # global_pool="" (no head): the pooled output is not timm's anyway; pool as timm's default head would.
    return pool, {"token": "cls", "avg": "mean"}.get(pool, "cls" if has_cls else "mean")


def _timm_options(
    state: Mapping[str, torch.Tensor],
    timm_config: dict | None,
    num_heads: int | None,
    global_pool: str | None,
) -> dict:
    """Every timm option the conversion and the timm reference need, resolved and cross-checked."""
    timm_config = dict(timm_config or {})
    model_args = dict(timm_config.get("model_args") or {})
    unknown = sorted(set(model_args) - _KNOWN_MODEL_ARGS)
    if unknown:
        raise NotImplementedError(
            f"config.json model_args {unknown} are timm options this converter does not know how to reproduce; "
            f"understood are {sorted(_KNOWN_MODEL_ARGS)}."
        )
    pretrained_cfg = timm_config.get("pretrained_cfg") or {}
    architecture = timm_config.get("architecture")

    patch_w = state["patch_embed.proj.weight"]
    width, channels = patch_w.shape[0], patch_w.shape[1]
    patch = (patch_w.shape[2], patch_w.shape[3])
    depth = _depth(state)
    head = state.get("head.weight")
    num_classes = 0 if head is None else head.shape[0]
    if "num_classes" in timm_config and int(timm_config["num_classes"]) != num_classes:
        raise ValueError(
            f"config.json says num_classes={timm_config['num_classes']}, but the weights have "
            f"{'no head' if head is None else f'a {num_classes}-class head'}."
        )
    has_cls = "cls_token" in state
    distilled = "dist_token" in state
    reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    prefix = int(has_cls) + int(distilled) + reg

    meta_info = None
    try:
        meta = _timm_meta_model(architecture, model_args, num_classes)
    except (TypeError, RuntimeError, AssertionError) as error:  # model_args timm itself rejects
        raise ValueError(
            f"timm cannot build {architecture!r} with model_args {model_args}: {error}"
        ) from error
    if meta is not None:
        meta_info = _from_meta_model(meta)
        if meta_info["distilled"] != distilled:
            raise ValueError(
                f"timm builds {architecture!r} as {type(meta).__name__}, but the weights "
                f"{'have' if distilled else 'have no'} `dist_token`: the config.json architecture does not "
                "belong to these weights."
            )
        want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if want != got:
            differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            logger.warning(
                "The weights differ from timm's %r built with model_args %s at %s; converting what the weights say.",
                architecture,
                model_args,
                differ[:6],
            )

    # Head count: argument, model_args, timm, the name's size word.
    heads = num_heads or model_args.get("num_heads") or (meta_info or {}).get("num_heads")
    heads = heads or _heads_from_name(architecture, width)
    if not heads:
        raise ValueError(
            f"The number of attention heads cannot be read from the weights (width {width}): pass "
            "`num_heads=` (`--num-heads` on the command line), or put timm's config.json with "
            "`architecture` / `model_args.num_heads` next to the weights."
        )
    if width % heads:
        raise ValueError(f"num_heads={heads} does not divide the width {width}.")

    has_fc_norm = "fc_norm.weight" in state
    candidates = (global_pool, timm_config.get("global_pool"), model_args.get("global_pool"))
    pool, pooling = _resolve_pooling(
        [*candidates, (meta_info or {}).get("global_pool")], has_cls, has_fc_norm, num_classes
    )
    if distilled and pool not in ("token", ""):
        raise ValueError(
            f"global_pool={pool!r}, but timm's VisionTransformerDistilled reads the class and distillation "
            "tokens (it accepts only global_pool='token')."
        )
    if distilled:
        pool, pooling = "token", "cls"  # timm keeps 'token' on a distilled backbone too

    pool_include_prefix = model_args.get("pool_include_prefix", (meta_info or {}).get("pool_include_prefix"))
    if pool_include_prefix and pool == "avg":
        raise NotImplementedError(
            "timm pool_include_prefix=True averages the class/register tokens too; vitrail's mean pooling reads "
            "only the patch tokens."
        )
    if model_args.get("pre_norm") or model_args.get("final_norm") is False:
        raise NotImplementedError("timm pre_norm=True / final_norm=False have no vitrail counterpart.")
    if model_args.get("proj_bias") is False:
        raise NotImplementedError("timm proj_bias=False has no vitrail counterpart.")
    dynamic_pad = model_args.get("dynamic_img_pad", (meta_info or {}).get("dynamic_img_pad", False))
    dynamic_size = bool(model_args.get("dynamic_img_size", (meta_info or {}).get("dynamic_img_size", False)))
    if dynamic_pad and not dynamic_size:
        raise NotImplementedError(
            "timm dynamic_img_pad=True without dynamic_img_size pads inputs of the native size only; vitrail pads "
            "when `dynamic_image_size=True`. Rebuild the timm model with dynamic_img_size=True to compare."
        )

    # Positions and grid.
    img_sizes = [
        s
        for s in (
            _pair(model_args.get("img_size")),
            _pair(pretrained_cfg.get("input_size")),
            (meta_info or {}).get("img_size"),
        )
        if s is not None
    ]
    pos = state.get("pos_embed")
    if pos is None:
        if not img_sizes:
            raise ValueError(
                "The checkpoint has no `pos_embed` (timm pos_embed='none'), so its image size cannot be read from "
                "the weights: put timm's config.json (with pretrained_cfg.input_size) next to them."
            )
        image_size, no_embed_class = img_sizes[0], True
    else:
        image_size, no_embed_class = _grid(pos.shape[1], prefix, patch, img_sizes)
        if distilled and no_embed_class:
            # timm's _pos_embed has a no_embed_class branch, but __init__ always sizes pos_embed for
            # num_patches + 2 rows, so such a model cannot run in timm and no checkpoint of it can exist.
            raise NotImplementedError(
                f"`pos_embed` has {pos.shape[1]} rows, one per patch of a {image_size} image and none for the class "
                "and distillation tokens (timm no_embed_class=True). timm's VisionTransformerDistilled always "
                "gives both tokens a position (its no_embed_class variant fails at run time), so this is no timm "
                "checkpoint and there is nothing to check a conversion against."
            )
    if (
        "no_embed_class" in model_args
        and pos is not None
        and bool(model_args["no_embed_class"]) != no_embed_class
    ):
        raise ValueError(
            f"config.json says no_embed_class={model_args['no_embed_class']}, but pos_embed has {pos.shape[1]} "
            f"rows for {prefix} prefix token(s) and a {image_size} image."
        )

    intermediate = state["blocks.0.mlp.fc1.weight"].shape[0]
    checks = {
        "embed_dim": width,
        "depth": depth,
        "patch_size": patch,
        "in_chans": channels,
        "reg_tokens": reg,
        "class_token": has_cls,
        "qk_norm": "blocks.0.attn.q_norm.weight" in state,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
    }
    for key, value in checks.items():
        if key in model_args:
            given = _pair(model_args[key]) if key == "patch_size" else model_args[key]
            if given != value:
                raise ValueError(
                    f"config.json model_args says {key}={model_args[key]}, the weights say {value}."
                )
    if "num_features" in timm_config and int(timm_config["num_features"]) != width:
        raise ValueError(
            f"config.json says num_features={timm_config['num_features']}, the weights are {width} wide."
        )
    if "mlp_ratio" in model_args and int(width * model_args["mlp_ratio"]) != intermediate:
        raise ValueError(
            f"config.json mlp_ratio={model_args['mlp_ratio']} does not give the MLP width {intermediate}."
        )

    if meta_info is None:
        logger.info(
            "timm does not describe this architecture here; assuming timm's VisionTransformer defaults: exact GELU "
            "and LayerNorm eps 1e-6."
        )
    layer_scale = "blocks.0.ls1.gamma" in state
    return {
        "architecture": architecture,
        "known_to_timm": meta_info is not None,
        "model_args": model_args,
        "num_classes": num_classes,
        "width": width,
        "depth": depth,
        "heads": heads,
        "intermediate": intermediate,
        "patch": patch,
        "channels": channels,
        "image_size": image_size,
        "has_cls": has_cls,
        "distilled": distilled,
        "reg": reg,
        "no_embed_class": no_embed_class,
        "has_pos": pos is not None,
        "global_pool": pool,
        "pooling": pooling,
        "fc_norm": has_fc_norm,
        "qk_norm": checks["qk_norm"],
        "qkv_bias": checks["qkv_bias"],
        # Only the initial value of new LayerScale vectors; the converted ones are loaded.
        "init_values": (model_args.get("init_values") or 1e-5) if layer_scale else None,
        "dynamic_img_size": dynamic_size,
        "hidden_act": (meta_info or {}).get("hidden_act", "gelu"),
        "layer_norm_eps": (meta_info or {}).get("layer_norm_eps", 1e-6),
        "labels": _labels(timm_config, num_classes) if num_classes else {"num_labels": 0},
    }


def _config_from_options(options: dict) -> VitrailConfig:
    height, width = options["image_size"]
    ph, pw = options["patch"]
    if not options["has_pos"]:
        prefix_positions = "none"
    elif options["no_embed_class"] or not (options["has_cls"] or options["reg"]):
        prefix_positions = "none"
    elif options["reg"] == 0 and not options["distilled"]:
        prefix_positions = "cls"
    else:
        prefix_positions = "all"
    return VitrailConfig(
        hidden_size=options["width"],
        num_hidden_layers=options["depth"],
        num_attention_heads=options["heads"],
        intermediate_size=options["intermediate"],
        hidden_act=options["hidden_act"],
        layer_norm_eps=options["layer_norm_eps"],
        image_size=height if height == width else [height, width],
        patch_size=ph if ph == pw else [ph, pw],
        num_channels=options["channels"],
        qkv_bias=options["qkv_bias"],
        encoder_stride=ph,
        pooling=options["pooling"],
        use_cls_token=options["has_cls"],
        use_distillation_token=options["distilled"],
        num_register_tokens=options["reg"],
        position_embedding_type="learned" if options["has_pos"] else "none",
        prefix_position_embeddings=prefix_positions,
        use_fc_norm=options["fc_norm"],
        layer_scale_init_value=options["init_values"],
        qk_norm=options["qk_norm"],
        dynamic_image_size=options["dynamic_img_size"],
        position_interpolation="bicubic_antialias",
        **options["labels"],
    )


def vitrail_config_from_timm(
    state_dict: Mapping[str, torch.Tensor],
    *,
    timm_config: dict | None = None,
    num_heads: int | None = None,
    global_pool: str | None = None,
    id2label: Mapping[int, str] | None = None,
) -> VitrailConfig:
    """The `VitrailConfig` reproducing a timm `VisionTransformer` state dict.

    `timm_config` is the Hub folder's config.json (optional; it supplies the head count, pooling, image size and
    label names the tensors cannot). `num_heads` and `global_pool` ("token" or "avg") override it. Labels come from
    `label_names` unless `id2label` is given; a checkpoint without a head gives `num_labels=0`. Raises `NotImplementedError` for timm options
    vitrail cannot reproduce and `ValueError` when something needed is unknown or the inputs disagree.
    """
    state = _strip_wrapper(state_dict)
    _check_supported_tensors(state)
    options = _timm_options(state, timm_config, num_heads, global_pool)
    if id2label is not None:
        if len(id2label) != options["num_classes"]:
            raise ValueError(
                f"id2label has {len(id2label)} labels, the head {options['num_classes']} classes."
            )
        labels = {int(k): str(v) for k, v in id2label.items()}
        options["labels"] = {"id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    return _config_from_options(options)


def _target_class(state: Mapping[str, torch.Tensor]):
    return VitrailForImageClassification if "head.weight" in state else VitrailModel


def convert_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: VitrailConfig, target_cls=None
) -> dict[str, torch.Tensor]:
    """Rename a timm VisionTransformer state dict to vitrail's names for `target_cls` (default: the classifier
    when there is a `head`, else `VitrailModel`), checking every tensor (see `rename_state_dict`)."""
    state = _strip_wrapper(state_dict)
    _check_supported_tensors(state)
    target_cls = target_cls or _target_class(state)
    if target_cls is VitrailForImageClassification and "head.weight" not in state:
        raise ValueError(
            "The timm checkpoint has no head (num_classes=0): convert it into VitrailModel, or add a head later "
            "with `VitrailForImageClassification` and `vitrail.convert.fit_to_class`."
        )
    if target_cls is VitrailModel and "head.weight" in state:
        raise ValueError(
            "The timm checkpoint has a classification head (`head.*`); convert it into "
            "VitrailForImageClassification (VitrailModel would have to drop it)."
        )
    return rename_state_dict(
        state,
        TIMM_RENAMES,
        expected_shapes(target_cls, config),
        drops=TIMM_DROPPED,
        backbone="vitrail." if target_cls is not VitrailModel else "",
        source_name="timm VisionTransformer checkpoint",
    )


# ---- files ------------------------------------------------------------------------------------------------------


def _read_source(path: str | Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict, Path | None]:
    """(state dict, timm config.json or {}, the weight file when it is a safetensors file)."""
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
    state = _strip_wrapper(read_weights(path, allow_pickle=allow_pickle))
    weight_file = path / "model.safetensors" if path.is_dir() else path
    return (
        state,
        timm_config,
        weight_file if weight_file.suffix == ".safetensors" and weight_file.is_file() else None,
    )


def _load(state, timm_config, num_heads, global_pool):
    _check_supported_tensors(state)
    options = _timm_options(state, timm_config, num_heads, global_pool)
    config = _config_from_options(options)
    target_cls = _target_class(state)
    converted = convert_timm_state_dict(state, config, target_cls)
    model = target_cls(config)
    model.load_state_dict(converted, strict=True)
    return model.eval(), options


def load_timm_checkpoint(
    path: str | Path,
    *,
    num_heads: int | None = None,
    global_pool: str | None = None,
    allow_pickle: bool = False,
) -> VitrailForImageClassification | VitrailModel:
    """A timm VisionTransformer checkpoint as a vitrail model in eval mode.

    `path` is a timm Hub folder (config.json + model.safetensors) or a weight file (`.safetensors`; a
    `config.json` beside it is used when it is timm's). Pickles (`.pth`, `.bin`) are read only with
    `allow_pickle=True`. A checkpoint with a head gives `VitrailForImageClassification` (labels from
    `label_names`), one without gives `VitrailModel`.
    """
    state, timm_config, _ = _read_source(path, allow_pickle)
    model, _ = _load(state, timm_config, num_heads, global_pool)
    return model


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
    # torchvision's CenterCrop places an odd margin at round((H - h) / 2), transformers' at floor.
    extra = {"center_crop_rounding": "round"}
    return VitrailImageProcessor(
        **extra,
        do_resize=True,
        size=size,
        resample=_INTERPOLATIONS[interpolation],
        do_center_crop=True,
        crop_size={"height": height, "width": width},
        crop_pct=None,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        num_channels=channels,
    )


# ---- the timm reference -----------------------------------------------------------------------------------------


def _timm_reference(options: dict, state: dict, weight_file: Path | None):
    """timm's own model with the same weights, built to accept any input size (its own position resampling)."""
    try:
        import timm
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None, "timm is not installed: no reference model to compare with."
    if options["known_to_timm"]:
        model = timm.create_model(
            options["architecture"],
            pretrained=False,
            **{**options["model_args"], "num_classes": options["num_classes"], "dynamic_img_size": True},
        )
        how = f"timm.create_model({options['architecture']!r})"
    else:
        width = options["width"]
        # VisionTransformerDistilled takes VisionTransformer's arguments and resamples its positions (cls and
        # dist rows kept) at run time with dynamic_img_size=True, as VisionTransformer does.
        model_cls = VisionTransformerDistilled if options["distilled"] else VisionTransformer
        model = model_cls(
            img_size=options["image_size"],
            patch_size=options["patch"],
            in_chans=options["channels"],
            num_classes=options["num_classes"],
            global_pool=options["global_pool"],
            embed_dim=width,
            depth=options["depth"],
            num_heads=options["heads"],
            mlp_ratio=(options["intermediate"] + 0.5) / width,  # timm takes int(width * ratio)
            qkv_bias=options["qkv_bias"],
            qk_norm=options["qk_norm"],
            init_values=options["init_values"],
            class_token=options["has_cls"],
            pos_embed="learn" if options["has_pos"] else "none",
            no_embed_class=options["no_embed_class"],
            reg_tokens=options["reg"],
            fc_norm=options["fc_norm"],
            dynamic_img_size=True,
        )
        how = f"timm {model_cls.__name__} built from the inferred options"
    if weight_file is not None:
        timm.models.load_checkpoint(model, str(weight_file), strict=True)
    else:
        model.load_state_dict(state, strict=True)
    model.eval()

    def reference(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(pixels) if options["num_classes"] else model.forward_features(pixels)

    return reference, f"reference: {how}, weights loaded by timm, dynamic_img_size=True."


def open_source(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    num_heads: int | None = None,
    global_pool: str | None = None,
) -> Converted:
    """The converted model, its processor (from config.json's `pretrained_cfg`, else None) and timm's own model as
    the reference, for `scripts/convert_checkpoint.py --from timm`. The reference maps pixels of any size to timm's
    logits (its `forward_features` tokens for a checkpoint without a head)."""
    state, timm_config, weight_file = _read_source(path, allow_pickle)
    model, options = _load(state, timm_config, num_heads, global_pool)
    notes = [
        f"timm {options['architecture'] or 'VisionTransformer'}: {options['depth']} blocks, width "
        f"{options['width']}, {options['heads']} heads, image {options['image_size']}, global_pool "
        f"{options['global_pool']!r}{', distillation token' if options['distilled'] else ''}, "
        f"{type(model).__name__}."
    ]
    processor = None
    pretrained_cfg = timm_config.get("pretrained_cfg")
    if pretrained_cfg:
        try:
            processor = timm_image_processor(pretrained_cfg)
        except NotImplementedError as error:
            notes.append(f"No image processor: {error}")
    else:
        notes.append("No pretrained_cfg in config.json: no image processor.")
    reference, note = _timm_reference(options, state, weight_file)
    notes.append(note)
    return Converted(model=model, processor=processor, reference=reference, notes=notes)


__all__ = [
    "TIMM_DROPPED",
    "TIMM_RENAMES",
    "TIMM_SIZE_HEADS",
    "TIMM_UNSUPPORTED",
    "convert_timm_state_dict",
    "is_timm_config",
    "load_timm_checkpoint",
    "open_source",
    "timm_image_processor",
    "vitrail_config_from_timm",
]
