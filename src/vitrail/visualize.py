"""What a vitrail model looks at: attention rollout and last-layer attention maps, drawn over the input image.

- Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): in each layer the heads
  are fused into one matrix (mean, max or min over heads), the identity is added for the residual connection and
  the rows are renormalised; the layers' matrices are then multiplied, first layer rightmost. Row i of the product
  says how much of token i's output comes from each input token.
- Last-layer maps: each head's attention weights in the last layer, as they are.

A map is a row of such a matrix, read for the query the classifier reads (`query="auto"`): the class token; the
mean of the patch queries for a mean-pooled model, which averages its patch tokens; both, equally, for
`pooling="cls_mean"`; the mean of the patch queries too for `pooling="map"`, whose learned pooling query is not a
token of the sequence; and with a distillation token, whose head's logits are averaged with the class head's, the
mean of that query and the distillation token's. Of the row only the patch columns are drawn: prefix tokens (class,
distillation, registers) have no place in the image, but they take part in the rollout, so attention that flows
through a register to a patch reaches the map. The share a map leaves on prefix tokens is reported.

Figures are drawn as `vitrail.plots` draws them, on a `Figure` with an Agg canvas, never through `pyplot`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .image_processing_vitrail import channel_statistic
from .plots import _new_figure, _save

__all__ = [
    "AttentionMaps",
    "HEAD_FUSIONS",
    "QUERIES",
    "TokenLayout",
    "attention_figure",
    "attention_maps",
    "attention_rollout",
    "fuse_heads",
    "model_view",
    "record_attentions",
    "save_attention_figure",
]

HEAD_FUSIONS = ("mean", "max", "min")
QUERIES = ("auto", "cls", "distillation", "patches")


@dataclass(frozen=True)
class TokenLayout:
    """Where tokens sit in a vitrail sequence, `[cls] [distillation] [registers...] patches`, for one input size.

    `grid` is the patch grid `(rows, cols)` of that input (padded up to whole patches when sizes are dynamic);
    `patch_hw` the patch size in pixels; `pooling` what the classifier reads (`config.pooling`).
    """

    use_cls_token: bool
    use_distillation_token: bool
    num_register_tokens: int
    grid: tuple[int, int]
    patch_hw: tuple[int, int]
    pooling: str

    @classmethod
    def from_config(cls, config, image_hw: Sequence[int]) -> TokenLayout:
        """The layout of `config`'s model for an input of `image_hw` pixels (the `pixel_values`' last two sides)."""
        patch_hw = config.patch_hw
        height, width = image_hw
        return cls(
            use_cls_token=config.use_cls_token,
            use_distillation_token=config.use_distillation_token,
            num_register_tokens=config.num_register_tokens,
            grid=(-(-height // patch_hw[0]), -(-width // patch_hw[1])),
            patch_hw=patch_hw,
            pooling=config.pooling,
        )

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.use_cls_token) + int(self.use_distillation_token) + self.num_register_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]

    def query(self, query: str = "auto") -> tuple[torch.Tensor, str]:
        """The query as weights over the `num_tokens` rows `(N,)`, summing to 1, and how a title says it.

        `"auto"` is what the classifier reads (see the module docstring); `"cls"`, `"distillation"` and
        `"patches"` (the mean of the patch queries) choose one.
        """
        if query not in QUERIES:
            raise ValueError(f"Unknown query {query!r}; choose one of {QUERIES}.")
        cls_row, distillation_row = 0, int(self.use_cls_token)
        patches = torch.zeros(self.num_tokens)
        patches[self.num_prefix_tokens :] = 1.0 / (self.num_tokens - self.num_prefix_tokens)

        def token(row: int) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.tensor(row), self.num_tokens).float()

        if query == "cls" or (query == "auto" and self.pooling == "cls"):
            if not self.use_cls_token:
                raise ValueError(
                    "This model has no class token (`use_cls_token=False`): use query='patches'."
                )
            weights, said = token(cls_row), "class token"
        elif query == "distillation":
            if not self.use_distillation_token:
                raise ValueError("This model has no distillation token: use query='cls' or 'patches'.")
            return token(distillation_row), "distillation token"
        elif query == "patches" or self.pooling in ("mean", "map"):
            weights, said = patches, "mean of the patch queries"
            if query == "auto" and self.pooling == "map":
                said += " (attention-pooled model: its learned pooling query is not a token of the sequence)"
            elif query == "auto":
                reason = "no class token" if not self.use_cls_token else "its class token is not read"
                said += f" (mean-pooled model, {reason})"
        else:  # auto with pooling="cls_mean": the head reads the class token and the patch mean side by side
            weights, said = (token(cls_row) + patches) / 2, "class token and mean of the patch queries"
        if query == "auto" and self.use_distillation_token:
            # Distilled models average the class head's and the distillation head's logits.
            weights, said = (
                (weights + token(distillation_row)) / 2,
                f"{said}, averaged with the distillation token",
            )
        return weights, said

    def patch_map(self, matrix: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`weights @ matrix`, the query's row of an `(..., N, N)` attention or rollout matrix, restricted to the patch
        columns and laid out on the grid: `(..., rows, cols)`, patches in row-major order as the model flattens them."""
        if matrix.shape[-1] != self.num_tokens or matrix.shape[-2] != self.num_tokens:
            raise ValueError(
                f"Expected attention over {self.num_tokens} tokens ({self.num_prefix_tokens} prefix + "
                f"{self.grid[0]}x{self.grid[1]} patches), got shape {tuple(matrix.shape)}."
            )
        row = torch.einsum("n,...nm->...m", weights.to(matrix), matrix)  # (..., N, N) -> (..., N)
        return row[..., self.num_prefix_tokens :].unflatten(-1, self.grid)  # (..., P) -> (..., rows, cols)


def _check_head_fusion(head_fusion: str) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"Unknown head_fusion {head_fusion!r}; choose one of {HEAD_FUSIONS}.")


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """`(..., heads, N, N)` -> `(..., N, N)`: the mean, max or min over the heads."""
    _check_head_fusion(head_fusion)
    reduce = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}[head_fusion]
    return reduce(attention, dim=-3)


def attention_rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of every layer's weights `(B, heads, N, N)`, first layer first:
    `(B, N, N)`, each row a distribution over the input tokens. Computed in float32 whatever the weights' dtype."""
    if not attentions or any(weights is None for weights in attentions):
        raise ValueError(
            "Attention rollout multiplies every layer's attention weights; run the model with "
            "`output_attentions=True` (all layers)."
        )
    rollout = None
    for weights in attentions:
        fused = fuse_heads(weights.float(), head_fusion)  # (B, h, N, N) -> (B, N, N)
        # Half of each token's output is its own input (the residual); max/min fusion rows need not sum to 1.
        mixed = fused + torch.eye(fused.shape[-1], device=fused.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


def record_attentions(model, pixel_values: torch.Tensor, all_layers: bool = True):
    """Run `model` once without gradients, keeping attention weights in `outputs.attentions`: every layer's
    (`all_layers=True`, which the rollout needs), else at least the last layer's."""
    # Asking for the last layer only keeps every other layer on the configured fused kernel.
    with torch.no_grad():
        return model(pixel_values=pixel_values, output_attentions=True if all_layers else [-1])


@dataclass
class AttentionMaps:
    """A batch's attention maps on the patch grid, and what they were read from.

    rollout (`torch.Tensor` of shape `(B, rows, cols)`, *optional*): the attention rollout's query row over the
        patches (None when not asked for). It sums to `1 - rollout_prefix_share`.
    rollout_prefix_share (`torch.Tensor` of shape `(B,)`, *optional*): the share of the rollout left on prefix
        tokens (class, distillation, registers), which the map does not draw.
    heads (`torch.Tensor` of shape `(B, heads, rows, cols)`): each head's last-layer attention of the query.
    layout (`TokenLayout`), query (`str`, how a title says it), head_fusion (`str`), num_layers (`int`).
    """

    rollout: torch.Tensor | None
    rollout_prefix_share: torch.Tensor | None
    heads: torch.Tensor
    layout: TokenLayout
    query: str
    head_fusion: str
    num_layers: int

    @classmethod
    def from_attentions(
        cls,
        attentions: Sequence[torch.Tensor | None],
        layout: TokenLayout,
        head_fusion: str = "mean",
        query: str = "auto",
        rollout: bool = True,
    ) -> AttentionMaps:
        """Maps from the weights a model returned (`outputs.attentions`, one `(B, heads, N, N)` per layer; with
        `rollout=False` only the last layer's is read)."""
        _check_head_fusion(head_fusion)
        weights, said = layout.query(query)
        if not attentions or attentions[-1] is None:
            raise ValueError(
                "No attention weights for the last layer: run the model with `output_attentions`."
            )
        rollout_map = (
            layout.patch_map(attention_rollout(attentions, head_fusion), weights) if rollout else None
        )
        return cls(
            rollout=rollout_map,
            rollout_prefix_share=None if rollout_map is None else 1.0 - rollout_map.sum(dim=(-2, -1)),
            heads=layout.patch_map(attentions[-1].float(), weights),
            layout=layout,
            query=said,
            head_fusion=head_fusion,
            num_layers=len(attentions),
        )


def attention_maps(
    model, pixel_values: torch.Tensor, head_fusion: str = "mean", query: str = "auto", rollout: bool = True
) -> AttentionMaps:
    """Attention maps of `model` (any vitrail model) for `pixel_values` `(B, C, H, W)`, as the image processor
    makes them: the rollout (unless `rollout=False`) and each head's last-layer map, for `query` (see
    `TokenLayout.query`). Non-square and, for `dynamic_image_size` models, any input sizes work."""
    outputs = record_attentions(model, pixel_values, all_layers=rollout)
    layout = TokenLayout.from_config(model.config, pixel_values.shape[-2:])
    return AttentionMaps.from_attentions(outputs.attentions, layout, head_fusion, query, rollout)


def model_view(pixel_values: torch.Tensor, processor=None) -> np.ndarray:
    """One processed image `(C, H, W)` back to what can be drawn: `(H, W)` grey or `(H, W, 3)` RGB in [0, 1], with
    the processor's normalisation undone (`image_mean`, `image_std`). More than 3 channels: the first three."""
    image = pixel_values.detach().float().cpu().numpy()
    channels = image.shape[0]
    if processor is not None and getattr(processor, "do_normalize", False):
        statistics = [
            channel_statistic(getattr(processor, name), name, channels)
            for name in ("image_mean", "image_std")
        ]
        mean, std = (np.broadcast_to(np.asarray(s, dtype=np.float32), (channels,)) for s in statistics)
        image = image * std[:, None, None] + mean[:, None, None]
    image = image[0] if channels < 3 else np.moveaxis(image[:3], 0, -1)  # (C, H, W) -> (H, W[, 3])
    return np.clip(image, 0.0, 1.0)


_PANEL_INCHES = 1.9
_MAX_COLUMNS = 6


def attention_figure(image: np.ndarray, maps: AttentionMaps, index: int = 0, title: str | None = None):
    """A figure of image `index` of the batch: the image as the model saw it, the rollout over it, then each head's
    last-layer map over it. Each map is coloured from 0 to its own maximum, one colour per patch; a dynamic-size
    input's padding is cut off.

    Args:
        image (`np.ndarray`): the input as drawn, `(H, W)` or `(H, W, 3)` in [0, 1] (`model_view` makes it from
            `pixel_values`); `H, W` are the sides the model was given.
        maps (`AttentionMaps`): the batch's maps.
        index (`int`): which image of the batch.
        title (`str`, *optional*): first line of the title (e.g. the file and the prediction); the query follows.

    Returns:
        `matplotlib.figure.Figure`
    """
    heads = maps.heads[index].numpy()
    panels = [("input", None)]
    if maps.rollout is not None:
        share = float(maps.rollout_prefix_share[index])
        note = f"\n{share:.1%} on prefix tokens (not drawn)" if maps.layout.num_prefix_tokens else ""
        panels.append((f"rollout ({maps.head_fusion} of heads){note}", maps.rollout[index].numpy()))
    last = maps.num_layers
    panels += [(f"layer {last}, head {h + 1}", heads[h]) for h in range(len(heads))]

    columns = min(len(panels), _MAX_COLUMNS)
    rows = math.ceil(len(panels) / columns)
    aspect = min(max(image.shape[0] / image.shape[1], 0.5), 2.0)  # panel height / width, within limits
    figure = _new_figure(columns * _PANEL_INCHES, rows * (_PANEL_INCHES * aspect + 0.35) + 0.45)
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat[len(panels) :]:
        axes.set_axis_off()
    for axes, (name, heat) in zip(grid.flat[: len(panels)], panels, strict=True):
        _draw(axes, image, heat, maps.layout)
        axes.set_title(name, fontsize=7)
    figure.suptitle(f"{title}\nquery: {maps.query}" if title else f"query: {maps.query}", fontsize=9)
    return figure


def _draw(axes, image: np.ndarray, heat: np.ndarray | None, layout: TokenLayout) -> None:
    height, width = image.shape[:2]
    # Small inputs (8x8 digits) are drawn as blocks; photos are smoothed when shrunk to the panel.
    smooth = "antialiased" if min(height, width) >= 64 else "nearest"
    axes.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, extent=(0, width, height, 0), interpolation=smooth)
    if heat is not None:
        rows, cols = heat.shape
        top = heat.max()
        extent = (
            0,
            cols * layout.patch_hw[1],
            rows * layout.patch_hw[0],
            0,
        )  # padded patches reach past H, W
        axes.imshow(
            heat / top if top > 0 else heat,
            cmap="inferno",
            vmin=0.0,
            vmax=1.0,
            alpha=0.6,
            extent=extent,
            interpolation="nearest",
        )
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()


def save_attention_figure(
    image: np.ndarray, maps: AttentionMaps, path, index: int = 0, title: str | None = None
) -> Path:
    """Write `attention_figure(image, maps, index, title)` as a PNG at `path` (parent folders are created)."""
    return _save(attention_figure(image, maps, index, title), path)
