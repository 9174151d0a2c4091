"""Checkpoint conversion from other Vision Transformer implementations into vitrail's format.

This first slice covers transformers' ViT and DeiT (`model_type` "vit" and "deit"), in both key layouts a
transformers checkpoint can have:

- `"hub"`: the layout of google/vit-* and facebook/deit-* on the Hub, which transformers 5.x still writes by default
  (`save_original_format=True`): `encoder.layer.N.attention.attention.query`, `intermediate.dense`, ...
- `"v5"`: transformers 5.x in-memory module names (`layers.N.attention.q_proj`, `mlp.fc1`, ...), what
  `model.state_dict()` returns.

Every foreign name lives in declarative tables: `HF_SHARED_RENAMES` outside the layers (the layouts agree there)
and one `HF_LAYER_RENAMES` table per layout. The conversion is loud: each source key
is placed exactly once or dropped with a logged reason, every target key is filled with the expected shape, and
each structural fix (a DeiT distillation token becoming a register token, q/k/v fused) is logged.

timm, big_vision `.npz` and DINOv2 checkpoints are not handled yet.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from .configuration_vitrail import VitrailConfig
from .modeling_vitrail import VitrailForImageClassification, VitrailModel

logger = logging.getLogger(__name__)

# ---- rename tables ---------------------------------------------------------------------------------------------
# Source names are matched after the backbone prefix (`vit.` / `deit.`) is removed. In targets, `{backbone}` is
# `vitrail.` for head models and empty for the bare backbone, and regex groups fill `{0}`, `{1}`. A slot `(k, n)`
# says the tensor is row block k of n concatenated along dim 0 of the target: vitrail keeps q, k and v in one fused
# `qkv` projection with rows `[q; k; v]`.

# Outside the layers both layouts agree: (source regex, vitrail name, slot).
HF_SHARED_RENAMES: tuple[tuple[str, str, tuple[int, int] | None], ...] = (
    (r"embeddings\.cls_token", "{backbone}embeddings.cls_token", None),
    # DeiT's distillation token sits right after the class token and owns a position, as a register token with
    # `prefix_position_embeddings="all"` does; DeiTForImageClassification's head reads only the class token.
    (r"embeddings\.distillation_token", "{backbone}embeddings.register_tokens", None),
    (r"embeddings\.position_embeddings", "{backbone}embeddings.position_embeddings", None),
    (
        r"embeddings\.patch_embeddings\.projection\.(weight|bias)",
        "{backbone}embeddings.patch_embeddings.projection.{0}",
        None,
    ),
    (r"layernorm\.(weight|bias)", "{backbone}layernorm.{0}", None),
    (r"classifier\.(weight|bias)", "classifier.{0}", None),
)

# Inside layer N, one table per layout: (module prefix of the layers, rows of (module, vitrail module, slot)); each
# module has a `.weight` and, where the config enables it, a `.bias`.
HF_LAYER_RENAMES: dict[str, tuple[str, tuple[tuple[str, str, tuple[int, int] | None], ...]]] = {
    "hub": (
        "encoder.layer.",
        (
            ("attention.attention.query", "attention.qkv", (0, 3)),
            ("attention.attention.key", "attention.qkv", (1, 3)),
            ("attention.attention.value", "attention.qkv", (2, 3)),
            ("attention.output.dense", "attention.proj", None),
            ("layernorm_before", "norm1", None),
            ("layernorm_after", "norm2", None),
            ("intermediate.dense", "mlp.fc1", None),
            ("output.dense", "mlp.fc2", None),
        ),
    ),
    "v5": (
        "layers.",
        (
            ("attention.q_proj", "attention.qkv", (0, 3)),
            ("attention.k_proj", "attention.qkv", (1, 3)),
            ("attention.v_proj", "attention.qkv", (2, 3)),
            ("attention.o_proj", "attention.proj", None),
            ("layernorm_before", "norm1", None),
            ("layernorm_after", "norm2", None),
            ("mlp.fc1", "mlp.fc1", None),
            ("mlp.fc2", "mlp.fc2", None),
        ),
    ),
}


def hf_rename_rows(layout: str) -> list[tuple[str, str, tuple[int, int] | None]]:
    """The full (source regex, vitrail name, slot) table of one layout: shared rows plus the layer rows."""
    layers, rows = HF_LAYER_RENAMES[layout]
    source = rf"{re.escape(layers)}(\d+)\.{{}}\.(weight|bias)"
    target = "{{backbone}}encoder.layers.{{0}}.{}.{{1}}"
    expanded = [(source.format(re.escape(src)), target.format(dst), slot) for src, dst, slot in rows]
    return [*HF_SHARED_RENAMES, *expanded]


# Source keys with no vitrail counterpart, dropped with this logged reason.
HF_DROPPED: tuple[tuple[str, str], ...] = (
    (
        r"pooler\.dense\.(weight|bias)",
        "transformers' ViT pooler (tanh(dense(cls))) has no vitrail counterpart; vitrail's pooler_output is the "
        "normalised class token, and no transformers classification head reads the pooler",
    ),
)

# Backbone prefix of head models, per model_type.
HF_PREFIXES = {"vit": "vit.", "deit": "deit."}

# ViTConfig / DeiTConfig fields that mean the same thing in VitrailConfig.
_SHARED_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "encoder_stride",
)

_DISTILLED_ARCHITECTURE = "DeiTForImageClassificationWithTeacher"
_DISTILLED_KEYS = ("cls_classifier.weight", "distillation_classifier.weight")


def _distillation_not_supported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{what} is a distilled DeiT (DeiTForImageClassificationWithTeacher): two heads, `cls_classifier` on the "
        "class token and `distillation_classifier` on the distillation token, whose logits are averaged at "
        "inference. vitrail cannot express that yet: VitrailConfig has no distillation-token pooling and "
        "VitrailForImageClassification has a single `classifier`. Keeping only one head would silently change the "
        "model's predictions, so nothing is converted. Convert a DeiTForImageClassification checkpoint instead, or "
        "wait for a distillation head in vitrail."
    )


# ---- config ----------------------------------------------------------------------------------------------------


def vitrail_config_from_hf(hf_config) -> VitrailConfig:
    """Build the `VitrailConfig` that reproduces a transformers `ViTConfig` or `DeiTConfig`.

    DeiT's distillation token becomes one register token with its own position (`num_register_tokens=1`,
    `prefix_position_embeddings="all"`); token order `[cls, dist, patches]` is vitrail's `[cls, registers,
    patches]`. Distilled DeiT (two heads) raises `NotImplementedError`.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in HF_PREFIXES:
        raise NotImplementedError(
            f"Cannot convert transformers model_type {model_type!r}: only {sorted(HF_PREFIXES)} are supported so far."
        )
    if _DISTILLED_ARCHITECTURE in (getattr(hf_config, "architectures", None) or []):
        raise _distillation_not_supported("This config")
    fields = {name: getattr(hf_config, name) for name in _SHARED_CONFIG_FIELDS}
    if isinstance(fields["image_size"], (list, tuple)):
        fields["image_size"] = list(fields["image_size"])
    if isinstance(fields["patch_size"], (list, tuple)):
        fields["patch_size"] = list(fields["patch_size"])
    fields["id2label"] = {int(k): v for k, v in hf_config.id2label.items()}
    fields["label2id"] = dict(hf_config.label2id)
    if getattr(hf_config, "problem_type", None) is not None:
        fields["problem_type"] = hf_config.problem_type
    if model_type == "deit":
        fields.update(num_register_tokens=1, prefix_position_embeddings="all")
    return VitrailConfig(pooling="cls", use_cls_token=True, position_embedding_type="learned", **fields)


# ---- state dict ------------------------------------------------------------------------------------------------


def detect_hf_layout(keys) -> str:
    """`"hub"` (encoder.layer.N.attention.attention.query ...) or `"v5"` (layers.N.attention.q_proj ...)."""
    hub = any(re.search(r"(^|\.)encoder\.layer\.\d+\.", k) for k in keys)
    v5 = any(re.search(r"(^|\.)layers\.\d+\.", k) for k in keys)
    if hub and v5:
        raise ValueError(
            "The checkpoint mixes transformers' Hub layout (encoder.layer.N...) and its 5.x in-memory layout "
            "(layers.N...); convert a state dict written in one layout."
        )
    if not (hub or v5):
        raise ValueError(
            "No transformer layers found: neither `encoder.layer.N.` nor `layers.N.` keys are present."
        )
    return "hub" if hub else "v5"


def _wants_head(state: dict, hf_config) -> bool:
    architectures = getattr(hf_config, "architectures", None) or []
    if any(a.endswith("ForImageClassification") for a in architectures):
        return True
    if any(a.endswith("Model") for a in architectures):
        return False
    return "classifier.weight" in state


def _target_class(state: dict, hf_config):
    return VitrailForImageClassification if _wants_head(state, hf_config) else VitrailModel


def convert_hf_state_dict(state: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Rename a transformers ViT/DeiT state dict (either layout) to vitrail's names, checking it completely.

    Raises `ValueError` naming the keys that were not placed (unknown), placed twice, missing, or of the wrong
    shape; each dropped key and each structural fix is logged at INFO level.
    """
    if any(k in state for k in _DISTILLED_KEYS):
        raise _distillation_not_supported("This checkpoint")
    config = vitrail_config_from_hf(hf_config)
    target_cls = _target_class(state, hf_config)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in target_cls(config).state_dict().items()}
    backbone = "vitrail." if target_cls is VitrailForImageClassification else ""
    prefix = HF_PREFIXES[hf_config.model_type]
    layout = detect_hf_layout(state)
    table = [(re.compile(src), dst, slot) for src, dst, slot in hf_rename_rows(layout)]
    dropped = [(re.compile(src), reason) for src, reason in HF_DROPPED]
    logger.info(
        "Converting %d tensors (%s, %s layout) into %s (%d tensors).",
        len(state),
        hf_config.model_type,
        layout,
        target_cls.__name__,
        len(expected),
    )

    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    unplaced, placed_twice = [], []
    for key, tensor in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        match = next(((m, dst, slot) for rx, dst, slot in table if (m := rx.fullmatch(name))), None)
        if match is None:
            reason = next((why for rx, why in dropped if rx.fullmatch(name)), None)
            if reason is None:
                unplaced.append(key)
            else:
                logger.info("Dropped %s: %s.", key, reason)
            continue
        m, dst, slot = match
        target = dst.format(*m.groups(), backbone=backbone)
        if name == "embeddings.distillation_token":
            logger.info(
                "DeiT: the distillation token becomes register token 0 with its own position "
                "(num_register_tokens=1, prefix_position_embeddings='all'); pooling reads the class token only."
            )
        if slot is None:
            if target in out:
                placed_twice.append(key)
            out[target] = tensor
        else:
            parts = fused.setdefault(target, {})
            if slot[0] in parts:
                placed_twice.append(key)
            parts[slot[0]] = (key, tensor)
    if unplaced:
        raise ValueError(
            f"{len(unplaced)} source key(s) match no row of the {layout!r} rename table and are not known to be "
            f"droppable: {sorted(unplaced)}. Is this a {hf_config.model_type} checkpoint?"
        )
    if placed_twice:
        raise ValueError(f"Source key(s) land on a vitrail parameter already filled: {sorted(placed_twice)}.")

    for target, parts in fused.items():
        blocks = [parts.get(i) for i in range(3)]
        if any(b is None for b in blocks):
            have = sorted(k for k, _ in parts.values())
            raise ValueError(f"{target} fuses q, k and v, but only {have} are in the checkpoint.")
        out[target] = torch.cat([t for _, t in blocks], dim=0)  # 3 x (D, ...) -> (3D, ...)
    if fused:
        logger.info(
            "Fused q/k/v projections of %d layers into `attention.qkv` (rows [q; k; v]).",
            len({t.rsplit(".", 1)[0] for t in fused}),
        )

    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Converted state does not fit {target_cls.__name__}: missing {missing}, unexpected {unexpected}."
        )
    wrong = {k: (tuple(out[k].shape), tuple(s)) for k, s in expected.items() if out[k].shape != s}
    if wrong:
        raise ValueError(f"Shape mismatches (got, expected): {wrong}.")
    logger.info("All %d vitrail tensors filled from %d source tensors.", len(out), len(state))
    return out


# ---- files -----------------------------------------------------------------------------------------------------


def _read_weights(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    pickled = folder / "pytorch_model.bin"
    if pickled.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{folder} holds only pytorch_model.bin, a pickle, which can run code when loaded. Convert it to "
                "safetensors with transformers (`from_pretrained(...).save_pretrained(...)`) or, if you trust the "
                "source, pass `allow_pickle=True`."
            )
        logger.warning("Loading pickled weights from %s (allow_pickle=True).", pickled)
        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"No model.safetensors (or sharded index) in {folder}.")


def load_hf_checkpoint(
    path: str | Path, allow_pickle: bool = False
) -> VitrailForImageClassification | VitrailModel:
    """Load a local transformers ViT/DeiT folder (config.json + model.safetensors) as a vitrail model in eval mode.

    Classification checkpoints give `VitrailForImageClassification`, bare `ViTModel`/`DeiTModel` ones give
    `VitrailModel`. `pytorch_model.bin` is read only with `allow_pickle=True`.
    """
    folder = Path(path)
    hf_config = AutoConfig.from_pretrained(folder)
    if _DISTILLED_ARCHITECTURE in (getattr(hf_config, "architectures", None) or []):
        raise _distillation_not_supported(str(folder))
    state = _read_weights(folder, allow_pickle)
    converted = convert_hf_state_dict(state, hf_config)
    model = _target_class(state, hf_config)(vitrail_config_from_hf(hf_config))
    model.load_state_dict(converted, strict=True)
    return model.eval()


# Preprocessor fields copied as they are; transformers' ViT and DeiT processors and vitrail's share their meaning.
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


def image_processor_from_hf(preprocessor_config: dict):
    """A `VitrailImageProcessor` doing what a transformers ViT/DeiT `preprocessor_config.json` describes."""
    from .image_processing_vitrail import VitrailImageProcessor

    kwargs = {k: preprocessor_config[k] for k in _PROCESSOR_FIELDS if k in preprocessor_config}
    ignored = sorted(set(preprocessor_config) - set(kwargs) - {"image_processor_type", "processor_class"})
    if ignored:
        logger.info("Preprocessor fields not carried over: %s.", ignored)
    return VitrailImageProcessor(**kwargs)


__all__ = [
    "HF_DROPPED",
    "HF_LAYER_RENAMES",
    "HF_SHARED_RENAMES",
    "convert_hf_state_dict",
    "detect_hf_layout",
    "hf_rename_rows",
    "image_processor_from_hf",
    "load_hf_checkpoint",
    "vitrail_config_from_hf",
]
