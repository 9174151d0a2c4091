"""Conversion of JAX/Flax `.npz` Vision Transformer checkpoints into vitrail.

Two key layouts are read, told apart by the Flax module names inside each encoder block:

- `"vit"`, google-research/vision_transformer (`vit_jax`, the original ViT and AugReg checkpoints): a block is
  `LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`; the position table
  `Transformer/posembed_input/pos_embedding` is added after the class token is prepended, so it has a row for it,
  `(1, 1 + N, D)` (`prefix_position_embeddings="cls"`). Keys sit at the top level or under `opt/target/`.
- `"big_vision"`, google-research/big_vision `models/vit.py`: a block is `LayerNorm_0`,
  `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`; positions are added to the patches before the
  class token (if any) is prepended: a learned `pos_embedding` `(1, N, D)`, or nothing stored at all with
  `posemb="sincos2d"` (vitrail's `position_embedding_type="sincos2d"` recomputes the same fixed table). Keys sit
  under `params/` or `params/img/` (the image tower of a two-tower model; other towers are skipped with a warning).
  Checkpoints trained with `scan=True` stack the layers in `Transformer/encoderblock/...` along a leading depth
  axis; `read_npz` splits them into `encoderblock_N`.

Both layouts: the patch kernel `embedding/kernel` is HWIO `(ph, pw, C, D)` (a Conv2d weight is OIHW); attention
kernels are `(D, heads, head_dim)` for query/key/value and `(heads, head_dim, D)` for `out`, so they carry the
head count; q, k and v are fused into vitrail's `qkv` (rows `[q; k; v]`); Dense kernels are `(in, out)`, the
transpose of a Linear weight. A class token (`cls`) means token pooling (`pool_type="tok"`, `classifier="token"`);
without one the head reads the mean of all tokens after the final LayerNorm (`"gap"`: `pooling="mean"`,
`use_fc_norm=False`). LayerNorm epsilon is Flax's 1e-6; positions are resampled to other resolutions bicubically
with antialiasing (`position_interpolation="bicubic_antialias"`, timm's `resample_abs_pos_embed`).

GELU: Flax's `nn.gelu`, used by both codebases, defaults to the tanh approximation, while timm and transformers
(google/vit-* on the Hub) run these very weights with the exact erf GELU. The default, `exact_gelu=True`, gives
`hidden_act="gelu"` and matches timm and transformers to float precision; `exact_gelu=False` gives
`hidden_act="gelu_pytorch_tanh"`, the activation the JAX model was trained and evaluated with. The two functions
differ by at most 4.7e-4 (at x = -2.7); on the tiny random test model the logits move by more than 1e-5.

Refused, because vitrail cannot express them and dropping them would change the model's outputs: a
multihead-attention-pooling head (`MAPHead_0/...`, big_vision `pool_type="map"`, SigLIP), a `pre_logits`
representation layer (tanh(Dense) before the head: `representation_size` / `rep_size`, e.g. the original
ImageNet-21k checkpoints) and hybrid ResNet stems (`conv_root`, `block1/...`). `backbone_only=True` converts the
encoder of such checkpoints alone into a `VitrailModel` (its `last_hidden_state` is exact; its `pooler_output` is
not the MAP / pre-logits output). Any other unknown key is named in a `ValueError`. Files holding pickled
(object) arrays are never loaded.

The patch convolution in JAX uses `padding="VALID"` and drops border pixels of inputs that are not a multiple of
the patch size; vitrail (with `dynamic_image_size=True`) and the timm reference pad them instead.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from ..configuration_vitrail import VitrailConfig
from ..modeling_vitrail import VitrailForImageClassification, VitrailModel
from .common import (
    Converted,
    Drop,
    Plan,
    Refuse,
    Rename,
    describe,
    grid_of_positions,
    height_width,
    in_layers,
    layer_count,
    refuse,
)

logger = logging.getLogger(__name__)

# Prefixes the parameters of a checkpoint may sit under, tried in this order: the original vit_jax training
# state, big_vision's image tower of a two-tower model (LiT, SigLIP), big_vision's plain parameters.
NPZ_PREFIXES = ("opt/target/", "params/img/", "params/", "")

# ---- tensor transforms (JAX layout -> torch layout) ------------------------------------------------------------


def _conv_kernel(t: torch.Tensor) -> torch.Tensor:
    return t.permute(3, 2, 0, 1)  # HWIO (ph, pw, C, D) -> OIHW (D, C, ph, pw)


def _dense_kernel(t: torch.Tensor) -> torch.Tensor:
    return t.T  # (in, out) -> (out, in)


def _heads_in_kernel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).T  # (D, heads, head_dim) -> (heads * head_dim, D)


def _heads_out_kernel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).T  # (heads, head_dim, D) -> (D, heads * head_dim)


def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)  # (heads, head_dim) -> (heads * head_dim,)


# ---- tables ------------------------------------------------------------------------------------------------------
# Source names are matched after the checkpoint prefix is stripped (`read_npz`).

_POSITIONS = "{backbone}embeddings.position_embeddings"
NPZ_RENAMES: tuple[Rename, ...] = (
    Rename(
        "embedding/kernel", "{backbone}embeddings.patch_embeddings.projection.weight", transform=_conv_kernel
    ),
    Rename("embedding/bias", "{backbone}embeddings.patch_embeddings.projection.bias"),
    Rename("cls", "{backbone}embeddings.cls_token"),
    # vit_jax: added after the class token is prepended, so row 0 is the class token's position.
    Rename("Transformer/posembed_input/pos_embedding", _POSITIONS),
    # big_vision: added to the patches only (absent with posemb="sincos2d").
    Rename("pos_embedding", _POSITIONS),
    Rename("Transformer/encoder_norm/scale", "{backbone}layernorm.weight"),
    Rename("Transformer/encoder_norm/bias", "{backbone}layernorm.bias"),
)
NPZ_HEAD_RENAMES: tuple[Rename, ...] = (
    Rename("head/kernel", "classifier.weight", transform=_dense_kernel),
    Rename("head/bias", "classifier.bias"),
)

# Flax module names inside `Transformer/encoderblock_N/`, per layout.
NPZ_LAYER_MODULES: dict[str, dict[str, str]] = {
    "vit": {
        "norm1": "LayerNorm_0",
        "attention": "MultiHeadDotProductAttention_1",
        "norm2": "LayerNorm_2",
        "mlp": "MlpBlock_3",
    },
    "big_vision": {
        "norm1": "LayerNorm_0",
        "attention": "MultiHeadDotProductAttention_0",
        "norm2": "LayerNorm_1",
        "mlp": "MlpBlock_0",
    },
}


def _layer_rows(norm1: str, attention: str, norm2: str, mlp: str) -> tuple[Rename, ...]:
    return in_layers(
        "Transformer/encoderblock_{n}/",
        (
            Rename(f"{norm1}/scale", "norm1.weight"),
            Rename(f"{norm1}/bias", "norm1.bias"),
            Rename(f"{attention}/query/kernel", "attention.qkv.weight", (0, 3), _heads_in_kernel),
            Rename(f"{attention}/key/kernel", "attention.qkv.weight", (1, 3), _heads_in_kernel),
            Rename(f"{attention}/value/kernel", "attention.qkv.weight", (2, 3), _heads_in_kernel),
            Rename(f"{attention}/query/bias", "attention.qkv.bias", (0, 3), _flatten),
            Rename(f"{attention}/key/bias", "attention.qkv.bias", (1, 3), _flatten),
            Rename(f"{attention}/value/bias", "attention.qkv.bias", (2, 3), _flatten),
            Rename(f"{attention}/out/kernel", "attention.proj.weight", transform=_heads_out_kernel),
            Rename(f"{attention}/out/bias", "attention.proj.bias"),
            Rename(f"{norm2}/scale", "norm2.weight"),
            Rename(f"{norm2}/bias", "norm2.bias"),
            Rename(f"{mlp}/Dense_0/kernel", "mlp.fc1.weight", transform=_dense_kernel),
            Rename(f"{mlp}/Dense_0/bias", "mlp.fc1.bias"),
            Rename(f"{mlp}/Dense_1/kernel", "mlp.fc2.weight", transform=_dense_kernel),
            Rename(f"{mlp}/Dense_1/bias", "mlp.fc2.bias"),
        ),
    )


# layout -> the rows of every layer
NPZ_LAYERS = {layout: _layer_rows(**modules) for layout, modules in NPZ_LAYER_MODULES.items()}

_BACKBONE_ADVICE = (
    "; pass `backbone_only=True` to convert the encoder alone into a VitrailModel (its last_hidden_state is "
    "exact, its pooler_output is not this head's input: train a new head on it)"
)
_HYBRID = "a hybrid ResNet+ViT stem; vitrail has a plain patch convolution and no ResNet stem"
NPZ_REFUSED: tuple[Refuse, ...] = (
    Refuse("conv_root/*", _HYBRID),
    Refuse("gn_root/*", _HYBRID),
    Refuse("block1/*", _HYBRID),
)
# Refused unless `backbone_only=True`, which drops them with the classification head instead.
NPZ_HEAD_REFUSED: tuple[Refuse, ...] = (
    Refuse(
        "MAPHead_0/*",
        "a multihead attention pooling head (big_vision pool_type='map', as in SigLIP); vitrail pools by class "
        "token or mean only" + _BACKBONE_ADVICE,
    ),
    Refuse(
        "pre_logits/*",
        "a representation layer, tanh(Dense) between pooling and the head (vit_jax representation_size, "
        "big_vision rep_size, e.g. the original ImageNet-21k checkpoints); vitrail's head is a single Linear on "
        "the pooled vector" + _BACKBONE_ADVICE,
    ),
)
NPZ_BACKBONE_DROPS: tuple[Drop, ...] = (
    Drop("head/*", "backbone_only=True: the classification head is not converted"),
    Drop("pre_logits/*", "backbone_only=True: the pre-logits representation layer is not converted"),
    Drop("MAPHead_0/*", "backbone_only=True: the attention-pooling (MAP) head is not converted"),
)
# A head with zero classes (some backbones ship one) holds no numbers.
NPZ_EMPTY_HEAD_DROPS: tuple[Drop, ...] = (Drop("head/*", "the head has zero classes"),)


def npz_rename_rows(layout: str, head: bool = True) -> list[Rename]:
    """All `Rename` rows of one layout (`"vit"` or `"big_vision"`); `head=False` leaves the classifier out."""
    return [*NPZ_RENAMES, *NPZ_LAYERS[layout], *(NPZ_HEAD_RENAMES if head else ())]


# ---- reading ---------------------------------------------------------------------------------------------------


def _bfloat16_to_float32(array: np.ndarray) -> np.ndarray:
    """JAX writes bfloat16 arrays as 2-byte void (`|V2`): widen the bits to float32."""
    return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _read_archive(path: str | Path) -> tuple[dict[str, np.ndarray], bool]:
    """Every array of an `.npz` file, keys untouched, bfloat16 widened to float32 (the flag says whether any
    was); pickles refused."""
    path = Path(path)
    refusal = (
        f"{path} holds pickled data (object arrays), which can run code when loaded; vitrail never loads "
        "pickles. A JAX checkpoint holds plain numeric arrays: re-save it with `np.savez(path, **params)` "
        "from flattened float arrays."
    )
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error):
            raise ValueError(refusal) from error
        raise ValueError(f"{path} is not a NumPy .npz archive: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single NumPy array, not an .npz archive of named parameters.")
    arrays, widened = {}, False
    with archive:
        for key in archive.files:
            try:
                array = archive[key]
            except ValueError as error:
                if "pickle" in str(error):
                    raise ValueError(f"{refusal} (array {key!r})") from error
                raise
            if array.dtype.kind == "V" and array.dtype.itemsize == 2:
                array, widened = _bfloat16_to_float32(array), True
            elif array.dtype.kind not in "fiub":
                raise ValueError(f"Array {key!r} of {path} has dtype {array.dtype}, not a number type.")
            arrays[key] = array
    return arrays, widened


def npz_prefix(keys) -> str:
    """The prefix the ViT parameters sit under (`opt/target/`, `params/img/`, `params/` or none)."""
    keys = set(keys)
    prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in keys), None)
    if prefix is None:
        sample = sorted(keys)[:10]
        raise ValueError(
            "No patch embedding (`embedding/kernel`, optionally under "
            f"{', '.join(repr(p) for p in NPZ_PREFIXES[:-1])}) in this .npz: it is not a JAX ViT checkpoint. "
            f"First keys: {sample}."
        )
    return prefix


def _unscan(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split big_vision's scanned `Transformer/encoderblock/...` stacks `(depth, ...)` into `encoderblock_N`."""
    stacked = {k: v for k, v in arrays.items() if k.startswith("Transformer/encoderblock/")}
    if not stacked:
        return arrays
    depths = {v.shape[0] for v in stacked.values()}
    if len(depths) != 1:
        raise ValueError(f"Scanned encoder blocks disagree on the depth (leading axis): {sorted(depths)}.")
    if any(re.match(r"Transformer/encoderblock_\d+/", k) for k in arrays):
        raise ValueError(
            "The checkpoint mixes scanned (`encoderblock/`) and unrolled (`encoderblock_N/`) layers."
        )
    out = {k: v for k, v in arrays.items() if k not in stacked}
    for key, value in stacked.items():
        rest = key[len("Transformer/encoderblock/") :]
        for i in range(value.shape[0]):
            out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
    logger.info("Split %d scanned layer stacks into %d layers.", len(stacked), depths.pop())
    return out


def _canonical(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip the parameter prefix (skipping, with a warning, what lies outside it) and unscan layer stacks.
    Idempotent, so the public functions accept raw or already-read arrays."""
    prefix = npz_prefix(arrays)
    inside = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    outside = sorted(k for k in arrays if not k.startswith(prefix))
    if outside:
        logger.warning(
            "Skipped %d arrays outside %r (optimizer state or other towers; they do not feed the image model): "
            "%s%s",
            len(outside),
            prefix,
            outside[:10],
            " ..." if len(outside) > 10 else "",
        )
    return _unscan(inside)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The parameters of a JAX ViT `.npz`, keyed by their `/`-separated Flax paths without the `params/img/`,
    `params/` or `opt/target/` prefix; scanned layer stacks are split per layer and bfloat16 is widened to
    float32. Loaded with `allow_pickle=False`: files with object (pickled) arrays are refused."""
    return _canonical(_read_archive(path)[0])


# ---- config ----------------------------------------------------------------------------------------------------


def detect_npz_layout(arrays: Mapping[str, np.ndarray]) -> str:
    """`"vit"` (google-research/vision_transformer) or `"big_vision"`, from the module names in block 0."""
    found = {
        layout
        for layout, modules in NPZ_LAYER_MODULES.items()
        if f"Transformer/encoderblock_0/{modules['mlp']}/Dense_0/kernel" in arrays
    }
    if len(found) != 1:
        block = sorted(k for k in arrays if k.startswith("Transformer/encoderblock_0/"))
        raise ValueError(
            "Cannot tell the .npz layout: block 0 should hold `MlpBlock_3` (google-research/vision_transformer) "
            f"or `MlpBlock_0` (big_vision); it holds {block[:12] or 'nothing'}."
        )
    return found.pop()


def _num_heads(arrays: Mapping[str, np.ndarray], layout: str, num_heads: int | None) -> int:
    key = f"Transformer/encoderblock_0/{NPZ_LAYER_MODULES[layout]['attention']}/query/kernel"
    if key not in arrays:
        raise ValueError(f"No attention query kernel {key!r} in the checkpoint.")
    kernel = arrays[key]
    if kernel.ndim == 3:  # (D, heads, head_dim)
        if num_heads is not None and num_heads != kernel.shape[1]:
            raise ValueError(
                f"num_heads={num_heads} contradicts the checkpoint: {key} has shape {kernel.shape}, i.e. "
                f"{kernel.shape[1]} heads of width {kernel.shape[2]}."
            )
        return int(kernel.shape[1])
    if num_heads is None:
        raise ValueError(
            f"{key} is a 2-D kernel {kernel.shape} that does not say how many heads it has; pass num_heads= "
            "(ViT-Ti 3, S 6, B 12, L and H 16)."
        )
    return num_heads


def _positions(
    arrays: Mapping[str, np.ndarray],
    patch: tuple[int, int],
    has_cls: bool,
    image_size: int | tuple[int, int] | None,
) -> tuple[str, str, tuple[int, int]]:
    """(position_embedding_type, prefix_position_embeddings, image (height, width))."""
    key = next(
        (k for k in ("Transformer/posembed_input/pos_embedding", "pos_embedding") if k in arrays), None
    )
    given = height_width(image_size)
    if key is None:
        if given is None:
            logger.warning(
                "No stored position table: big_vision posemb='sincos2d', recomputed at any size. The checkpoint "
                "does not record its resolution; assuming 224x224 (pass image_size= to choose)."
            )
            given = (224, 224)
        logger.info("Positions: fixed 2D sin-cos (big_vision posemb_sincos_2d).")
        return "sincos2d", "none", (int(given[0]), int(given[1]))
    table = arrays[key]
    if table.ndim != 3 or table.shape[0] != 1:
        raise ValueError(f"{key} should have shape (1, tokens, width), got {table.shape}.")
    rows, prefixes = table.shape[1], (0, 1) if has_cls else (0,)
    if given is None:
        given, prefix = grid_of_positions(
            rows, prefixes, patch, name=key, hint="pass image_size=(height, width)"
        )
    else:
        grid = (given[0] // patch[0], given[1] // patch[1])
        prefix = rows - grid[0] * grid[1]
        if prefix not in prefixes:
            raise ValueError(
                f"{key} has {rows} rows, but image_size={given} with patch {patch} makes a {grid[0]}x{grid[1]} "
                f"grid ({grid[0] * grid[1]} patches){' plus a class token' if has_cls else ''}. To run at another "
                "resolution, load at the stored one (leave image_size unset) and call `model.set_image_size(...)`."
            )
    return "learned", ("cls" if prefix else "none"), (int(given[0]), int(given[1]))


def vitrail_config_from_npz(
    arrays: Mapping[str, np.ndarray],
    *,
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    num_labels: int | None = None,
    exact_gelu: bool = True,
    backbone_only: bool = False,
) -> VitrailConfig:
    """The `VitrailConfig` of a JAX ViT checkpoint, read from its shapes (`arrays` as `read_npz` returns them).

    Width, depth, MLP size, patch size and channels come from the kernels; the head count from the attention
    kernels `(D, heads, head_dim)` (or `num_heads` when a checkpoint stores them flat); the resolution from the
    position table's grid times the patch size (square unless `image_size` says otherwise; 224 with a warning for
    sin-cos positions, which store no table). `num_labels` must agree with the head when there is one.
    `exact_gelu` is explained in the module docstring.
    """
    arrays = _canonical(arrays)
    refuse(arrays, NPZ_REFUSED + (() if backbone_only else NPZ_HEAD_REFUSED), "JAX .npz checkpoint")
    layout = detect_npz_layout(arrays)
    modules = NPZ_LAYER_MODULES[layout]
    patch_kernel = arrays["embedding/kernel"]
    if patch_kernel.ndim != 4:
        raise ValueError(
            f"embedding/kernel should be an HWIO conv kernel (ph, pw, C, D), got shape {patch_kernel.shape}."
        )
    ph, pw, channels, width = (int(s) for s in patch_kernel.shape)
    has_cls = "cls" in arrays
    position_type, prefix_positions, (height, image_width) = _positions(arrays, (ph, pw), has_cls, image_size)
    fields = dict(
        hidden_size=width,
        num_hidden_layers=layer_count(arrays, "Transformer/encoderblock_{n}/*"),
        num_attention_heads=_num_heads(arrays, layout, num_heads),
        intermediate_size=int(arrays[f"Transformer/encoderblock_0/{modules['mlp']}/Dense_0/kernel"].shape[1]),
        hidden_act="gelu" if exact_gelu else "gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        image_size=height if height == image_width else [height, image_width],
        patch_size=ph if ph == pw else [ph, pw],
        num_channels=channels,
        qkv_bias=f"Transformer/encoderblock_0/{modules['attention']}/query/bias" in arrays,
        encoder_stride=ph,
        pooling="cls" if has_cls else "mean",
        use_cls_token=has_cls,
        use_fc_norm=False,
        position_embedding_type=position_type,
        prefix_position_embeddings=prefix_positions,
        position_interpolation="bicubic_antialias",
    )
    classes = _head_classes(arrays) if not backbone_only else 0
    if classes and num_labels is not None and num_labels != classes:
        raise ValueError(f"num_labels={num_labels}, but the checkpoint's head has {classes} classes.")
    if classes or num_labels is not None:
        fields["num_labels"] = classes or num_labels
    return VitrailConfig(**fields)


def _head_classes(arrays: Mapping[str, np.ndarray]) -> int:
    kernel = arrays.get("head/kernel")
    return 0 if kernel is None else int(kernel.shape[-1])


# ---- state dict ------------------------------------------------------------------------------------------------


def _plan(arrays: Mapping[str, np.ndarray], config: VitrailConfig, backbone_only: bool) -> Plan:
    """The conversion of `_canonical` arrays that `vitrail_config_from_npz` has read and checked."""
    layout = detect_npz_layout(arrays)
    head = not backbone_only and _head_classes(arrays) > 0
    return Plan(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
        config,
        head=head,
        rows=npz_rename_rows(layout, head=head),
        drops=NPZ_BACKBONE_DROPS if backbone_only else () if head else NPZ_EMPTY_HEAD_DROPS,
        source_name=f"JAX .npz checkpoint ({layout} layout)",
    )


def load_npz_checkpoint(
    path: str | Path,
    *,
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    num_labels: int | None = None,
    exact_gelu: bool = True,
    backbone_only: bool = False,
) -> VitrailForImageClassification | VitrailModel:
    """A JAX ViT `.npz` as a vitrail model in eval mode: `VitrailForImageClassification` when it has a head with
    classes, else `VitrailModel` (always with `backbone_only=True`). Keywords as in `vitrail_config_from_npz`."""
    arrays = read_npz(path)
    config = vitrail_config_from_npz(
        arrays,
        num_heads=num_heads,
        image_size=image_size,
        num_labels=num_labels,
        exact_gelu=exact_gelu,
        backbone_only=backbone_only,
    )
    return _plan(arrays, config, backbone_only).load()


# ---- preprocessing ---------------------------------------------------------------------------------------------


def npz_image_processor(config: VitrailConfig):
    """The evaluation transform of vit_jax and big_vision: resize the whole image to `image_size` (no crop, aspect
    not kept), bilinear, then scale pixel values to [-1, 1] (`(x - 127.5) / 127.5`, i.e. mean 0.5, std 0.5).

    JAX resizes with `tf.image.resize` (bilinear without antialiasing); PIL's bilinear filter antialiases when
    shrinking, so pixels differ slightly from TensorFlow's on downscaled images.
    """
    from transformers.image_utils import PILImageResampling

    from ..image_processing_vitrail import VitrailImageProcessor

    height, width = config.image_hw
    half = [0.5] * config.num_channels
    return VitrailImageProcessor(
        size={"height": height, "width": width},
        resample=PILImageResampling.BILINEAR,
        do_center_crop=False,
        image_mean=half,
        image_std=half,
        num_channels=config.num_channels,
    )


# ---- reference -------------------------------------------------------------------------------------------------


def posemb_sincos_2d(rows: int, cols: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's `posemb_sincos_2d` in numpy float32, as JAX evaluates it: `(1, rows * cols, width)`."""
    y, x = np.mgrid[:rows, :cols]
    omega = np.arange(width // 4, dtype=np.float32) / np.float32(width // 4 - 1)
    omega = np.float32(1.0) / np.float32(temperature) ** omega
    y = np.einsum("m,d->md", y.flatten().astype(np.float32), omega)
    x = np.einsum("m,d->md", x.flatten().astype(np.float32), omega)
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return table.astype(np.float32)[None]


def _timm_reference(
    raw: Mapping[str, np.ndarray], config: VitrailConfig, head: bool, path: Path | None = None
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """timm's `VisionTransformer` loading the same arrays with its own `.npz` reader (`_load_weights`): the file
    itself when `path` is given and timm can read it as it is, else `raw` re-saved in memory. Returns the
    reference (None without timm) and a note saying what it is."""
    if importlib.util.find_spec("timm") is None:
        return None, "timm is not installed: no reference to compare against."
    from .timm import timm_model_like

    prefix = npz_prefix(raw)
    sincos = config.position_embedding_type == "sincos2d"
    (ph, pw), num_classes = config.patch_hw, config.num_labels if head else 0

    def build(grid: tuple[int, int]):
        model = timm_model_like(config, num_classes, image_hw=(grid[0] * ph, grid[1] * pw))
        if path is not None and not sincos:
            model.load_pretrained(str(path))
            return model.eval()
        arrays = dict(raw)
        if sincos:  # timm has no sin-cos table: hand it big_vision's for this grid as a learned one
            arrays[f"{prefix}pos_embedding"] = posemb_sincos_2d(*grid, config.hidden_size)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        buffer.seek(0)
        model.load_pretrained(buffer)
        return model.eval()

    # The model's config may be resized later (`set_image_size`); timm's native grid stays the checkpoint's.
    native = tuple(config.grid_size)
    models = {native: build(native)}

    def reference(pixels: torch.Tensor) -> torch.Tensor:
        grid = (-(-pixels.shape[-2] // ph), -(-pixels.shape[-1] // pw))
        if sincos and grid not in models:  # big_vision recomputes the table; timm would resample it
            models[grid] = build(grid)
        model = models[grid if sincos else native]
        with torch.no_grad():
            return model(pixels) if head else model.forward_features(pixels)

    gelu = "exact GELU" if config.hidden_act == "gelu" else "tanh-approximate GELU"
    positions = (
        "sin-cos table from a numpy port of big_vision's posemb_sincos_2d, rebuilt for each grid"
        if sincos
        else "learned table resampled bicubically with antialiasing at other sizes"
    )
    return reference, (
        f"Reference: timm VisionTransformer reading the same .npz with its own loader ({gelu}; {positions})."
    )


def open_source(
    path: str | Path,
    *,
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    exact_gelu: bool = True,
    backbone_only: bool = False,
) -> Converted:
    """Everything `scripts/convert_checkpoint.py --from npz` needs: the converted model (eval), the JAX evaluation
    preprocessing, and a reference mapping pixels of any size to timm's outputs on the same file (logits, or the
    last hidden state for backbones)."""
    raw, widened = _read_archive(path)
    arrays = _canonical(raw)
    config = vitrail_config_from_npz(
        arrays, num_heads=num_heads, image_size=image_size, exact_gelu=exact_gelu, backbone_only=backbone_only
    )
    plan = _plan(arrays, config, backbone_only)
    # timm reads bfloat16 only through jax; give it the widened copy then.
    reference, note = _timm_reference(raw, config, plan.head, path=None if widened else Path(path))
    notes = [
        f"JAX .npz, {detect_npz_layout(arrays)} layout: {describe(config)}. JAX trained with tanh-approximate GELU; "
        "exact_gelu=False reproduces it.",
        "Preprocessing: resize to the model size (bilinear, no crop), scale to [-1, 1].",
        note,
    ]
    return Converted(plan.load(), npz_image_processor(config), reference, notes)


__all__ = [
    "NPZ_BACKBONE_DROPS",
    "NPZ_HEAD_RENAMES",
    "NPZ_LAYERS",
    "NPZ_LAYER_MODULES",
    "NPZ_REFUSED",
    "NPZ_RENAMES",
    "detect_npz_layout",
    "load_npz_checkpoint",
    "npz_image_processor",
    "npz_prefix",
    "npz_rename_rows",
    "open_source",
    "posemb_sincos_2d",
    "read_npz",
    "vitrail_config_from_npz",
]
