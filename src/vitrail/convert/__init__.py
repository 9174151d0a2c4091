"""Checkpoints of other Vision Transformer implementations into vitrail, checked tensor by tensor.

- `vitrail.convert.hf`: transformers ViT, DeiT (plain and distilled), DINOv2 (with and without registers), MAE,
  MSN, I-JEPA and SimMIM models, in both key layouts transformers writes, and timm models saved through
  transformers' TimmWrapper classes; other ViT-like transformers types are refused naming what is missing;
- `vitrail.convert.timm`: timm checkpoints (Hub folders and state dicts), read from the model timm builds for
  their architecture, with their preprocessing;
- `vitrail.convert.npz`: JAX `.npz` files of google-research/vision_transformer and big_vision.

With vitrail installed, `VitrailForImageClassification.from_pretrained` & co. (`vitrail.loading`) call
`load_foreign_pretrained` here when a folder or Hub repo holds a transformers or timm checkpoint, or the path is a
JAX `.npz` file, and check every checkpoint's weight files with `check_weight_files` before loading.
`scripts/convert_checkpoint.py` writes a complete vitrail folder from any of the three and checks the logits.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.utils import cached_file

from ..configuration_vitrail import VitrailConfig
from .common import Converted, Drop, Rename, read_weights, rename_state_dict, unnest, weight_files
from .hf import (
    REFUSED_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    check_architectures,
    convert_hf_state_dict,
    detect_hf_layout,
    image_processor_from_hf,
    load_hf_checkpoint,
    load_timm_wrapper_checkpoint,
    refusal,
    vitrail_config_from_hf,
)
from .npz import load_npz_checkpoint, read_npz
from .timm import check_timm_config, is_timm_config, load_timm_checkpoint, timm_image_processor

logger = logging.getLogger("vitrail.convert")

# The arguments of `from_pretrained` that say where a checkpoint is, as transformers and huggingface_hub name them.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


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


def check_weight_files(files) -> None:
    """Open each weight file before loading: one that cannot be read is named (safetensors' own error does not say
    which file), and tensors that are not floating point are refused by name, since loading would cast them to
    float silently. Pickles (read only with `allow_pickle=True`) are opened on the meta device: no data is read."""
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt") as weights:
                    dtypes = {name: weights.get_slice(name).get_dtype() for name in weights.keys()}
            except SafetensorError as error:
                raise OSError(
                    f"{file} cannot be read as safetensors ({error}): it is truncated, empty or damaged. Save or "
                    "download the checkpoint again."
                ) from error
            wrong = {name: dtype for name, dtype in dtypes.items() if not dtype.startswith(("F", "BF"))}
        else:
            state = unnest(torch.load(file, map_location="meta", weights_only=True))
            tensors = {name: t for name, t in state.items() if isinstance(t, torch.Tensor)}
            wrong = {name: str(t.dtype) for name, t in tensors.items() if not t.is_floating_point()}
        if wrong:
            shown = dict(sorted(wrong.items())[:12])
            raise ValueError(
                f"{file} holds {len(wrong)} tensor(s) that are not floating point, as no vitrail weight is: {shown}. "
                "The file is damaged or holds quantized or other data; loading would cast them to float silently."
            )


def load_foreign_pretrained(cls, path_or_repo, config_dict: dict, *model_args, **kwargs):
    """Open a transformers ViT / DeiT / DINOv2 or timm checkpoint, or a JAX `.npz` file (`config_dict` is then
    `{"format": "npz"}`), as `cls` (a vitrail model class).

    The checkpoint is converted into the vitrail class it corresponds to, then fitted to `cls`: asking
    `VitrailModel` of a classifier drops the head (logged); asking a head class of a backbone adds a newly
    initialised head (warned). The weight files are checked first (`check_weight_files`) and the result after
    (`check_loaded_weights`: NaN or inf refused by name). Keyword arguments: the Hub ones of `from_pretrained`,
    `allow_pickle`, `attn_implementation`, `dtype`, `ignore_mismatched_sizes` (as in `fit_to_class`), and
    VitrailConfig fields (e.g. `drop_path_rate`, `dynamic_image_size`, the backbone's `out_indices`); anything
    else raises `TypeError`.
    """
    if model_args:
        raise TypeError(
            f"Positional model arguments are not supported for converted checkpoints: {model_args}."
        )
    allow_pickle = bool(kwargs.pop("allow_pickle", False))
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    ignore_mismatched_sizes = bool(kwargs.pop("ignore_mismatched_sizes", False))
    kwargs.pop("trust_remote_code", None)  # converting runs vitrail's code, never the checkpoint's
    if kwargs.pop("use_safetensors", None) is False and not allow_pickle:
        raise ValueError(
            "`use_safetensors=False` asks for pickled weights: pass `allow_pickle=True` to read them."
        )
    if kwargs.pop("weights_only", True) is False:
        raise ValueError("Converted checkpoints' pickles are read with `weights_only=True` only.")
    # The backbone's stages are set by name, as for vitrail checkpoints (the fields themselves are private).
    fields = set(VitrailConfig.__dataclass_fields__) | {"out_features", "out_indices"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(
            f"from_pretrained got arguments it cannot apply to a converted checkpoint: {unknown}."
        )

    timm = is_timm_config(config_dict)
    if config_dict.get("format") == "npz":
        source = load_npz_checkpoint(path_or_repo)
    elif timm or config_dict.get("model_type") in SUPPORTED_MODEL_TYPES:
        check_architectures(config_dict.get("architectures"))  # a head vitrail lacks, before reading weights
        folder = resolve_folder(path_or_repo, allow_pickle=allow_pickle, **hub)
        if timm:  # what vitrail cannot reproduce is refused by name before the weights are opened
            check_timm_config(config_dict)
        check_weight_files(weight_files(folder, allow_pickle=allow_pickle))
        # timm folders, saved by timm or through transformers' TimmWrapper classes (tensors under `timm_model.`)
        load = load_timm_wrapper_checkpoint if timm else load_hf_checkpoint
        source = load(folder, allow_pickle=allow_pickle)
    elif config_dict.get("model_type") in REFUSED_MODEL_TYPES:
        raise NotImplementedError(f"{path_or_repo}: {refusal(config_dict['model_type'])}")
    else:
        raise ValueError(
            f"{path_or_repo} holds a {config_dict.get('model_type')!r} checkpoint. vitrail opens its own "
            f"checkpoints and converts transformers {list(SUPPORTED_MODEL_TYPES)} and timm ones; use that model "
            "type's own class, or convert the weights with vitrail.convert."
        )
    logger.info("Converted %s (%s) into %s.", path_or_repo, type(source).__name__, cls.__name__)
    config = source.config
    if kwargs or attn_implementation:
        fields = config.to_dict()
        if {"out_features", "out_indices"} & set(kwargs):  # stages asked for by one name replace both
            fields.pop("out_features", None), fields.pop("out_indices", None)
        config = VitrailConfig(**{**fields, **kwargs})
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = fit_to_class(source, cls, config, ignore_mismatched_sizes=ignore_mismatched_sizes)
    model.check_loaded_weights(path_or_repo)
    if dtype is not None and dtype != "auto":
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()


def load_image_processor(path_or_repo, **hub_kwargs):
    """The image processor that goes with a checkpoint: vitrail's own `preprocessor_config.json`, one translated
    from transformers' (ViT/DeiT/DINOv2) or from timm's `pretrained_cfg`; None when the checkpoint says nothing."""
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


def _crops(processor) -> bool:
    return bool(getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None))


def processor_output_hw(processor) -> tuple[int, int]:
    """The (height, width) of the images `processor` outputs: its crop when it center-crops, else its resize."""
    out = processor.crop_size if _crops(processor) else processor.size
    if "height" not in out:  # resizing by shortest edge with no crop: square outputs only
        return out["shortest_edge"], out["shortest_edge"]
    return out["height"], out["width"]


def fit_processor_to(processor, image_hw: tuple[int, int]) -> None:
    """Make `processor` output `image_hw` pixels, keeping its resize-to-crop ratio (e.g. 256 -> 224 becomes
    439 -> 384 for a 384-px model)."""
    old_hw = processor_output_hw(processor)
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
    if _crops(processor):
        processor.crop_size = {"height": image_hw[0], "width": image_hw[1]}


def fit_to_class(source, cls, config=None, ignore_mismatched_sizes: bool = False):
    """`source` (a vitrail model) as an instance of `cls` built from `config` (default: the source's), sharing every
    tensor both have. A tensor whose shape `config` changes is refused by name, or with
    `ignore_mismatched_sizes=True` newly initialised (warned), as transformers does."""
    config = config or source.config
    if type(source) is cls and config is source.config:
        return source
    model = cls(config)
    prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
    state = {prefix + name: tensor for name, tensor in source.base_model.state_dict().items()}
    has_head = hasattr(source, "classifier")
    if has_head and hasattr(model, "classifier"):
        heads = ("classifier.", "distillation_classifier.")
        state.update({name: t for name, t in source.state_dict().items() if name.startswith(heads)})
    elif hasattr(model, "classifier"):
        logger.warning(
            "The checkpoint is a backbone without a classification head: %s gets a newly initialised head "
            "(train it before use).",
            cls.__name__,
        )
    elif has_head:
        logger.info("%s has no classification head: the checkpoint's head is not loaded.", cls.__name__)
    target = model.state_dict()
    if hasattr(source, "decoder") and hasattr(model, "decoder"):
        state.update({name: t for name, t in source.state_dict().items() if name.startswith("decoder.")})
    elif hasattr(source, "decoder"):
        logger.info(
            "%s has no masked-image-modeling decoder: the checkpoint's decoder and mask token are not loaded.",
            cls.__name__,
        )
        state.pop(f"{prefix}embeddings.mask_token", None)
    resized = sorted(name for name, t in state.items() if name in target and t.shape != target[name].shape)
    if resized and not ignore_mismatched_sizes:
        raise ValueError(
            f"The arguments given change the shape of {resized}: leave them out, or pass "
            "`ignore_mismatched_sizes=True` to initialise these tensors anew."
        )
    missing, unexpected = model.load_state_dict(
        {name: t for name, t in state.items() if name not in resized}, strict=False
    )
    # New by design: the tensors of a head the source lacks, the mask token of masked image modeling, and with
    # `ignore_mismatched_sizes=True` the resized ones. A gap in the backbone is a bug, never filled at random.
    gaps = [n for n in missing if n.startswith(prefix) and n not in resized and not n.endswith("mask_token")]
    if unexpected or gaps:
        raise ValueError(f"Cannot fit the converted checkpoint: missing {gaps}, unexpected {unexpected}.")
    if missing:
        logger.warning("%s: %s newly initialised.", cls.__name__, ", ".join(sorted(missing)))
    return model


__all__ = [
    "Converted",
    "Drop",
    "Rename",
    "HUB_KWARGS",
    "REFUSED_MODEL_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "check_weight_files",
    "convert_hf_state_dict",
    "detect_hf_layout",
    "fit_processor_to",
    "fit_to_class",
    "image_processor_from_hf",
    "load_foreign_pretrained",
    "load_hf_checkpoint",
    "load_image_processor",
    "load_npz_checkpoint",
    "load_timm_wrapper_checkpoint",
    "load_timm_checkpoint",
    "processor_output_hw",
    "read_npz",
    "read_weights",
    "rename_state_dict",
    "resolve_folder",
    "timm_image_processor",
    "vitrail_config_from_hf",
    "weight_files",
]
