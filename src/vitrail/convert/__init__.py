"""Checkpoints of other Vision Transformer implementations into vitrail, checked tensor by tensor.

- `vitrail.convert.hf`: transformers ViT, DeiT (plain and distilled), DINOv2 (with and without registers), in
  both key layouts transformers writes;
- `vitrail.convert.timm`: timm `VisionTransformer` (and distilled DeiT) state dicts and Hub folders, with their
  preprocessing;
- `vitrail.convert.npz`: JAX `.npz` files of google-research/vision_transformer and big_vision.

`VitrailForImageClassification.from_pretrained` / `VitrailModel.from_pretrained` call `load_foreign_pretrained`
here when a folder or Hub repo holds a transformers or timm checkpoint instead of a vitrail one.
`scripts/convert_checkpoint.py` writes a complete vitrail folder from any of the three and checks the logits.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..configuration_vitrail import VitrailConfig
from ..modeling_vitrail import _HUB_KWARGS
from .common import Converted, Drop, Rename, expected_shapes, read_weights, rename_state_dict
from .hf import (
    SUPPORTED_MODEL_TYPES,
    convert_hf_state_dict,
    detect_hf_layout,
    image_processor_from_hf,
    load_hf_checkpoint,
    vitrail_config_from_hf,
)
from .npz import load_npz_checkpoint, read_npz
from .timm import is_timm_config, load_timm_checkpoint, timm_image_processor

logger = logging.getLogger("vitrail.convert")

_IGNORED_KWARGS = ("trust_remote_code", "ignore_mismatched_sizes", "use_safetensors", "weights_only")


def resolve_folder(path_or_repo, allow_pickle: bool = False, **hub_kwargs) -> Path:
    """A local folder as it is; a Hub repo id downloaded (only config, weights and preprocessing files) into the
    cache, or read from it offline."""
    subfolder = hub_kwargs.pop("subfolder", "") or ""
    local = Path(path_or_repo) / subfolder
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    names = ["config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json"]
    if allow_pickle:
        names.append("pytorch_model.bin")
    patterns = [f"{subfolder}/{n}" if subfolder else n for n in names]
    hub_kwargs.pop("proxies", None)
    root = snapshot_download(str(path_or_repo), allow_patterns=patterns, **hub_kwargs)
    return Path(root) / subfolder


def load_foreign_pretrained(cls, path_or_repo, config_dict: dict, *model_args, **kwargs):
    """Open a transformers ViT / DeiT / DINOv2 or timm checkpoint, or a JAX `.npz` file (`config_dict` is then
    `{"format": "npz"}`), as `cls` (a vitrail model class).

    The checkpoint is converted into the vitrail class it corresponds to, then fitted to `cls`: asking
    `VitrailModel` of a classifier drops the head (logged); asking a head class of a backbone adds a newly
    initialised head (warned). Keyword arguments: the Hub ones of `from_pretrained`, `allow_pickle`,
    `attn_implementation`, `dtype`, and VitrailConfig fields that do not change tensor shapes (e.g.
    `drop_path_rate`, `dynamic_image_size`); anything else raises `TypeError`.
    """
    if model_args:
        raise TypeError(
            f"Positional model arguments are not supported for converted checkpoints: {model_args}."
        )
    allow_pickle = bool(kwargs.pop("allow_pickle", False))
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    for name in _IGNORED_KWARGS:
        kwargs.pop(name, None)
    fields = set(VitrailConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(
            f"from_pretrained got arguments it cannot apply to a converted checkpoint: {unknown}."
        )

    timm = is_timm_config(config_dict)
    if config_dict.get("format") == "npz":
        source = load_npz_checkpoint(path_or_repo)
    elif timm or config_dict.get("model_type") in SUPPORTED_MODEL_TYPES:
        folder = resolve_folder(path_or_repo, allow_pickle=allow_pickle, **hub)
        source = (load_timm_checkpoint if timm else load_hf_checkpoint)(folder, allow_pickle=allow_pickle)
    else:
        raise ValueError(
            f"{path_or_repo} holds a {config_dict.get('model_type')!r} checkpoint. vitrail opens its own "
            f"checkpoints and converts transformers {list(SUPPORTED_MODEL_TYPES)} and timm ones; use that model "
            "type's own class, or convert the weights with vitrail.convert."
        )
    logger.info("Converted %s (%s) into %s.", path_or_repo, type(source).__name__, cls.__name__)
    config = source.config
    if kwargs or attn_implementation:
        config = VitrailConfig(**{**config.to_dict(), **kwargs})
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = fit_to_class(source, cls, config)
    if dtype is not None and dtype != "auto":
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()


def load_image_processor(path_or_repo, **hub_kwargs):
    """The image processor that goes with a checkpoint: vitrail's own `preprocessor_config.json`, one translated
    from transformers' (ViT/DeiT/DINOv2) or from timm's `pretrained_cfg`; None when the checkpoint says nothing."""
    from transformers.utils import cached_file

    from ..image_processing_vitrail import VitrailImageProcessor

    def read(name: str) -> dict | None:
        file = cached_file(path_or_repo, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        return json.loads(Path(file).read_text()) if file else None

    preprocessor = read("preprocessor_config.json")
    if preprocessor is not None:
        if preprocessor.get("image_processor_type") == VitrailImageProcessor.__name__:
            return VitrailImageProcessor.from_pretrained(path_or_repo, **hub_kwargs)
        return image_processor_from_hf(preprocessor)
    config = read("config.json")
    if config is not None and is_timm_config(config) and config.get("pretrained_cfg"):
        return timm_image_processor(config["pretrained_cfg"])
    return None


def fit_processor_to(processor, image_hw: tuple[int, int]) -> None:
    """Make `processor` output `image_hw` pixels, keeping its resize-to-crop ratio (e.g. 256 -> 224 becomes
    439 -> 384 for a 384-px model)."""
    crops = bool(getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None))
    out = processor.crop_size if crops else processor.size
    if "height" not in out:  # resizing by shortest edge with no crop: square outputs only
        out = {"height": out["shortest_edge"], "width": out["shortest_edge"]}
    old_hw = (out["height"], out["width"])
    if old_hw == tuple(image_hw):
        return
    size = dict(processor.size)
    if "shortest_edge" in size:
        size = {"shortest_edge": round(size["shortest_edge"] * min(image_hw) / min(old_hw))}
    else:
        size = {
            "height": round(size["height"] * image_hw[0] / old_hw[0]),
            "width": round(size["width"] * image_hw[1] / old_hw[1]),
        }
    processor.size = size
    if crops:
        processor.crop_size = {"height": image_hw[0], "width": image_hw[1]}


def fit_to_class(source, cls, config=None):
    """`source` (a vitrail model) as an instance of `cls`, sharing every tensor both have."""
    config = config or source.config
    if type(source) is cls and config is source.config:
        return source
    model = cls(config)
    backbone = getattr(source, "vitrail", source)
    missing, unexpected = model.base_model.load_state_dict(backbone.state_dict(), strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise ValueError(f"Cannot fit the converted backbone: missing {missing}, unexpected {unexpected}.")
    has_head = hasattr(source, "classifier")
    if hasattr(model, "classifier") and has_head:
        model.classifier.load_state_dict(source.classifier.state_dict())
        if source.distillation_classifier is not None:
            model.distillation_classifier.load_state_dict(source.distillation_classifier.state_dict())
    elif hasattr(model, "classifier"):
        logger.warning(
            "The checkpoint is a backbone without a classification head: %s gets a newly initialised head "
            "(train it before use).",
            cls.__name__,
        )
    elif has_head:
        logger.info("%s has no classification head: the checkpoint's head is not loaded.", cls.__name__)
    if missing:
        logger.warning("%s: %s newly initialised.", cls.__name__, ", ".join(missing))
    return model


__all__ = [
    "Converted",
    "Drop",
    "Rename",
    "SUPPORTED_MODEL_TYPES",
    "convert_hf_state_dict",
    "detect_hf_layout",
    "expected_shapes",
    "fit_processor_to",
    "fit_to_class",
    "image_processor_from_hf",
    "load_foreign_pretrained",
    "load_hf_checkpoint",
    "load_image_processor",
    "load_npz_checkpoint",
    "load_timm_checkpoint",
    "read_npz",
    "read_weights",
    "rename_state_dict",
    "resolve_folder",
    "timm_image_processor",
    "vitrail_config_from_hf",
]
