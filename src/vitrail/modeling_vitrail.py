"""vitrail's Vision Transformer: ViT = Transformer(Patch(x)).

Patch embedding (a Conv2d with kernel = stride = patch) -> prefix tokens and positions -> pre-norm Transformer
layers (attention `softmax(QK^T / sqrt(d)) V`, then an MLP) -> final LayerNorm -> pooling -> heads.

This file travels to the Hub with every checkpoint: it imports only torch, transformers and
`configuration_vitrail`, and knows nothing of the rest of vitrail (the package adds conversion, new image sizes
and label sets on loading through `VitrailPreTrainedModel.pretrained_loader`). Parameter names are the checkpoint
format; docs/reference/checkpoint-format.md lists them.

Layout choices were measured on a 2-core CPU at ViT-B/16 shapes (`python scripts/benchmark_layout.py`): one fused
`qkv` projection and three separate ones, and adding positions before or after the prefix tokens are
concatenated, run within noise of each other. The fused `(3D, D)` projection is kept because it is one tensor,
as in timm and big_vision; the conversion tables split or join it for other layouts.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import transformers

if int(transformers.__version__.split(".")[0]) < 5:  # the imports below exist in transformers 5 only
    raise ImportError(
        f"vitrail's checkpoint code needs transformers >= 5.0, not {transformers.__version__}: run "
        'pip install -U "transformers>=5".'
    )

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedImageModelingOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_vitrail import VitrailConfig

logger = logging.getLogger(__name__)


@dataclass
class VitrailImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput`, plus each head's own logits when the model has a distillation token.

    cls_logits (`torch.FloatTensor` of shape `(batch, num_labels)`, *optional*): the class-token head's logits.
    distillation_logits (`torch.FloatTensor` of shape `(batch, num_labels)`, *optional*): the distillation-token
        head's logits; `logits` is the mean of the two.
    """

    cls_logits: torch.FloatTensor | None = None
    distillation_logits: torch.FloatTensor | None = None


def sincos_2d_position_embeddings(rows: int, cols: int, width: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos positions, float32 `(1, rows * cols, width)`, in big_vision's `posemb_sincos_2d` layout
    (temperature 10000): the channels are `[sin(x), cos(x), sin(y), cos(y)]`, a quarter each, over `width // 4`
    frequencies."""
    quarter = width // 4
    omega = torch.arange(quarter, dtype=torch.float64, device=device) / max(quarter - 1, 1)
    omega = 10000.0**-omega
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64, device=device),
        torch.arange(cols, dtype=torch.float64, device=device),
        indexing="ij",
    )
    x = x.reshape(-1, 1) * omega  # (rows * cols, quarter)
    y = y.reshape(-1, 1) * omega
    table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return table.float().unsqueeze(0)


def make_norm(config: VitrailConfig, width: int) -> nn.Module:
    """A norm over the last `width` features, of the kind `config.norm_type` names, with `config.layer_norm_eps`:
    every norm of the model is built here."""
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(width, eps=config.layer_norm_eps)
    return nn.LayerNorm(width, eps=config.layer_norm_eps)


class VitrailPatchEmbeddings(nn.Module):
    """Turns `(B, C, H, W)` images into `(B, rows * cols, hidden)` patch tokens with one strided convolution."""

    def __init__(self, config: VitrailConfig):
        super().__init__()
        self.image_hw = config.image_hw
        self.patch_hw = config.patch_hw
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=self.patch_hw,
            stride=self.patch_hw,
            bias=config.patch_embedding_bias,
        )
        self.norm = make_norm(config, config.hidden_size) if config.patch_embedding_norm else None

    def forward(self, pixel_values: torch.Tensor, dynamic_size: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        if pixel_values is None:
            raise ValueError("`pixel_values` is required: pass a (batch, channels, height, width) tensor.")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"`pixel_values` must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}."
            )
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(
                f"`pixel_values` has {channels} channels but the model expects {self.num_channels} "
                f"(`config.num_channels`). Convert the images (the image processor does this for you) or build "
                f"the model with `num_channels={channels}`."
            )
        if dynamic_size:
            # Pad bottom/right up to whole patches so no border pixel is dropped. Padding by zero when the sides fit
            # costs a copy, but takes no branch on the size, which `torch.export` would fix to the example's.
            pixel_values = F.pad(pixel_values, (0, -width % self.patch_hw[1], 0, -height % self.patch_hw[0]))
        elif (height, width) != self.image_hw:
            raise ValueError(
                f"Input image size {height}x{width} does not match the model's {self.image_hw[0]}x{self.image_hw[1]} "
                "(`config.image_size`). Resize the images (the image processor does this), pass "
                "`interpolate_pos_encoding=True`, or set `config.dynamic_image_size=True` to accept any size."
            )
        # (B, C, H, W) -> (B, D, r, c)
        patches = self.projection(pixel_values.to(self.projection.weight.dtype))
        grid = (patches.shape[-2], patches.shape[-1])
        patches = patches.flatten(2).transpose(1, 2)  # (B, D, r, c) -> (B, r * c, D)
        if self.norm is not None:
            patches = self.norm(patches)
        return patches, grid


class VitrailEmbeddings(nn.Module):
    """Patch tokens plus positions, behind the prefix tokens: `[cls] [distillation] [registers...] patches`."""

    def __init__(self, config: VitrailConfig, use_mask_token: bool = False):
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.patch_embeddings = VitrailPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden)) if config.use_cls_token else None
        self.distillation_token = (
            nn.Parameter(torch.zeros(1, 1, hidden)) if config.use_distillation_token else None
        )
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, hidden))
            if config.num_register_tokens
            else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden)) if use_mask_token else None
        self.num_prefix_positions = config.num_prefix_positions
        self.grid_size = config.grid_size
        self.position_embeddings = None
        if config.position_embedding_type == "learned":
            self.position_embeddings = nn.Parameter(
                torch.zeros(1, self.num_prefix_positions + config.num_patches, hidden)
            )
        elif config.position_embedding_type == "sincos2d":
            table = sincos_2d_position_embeddings(*self.grid_size, hidden)
            self.register_buffer("sincos_position_embeddings", table, persistent=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.pre_norm = make_norm(config, hidden) if config.pre_norm else None

    def patch_positions(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """Positions for a `grid` of patches, `(1, rows * cols, hidden)`: the one rule, at run time and in
        `set_image_size`. A learned table is resampled bicubically, rows and columns independently:
        `position_interpolation="bicubic_antialias"` is timm's `resample_abs_pos_embed` (low-passes when shrinking),
        `"bicubic"` transformers' `interpolate_pos_encoding`. Sin-cos positions are computed for the grid."""
        # A symbolic grid (`torch.export` with a dynamic image size) cannot be compared without fixing it to the
        # example's: it takes the general path, which gives the native table itself at the native grid (bicubic
        # weights at offset 0 are exactly 1 and 0; sin-cos positions are recomputed by the same function).
        native = not any(isinstance(n, torch.SymInt) for n in grid) and tuple(grid) == tuple(self.grid_size)
        kind = self.config.position_embedding_type
        if kind == "sincos2d":
            if native:
                return self.sincos_position_embeddings.to(dtype)
            device = self.patch_embeddings.projection.weight.device
            return sincos_2d_position_embeddings(*grid, self.config.hidden_size, device=device).to(dtype)
        if kind != "learned":
            return None
        table = self.position_embeddings[:, self.num_prefix_positions :]
        if native:
            return table
        width, antialias = table.shape[-1], self.config.position_interpolation == "bicubic_antialias"
        # (1, N, C) -> (1, C, rows, cols) -> resampled -> (1, rows * cols, C)
        image = table.reshape(1, *self.grid_size, width).permute(0, 3, 1, 2).float()
        image = F.interpolate(
            image, size=tuple(grid), mode="bicubic", align_corners=False, antialias=antialias
        )
        return image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], width).to(table.dtype)

    @torch.no_grad()
    def set_grid(self, grid: tuple[int, int]) -> None:
        """Make `grid` the native one, storing the positions `patch_positions` gives for it (prefix rows kept)."""
        if self.position_embeddings is not None:
            prefix = self.position_embeddings[:, : self.num_prefix_positions]
            patches = self.patch_positions(grid, self.position_embeddings.dtype)
            self.position_embeddings = nn.Parameter(torch.cat([prefix, patches], dim=1))
        elif self.config.position_embedding_type == "sincos2d":
            table = self.patch_positions(grid, self.sincos_position_embeddings.dtype)
            self.register_buffer("sincos_position_embeddings", table, persistent=False)
        self.grid_size = tuple(grid)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        dynamic_size: bool = False,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        patches, grid = self.patch_embeddings(pixel_values, dynamic_size)
        batch = patches.shape[0]

        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("`bool_masked_pos` needs a mask token: use `VitrailForMaskedImageModeling`.")
            if bool_masked_pos.shape != patches.shape[:2]:
                raise ValueError(
                    f"`bool_masked_pos` must have shape (batch, num_patches) = {tuple(patches.shape[:2])} for this "
                    f"input ({grid[0]}x{grid[1]} patches), got {tuple(bool_masked_pos.shape)}."
                )
            patches = torch.where(
                bool_masked_pos.unsqueeze(-1).bool(), self.mask_token.to(patches.dtype), patches
            )

        positions = self.patch_positions(grid, patches.dtype)
        if positions is not None:
            patches = patches + positions

        learned = [
            t for t in (self.cls_token, self.distillation_token, self.register_tokens) if t is not None
        ]
        tokens = patches
        if learned:
            prefix = torch.cat(learned, dim=1)  # (1, P, D) in token order
            owned = self.num_prefix_positions  # the first `owned` prefix tokens have a position of their own
            if owned:
                positioned = prefix[:, :owned] + self.position_embeddings[:, :owned]
                prefix = torch.cat([positioned, prefix[:, owned:]], dim=1)
            tokens = torch.cat([prefix.expand(batch, -1, -1), patches], dim=1)  # (B, P + r * c, D)
        tokens = self.dropout(tokens)
        if self.pre_norm is not None:
            tokens = self.pre_norm(tokens)
        return tokens, grid


# ---- positions inside attention: rotary embeddings and relative position biases ------------------------------
#
# Both depend on the patch grid of the input, which `dynamic_image_size` lets change from call to call: they are
# computed for the grid at run time (nothing grid-sized is stored but BEiT's learned table), and the encoder hands
# the grid, the rotary coordinates and any shared bias to every layer.


def _is_native(grid, native: tuple[int, int]) -> bool:
    """Whether `grid` is the `native` one, without fixing a symbolic (`torch.export`) grid to the example's."""
    return not any(isinstance(n, torch.SymInt) for n in grid) and tuple(grid) == tuple(native)


def rope_coordinates(config: VitrailConfig, grid: tuple[int, int], device=None, training: bool = False):
    """The 2D position of every patch, float32 `(rows * cols, 2)` in token (row-major) order, its two columns in
    `config.rope_axis_order`. `"index"`: the patch index plus `rope_offset`, rescaled onto `rope_reference_grid`
    when set (EVA-02's `ref_feat_shape`); `"centered"`: the patch centre scaled to [-1, 1] per axis (DINOv3), then
    times 2 pi so that angles are coordinate times frequency for both. In training, `rope_train_*` move the
    coordinates of the whole grid by one random transform (DINOv3's shift, jitter and rescale, drawn in that order)."""
    rows, cols = grid
    sizes, reference = [rows, cols], list(config.rope_reference_hw or (None, None))
    if config.rope_axis_order == "xy":
        sizes, reference = sizes[::-1], reference[::-1]
    axes = []
    for size, ref in zip(sizes, reference, strict=True):
        t = torch.arange(size, device=device, dtype=torch.float32) + config.rope_offset
        if config.rope_coordinates == "centered":
            t = 2.0 * ((t + 0.5) / size) - 1.0
        elif ref is not None:
            t = t / size * ref
        axes.append(t)
    first, second = torch.meshgrid(
        axes[0], axes[1], indexing="ij" if config.rope_axis_order == "yx" else "xy"
    )
    coordinates = torch.stack([first.reshape(-1), second.reshape(-1)], dim=-1)  # (r, c) x 2 -> (r * c, 2)
    if training:
        if config.rope_train_shift is not None:
            shift = config.rope_train_shift
            coordinates = coordinates + torch.empty(2, device=device).uniform_(-shift, shift)
        if config.rope_train_jitter is not None:
            spread = math.log(config.rope_train_jitter)
            coordinates = coordinates * torch.empty(2, device=device).uniform_(-spread, spread).exp()
        if config.rope_train_rescale is not None:
            spread = math.log(config.rope_train_rescale)
            coordinates = coordinates * torch.empty(1, device=device).uniform_(-spread, spread).exp()
    if config.rope_coordinates == "centered":
        coordinates = coordinates * (2 * math.pi)
    return coordinates


def axial_rope_frequencies(config: VitrailConfig, device=None) -> torch.Tensor:
    """`(2, 1, head_dim // 2)`: row `a` holds the frequency of each rotation slot for coordinate `a`. The first half
    of the slots follows the first coordinate at `rope_theta ** (-i / (head_dim // 4))`, the second half the other
    one (zeros elsewhere), the same frequencies on each axis, as timm's `RotaryEmbeddingCat` and DINOv3 use them."""
    quarter = config.head_dim // 4
    bands = 1.0 / config.rope_theta ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    zeros = torch.zeros_like(bands)
    return torch.stack([torch.cat([bands, zeros]), torch.cat([zeros, bands])]).unsqueeze(1)


def mixed_rope_frequencies(config: VitrailConfig) -> torch.Tensor:
    """A RoPE-Mixed starting point `(2, heads, head_dim // 2)` (Heo et al. 2024): for each head, the axial bands
    turned by a random angle, so that every head starts out looking along its own direction of the plane."""
    magnitudes = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 4) / config.head_dim)
    angles = torch.rand(config.num_attention_heads, 1) * 2 * math.pi
    along_x = torch.cat([magnitudes * angles.cos(), magnitudes * (angles + math.pi / 2).cos()], dim=-1)
    along_y = torch.cat([magnitudes * angles.sin(), magnitudes * (angles + math.pi / 2).sin()], dim=-1)
    return torch.stack([along_x, along_y])


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor, layout: str) -> torch.Tensor:
    """Turn each channel pair of `x` `(..., N, head_dim)` by its angle `(..., N, head_dim // 2)`: pairs `(2i, 2i+1)`
    for `"interleaved"`, `(i, i + head_dim / 2)` for `"half"`. Computed in the angles' float32 (x * cos promotes) and
    returned in x's dtype."""
    cos, sin = angles.cos(), angles.sin()
    if layout == "half":
        first, second = x.chunk(2, dim=-1)
    else:
        first, second = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., d) -> 2 x (..., d / 2)
    turned_first = first * cos - second * sin
    turned_second = second * cos + first * sin
    if layout == "half":
        turned = torch.cat([turned_first, turned_second], dim=-1)
    else:
        turned = torch.stack([turned_first, turned_second], dim=-1).flatten(-2)
    return turned.to(x.dtype)


def relative_position_index(grid: tuple[int, int], device=None) -> torch.Tensor:
    """`(N, N)` index into a row-major `(2 * rows - 1, 2 * cols - 1)` table of offsets: entry `[i, j]` is the
    offset of patch `i` (the query) from patch `j` (the key), as BEiT and Swin number them."""
    rows, cols = grid
    ys = torch.arange(rows, device=device)[:, None].expand(rows, cols).reshape(-1)
    xs = torch.arange(cols, device=device)[None, :].expand(rows, cols).reshape(-1)
    dy = ys[:, None] - ys[None, :] + (rows - 1)
    dx = xs[:, None] - xs[None, :] + (cols - 1)
    return dy * (2 * cols - 1) + dx


class VitrailRelativePositionBias(nn.Module):
    """A learned attention bias `(1, heads, N, N)` that depends on the offset between query and key patch.

    `"table"` (Bao et al. 2021, BEiT): one row per offset of the native grid, `table` `((2R-1) * (2C-1) + 3, heads)`,
    the three last rows for class token to patch, patch to class token and class token to itself (none without a
    class token). Another grid resamples the offset table bilinearly, as transformers' BEiT does.
    `"mlp"` (timm's relpos ViTs, after Swin-V2): a ReLU MLP maps the log-scaled offset `sign(d) log(1 + |d|)` per
    axis to a bias per head, so it is defined at any grid; prefix tokens get no bias.
    """

    def __init__(self, config: VitrailConfig):
        super().__init__()
        self.kind = config.relative_position_bias
        self.grid_size = config.grid_size
        self.num_prefix_tokens = config.num_prefix_tokens
        heads = config.num_attention_heads
        if self.kind == "table":
            rows, cols = self.grid_size
            extra = 3 if config.use_cls_token else 0
            self.table = nn.Parameter(torch.zeros((2 * rows - 1) * (2 * cols - 1) + extra, heads))
        else:
            hidden = config.relative_position_bias_hidden_size
            # timm's RelPosMlp drops an eighth of the hidden units in training; kept, so fine-tuning matches it.
            layers = dict(
                fc1=nn.Linear(2, hidden), act=nn.ReLU(), drop=nn.Dropout(0.125), fc2=nn.Linear(hidden, heads)
            )
            self.mlp = nn.Sequential(OrderedDict(layers))

    def offset_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The bias of every offset of `grid`, `((2 * rows - 1) * (2 * cols - 1), heads)`."""
        rows, cols = grid
        if self.kind == "mlp":
            device = self.mlp.fc1.weight.device
            dy = torch.arange(-(rows - 1), rows, device=device, dtype=torch.float32)
            dx = torch.arange(-(cols - 1), cols, device=device, dtype=torch.float32)
            offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)  # (2r-1, 2c-1, 2)
            offsets = offsets.sign() * torch.log(1.0 + offsets.abs())
            return self.mlp(offsets.to(self.mlp.fc1.weight.dtype)).reshape(-1, self.mlp.fc2.out_features)
        native = self.table[: self.table.shape[0] - (3 if self.num_prefix_tokens else 0)]
        if _is_native(grid, self.grid_size):
            return native
        heads = native.shape[-1]
        # (K, h) -> (1, h, 2R-1, 2C-1) -> resampled -> ((2r-1) * (2c-1), h)
        image = native.reshape(2 * self.grid_size[0] - 1, 2 * self.grid_size[1] - 1, heads).permute(2, 0, 1)
        image = F.interpolate(
            image[None].float(), size=(2 * rows - 1, 2 * cols - 1), mode="bilinear", align_corners=False
        )
        return image[0].permute(1, 2, 0).reshape(-1, heads).to(native.dtype)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        table = self.offset_table(grid)
        bias = table[relative_position_index(grid, table.device)].permute(2, 0, 1)  # (N, N, h) -> (h, N, N)
        prefix = self.num_prefix_tokens
        if self.kind == "mlp":
            bias = F.pad(bias, (prefix, 0, prefix, 0))
        elif prefix:  # BEiT's class-token rows: to the patches, from the patches, to itself
            heads, patches = bias.shape[0], bias.shape[-1]
            to_patches, from_patches, itself = (row.reshape(heads, 1, 1) for row in self.table[-3:])
            top = torch.cat([itself, to_patches.expand(heads, 1, patches)], dim=-1)
            body = torch.cat([from_patches.expand(heads, patches, 1), bias], dim=-1)
            bias = torch.cat([top, body], dim=1)
        return bias.unsqueeze(0)  # (1, h, N, N)

    @torch.no_grad()
    def set_grid(self, grid: tuple[int, int]) -> None:
        """Make `grid` the native one; a table is resampled once by the rule `offset_table` applies at run time."""
        if self.kind == "table":
            extras = self.table[self.table.shape[0] - (3 if self.num_prefix_tokens else 0) :]
            self.table = nn.Parameter(torch.cat([self.offset_table(grid), extras]))
        self.grid_size = tuple(grid)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d)) V, written out. Inputs `(B, heads, N, d)`; returns `(B, N, heads, d)` and the
    weights `(B, heads, N, N)`, the contract of transformers' attention interface."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, h, N, d) -> (B, N, h, d)
    return output, weights


class VitrailAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; the kernel comes from transformers' registry.
    Positions may enter here too: rotary embeddings turn the queries and keys of the patches, and a relative
    position bias is added to the scores as the additive attention mask both eager and sdpa kernels take."""

    is_causal = False

    def __init__(self, config: VitrailConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.dropout_p = config.attention_probs_dropout_prob
        # BEiT and EVA learn biases for queries and values only; the key's would cancel in the softmax anyway.
        separate_biases = config.qkv_bias and not config.key_bias
        self.qkv = nn.Linear(
            config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias and not separate_biases
        )
        self.q_bias = nn.Parameter(torch.zeros(config.hidden_size)) if separate_biases else None
        self.v_bias = nn.Parameter(torch.zeros(config.hidden_size)) if separate_biases else None
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.rope_freqs = (
            nn.Parameter(torch.zeros(2, self.num_heads, self.head_dim // 2))
            if config.rope_type == "mixed"
            else None
        )
        per_layer_bias = config.relative_position_bias != "none" and not config.relative_position_bias_shared
        self.relative_position_bias = VitrailRelativePositionBias(config) if per_layer_bias else None
        self.norm = make_norm(config, config.hidden_size) if config.attention_norm else None
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.proj_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        grid: tuple[int, int] | None = None,
        rope_coordinates: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`grid`: the patch grid of the input (for a relative position bias of this layer); `rope_coordinates`:
        `(patches, 2)` from `rope_coordinates`, when the model uses RoPE; `attention_bias`: a `(1, heads, N, N)`
        bias shared by all layers."""
        batch, tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states)
        if self.q_bias is not None:
            # Added to the output, not passed to F.linear, so that a wrapped or quantised `qkv` (LoRA, int8) works.
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]).to(qkv.dtype)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        # Unbinding the `3` axis in place, then moving heads forward, makes the same views as a permute of the
        # whole tensor, but backward stacks the three gradients straight into the (B, N, 3, h, d) layout of the
        # projection's output: one copy of it per layer instead of two (stack, then reshape a permuted tensor).
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, N, 3, h, d) -> 3 x (B, h, N, d)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        if rope_coordinates is not None:
            query, key = self.rotate(query, key, rope_coordinates)

        # Fused kernels (sdpa, flash) never materialise the weights; asking for them switches this call to eager.
        # Looked up on every call, so `model.set_attn_implementation(...)` takes effect at once (transformers also
        # reads this very call in the source to decide that vitrail supports switching).
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        if self.relative_position_bias is not None:
            attention_bias = self.relative_position_bias(grid)
        if attention_bias is not None:
            if implementation not in ("eager", "sdpa"):
                raise ValueError(
                    f"A relative position bias is added to the attention scores, which the {implementation!r} "
                    "attention kernel cannot take (per head); load the model with `attn_implementation='sdpa'` "
                    "or 'eager', or call `model.set_attn_implementation('sdpa')`."
                )
            attention_bias = attention_bias.to(query.dtype)
        dropout = self.dropout_p if self.training else 0.0
        output, weights = attention(
            self, query, key, value, attention_bias, dropout=dropout, scaling=self.scaling, is_causal=False
        )
        output = output.reshape(batch, tokens, width)  # (B, N, h, d) -> (B, N, D)
        if self.norm is not None:
            output = self.norm(output)
        return self.proj(output), (weights if output_attentions else None)

    def rotate(
        self, query: torch.Tensor, key: torch.Tensor, coordinates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on the patch tokens of `query` and `key` `(B, h, N, d)`; the prefix tokens before them keep their
        values, as in every source (a class token has no place on the grid)."""
        frequencies = self.rope_freqs
        if frequencies is None:
            frequencies = axial_rope_frequencies(self.config, coordinates.device)
        frequencies = frequencies.float()
        # (P, 2) coordinates x (2, h or 1, d/2) frequencies -> (h or 1, P, d/2) angles, one per rotation slot.
        # Elementwise rather than a matmul, so autocast cannot round the angles to half precision.
        angles = (
            coordinates[:, 0, None] * frequencies[0, :, None]
            + coordinates[:, 1, None] * frequencies[1, :, None]
        )
        prefix, layout = self.config.num_prefix_tokens, self.config.rope_layout
        rotated = []
        for states in (query, key):
            turned = rotate_pairs(states[:, :, prefix:], angles, layout)
            rotated.append(torch.cat([states[:, :, :prefix], turned], dim=2) if prefix else turned)
        return rotated[0], rotated[1]


class VitrailMLP(nn.Module):
    """Two linear layers with the configured activation between them; with `mlp_type="swiglu"`, fc1 makes a gate
    and a value half and the activated gate multiplies the value (a gated linear unit); with `mlp_norm`, a norm on
    the hidden activations before fc2.

    `in_layer=False` makes the attention-pooling head's MLP, `intermediate_size` wide: plain (never gated), with
    biases and no inner norm whatever the layers have, as in timm's `AttentionPoolLatent` and SigLIP's head."""

    def __init__(self, config: VitrailConfig, intermediate_size: int | None = None, in_layer: bool = True):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gated = in_layer and config.mlp_type == "swiglu"
        bias = config.mlp_bias or not in_layer
        self.fc1 = nn.Linear(config.hidden_size, width * (2 if self.gated else 1), bias=bias)
        self.act = ACT2FN[config.hidden_act]
        self.norm = make_norm(config, width) if in_layer and config.mlp_norm else None
        self.fc2 = nn.Linear(width, config.hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        if self.gated:
            gate, value = hidden_states.chunk(2, dim=-1)  # (B, N, 2H) -> 2 x (B, N, H)
            hidden_states = self.act(gate) * value
        else:
            hidden_states = self.act(hidden_states)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return self.fc2(hidden_states)


class VitrailLayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (Touvron et al. 2021, CaiT)."""

    def __init__(self, config: VitrailConfig):
        super().__init__()
        self.scale = nn.Parameter(torch.full((config.hidden_size,), float(config.layer_scale_init_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.scale


class VitrailDropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples, rescaling the kept ones (Huang et al. 2016)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep = 1.0 - self.drop_prob
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(mask_shape).bernoulli_(keep)
        return hidden_states * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class VitrailLayer(GradientCheckpointingLayer):
    """One pre-norm Transformer layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: VitrailConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = make_norm(config, config.hidden_size)
        self.attention = VitrailAttention(config)
        self.norm2 = make_norm(config, config.hidden_size)
        self.mlp = VitrailMLP(config)
        layer_scale = config.layer_scale_init_value is not None
        self.layer_scale1 = VitrailLayerScale(config) if layer_scale else nn.Identity()
        self.layer_scale2 = VitrailLayerScale(config) if layer_scale else nn.Identity()
        self.drop_path = VitrailDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        grid: tuple[int, int] | None = None,
        rope_coordinates: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Positional arguments all: reentrant gradient checkpointing only sees tensors passed that way.
        attended, weights = self.attention(
            self.norm1(hidden_states), output_attentions, grid, rope_coordinates, attention_bias
        )
        hidden_states = hidden_states + self.drop_path(self.layer_scale1(self.dropout(attended)))
        mixed = self.mlp(self.norm2(hidden_states))
        hidden_states = hidden_states + self.drop_path(self.layer_scale2(self.dropout(mixed)))
        return hidden_states, weights


def chosen_indices(request, count: int, name: str) -> frozenset[int] | None:
    """The entries an `output_attentions` / `output_hidden_states` argument asks for among `count`: none (`None`:
    `False`, `None` or an empty list), all (`True`), or those of an index or list of indices, negative ones
    counting from the end as in transformers' output capturing. An index out of range is refused (transformers
    silently selects nothing for it)."""
    if request is None or request is False:
        return None
    if request is True:
        return frozenset(range(count))
    items = [request] if isinstance(request, int) else list(request)
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count]
    if bad:
        raise ValueError(
            f"`{name}={request!r}`: {bad} cannot index the {count} entries there are; pass `True` for all of them, "
            f"or integers from {-count} to {count - 1} (negative ones count from the end)."
        )
    return frozenset(i % count for i in items) or None


class VitrailEncoder(nn.Module):
    """The stack of layers; drop-path probability grows linearly from 0 at the first layer to the configured rate."""

    def __init__(self, config: VitrailConfig):
        super().__init__()
        self.config = config
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([VitrailLayer(config, rate) for rate in rates])
        shared_bias = config.relative_position_bias != "none" and config.relative_position_bias_shared
        self.relative_position_bias = VitrailRelativePositionBias(config) if shared_bias else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_layers: frozenset[int] | None = None,
        hidden_layers: frozenset[int] | None = None,
        depth: int | None = None,
        *,
        grid: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...] | None, tuple[torch.Tensor | None, ...] | None]:
        """Run the first `depth` layers (all by default), the ones in `attention_layers` with eager attention so
        that they return their weights. Returns the last output, then the hidden states (index 0 the input, `i`
        the output of layer `i - 1`) chosen by `hidden_layers` and the weights of `attention_layers`: one entry per
        index, `None` where not chosen (transformers' convention), or `None` instead of a tuple when none is. Only
        chosen tensors are kept, so memory does not grow with depth. `grid`, the `(rows, cols)` of the patches
        among the tokens, is needed by positions inside attention only.

        Rotary coordinates and a shared relative position bias are made once here for all layers (so a training
        run's random coordinate transform is the same in every layer, and a checkpointed layer's recomputation
        sees the same one)."""
        needs_grid = self.config.rope_type != "none" or self.config.relative_position_bias != "none"
        if grid is None and needs_grid:
            raise ValueError(
                "This model places positions inside attention (rotary embeddings or a relative position bias), "
                "which need the patch grid of the tokens: pass `grid=(rows, cols)`."
            )
        rope = None
        if self.config.rope_type != "none":
            rope = rope_coordinates(self.config, grid, hidden_states.device, self.training)
        shared_bias = self.relative_position_bias(grid) if self.relative_position_bias is not None else None
        chosen_attentions, chosen_hidden = attention_layers or frozenset(), hidden_layers or frozenset()
        states = [hidden_states if 0 in chosen_hidden else None]
        weights = []
        for index, layer in enumerate(self.layers[:depth]):
            hidden_states, layer_weights = layer(
                hidden_states, index in chosen_attentions, grid, rope, shared_bias
            )
            states.append(hidden_states if index + 1 in chosen_hidden else None)
            weights.append(layer_weights)
        unrun = len(self.layers) - len(weights)
        states = tuple(states) + (None,) * unrun if hidden_layers else None
        weights = tuple(weights) + (None,) * unrun if attention_layers else None
        return hidden_states, states, weights


class VitrailAttentionPool(nn.Module):
    """Multi-head attention pooling, "MAP" (Lee et al. 2019, Set Transformer's PMA; Zhai et al. 2022, "Scaling
    Vision Transformers"; SigLIP's head): a learned latent query attends over the tokens,
    `x = proj(attention(q(latent), kv(tokens)))`, then a residual MLP, `x + mlp(norm(x))`; returns `(B, D)`. timm's
    `AttentionPoolLatent` with one latent, transformers' `SiglipMultiheadAttentionPoolingHead`. The kernel comes
    from the same registry as the layers' attention."""

    is_causal = False

    def __init__(self, config: VitrailConfig):
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.num_heads = config.map_num_heads or config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.latent = nn.Parameter(torch.zeros(1, 1, hidden))
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)  # rows [k; v]
        self.proj = nn.Linear(hidden, hidden)
        self.norm = make_norm(config, hidden)
        self.mlp = VitrailMLP(config, config.map_intermediate_size, in_layer=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, width = tokens.shape
        # (1, 1, D) -> (B, h, 1, d): one query, the same for every image
        query = self.q(self.latent).reshape(1, 1, self.num_heads, self.head_dim).transpose(1, 2)
        query = query.expand(batch, -1, -1, -1)
        kv = self.kv(tokens).reshape(batch, count, 2, self.num_heads, self.head_dim)
        key, value = (t.transpose(1, 2) for t in kv.unbind(2))  # (B, N, 2, h, d) -> 2 x (B, h, N, d)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        pooled, _ = attention(
            self, query, key, value, None, dropout=0.0, scaling=self.scaling, is_causal=False
        )
        pooled = self.proj(pooled.reshape(batch, width))  # (B, 1, h, d) -> (B, D)
        return pooled + self.mlp(self.norm(pooled))


def _check_runs_folder_code(path, subfolder: str | None) -> None:
    """Refuse a local folder whose own `modeling_vitrail.py` is not the code running: transformers' Auto classes keep
    one model class per config class, which same-named folders with the same configuration code share."""
    theirs = Path(str(path), subfolder or "", Path(__file__).name)
    if theirs.is_file() and theirs.read_bytes() != Path(__file__).read_bytes():
        raise ImportError(
            f"{theirs} differs from the code of this class ({__file__}): transformers' Auto classes reuse the model "
            "class of an earlier folder of the same name in this process. Load it in a new process, or rename it."
        )


# The parts of the heads (masked image modeling's mask token is one): a checkpoint without a part opens in a class
# that has it, which gets it new; a class without a part leaves the checkpoint's out.
_HEAD_PART = re.compile(
    r"((?:distillation_)?classifier|decoder)\..+|(?:vitrail\.)?(?:embeddings\.(mask_token)|(attention_pool)\..+)"
)


def _listed(names: set[str]) -> str:
    shown = sorted(names) or ["no tensor"]
    return ", ".join(shown[:12]) + (f" and {len(shown) - 12} more" if len(shown) > 12 else "")


# Every saved checkpoint opens with these Auto classes, whatever head it holds (the head's own class is added by
# transformers when it saves): `AutoModel` on a classifier checkpoint gives its bare model, `AutoBackbone` its
# feature maps.
_AUTO_MAP = {
    "AutoConfig": "configuration_vitrail.VitrailConfig",
    "AutoModel": "modeling_vitrail.VitrailModel",
    "AutoBackbone": "modeling_vitrail.VitrailBackbone",
}
_PROCESSOR_FILE = "image_processing_vitrail.py"


def _loaded_processor_code() -> Path | None:
    """The image processor's code file of the checkpoint this module came from, if it is at hand.

    It is beside this file with vitrail installed, and for Hub code kept in one folder per repo and commit.
    transformers 5.24 and later keep each of a local folder's files apart, in a folder named by a hash of its code
    (`transformers_modules.<folder name>.<hash>.modeling_vitrail`): there the processor's module is looked for among
    the loaded modules of the same checkpoint name, which hold it only if its processor was loaded. Copies that
    differ count as none.
    """
    beside = Path(__file__).with_name(_PROCESSOR_FILE)
    if beside.is_file():
        return beside
    checkpoint, stem = __name__.rsplit(".", 2)[0], Path(_PROCESSOR_FILE).stem
    found = {
        Path(module.__file__)
        for name, module in list(sys.modules.items())
        if name.rsplit(".", 2)[0] == checkpoint
        and name.rsplit(".", 1)[-1] == stem
        and isinstance(getattr(module, "__file__", None), str)
        and Path(module.__file__).is_file()
    }
    if len({path.read_bytes() for path in found}) != 1:
        return None
    return min(found)


class VitrailPreTrainedModel(PreTrainedModel):
    """Weight initialisation, attention-backend flags and Hub-ready saving shared by all vitrail models."""

    config_class = VitrailConfig
    config: VitrailConfig
    base_model_prefix = "vitrail"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["VitrailEmbeddings", "VitrailLayer", "VitrailAttentionPool"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _input_embed_layer = "patch_embeddings"  # what transformers' `get_input_embeddings` returns
    # The heads' losses are per-batch means; the Trainer must not pass `num_items_in_batch` and skip its own
    # gradient-accumulation scaling.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):  # RMSNorm has a weight only
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, VitrailEmbeddings):
            learned = (module.cls_token, module.distillation_token, module.register_tokens)
            for token in (*learned, module.position_embeddings):
                if token is not None:
                    init.trunc_normal_(token, mean=0.0, std=std)
            if module.mask_token is not None:
                init.zeros_(module.mask_token)
            if module.config.position_embedding_type == "sincos2d":
                init.copy_(
                    module.sincos_position_embeddings,
                    sincos_2d_position_embeddings(*module.grid_size, module.config.hidden_size),
                )
        elif isinstance(module, VitrailAttentionPool):
            init.trunc_normal_(module.latent, mean=0.0, std=std)
        elif isinstance(module, VitrailLayerScale):
            init.constant_(module.scale, self.config.layer_scale_init_value)
        elif isinstance(module, VitrailAttention):
            for bias in (module.q_bias, module.v_bias):
                if bias is not None:
                    init.zeros_(bias)
            if module.rope_freqs is not None:
                init.copy_(module.rope_freqs, mixed_rope_frequencies(self.config))
        elif isinstance(module, VitrailRelativePositionBias) and module.kind == "table":
            init.trunc_normal_(module.table, mean=0.0, std=std)

    # `import vitrail` sets this to `vitrail.loading.load_pretrained` (conversion, `image_size=`, new label sets).
    # The copy of this file that travels with a checkpoint has none: it opens vitrail checkpoints only.
    pretrained_loader: ClassVar[Callable | None] = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """With vitrail installed, `vitrail.loading.load_pretrained`. In Hub-carried code, `from_vitrail_checkpoint`,
        once sure that a local folder's own `modeling_vitrail.py` is the code running."""
        loader = VitrailPreTrainedModel.pretrained_loader
        if loader is not None:
            return loader(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        _check_runs_folder_code(pretrained_model_name_or_path, kwargs.get("subfolder"))
        return cls.from_vitrail_checkpoint(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def from_vitrail_checkpoint(cls, path, *model_args, allow_pickle: bool = False, **kwargs):
        """transformers' `from_pretrained` for a vitrail checkpoint, refusing what `check_loaded_weights` refuses
        where transformers would warn or stay silent, and reading safetensors only: transformers falls back to a
        pickled `pytorch_model.bin`, which vitrail reads only with `allow_pickle=True` (`weights_only=True`), as
        for every other source. `ignore_mismatched_sizes=True` keeps transformers' meaning."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        if not allow_pickle:
            if kwargs.get("use_safetensors") is False:
                raise ValueError(
                    "`use_safetensors=False` asks for pickled weights, which can run code when loaded; vitrail reads "
                    "them only when you also pass `allow_pickle=True` (for a source you trust)."
                )
            kwargs["use_safetensors"] = True
        try:
            model, info = super().from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        except OSError as error:
            if allow_pickle or "model.safetensors" not in str(error):
                raise
            folder = Path(str(path))
            if folder.is_dir() and not any(folder.glob("*.bin")):
                raise OSError(
                    f"{path} holds no weights: neither model.safetensors nor a sharded index."
                ) from error
            raise OSError(
                f"{path} has no safetensors weights (model.safetensors or a sharded index), only pickled ones "
                "(pytorch_model.bin), and unpickling can run code. If you trust the source, pass `allow_pickle=True` "
                "(read with `weights_only=True`), or re-save the weights once as safetensors."
            ) from error
        model.check_loaded_weights(path, info)
        return (model, info) if output_loading_info else model

    def check_loaded_weights(self, source, loading_info: dict | None = None) -> None:
        """Refuse, naming the tensors, weights that do not make this model: another model type's checkpoint, tensors
        the config builds that are missing or that it does not build (from transformers' `loading_info`; a head part
        may be absent as a whole, see `_HEAD_PART`), NaN or inf."""
        if self.config.model_type != VitrailConfig.model_type:  # as config.json says
            raise ImportError(
                f"{source} is not a vitrail checkpoint (model_type {self.config.model_type!r}); converting it needs "
                "the vitrail package (`pip install vitrail`), whose `from_pretrained` converts it on the way in."
            )
        info = loading_info or {"missing_keys": [], "unexpected_keys": []}
        missing, parts = set(info["missing_keys"]), {}
        for name in self.state_dict():
            if part := _HEAD_PART.fullmatch(name):
                parts.setdefault(next(group for group in part.groups() if group), set()).add(name)
        # A head part absent as a whole is new by design (transformers warns); one partly there is damage.
        missing -= {name for part in parts.values() if part <= missing for name in part}
        unknown = {name for name in info["unexpected_keys"] if not _HEAD_PART.fullmatch(name)}
        if missing or unknown:
            raise ValueError(
                f"{source} does not fit its config: it lacks {_listed(missing)} and holds {_listed(unknown)} that "
                "the config does not build. Damaged weights, or a config other than the one they were saved with "
                "(more or fewer layers?): load them with that config rather than leave tensors random or unused."
            )
        floats = {name: t for name, t in self.state_dict().items() if t.is_floating_point() and not t.is_meta}
        # NaN propagates through min and max and inf is one of them: one pass, no mask tensor (8x faster than
        # `isfinite().all()`, which the benchmark's `from_pretrained` row showed as most of a B/16 load).
        broken = {
            name
            for name, tensor in floats.items()
            if tensor.numel() and not torch.stack(tensor.aminmax()).isfinite().all()
        }
        if broken:
            raise ValueError(
                f"{source}: weights not finite (NaN or inf) in {_listed(broken)}, so the model would predict NaN. The "
                "checkpoint is damaged, or was saved after training diverged."
            )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config as transformers does, plus the code files and an `auto_map` that names only
        code the folder carries, so it opens with `trust_remote_code=True` where vitrail is not installed.

        transformers copies this file and the configuration file. The image processor's file is copied beside them
        when it is at hand (always with vitrail installed; from Hub-carried code only if the processor was loaded
        too); otherwise `AutoImageProcessor` is left out of `auto_map` until the processor is saved there.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        processor_code = _loaded_processor_code()
        if processor_code is not None:
            shutil.copyfile(processor_code, folder / _PROCESSOR_FILE)
        carried = {"configuration_vitrail", "modeling_vitrail"}
        auto_map = {**(getattr(self.config, "auto_map", None) or {}), **_AUTO_MAP}
        if (folder / _PROCESSOR_FILE).exists():
            carried.add(Path(_PROCESSOR_FILE).stem)
            auto_map["AutoImageProcessor"] = "image_processing_vitrail.VitrailImageProcessor"
        else:
            logger.warning(
                "%s is not at hand to copy, so %s/config.json maps no AutoImageProcessor: save the image processor "
                "into the same folder to make the checkpoint complete.",
                _PROCESSOR_FILE,
                folder,
            )

        def names_carried_code(reference) -> bool:
            # "module.Class" (or a list of them); "other/repo--module.Class" is code in another repo.
            refs = reference if isinstance(reference, list) else [reference]
            return all(r is None or "--" in r or r.split(".")[0] in carried for r in refs)

        self.config.auto_map = {name: ref for name, ref in auto_map.items() if names_carried_code(ref)}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Make the model's native input size `image_size`, resampling the learned position table once by the rule
        the model applies at run time (`VitrailEmbeddings.patch_positions`) instead of re-initialising it.
        Fine-tuning or evaluating at a new resolution starts here."""
        new = VitrailConfig(**{**self.config.to_dict(), "image_size": image_size})  # validates the new size
        embeddings = self.base_model.embeddings
        embeddings.set_grid(new.grid_size)
        for module in self.base_model.modules():
            if isinstance(module, VitrailRelativePositionBias):
                module.set_grid(new.grid_size)
        embeddings.patch_embeddings.image_hw = new.image_hw
        self.config.image_size = image_size

    def _or_config(self, value, name: str):
        """A call's argument, or the config's field `name` when the argument is unset (None)."""
        return getattr(self.config, name, False) if value is None else value

    def _chosen_outputs(self, output_attentions, output_hidden_states):
        """The layers whose attention weights, and the hidden states, a call asks for (see `chosen_indices`)."""
        depth = self.config.num_hidden_layers
        return (
            chosen_indices(
                self._or_config(output_attentions, "output_attentions"), depth, "output_attentions"
            ),
            chosen_indices(
                self._or_config(output_hidden_states, "output_hidden_states"),
                depth + 1,
                "output_hidden_states",
            ),
        )

    def _as_requested(self, output, return_dict: bool | None):
        """`output` as a `ModelOutput`, or as a tuple when `return_dict` (or else the config's) is False."""
        return output if self._or_config(return_dict, "return_dict") else output.to_tuple()


class VitrailModel(VitrailPreTrainedModel):
    r"""
    The bare vitrail Vision Transformer: embeddings, encoder, final LayerNorm and pooling.

    Returns a [`~transformers.modeling_outputs.BaseModelOutputWithPooling`] whose `last_hidden_state` holds every
    token `(batch, prefix + patches, hidden_size)` and whose `pooler_output` is the representation chosen by
    `config.pooling`, `(batch, config.pooled_size)`.

    Args:
        config ([`VitrailConfig`]): the model configuration.
        use_mask_token (`bool`, *optional*, defaults to `False`): add the learned mask token used by masked image
            modeling.
    """

    def __init__(self, config: VitrailConfig, use_mask_token: bool = False):
        super().__init__(config)
        self.embeddings = VitrailEmbeddings(config, use_mask_token=use_mask_token)
        self.encoder = VitrailEncoder(config)
        self.layernorm = make_norm(config, config.hidden_size) if config.final_norm else None
        self.attention_pool = VitrailAttentionPool(config) if config.pooling == "map" else None
        self.post_init()

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(B, N, D)` tokens -> the `(B, pooled_size)` vector the head reads; registers are never pooled, except by
        the attention-pooling head (`"map"`), which attends over every token."""
        patches = tokens[:, self.config.num_prefix_tokens :]
        if self.config.pooling == "cls":
            return tokens[:, 0]
        if self.config.pooling == "mean":
            return patches.mean(dim=1)
        if self.config.pooling == "map":
            return self.attention_pool(tokens)
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)  # "cls_mean"

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch, num_channels, height, width)`): the images, as the image
                processor makes them.
            bool_masked_pos (`torch.BoolTensor` of shape `(batch, num_patches)`, *optional*): patches to replace
                with the mask token (masked image modeling only).
            interpolate_pos_encoding (`bool`, *optional*): accept an input size other than `config.image_size` for
                this call (pad to whole patches, resample positions). Defaults to `config.dynamic_image_size`.
            output_attentions (`bool`, `int` or `list[int]`, *optional*): also return attention weights
                `(batch, heads, tokens, tokens)`, whatever the attention backend: `True` for every layer, or the
                indices of the layers wanted (`[-1]`: the last), which alone run eager attention while the others
                keep the configured kernel; the tuple has an entry per layer, `None` for those not chosen.
            output_hidden_states (`bool`, `int` or `list[int]`, *optional*): also return the embeddings (index 0)
                and each layer's output (index `i` for layer `i - 1`, before the final norm): `True` for all, or the
                indices wanted, with `None` in the other entries, as transformers' output capturing does.
            return_dict (`bool`, *optional*): return a `ModelOutput` (default) rather than a tuple.
        """
        attention_layers, hidden_layers = self._chosen_outputs(output_attentions, output_hidden_states)

        tokens, grid = self.embeddings(
            pixel_values,
            bool_masked_pos,
            dynamic_size=self._or_config(interpolate_pos_encoding, "dynamic_image_size"),
        )
        tokens, hidden_states, attentions = self.encoder(tokens, attention_layers, hidden_layers, grid=grid)
        if self.config.use_fc_norm:
            pooled = self.layernorm(self.pool(tokens))
        else:
            if self.layernorm is not None:  # none with `final_norm=False`
                tokens = self.layernorm(tokens)
            pooled = self.pool(tokens)

        output = BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=pooled, hidden_states=hidden_states, attentions=attentions
        )
        return self._as_requested(output, return_dict)


class VitrailBackbone(BackboneMixin, VitrailPreTrainedModel):
    r"""
    vitrail as a backbone for dense tasks (detection, segmentation, depth), in transformers' backbone API: the
    stages named by `config.out_features` / `config.out_indices` (`"stem"` for the embeddings, `"stage{i}"` for
    layer i's output) come back as `feature_maps`, each `(batch, hidden_size, rows, cols)` over the patch grid of
    the input (prefix tokens left out, final LayerNorm applied when `config.apply_layernorm`), or with
    `config.reshape_hidden_states=False` each `(batch, tokens, hidden_size)`, every token, prefix tokens first (as
    `Dinov2Backbone` gives DPT and Depth Anything). Only the layers up to the last stage any output needs are run. It has `VitrailModel`'s parameters, so any vitrail checkpoint
    (a classifier's or MIM model's head left out) loads into it.

    Args:
        config ([`VitrailConfig`]): the model configuration.

    Example:

    ```python
    >>> import torch
    >>> from vitrail import VitrailBackbone, VitrailConfig
    >>> backbone = VitrailBackbone(VitrailConfig.from_variant("Ti/16", out_indices=[4, 8, 12]))
    >>> [tuple(m.shape) for m in backbone(torch.zeros(1, 3, 224, 224)).feature_maps]  # 224 px, patch 16
    [(1, 192, 14, 14), (1, 192, 14, 14), (1, 192, 14, 14)]

    A checkpoint on the Hub opens the same way through `AutoBackbone.from_pretrained(repo, out_indices=...,
    trust_remote_code=True)`, without vitrail installed.
    ```
    """

    def __init__(self, config: VitrailConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = VitrailEmbeddings(config)
        self.encoder = VitrailEncoder(config)
        self.layernorm = make_norm(config, config.hidden_size) if config.final_norm else None
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch, num_channels, height, width)`): the images.
            output_hidden_states, output_attentions, return_dict, interpolate_pos_encoding: as in [`VitrailModel`]
                (hidden states and attentions asked for are computed even past the last feature map).
        """
        attention_layers, hidden_layers = self._chosen_outputs(output_attentions, output_hidden_states)
        stages = [self.stage_names.index(name) for name in self.out_features]
        depth = max([*stages, *(hidden_layers or ()), *(i + 1 for i in attention_layers or ())])

        tokens, grid = self.embeddings(
            pixel_values, dynamic_size=self._or_config(interpolate_pos_encoding, "dynamic_image_size")
        )
        _, states, attentions = self.encoder(
            tokens, attention_layers, (hidden_layers or frozenset()) | set(stages), depth, grid=grid
        )
        feature_maps = tuple(self._feature_map(states[stage], grid) for stage in stages)
        if hidden_layers is not None:
            hidden_layers = tuple(state if i in hidden_layers else None for i, state in enumerate(states))
        output = BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_layers, attentions=attentions)
        return self._as_requested(output, return_dict)

    def _feature_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.config.apply_layernorm and self.layernorm is not None:
            tokens = self.layernorm(tokens)
        if not self.config.reshape_hidden_states:
            return tokens  # (B, N, D), prefix tokens first: what DPT, Depth Anything and VitPose read
        patches = tokens[:, self.config.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid)  # (B, r * c, D) -> (B, D, r, c)


class VitrailForImageClassification(VitrailPreTrainedModel):
    r"""
    vitrail with a linear head on the pooled representation (`config.pooling`). With `labels`, the loss follows
    `config.problem_type`: cross-entropy for single-label, BCE-with-logits for multi-label, MSE for regression
    (inferred from `num_labels` and the label dtype when unset).

    Args:
        config ([`VitrailConfig`]): the model configuration; `num_labels`, `id2label` and `label2id` name the classes.
    """

    def __init__(self, config: VitrailConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vitrail = VitrailModel(config)
        self.classifier = self._new_head(config.pooled_size)
        self.distillation_classifier = (
            self._new_head(config.hidden_size) if config.use_distillation_token else None
        )
        self.post_init()

    def _new_head(self, width: int) -> nn.Module:
        labels = self.config.num_labels
        return nn.Linear(width, labels) if labels > 0 else nn.Identity()

    def reset_classifier(self, id2label: dict[int, str]) -> None:
        """Give the model a freshly initialised head for a new label set (everything else is kept)."""
        old, new = list(self.config.id2label.values()), list(id2label.values())
        logger.warning(
            f"The classification head, which predicts {len(old)} classes {old[:5]}, is re-initialised for "
            f"{len(new)} classes {new[:5]} (train it before use); every other weight is kept."
        )
        self.config.id2label = {int(k): v for k, v in id2label.items()}
        self.config.label2id = {v: k for k, v in self.config.id2label.items()}
        self.num_labels = self.config.num_labels
        reference = next(self.parameters())
        self.classifier = self._new_head(self.config.pooled_size)
        if self.distillation_classifier is not None:
            self.distillation_classifier = self._new_head(self.config.hidden_size)
        for head in (self.classifier, self.distillation_classifier):
            if head is not None:
                head.apply(self._init_weights)
                head.to(device=reference.device, dtype=reference.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VitrailImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch, num_channels, height, width)`): the images.
            labels (`torch.Tensor`, *optional*): class indices `(batch,)` for single-label classification, multi-hot
                floats `(batch, num_labels)` for multi-label, floats for regression.
            distillation_labels (`torch.Tensor`, *optional*): with a distillation token, the targets of the
                distillation head (a teacher's predictions, same format as `labels`); defaults to `labels`. The loss
                is the mean of the two heads' losses, DeiT's hard-distillation objective.
            interpolate_pos_encoding, output_attentions, output_hidden_states, return_dict: as in [`VitrailModel`].
        """
        distillation_labels = kwargs.pop("distillation_labels", None)
        outputs = self.vitrail(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        cls_logits = distillation_logits = None
        if self.distillation_classifier is not None:
            token = outputs.last_hidden_state[:, 1]  # [cls, distillation, ...]
            if self.config.use_fc_norm:  # the final norm is applied to pooled vectors only
                token = self.vitrail.layernorm(token)
            cls_logits, distillation_logits = logits, self.distillation_classifier(token)
            logits = (cls_logits + distillation_logits) / 2
        loss = None
        if labels is not None and distillation_logits is None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        elif labels is not None:
            targets = labels if distillation_labels is None else distillation_labels
            loss = (
                self.loss_function(labels, cls_logits, self.config, **kwargs)
                + self.loss_function(targets, distillation_logits, self.config, **kwargs)
            ) / 2
        output = VitrailImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
        )
        return self._as_requested(output, return_dict)


class VitrailForMaskedImageModeling(VitrailPreTrainedModel):
    r"""
    vitrail with the SimMIM decoder (Xie et al. 2021): masked patches are replaced by a learned mask token, and a
    1x1 convolution followed by a pixel shuffle predicts the pixels; the loss is the L1 error on masked pixels only.

    Args:
        config ([`VitrailConfig`]): the model configuration; `encoder_stride` must equal `patch_size`.
    """

    def __init__(self, config: VitrailConfig):
        super().__init__(config)
        if config.patch_hw != (config.encoder_stride, config.encoder_stride):
            raise ValueError(
                f"Masked image modeling reconstructs one patch per token, so `encoder_stride` "
                f"({config.encoder_stride}) must equal `patch_size` ({config.patch_size}); set both the same."
            )
        self.vitrail = VitrailModel(config, use_mask_token=True)
        self.decoder = nn.Sequential(
            nn.Conv2d(config.hidden_size, config.encoder_stride**2 * config.num_channels, kernel_size=1),
            nn.PixelShuffle(config.encoder_stride),
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedImageModelingOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch, num_channels, height, width)`): the images.
            bool_masked_pos (`torch.BoolTensor` of shape `(batch, num_patches)`, *optional*): the patches to hide;
                without it there is no loss, only a reconstruction.
            interpolate_pos_encoding, output_attentions, output_hidden_states, return_dict: as in [`VitrailModel`].
        """
        outputs = self.vitrail(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        batch, _, height, width = pixel_values.shape
        patch = self.config.encoder_stride
        rows, cols = -(-height // patch), -(-width // patch)
        tokens = outputs.last_hidden_state[:, self.config.num_prefix_tokens :]
        tokens = tokens.transpose(1, 2).reshape(batch, -1, rows, cols)  # (B, r * c, D) -> (B, D, r, c)
        reconstruction = self.decoder(tokens)[..., :height, :width]  # (B, D, r, c) -> (B, C, H, W)

        loss = None
        if bool_masked_pos is not None:
            mask = bool_masked_pos.reshape(batch, 1, rows, cols).to(reconstruction.dtype)
            mask = mask.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :height, :width]
            error = F.l1_loss(reconstruction, pixel_values.to(reconstruction.dtype), reduction="none")
            # Mean over masked pixels and channels; the epsilon keeps a batch with nothing masked at zero loss.
            loss = (error * mask).sum() / (mask.sum() * self.config.num_channels + 1e-5)

        output = MaskedImageModelingOutput(
            loss=loss,
            reconstruction=reconstruction,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return self._as_requested(output, return_dict)


VitrailModel.register_for_auto_class("AutoModel")
VitrailBackbone.register_for_auto_class("AutoBackbone")
VitrailForImageClassification.register_for_auto_class("AutoModelForImageClassification")
VitrailForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")

__all__ = [
    "VitrailImageClassifierOutput",
    "VitrailPreTrainedModel",
    "VitrailModel",
    "VitrailBackbone",
    "VitrailForImageClassification",
    "VitrailForMaskedImageModeling",
]
