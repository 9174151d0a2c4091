"""`from_pretrained` as the installed package runs it.

`import vitrail` installs `load_pretrained` on the model classes (`VitrailPreTrainedModel.pretrained_loader`). It
opens vitrail checkpoints through the classes' own checked loader (`from_vitrail_checkpoint`, which Hub-carried code
runs too), converts other implementations' checkpoints with `vitrail.convert`, and then applies what was asked
beyond the checkpoint: another image size, another label set. Imports run one way: this module uses the model
classes and `vitrail.convert`; neither knows it.
"""

from __future__ import annotations

import logging

from .configuration_vitrail import VitrailConfig
from .convert import HUB_KWARGS, check_weight_files, load_foreign_pretrained, weight_files

logger = logging.getLogger(__name__)


def load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
    """`cls.from_pretrained(...)` with vitrail installed: transformers' loading made strict
    (`VitrailPreTrainedModel.from_vitrail_checkpoint`: safetensors only unless `allow_pickle=True`; missing or
    unknown tensors and NaN / inf values refused by name), and

    - before loading, the weight files are opened: one that cannot be read (truncated, empty) is named, and tensors
      that are not floating point are refused by name (loading would cast them to float silently);
    - a checkpoint of another implementation (a transformers ViT / DeiT / DINOv2 `config.json`, a timm folder, a JAX
      `.npz` file) is converted on the way in (`vitrail.convert.load_foreign_pretrained`), with the same checks;
    - `image_size=` other than the checkpoint's resamples the position table (`set_image_size`) instead of
      re-initialising it;
    - a label set (`num_labels=` / `id2label=` / `label2id=`) other than the checkpoint's re-initialises only the
      classification head(s) (`reset_classifier`, which warns); the rest is loaded.
    """
    path = pretrained_model_name_or_path
    image_size = kwargs.pop("image_size", None)
    labels = {name: kwargs.pop(name) for name in ("num_labels", "id2label", "label2id") if name in kwargs}
    hub = {name: kwargs[name] for name in HUB_KWARGS if name in kwargs}
    config_dict = None if kwargs.get("config") is not None else _read_config_dict(path, hub)
    if config_dict is None and str(path).endswith(".npz"):
        config_dict = {"model_type": None, "format": "npz"}  # a JAX checkpoint file: no config.json
    if config_dict is not None and config_dict.get("model_type") != VitrailConfig.model_type:
        loaded = load_foreign_pretrained(cls, path, config_dict, *model_args, **kwargs)
    else:
        if path is not None and (config_dict is not None or kwargs.get("config") is not None):
            check_weight_files(weight_files(path, allow_pickle=bool(kwargs.get("allow_pickle")), **hub))
        loaded = cls.from_vitrail_checkpoint(path, *model_args, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # a tuple with output_loading_info=True
    _apply_labels(model, **labels)
    _apply_image_size(model, image_size)
    return loaded


def _read_config_dict(path, hub: dict) -> dict | None:
    """The checkpoint's raw config.json, or None when there is none (transformers then says why)."""
    try:
        return VitrailConfig.get_config_dict(path, **hub)[0]
    except (OSError, ValueError):
        return None


def _apply_labels(model, num_labels=None, id2label=None, label2id=None) -> None:
    """Apply a requested label set; a different one means a new head (heads only exist on classifiers)."""
    if id2label is None and label2id is not None:
        id2label = {i: name for name, i in label2id.items()}
    if id2label is None and num_labels is None:
        return
    if id2label is None:
        if num_labels == model.config.num_labels:
            return
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    id2label = {int(k): v for k, v in id2label.items()}
    if num_labels is not None and num_labels != len(id2label):
        raise ValueError(f"`num_labels={num_labels}` but `id2label` names {len(id2label)} classes.")
    if id2label == model.config.id2label:
        return
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(id2label)
    else:
        model.config.id2label = id2label
        model.config.label2id = {v: k for k, v in id2label.items()}


def _apply_image_size(model, image_size) -> None:
    """Resample the position table to a requested image size other than the checkpoint's."""
    if image_size is None:
        return
    requested = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if requested != model.config.image_hw:
        logger.warning(
            "Resampling the position table from %s to %s px (%s).",
            model.config.image_size,
            image_size,
            model.config.position_interpolation,
        )
        model.set_image_size(image_size)
