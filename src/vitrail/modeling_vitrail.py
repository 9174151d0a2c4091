"""vitrail's Vision Transformer: ViT = Transformer(Patch(x)).

Patch embedding (a Conv2d with kernel = stride = patch) -> prefix tokens and positions -> pre-norm Transformer
layers (attention `softmax(QK^T / sqrt(d)) V`, then an MLP) -> final LayerNorm -> pooling -> heads.

This file travels to the Hub with every checkpoint: it imports only torch, transformers and
`configuration_vitrail`, and knows nothing of the rest of vitrail (the package adds conversion, new image sizes
and label sets on loading through `VitrailPreTrainedModel.pretrained_loader`). Parameter names are the checkpoint
format; the README lists them.

Layout choices were measured on a 2-core CPU at ViT-B/16 shapes (`python scripts/benchmark_layout.py`): one fused
`qkv` projection and three separate ones, and adding positions before or after the prefix tokens are
concatenated, run within noise of each other. The fused `(3D, D)` projection is kept because it is one tensor,
as in timm and big_vision; the conversion tables split or join it for other layouts.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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


class VitrailPatchEmbeddings(nn.Module):
    """Turns `(B, C, H, W)` images into `(B, rows * cols, hidden)` patch tokens with one strided convolution."""

    def __init__(self, config: VitrailConfig):
        super().__init__()
        self.image_hw = config.image_hw
        self.patch_hw = config.patch_hw
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=self.patch_hw, stride=self.patch_hw
        )

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
        return patches.flatten(2).transpose(1, 2), grid  # (B, D, r, c) -> (B, r * c, D)


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
        return self.dropout(tokens), grid


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
    """Multi-head self-attention with one fused qkv projection; the kernel comes from transformers' registry."""

    is_causal = False

    def __init__(self, config: VitrailConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.dropout_p = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        # Unbinding the `3` axis in place, then moving heads forward, makes the same views as a permute of the
        # whole tensor, but backward stacks the three gradients straight into the (B, N, 3, h, d) layout of the
        # projection's output: one copy of it per layer instead of two (stack, then reshape a permuted tensor).
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, N, 3, h, d) -> 3 x (B, h, N, d)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)

        # Fused kernels (sdpa, flash) never materialise the weights; asking for them switches this call to eager.
        # Looked up on every call, so `model.set_attn_implementation(...)` takes effect at once (transformers also
        # reads this very call in the source to decide that vitrail supports switching).
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        dropout = self.dropout_p if self.training else 0.0
        output, weights = attention(
            self, query, key, value, None, dropout=dropout, scaling=self.scaling, is_causal=False
        )
        output = output.reshape(batch, tokens, width)  # (B, N, h, d) -> (B, N, D)
        return self.proj(output), (weights if output_attentions else None)


class VitrailMLP(nn.Module):
    """Two linear layers with the configured activation between them; with `mlp_type="swiglu"`, fc1 makes a gate
    and a value half and the activated gate multiplies the value (a gated linear unit)."""

    def __init__(self, config: VitrailConfig):
        super().__init__()
        self.gated = config.mlp_type == "swiglu"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size * (2 if self.gated else 1))
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        if self.gated:
            gate, value = hidden_states.chunk(2, dim=-1)  # (B, N, 2H) -> 2 x (B, N, H)
            return self.fc2(self.act(gate) * value)
        return self.fc2(self.act(hidden_states))


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
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = VitrailAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VitrailMLP(config)
        layer_scale = config.layer_scale_init_value is not None
        self.layer_scale1 = VitrailLayerScale(config) if layer_scale else nn.Identity()
        self.layer_scale2 = VitrailLayerScale(config) if layer_scale else nn.Identity()
        self.drop_path = VitrailDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(self.norm1(hidden_states), output_attentions)
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
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([VitrailLayer(config, rate) for rate in rates])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_layers: frozenset[int] | None = None,
        hidden_layers: frozenset[int] | None = None,
        depth: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...] | None, tuple[torch.Tensor | None, ...] | None]:
        """Run the first `depth` layers (all by default), the ones in `attention_layers` with eager attention so
        that they return their weights. Returns the last output, then the hidden states (index 0 the input, `i`
        the output of layer `i - 1`) chosen by `hidden_layers` and the weights of `attention_layers`: one entry per
        index, `None` where not chosen (transformers' convention), or `None` instead of a tuple when none is. Only
        chosen tensors are kept, so memory does not grow with depth."""
        chosen_attentions, chosen_hidden = attention_layers or frozenset(), hidden_layers or frozenset()
        states = [hidden_states if 0 in chosen_hidden else None]
        weights = []
        for index, layer in enumerate(self.layers[:depth]):
            hidden_states, layer_weights = layer(hidden_states, index in chosen_attentions)
            states.append(hidden_states if index + 1 in chosen_hidden else None)
            weights.append(layer_weights)
        unrun = len(self.layers) - len(weights)
        states = tuple(states) + (None,) * unrun if hidden_layers else None
        weights = tuple(weights) + (None,) * unrun if attention_layers else None
        return hidden_states, states, weights


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
_HEAD_PART = re.compile(r"((?:distillation_)?classifier|decoder)\..+|(?:vitrail\.)?embeddings\.(mask_token)")


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


class VitrailPreTrainedModel(PreTrainedModel):
    """Weight initialisation, attention-backend flags and Hub-ready saving shared by all vitrail models."""

    config_class = VitrailConfig
    config: VitrailConfig
    base_model_prefix = "vitrail"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["VitrailEmbeddings", "VitrailLayer"]
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
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
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
        elif isinstance(module, VitrailLayerScale):
            init.constant_(module.scale, self.config.layer_scale_init_value)

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
                parts.setdefault(part.group(1) or part.group(2), set()).add(name)
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
        processor_code = Path(__file__).with_name(_PROCESSOR_FILE)
        if processor_code.exists():
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
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(B, N, D)` tokens -> the `(B, pooled_size)` vector the head reads; registers are never pooled."""
        patches = tokens[:, self.config.num_prefix_tokens :]
        if self.config.pooling == "cls":
            return tokens[:, 0]
        if self.config.pooling == "mean":
            return patches.mean(dim=1)
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

        tokens, _ = self.embeddings(
            pixel_values,
            bool_masked_pos,
            dynamic_size=self._or_config(interpolate_pos_encoding, "dynamic_image_size"),
        )
        tokens, hidden_states, attentions = self.encoder(tokens, attention_layers, hidden_layers)
        if self.config.use_fc_norm:
            pooled = self.layernorm(self.pool(tokens))
        else:
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
    >>> from transformers import AutoBackbone
    >>> # A Hub repo (transformers 5.24's AutoBackbone misses local folders); trust_remote_code=True without vitrail
    >>> backbone = AutoBackbone.from_pretrained("you/my-vit", out_indices=[4, 8, 12])
    >>> [tuple(m.shape) for m in backbone(pixel_values).feature_maps]  # 224 px, patch 16
    [(1, 768, 14, 14), (1, 768, 14, 14), (1, 768, 14, 14)]
    ```
    """

    def __init__(self, config: VitrailConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = VitrailEmbeddings(config)
        self.encoder = VitrailEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
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
            tokens, attention_layers, (hidden_layers or frozenset()) | set(stages), depth
        )
        feature_maps = tuple(self._feature_map(states[stage], grid) for stage in stages)
        if hidden_layers is not None:
            hidden_layers = tuple(state if i in hidden_layers else None for i, state in enumerate(states))
        output = BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_layers, attentions=attentions)
        return self._as_requested(output, return_dict)

    def _feature_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.config.apply_layernorm:
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
