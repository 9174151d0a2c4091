"""timm `VisionTransformer` checkpoints into vitrail.

A timm checkpoint is a plain state dict (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.attn.qkv`, ...),
usually in a Hub folder next to a `config.json` such as
`{"architecture": "vit_base_patch16_224.augreg2_in21k_ft_in1k", "num_classes": 1000, "global_pool": "token",
"pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 0.9, ...}, "label_names": [...], "model_args": {...}}`.

Almost the whole architecture is read off the tensors (`TimmFacts`): width, depth, patch size, MLP size, class,
distillation and register tokens, position rows, `fc_norm`, `qk_norm`, LayerScale, biases. `vitrail_config_from_timm`
reconciles these facts with everything else in one place: what config.json says about them must agree; what they
cannot say (heads, pooling, image size and so whether prefix tokens own positions, activation, epsilon) comes, in
order, from explicit arguments, the config.json, timm itself when it is installed and knows the architecture name
(the model is built on the meta device and read), the name's size word (`vit_base_...` -> 12 heads, when the width
agrees), and finally documented defaults -- each guess is logged.

timm's distilled DeiT (`VisionTransformerDistilled`, e.g. `deit_base_distilled_patch16_224`) converts too: its
`dist_token` becomes vitrail's distillation token (`use_distillation_token=True`, token order `[cls, distillation,
patches]`, `pos_embed` rows for both tokens: `prefix_position_embeddings="all"`) and `head_dist` the
`distillation_classifier`, so that the logits are timm's eval-mode average `(head(cls) + head_dist(dist)) / 2`. A
distilled backbone (`num_classes=0`) becomes a `VitrailModel` that keeps the token.

Every timm option vitrail cannot reproduce raises, naming the tensor or option: attention pooling
(`global_pool="map"`), `pre_norm` (`norm_pre`), gated MLPs, `proj_bias=False`, a patch norm, `scale_attn_norm` /
`scale_mlp_norm`, `final_norm=False`, max pooling, `pool_include_prefix`. Nothing that affects the outputs is
dropped.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configuration_vitrail import VARIANTS, VitrailConfig
from ..modeling_vitrail import VitrailForImageClassification, VitrailModel
from .common import (
    Converted,
    Plan,
    Refuse,
    Rename,
    describe,
    grid_of_positions,
    height_width,
    in_layers,
    layer_count,
    read_weights,
    refuse,
)

logger = logging.getLogger(__name__)

# ---- tables ------------------------------------------------------------------------------------------------------
# timm's fused qkv has rows [q; k; v] like vitrail's, so every tensor is copied as it is. Every tensor of a
# supported timm VisionTransformer affects its outputs, so nothing is dropped.

TIMM_RENAMES: tuple[Rename, ...] = (
    Rename("cls_token", "{backbone}embeddings.cls_token"),
    Rename("dist_token", "{backbone}embeddings.distillation_token"),
    Rename("reg_token", "{backbone}embeddings.register_tokens"),
    Rename("pos_embed", "{backbone}embeddings.position_embeddings"),
    Rename("patch_embed.proj.{p}", "{backbone}embeddings.patch_embeddings.projection.{p}"),
    *in_layers(
        "blocks.{n}.",
        (
            Rename("norm1.{p}", "norm1.{p}"),
            Rename("norm2.{p}", "norm2.{p}"),
            Rename("attn.qkv.{p}", "attention.qkv.{p}"),
            Rename("attn.q_norm.{p}", "attention.q_norm.{p}"),
            Rename("attn.k_norm.{p}", "attention.k_norm.{p}"),
            Rename("attn.proj.{p}", "attention.proj.{p}"),
            Rename("ls1.gamma", "layer_scale1.scale"),
            Rename("ls2.gamma", "layer_scale2.scale"),
            Rename("mlp.fc1.{p}", "mlp.fc1.{p}"),
            Rename("mlp.fc2.{p}", "mlp.fc2.{p}"),
        ),
    ),
    Rename("norm.{p}", "{backbone}layernorm.{p}"),
    Rename(
        "fc_norm.{p}",
        "{backbone}layernorm.{p}",
        note="timm's fc_norm (final norm on the pooled vector) became vitrail's layernorm with use_fc_norm=True.",
    ),
    Rename("head.{p}", "classifier.{p}"),
    Rename("head_dist.{p}", "distillation_classifier.{p}"),
)

# Tensors of timm options vitrail has no counterpart for, refused before anything else is read so that the error
# says what the tensor *is*, not only that it is unknown.
TIMM_REFUSED: tuple[Refuse, ...] = (
    Refuse(
        "attn_pool.*",
        "attention pooling (timm `global_pool='map'` / 'prr', as in SigLIP); vitrail pools with the class token "
        "or a mean. Convert only the backbone by removing the attn_pool.* and head.* tensors and passing "
        "global_pool='avg' (the pooled output then differs from timm's)",
    ),
    Refuse(
        "norm_pre.*",
        "a LayerNorm before the blocks (timm `pre_norm=True`, as in CLIP); vitrail has no pre-norm",
    ),
    Refuse("patch_embed.norm.*", "a LayerNorm inside the patch embedding (timm `embed_norm_layer`)"),
    Refuse(
        "blocks.{n}.attn.norm.*",
        "a LayerNorm inside attention before its output projection (timm `scale_attn_norm=True`)",
    ),
    Refuse("blocks.{n}.mlp.norm.*", "a LayerNorm inside the MLP (timm `scale_mlp_norm=True`)"),
    Refuse(
        "blocks.{n}.mlp.fc1_*",
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

# timm's size words and the vitrail variant each names (timm vision_transformer.py model definitions), for the
# head count; the word is trusted only when the checkpoint's width is the variant's.
TIMM_SIZE_WORDS = {"tiny": "Ti", "small": "S", "medium": "M", "base": "B", "large": "L", "huge": "H",
                   "giant": "g", "gigantic": "G"}  # fmt: skip

# vitrail's `hidden_act` -> timm's `act_layer`.
_TIMM_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "silu": "silu",
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


# ---- what the tensors say --------------------------------------------------------------------------------------


def _strip_wrapper(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a `module.` (DataParallel) prefix that every key carries."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _refuse_unsupported(state: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors of timm options vitrail cannot reproduce (`TIMM_REFUSED`, and those told by a missing tensor
    or a shape) and state dicts timm cannot have written."""
    refuse(state, TIMM_REFUSED, "timm checkpoint")
    needed = ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight")
    if any(name not in state for name in needed):
        raise ValueError(
            "This is not a timm VisionTransformer state dict: `patch_embed.proj.weight` and `blocks.N.*` are "
            f"expected; first keys: {sorted(state)[:8]}."
        )
    if "blocks.0.attn.proj.bias" not in state:
        raise NotImplementedError(
            "`blocks.0.attn.proj.bias` is missing: the timm model was built with `proj_bias=False`; vitrail's "
            "attention output projection always has a bias. (Zero biases would reproduce it: add "
            "`blocks.N.attn.proj.bias = zeros` for every block if you want that.)"
        )
    if "norm.weight" not in state and "fc_norm.weight" not in state:
        raise NotImplementedError(
            "The checkpoint has neither `norm.*` nor `fc_norm.*`: the timm model was built with "
            "`final_norm=False`; vitrail always applies a final LayerNorm."
        )
    fc1, fc2 = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc2.weight"]
    if fc1.shape[0] != fc2.shape[1]:
        raise NotImplementedError(
            f"`blocks.0.mlp.fc1` makes {fc1.shape[0]} features but `fc2` reads {fc2.shape[1]}: a gated MLP "
            "(timm `GluMlp` / `SwiGLUPacked`). vitrail has `mlp_type='swiglu'`, but timm's gate order and "
            "activation cannot be confirmed from the weights, so this converter refuses it."
        )
    # A distillation token must come as timm's VisionTransformerDistilled builds it: with a second head exactly
    # when there is a first one, the final norm on every token, and no register tokens.
    if "head_dist.weight" in state and "dist_token" not in state:
        raise ValueError(
            "The checkpoint has `head_dist.*` but no `dist_token`: a distillation head needs timm's distillation "
            "token (VisionTransformerDistilled), so this state dict is inconsistent."
        )
    if "dist_token" not in state:
        return
    if "head.weight" in state and "head_dist.weight" not in state:
        raise ValueError(
            "The checkpoint has `dist_token` and `head.*` but no `head_dist.*`; timm's VisionTransformerDistilled "
            "always has both heads (or neither, with num_classes=0), so this state dict is inconsistent."
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


@dataclass(frozen=True)
class TimmFacts:
    """The architecture of a timm VisionTransformer as its tensors give it (`TimmFacts.read`)."""

    width: int
    depth: int
    patch: tuple[int, int]
    channels: int
    mlp_width: int
    num_classes: int  # 0 without a head
    class_token: bool
    distilled: bool
    registers: int
    positions: int | None  # rows of pos_embed; None with timm pos_embed='none'
    fc_norm: bool
    qk_norm: bool
    qkv_bias: bool
    layer_scale: bool

    @classmethod
    def read(cls, state: Mapping[str, torch.Tensor]) -> TimmFacts:
        """The facts of a state dict that `_refuse_unsupported` lets through."""
        patch = state["patch_embed.proj.weight"]  # (width, channels, ph, pw)
        return cls(
            width=patch.shape[0],
            depth=layer_count(state, "blocks.{n}.*"),
            patch=tuple(patch.shape[2:]),
            channels=patch.shape[1],
            mlp_width=state["blocks.0.mlp.fc1.weight"].shape[0],
            num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
            class_token="cls_token" in state,
            distilled="dist_token" in state,
            registers=state["reg_token"].shape[1] if "reg_token" in state else 0,
            positions=state["pos_embed"].shape[1] if "pos_embed" in state else None,
            fc_norm="fc_norm.weight" in state,
            qk_norm="blocks.0.attn.q_norm.weight" in state,
            qkv_bias="blocks.0.attn.qkv.bias" in state,
            layer_scale="blocks.0.ls1.gamma" in state,
        )

    @property
    def prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled) + self.registers

    @property
    def as_model_args(self) -> dict:
        """The facts in the words of timm's config.json and `model_args` (pre_norm, final_norm and proj_bias: a
        refused option's tensors would be there otherwise)."""
        return {
            "embed_dim": self.width,
            "depth": self.depth,
            "patch_size": self.patch,
            "in_chans": self.channels,
            "reg_tokens": self.registers,
            "class_token": self.class_token,
            "qk_norm": self.qk_norm,
            "qkv_bias": self.qkv_bias,
            "proj_bias": True,
            "pre_norm": False,
            "final_norm": True,
            "num_classes": self.num_classes,
            "num_features": self.width,
        }


# ---- what timm and config.json say -----------------------------------------------------------------------------


def _timm_says(architecture: str | None, model_args: dict, state: Mapping, facts: TimmFacts) -> dict:
    """What timm's own model of `architecture`, built on the meta device (no memory, no download), says that the
    tensors cannot, in the words of `model_args` plus vitrail's `hidden_act` and `layer_norm_eps`; {} when timm is
    not installed or does not know the name. Raises when that model uses a part vitrail cannot reproduce, or is
    not of the kind the weights are."""
    if not architecture or importlib.util.find_spec("timm") is None:
        return {}
    import timm
    from timm.layers import Mlp
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not timm.is_model(architecture):
        return {}
    try:
        with torch.device("meta"):
            meta = timm.create_model(
                architecture, pretrained=False, **{**model_args, "num_classes": facts.num_classes}
            )
    except (TypeError, RuntimeError, AssertionError) as error:  # model_args timm itself rejects
        raise ValueError(
            f"timm cannot build {architecture!r} with model_args {model_args}: {error}"
        ) from error
    if type(meta) not in (VisionTransformer, VisionTransformerDistilled):
        raise NotImplementedError(
            f"timm builds this architecture as {type(meta).__name__}; only VisionTransformer and "
            "VisionTransformerDistilled convert."
        )
    if (type(meta) is VisionTransformerDistilled) != facts.distilled:
        raise ValueError(
            f"timm builds {architecture!r} as {type(meta).__name__}, but the weights "
            f"{'have' if facts.distilled else 'have no'} `dist_token`: the config.json architecture does not "
            "belong to these weights."
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
    norms = [block.norm1, block.norm2, block.attn.q_norm, meta.norm, meta.fc_norm]
    norms = [m for m in norms if m is not None and not isinstance(m, torch.nn.Identity)]
    if any(not isinstance(m, torch.nn.LayerNorm) for m in norms):
        kinds = sorted({type(m).__name__ for m in norms})
        raise NotImplementedError(
            f"This timm architecture normalises with {kinds}; vitrail has only LayerNorm."
        )
    eps = {m.eps for m in norms}
    if len(eps) != 1:
        raise NotImplementedError(f"This timm architecture mixes LayerNorm epsilons {sorted(eps)}.")
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
    return {
        "num_heads": block.attn.num_heads,
        "hidden_act": hidden_act,
        "layer_norm_eps": eps.pop(),
        "global_pool": meta.global_pool,
        "pool_include_prefix": bool(getattr(meta, "pool_include_prefix", False)),
        "dynamic_img_size": bool(getattr(meta, "dynamic_img_size", False)),
        "dynamic_img_pad": bool(getattr(meta.patch_embed, "dynamic_img_pad", False)),
        "img_size": tuple(meta.patch_embed.img_size),
    }


def _heads_from_name(architecture: str | None, width: int) -> int | None:
    match = re.match(r"(?:vit|deit3?|eva)_([a-z]+)_", architecture or "")
    if not match or match.group(1) not in TIMM_SIZE_WORDS:
        return None
    size_width, _, heads, _ = VARIANTS[TIMM_SIZE_WORDS[match.group(1)]]
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


def _labels(timm_config: dict, num_classes: int) -> dict[int, str]:
    names = timm_config.get("label_names")
    if names and len(names) == num_classes:
        return dict(enumerate(names))
    if names:
        logger.warning(
            "config.json has %d label_names for %d classes; using LABEL_i.", len(names), num_classes
        )
    return {i: f"LABEL_{i}" for i in range(num_classes)}


def _pooling(candidates, facts: TimmFacts) -> str:
    """vitrail's `pooling` for timm's global_pool, the first of `candidates` that is not None (the argument,
    config.json, model_args, timm's model); with none, a guess from the tensors (logged). fc_norm works with either
    pooling: vitrail's `use_fc_norm` normalises whatever vector is pooled, as timm's `fc_norm` does."""
    has_cls, has_fc_norm, num_classes = facts.class_token, facts.fc_norm, facts.num_classes
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
    if facts.distilled and pool not in ("token", ""):
        raise ValueError(
            f"global_pool={pool!r}, but timm's VisionTransformerDistilled reads the class and distillation "
            "tokens (it accepts only global_pool='token')."
        )
    # global_pool="" (no head): the pooled output is not timm's anyway; pool as timm's default head would.
    return {"token": "cls", "avg": "mean"}.get(pool, "cls" if has_cls else "mean")


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
    label names the tensors cannot). `num_heads` and `global_pool` ("token" or "avg") override it. Labels come
    from `label_names` unless `id2label` is given; a checkpoint without a head gives `num_labels=0`. Raises
    `NotImplementedError` for timm options vitrail cannot reproduce and `ValueError` when something needed is
    unknown or the inputs disagree.
    """
    state = _strip_wrapper(state_dict)
    _refuse_unsupported(state)
    facts = TimmFacts.read(state)
    timm_config = dict(timm_config or {})
    model_args = dict(timm_config.get("model_args") or {})
    unknown = sorted(set(model_args) - _KNOWN_MODEL_ARGS)
    if unknown:
        raise NotImplementedError(
            f"config.json model_args {unknown} are timm options this converter does not know how to reproduce; "
            f"understood are {sorted(_KNOWN_MODEL_ARGS)}."
        )
    architecture = timm_config.get("architecture")
    meta = _timm_says(architecture, model_args, state, facts)
    if not meta:
        logger.info(
            "timm does not describe the architecture %r here (not named, timm not installed, or a name timm does not "
            "know); assuming timm's VisionTransformer defaults: exact GELU and LayerNorm eps 1e-6.",
            architecture,
        )

    # What config.json says must be what the weights say.
    said = {
        **model_args,
        "patch_size": height_width(model_args.get("patch_size")),
        "num_classes": timm_config.get("num_classes"),
        "num_features": timm_config.get("num_features"),
    }
    for key, value in facts.as_model_args.items():
        if said.get(key) is not None and said[key] != value:
            raise ValueError(f"config.json says {key}={said[key]}, the weights say {value}.")
    if "mlp_ratio" in model_args and int(facts.width * model_args["mlp_ratio"]) != facts.mlp_width:
        raise ValueError(
            f"config.json mlp_ratio={model_args['mlp_ratio']} does not give the MLP width {facts.mlp_width}."
        )

    # What the weights cannot say: the argument first, then config.json, timm's own model, the name, defaults.
    def option(key: str, default=None):
        return model_args.get(key, meta.get(key, default))

    heads = num_heads or option("num_heads") or _heads_from_name(architecture, facts.width)
    if not heads:
        raise ValueError(
            f"The number of attention heads cannot be read from the weights (width {facts.width}): pass "
            "`num_heads=` (`--num-heads` on the command line), or put timm's config.json with "
            "`architecture` / `model_args.num_heads` next to the weights."
        )
    pooling = _pooling([global_pool, timm_config.get("global_pool"), option("global_pool")], facts)
    if option("pool_include_prefix") and pooling == "mean":
        raise NotImplementedError(
            "timm pool_include_prefix=True averages the class/register tokens too; vitrail's mean pooling reads "
            "only the patch tokens."
        )
    dynamic_size = bool(option("dynamic_img_size", False))
    if option("dynamic_img_pad") and not dynamic_size:
        raise NotImplementedError(
            "timm dynamic_img_pad=True without dynamic_img_size pads inputs of the native size only; vitrail pads "
            "when `dynamic_image_size=True`. Rebuild the timm model with dynamic_img_size=True to compare."
        )

    sizes = [
        height_width(model_args.get("img_size")),
        height_width((timm_config.get("pretrained_cfg") or {}).get("input_size")),
    ]
    sizes = [s for s in (*sizes, meta.get("img_size")) if s is not None]
    if facts.positions is not None:
        (height, width), prefix_rows = grid_of_positions(
            facts.positions,
            [facts.prefix_tokens, 0] if facts.prefix_tokens else [0],
            facts.patch,
            sizes,
            name="`pos_embed`",
            hint="put timm's config.json (with `pretrained_cfg.input_size` or `model_args.img_size`) next to the "
            "weights",
        )
        no_embed_class = prefix_rows == 0
    elif sizes:
        (height, width), no_embed_class = sizes[0], True
    else:
        raise ValueError(
            "The checkpoint has no `pos_embed` (timm pos_embed='none'), so its image size cannot be read from "
            "the weights: put timm's config.json (with pretrained_cfg.input_size) next to them."
        )
    if model_args.get("no_embed_class", no_embed_class) != no_embed_class and facts.positions is not None:
        raise ValueError(
            f"config.json says no_embed_class={model_args['no_embed_class']}, but pos_embed has "
            f"{facts.positions} rows for {facts.prefix_tokens} prefix token(s) and a {height}x{width} image."
        )
    if facts.distilled and no_embed_class:
        raise NotImplementedError(
            f"`pos_embed` has {facts.positions or 'no'} rows for a {height}x{width} image: the class and distillation "
            "tokens own no position (timm no_embed_class=True or pos_embed='none'), a model timm's "
            "VisionTransformerDistilled cannot run, so there is nothing to check a conversion against."
        )

    if id2label is not None and len(id2label) != facts.num_classes:
        raise ValueError(f"id2label has {len(id2label)} labels, the head {facts.num_classes} classes.")
    if id2label is None:
        id2label = _labels(timm_config, facts.num_classes) if facts.num_classes else {}
    id2label = {int(k): str(v) for k, v in id2label.items()}
    labels = (
        {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        if id2label
        else {"num_labels": 0}
    )
    # no_embed_class is also true without positions or without prefix tokens.
    if no_embed_class:
        prefix_positions = "none"
    else:
        prefix_positions = "cls" if facts.prefix_tokens == 1 and facts.class_token else "all"
    return VitrailConfig(
        hidden_size=facts.width,
        num_hidden_layers=facts.depth,
        num_attention_heads=heads,
        intermediate_size=facts.mlp_width,
        hidden_act=meta.get("hidden_act", "gelu"),
        layer_norm_eps=meta.get("layer_norm_eps", 1e-6),
        image_size=height if height == width else [height, width],
        patch_size=facts.patch[0] if facts.patch[0] == facts.patch[1] else list(facts.patch),
        num_channels=facts.channels,
        qkv_bias=facts.qkv_bias,
        encoder_stride=facts.patch[0],
        pooling=pooling,
        use_cls_token=facts.class_token,
        use_distillation_token=facts.distilled,
        num_register_tokens=facts.registers,
        position_embedding_type="none" if facts.positions is None else "learned",
        prefix_position_embeddings=prefix_positions,
        use_fc_norm=facts.fc_norm,
        # Only the initial value of new LayerScale vectors; the converted ones are loaded.
        layer_scale_init_value=(model_args.get("init_values") or 1e-5) if facts.layer_scale else None,
        qk_norm=facts.qk_norm,
        dynamic_image_size=dynamic_size,
        position_interpolation="bicubic_antialias",
        **labels,
    )


def _plan(state: Mapping[str, torch.Tensor], config: VitrailConfig) -> Plan:
    return Plan(
        state,
        config,
        head="head.weight" in state,
        rows=TIMM_RENAMES,
        source_name="timm VisionTransformer checkpoint",
    )


def convert_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: VitrailConfig, target_cls=None
) -> dict[str, torch.Tensor]:
    """Rename a timm VisionTransformer state dict to vitrail's names for `target_cls` (default: the classifier
    when there is a `head`, else `VitrailModel`), checking every tensor (see `rename_state_dict`)."""
    state = _strip_wrapper(state_dict)
    _refuse_unsupported(state)
    plan = _plan(state, config)
    if target_cls not in (None, plan.model_class):
        raise ValueError(
            f"The timm checkpoint has {'a' if plan.head else 'no'} head (a classifier, `head.*`): convert it into "
            f"{plan.model_class.__name__} (`vitrail.convert.fit_to_class` then adds or leaves out a head)."
        )
    return plan.state_dict()


# ---- files -------------------------------------------------------------------------------------------------------


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
    config = vitrail_config_from_timm(
        state, timm_config=timm_config, num_heads=num_heads, global_pool=global_pool
    )
    return _plan(state, config).load()


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
    timm_config: dict, config: VitrailConfig, state: dict, weight_file: Path | None
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """timm's own model with the same weights, built to accept any input size (its own position resampling), and
    a note saying what it is; None when timm is not installed."""
    if importlib.util.find_spec("timm") is None:
        return None, "timm is not installed: no reference model to compare with."
    import timm

    architecture, num_classes = (
        timm_config.get("architecture"),
        config.num_labels if "head.weight" in state else 0,
    )
    if architecture and timm.is_model(architecture):
        model_args = {
            **timm_config.get("model_args", {}),
            "num_classes": num_classes,
            "dynamic_img_size": True,
        }
        model = timm.create_model(architecture, pretrained=False, **model_args)
        how = f"timm.create_model({architecture!r})"
    else:
        model = timm_model_like(config, num_classes)
        how = f"timm {type(model).__name__} built from the converted config"
    if weight_file is not None:
        timm.models.load_checkpoint(model, str(weight_file), strict=True)
    else:
        model.load_state_dict(state, strict=True)
    model.eval()

    def reference(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(pixels) if num_classes else model.forward_features(pixels)

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
    config = vitrail_config_from_timm(
        state, timm_config=timm_config, num_heads=num_heads, global_pool=global_pool
    )
    model = _plan(state, config).load()
    notes = [f"timm {timm_config.get('architecture') or 'VisionTransformer'}: {describe(config)}."]
    processor = None
    if timm_config.get("pretrained_cfg"):
        try:
            processor = timm_image_processor(timm_config["pretrained_cfg"])
        except NotImplementedError as error:
            notes.append(f"No image processor: {error}")
    reference, note = _timm_reference(timm_config, config, state, weight_file)
    notes.append(note)
    return Converted(model=model, processor=processor, reference=reference, notes=notes)


__all__ = [
    "TIMM_REFUSED",
    "TIMM_RENAMES",
    "TIMM_SIZE_WORDS",
    "TimmFacts",
    "convert_timm_state_dict",
    "is_timm_config",
    "load_timm_checkpoint",
    "open_source",
    "timm_image_processor",
    "timm_model_like",
    "vitrail_config_from_timm",
]
