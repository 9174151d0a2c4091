"""vitrail.visualize: the rollout's maths on hand-made attention, maps for every token layout, and the pictures."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config
from vitrail import VitrailForImageClassification, VitrailImageProcessor
from vitrail.visualize import (
    AttentionMaps,
    TokenLayout,
    attention_figure,
    attention_maps,
    attention_rollout,
    fuse_heads,
    model_view,
    record_attentions,
    save_attention_figure,
)


def layout(cls=True, distillation=False, registers=0, grid=(1, 2), pooling="cls") -> TokenLayout:
    return TokenLayout(cls, distillation, registers, grid, (4, 4), pooling)


def one_hot_attention(targets: list[int], heads: int = 1) -> torch.Tensor:
    """`(1, heads, N, N)` weights in which token i attends only to token `targets[i]`."""
    rows = torch.nn.functional.one_hot(torch.tensor(targets), len(targets)).float()
    return rows.expand(1, heads, -1, -1)


# ---- the maths ---------------------------------------------------------------------------------------------


def test_identity_attention_rolls_out_to_the_identity():
    eye = torch.eye(7).expand(2, 3, 7, 7)
    for fusion in ("mean", "max", "min"):
        assert torch.equal(attention_rollout([eye] * 4, fusion), torch.eye(7).expand(2, 7, 7))


def test_uniform_attention_rolls_out_to_its_closed_form():
    # Each layer is (U + I) / 2 with U uniform; U @ U = U, so L layers give I / 2^L + (1 - 1 / 2^L) U.
    n, depth = 5, 3
    uniform = torch.full((1, 2, n, n), 1.0 / n)
    expected = torch.eye(n) / 2**depth + (1 - 1 / 2**depth) * torch.full((n, n), 1.0 / n)
    torch.testing.assert_close(attention_rollout([uniform] * depth)[0], expected, rtol=0, atol=1e-6)


def test_a_one_hot_chain_gives_the_hand_computed_map():
    # [cls, p1, p2]. Layer 1: everyone attends p2; layer 2: everyone attends p1. With the residual, the class
    # token's row is (e0 + e1) / 2 after layer 2 applied to rows (e0 + e2) / 2 and (e1 + e2) / 2 of layer 1:
    # 1/4 e0 + 1/4 e1 + 1/2 e2.
    tokens = layout(grid=(1, 2))
    rollout = attention_rollout([one_hot_attention([2, 2, 2]), one_hot_attention([1, 1, 1])])
    torch.testing.assert_close(rollout[0, 0], torch.tensor([0.25, 0.25, 0.5]))
    maps = AttentionMaps.from_attentions(
        [one_hot_attention([2, 2, 2]), one_hot_attention([1, 1, 1])], tokens, query="cls"
    )
    torch.testing.assert_close(maps.rollout[0], torch.tensor([[0.25, 0.5]]))
    torch.testing.assert_close(maps.rollout_prefix_share, torch.tensor([0.25]))
    torch.testing.assert_close(maps.heads[0, 0], torch.tensor([[1.0, 0.0]]))  # the last layer alone: p1


def test_registers_are_counted_in_the_rollout_but_not_drawn():
    # [cls, register, p1, p2]. Layer 1: the register attends p2 (others themselves); layer 2: cls attends the
    # register. cls's row: 1/2 e_cls + 1/2 (1/2 e_reg + 1/2 e_p2): p2 is reached only through the register.
    tokens = layout(registers=1, grid=(2, 1))
    attentions = [one_hot_attention([0, 3, 2, 3]), one_hot_attention([1, 1, 2, 3])]
    maps = AttentionMaps.from_attentions(attentions, tokens, query="cls")
    torch.testing.assert_close(maps.rollout[0], torch.tensor([[0.0], [0.25]]))
    torch.testing.assert_close(maps.rollout_prefix_share, torch.tensor([0.75]))  # cls 1/2 + register 1/4
    assert (
        maps.heads.shape == (1, 1, 2, 1) and maps.heads.sum() == 0
    )  # the last layer's cls looks at the register


def test_head_fusion_mean_max_min_by_hand():
    heads = torch.tensor([[[0.8, 0.2], [0.4, 0.6]], [[0.2, 0.8], [0.6, 0.4]]]).unsqueeze(0)  # (1, 2, 2, 2)
    torch.testing.assert_close(fuse_heads(heads, "max")[0], torch.tensor([[0.8, 0.8], [0.6, 0.6]]))
    # Fused, plus the identity, rows renormalised:
    expected = {
        "mean": [[0.75, 0.25], [0.25, 0.75]],  # [[1.5, .5], [.5, 1.5]] / 2
        "max": [[9 / 13, 4 / 13], [3 / 11, 8 / 11]],  # [[1.8, .8], [.6, 1.6]] / (2.6, 2.2)
        "min": [[6 / 7, 1 / 7], [2 / 9, 7 / 9]],  # [[1.2, .2], [.4, 1.4]] / (1.4, 1.8)
    }
    for fusion, rows in expected.items():
        torch.testing.assert_close(attention_rollout([heads], fusion)[0], torch.tensor(rows))


def test_bad_arguments_are_refused_by_name():
    weights = one_hot_attention([0, 1, 2])
    with pytest.raises(ValueError, match="head_fusion 'median'"):
        attention_rollout([weights], "median")
    with pytest.raises(ValueError, match="head_fusion 'median'"):
        AttentionMaps.from_attentions([weights], layout(), head_fusion="median", rollout=False)
    with pytest.raises(ValueError, match="every layer"):
        attention_rollout([None, weights])
    with pytest.raises(ValueError, match="query 'register'"):
        layout().query("register")
    with pytest.raises(ValueError, match="no class token"):
        layout(cls=False, pooling="mean").query("cls")
    with pytest.raises(ValueError, match="no distillation token"):
        layout().query("distillation")
    with pytest.raises(ValueError, match=r"3 tokens \(1 prefix \+ 1x2 patches\)"):
        layout().patch_map(torch.zeros(1, 4, 4), torch.ones(3))


def test_patches_are_laid_out_row_major_on_a_non_square_grid():
    tokens = layout(grid=(2, 3))
    targets = [6, 1, 2, 3, 4, 5, 6]  # cls attends only to patch 5 = row 1, column 2
    maps = AttentionMaps.from_attentions([one_hot_attention(targets, heads=2)], tokens, rollout=False)
    assert maps.rollout is None
    expected = torch.zeros(2, 3)
    expected[1, 2] = 1.0
    assert torch.equal(maps.heads[0, 0], expected) and torch.equal(maps.heads[0, 1], expected)


@pytest.mark.parametrize(
    "tokens, weights, said",
    [
        (layout(), [1, 0, 0], "class token"),
        (
            layout(cls=False, pooling="mean"),
            [0.5, 0.5],
            "mean of the patch queries (mean-pooled model, no class",
        ),
        (layout(pooling="mean"), [0, 0.5, 0.5], "(mean-pooled model, its class token is not read)"),
        (layout(pooling="cls_mean"), [0.5, 0.25, 0.25], "class token and mean of the patch queries"),
        (layout(distillation=True), [0.5, 0.5, 0, 0], "class token, averaged with the distillation token"),
        (layout(registers=2, pooling="mean", grid=(2, 1)), [0, 0, 0, 0.5, 0.5], "mean of the patch queries"),
    ],
    ids=["cls", "mean-no-cls", "mean-with-cls", "cls_mean", "distillation", "registers"],
)
def test_auto_query_is_what_the_classifier_reads(tokens, weights, said):
    query, description = tokens.query("auto")
    torch.testing.assert_close(query, torch.tensor(weights, dtype=torch.float32))
    assert said in description


# ---- real models: every token layout, non-square and dynamic sizes -------------------------------------------

LAYOUTS = {
    "cls": {},
    "distillation": dict(use_distillation_token=True),
    "registers": dict(num_register_tokens=3),
    "distillation+registers": dict(
        use_distillation_token=True, num_register_tokens=2, prefix_position_embeddings="all"
    ),
    "mean-no-cls": dict(pooling="mean", use_cls_token=False),
    "cls_mean": dict(pooling="cls_mean"),
}


@pytest.mark.parametrize("overrides", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize(
    "image_size, dynamic, input_hw, grid",
    [((12, 20), False, (12, 20), (3, 5)), (16, True, (14, 22), (4, 6))],
    ids=["non-square", "dynamic"],
)
def test_maps_for_every_token_layout(overrides, image_size, dynamic, input_hw, grid):
    config = tiny_config(
        image_size=image_size, patch_size=4, dynamic_image_size=dynamic, num_labels=3, **overrides
    )
    model = VitrailForImageClassification(config).eval()
    pixels = torch.randn(2, 3, *input_hw)
    maps = attention_maps(model, pixels)
    assert maps.layout.grid == grid
    assert maps.rollout.shape == (2, *grid) and maps.heads.shape == (2, 4, *grid)
    assert maps.num_layers == 2 and (maps.rollout >= 0).all()
    # The rollout's rows are distributions: what the map does not hold lies on prefix tokens.
    torch.testing.assert_close(maps.rollout.sum(dim=(1, 2)) + maps.rollout_prefix_share, torch.ones(2))
    if config.num_prefix_tokens == 0:
        torch.testing.assert_close(maps.rollout_prefix_share, torch.zeros(2), rtol=0, atol=1e-6)
    else:
        assert (maps.rollout_prefix_share > 0.01).all()

    # Under the default sdpa backend the weights are real: the same maps as eager attention gives.
    model.set_attn_implementation("eager")
    eager = attention_maps(model, pixels)
    torch.testing.assert_close(maps.rollout, eager.rollout, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps.heads, eager.heads, rtol=0, atol=1e-6)

    heads_only = attention_maps(model, pixels, head_fusion="max", rollout=False)
    assert heads_only.rollout is None and torch.equal(heads_only.heads, eager.heads)


# ---- pictures ------------------------------------------------------------------------------------------------


def test_model_view_undoes_the_normalisation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
    processor = VitrailImageProcessor(
        size={"height": 10, "width": 14}, image_mean=[0.2, 0.4, 0.6], image_std=0.3
    )
    pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
    np.testing.assert_allclose(model_view(pixels, processor), image / 255.0, atol=1e-6)
    gray = VitrailImageProcessor(size={"height": 10, "width": 14}, num_channels=1)
    assert model_view(gray(images=image, return_tensors="pt")["pixel_values"][0], gray).shape == (10, 14)


@pytest.mark.parametrize(
    "overrides, channels, input_hw, panels",
    [
        (dict(image_size=8, patch_size=2, pooling="mean", use_cls_token=False, num_channels=1), 1, (8, 8), 6),
        (dict(image_size=16, patch_size=4, dynamic_image_size=True, num_register_tokens=2), 3, (14, 22), 6),
    ],
    ids=["digits-like", "rgb-dynamic-registers"],
)
def test_attention_figure_is_written(tmp_path, overrides, channels, input_hw, panels):
    pyplot_was_loaded = "matplotlib.pyplot" in sys.modules
    model = VitrailForImageClassification(tiny_config(num_labels=3, **overrides)).eval()
    pixels = torch.rand(2, channels, *input_hw)
    maps = attention_maps(model, pixels)
    figure = attention_figure(model_view(pixels[1]), maps, index=1, title="two.png: 7 (91%)")
    drawn = [axes for axes in figure.axes if axes.images]
    assert len(drawn) == panels  # input, rollout, 4 heads
    suptitle = figure.get_suptitle()
    assert suptitle.startswith("two.png: 7 (91%)\nquery: ")
    if not model.config.use_cls_token:
        assert "mean of the patch queries (mean-pooled model, no class token)" in suptitle
    height, width = input_hw
    for axes in drawn:
        assert axes.get_xlim() == (0, width) and axes.get_ylim() == (
            height,
            0,
        )  # dynamic sizes: padding cut off
    overlay = drawn[1].images[1]  # the rollout over the input: 0 to its maximum, one colour per patch
    np.testing.assert_allclose(overlay.get_array(), maps.rollout[1] / maps.rollout[1].max(), rtol=1e-6)
    assert overlay.get_interpolation() == "nearest"
    rollout_title = drawn[1].get_title()
    assert rollout_title.startswith("rollout (mean of heads)")
    if model.config.num_prefix_tokens:  # the share left on the registers, to a tenth of a percent
        assert rollout_title.endswith(
            f"\n{float(maps.rollout_prefix_share[1]):.1%} on prefix tokens (not drawn)"
        )

    path = save_attention_figure(model_view(pixels[1]), maps, tmp_path / "maps" / "two.png", index=1)
    width, height = (round(side * figure.dpi) for side in figure.get_size_inches())
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (width, height)
        low, high = png.convert("L").getextrema()
        assert high - low > 100  # something is drawn
    assert pyplot_was_loaded or "matplotlib.pyplot" not in sys.modules  # global matplotlib state left alone


def test_last_layer_maps_leave_the_other_layers_on_the_fused_kernel(monkeypatch):
    """Without the rollout only the last layer's weights are asked for: the layers before it keep running sdpa
    (torch's kernel counted), their entries are None, and the head maps equal eager attention's."""
    model = VitrailForImageClassification(tiny_config(num_hidden_layers=3, num_labels=3)).eval()
    pixels = torch.randn(2, 3, 30, 30)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs),
    )
    outputs = record_attentions(model, pixels, all_layers=False)
    assert len(calls) == 2  # layers 1 and 2 fused; layer 3 eager
    assert outputs.attentions[0] is None and outputs.attentions[1] is None
    assert outputs.attentions[2].shape == (2, 4, 226, 226)
    fused = attention_maps(model, pixels, rollout=False)
    model.set_attn_implementation("eager")
    eager = attention_maps(model, pixels, rollout=False)
    assert fused.rollout is None
    torch.testing.assert_close(fused.heads, eager.heads, rtol=0, atol=1e-6)
