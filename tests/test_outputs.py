"""Chosen-layer outputs: `output_attentions` / `output_hidden_states` as layer indices (transformers' convention),
eager attention only where weights are asked for, and the feature-extraction pipeline's pooling."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

import vitrail.modeling_vitrail
from vitrail import VitrailForImageClassification, VitrailImageProcessor, VitrailModel

from .conftest import tiny_config

DEPTH = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 4-layer classifier with weights far from the initialisation (so attention is far from uniform)."""
    path = tmp_path_factory.mktemp("outputs")
    model = VitrailForImageClassification(tiny_config(num_hidden_layers=DEPTH, num_labels=3))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture
def kernels(monkeypatch) -> dict:
    """Count the attention kernels that run: torch's fused sdpa entry point, and vitrail's eager function (which
    records the layer that called it)."""
    ran = {"sdpa": 0, "eager": []}
    fused, eager = (
        torch.nn.functional.scaled_dot_product_attention,
        vitrail.modeling_vitrail.eager_attention_forward,
    )

    def counted_sdpa(*args, **kwargs):
        ran["sdpa"] += 1
        return fused(*args, **kwargs)

    def counted_eager(module, *args, **kwargs):
        ran["eager"].append(module)
        return eager(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted_sdpa)
    monkeypatch.setattr(vitrail.modeling_vitrail, "eager_attention_forward", counted_eager)
    return ran


def eager_layers(model, ran) -> list[int]:
    layers = [layer.attention for layer in model.vitrail.encoder.layers]
    return [layers.index(module) for module in ran["eager"]]


@pytest.mark.parametrize(
    "chosen", [[-1], [0, 2], 1, [3, -1]], ids=["last", "first-and-third", "int", "twice"]
)
def test_chosen_attentions_are_eager_only_there(folder, pixels, kernels, chosen):
    """Under sdpa, `output_attentions=<indices>` runs eager attention in the chosen layers only (the others keep
    the fused kernel), returns their weights equal to an eager model's (1e-6), `None` for the other layers (as
    transformers fills unselected hidden states), and leaves the logits as they were."""
    sdpa = VitrailForImageClassification.from_pretrained(folder).eval()
    eager = VitrailForImageClassification.from_pretrained(folder, attn_implementation="eager").eval()
    assert sdpa.config._attn_implementation == "sdpa"
    wanted = sorted({i % DEPTH for i in ([chosen] if isinstance(chosen, int) else chosen)})
    with torch.no_grad():
        reference = eager(pixels, output_attentions=True).attentions
        plain = sdpa(pixels).logits
        kernels.update(sdpa=0, eager=[])
        out = sdpa(pixels, output_attentions=chosen)

    assert eager_layers(sdpa, kernels) == wanted
    assert kernels["sdpa"] == DEPTH - len(wanted)
    assert len(out.attentions) == DEPTH
    for index, weights in enumerate(out.attentions):
        if index in wanted:
            assert weights.shape == (3, 4, 226, 226)
            torch.testing.assert_close(weights, reference[index], atol=1e-6, rtol=0)
        else:
            assert weights is None, index
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=0)
    assert reference[0].std() > 1e-3  # the weights compared are far from uniform


def test_all_attentions_and_none(folder, pixels, kernels):
    """`True` keeps its meaning (every layer's weights, every layer eager); `False`, `None` and `[]` ask for none
    and run sdpa throughout."""
    model = VitrailForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        everything = model(pixels, output_attentions=True).attentions
        assert len(everything) == DEPTH and all(w.shape == (3, 4, 226, 226) for w in everything)
        assert eager_layers(model, kernels) == list(range(DEPTH)) and kernels["sdpa"] == 0
        for nothing in (False, None, []):
            kernels.update(sdpa=0, eager=[])
            assert model(pixels, output_attentions=nothing).attentions is None
            assert kernels == {"sdpa": DEPTH, "eager": []}


def test_eager_models_return_only_the_chosen_weights(folder, pixels):
    model = VitrailModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        everything = model(pixels, output_attentions=True).attentions
        chosen = model(pixels, output_attentions=[1]).attentions
    assert [w is None for w in chosen] == [True, False, True, True]
    assert torch.equal(chosen[1], everything[1])


@pytest.mark.parametrize("chosen", [[0, 2, -1], 3, [-5], range(5)], ids=["list", "int", "negative", "range"])
def test_chosen_hidden_states_follow_transformers(folder, pixels, chosen):
    """transformers' convention (its common test `test_can_capture_specific_layers_hidden_states`): as many
    entries as `output_hidden_states=True` gives (embeddings, then each layer), the chosen ones equal to those,
    the others `None`; negative indices count from the end."""
    model = VitrailModel.from_pretrained(folder).eval()
    with torch.no_grad():
        everything = model(pixels, output_hidden_states=True).hidden_states
        out = model(pixels, output_hidden_states=chosen)
    assert len(everything) == DEPTH + 1
    kept = {i % (DEPTH + 1) for i in ([chosen] if isinstance(chosen, int) else chosen)}
    assert len(out.hidden_states) == DEPTH + 1
    for index, state in enumerate(out.hidden_states):
        if index in kept:
            assert torch.equal(state, everything[index]), index
        else:
            assert state is None, index


def test_heads_and_tuples_pass_the_choice_on(folder, pixels):
    model = VitrailForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(pixels, output_hidden_states=[-1], output_attentions=[-1])
        logits, hidden_states, attentions = model(
            pixels, output_hidden_states=[-1], output_attentions=[-1], return_dict=False
        )
    assert torch.equal(logits, out.logits)
    assert [h is None for h in hidden_states] == [True] * DEPTH + [False]
    assert [a is None for a in attentions] == [True] * (DEPTH - 1) + [False]
    assert torch.equal(attentions[-1], out.attentions[-1])


@pytest.mark.parametrize(
    "argument, value, match",
    [
        (
            "output_attentions",
            [4],
            r"output_attentions=\[4\]`: \[4\] cannot index the 4 entries.* from -4 to 3",
        ),
        ("output_attentions", [-5, 0], r"\[-5\] cannot index the 4 entries"),
        ("output_hidden_states", 5, r"output_hidden_states=5`: \[5\] cannot index the 5 entries.*-5 to 4"),
        ("output_hidden_states", ["last"], r"\['last'\] cannot index"),
        ("output_attentions", [True], r"\[True\] cannot index"),
    ],
)
def test_indices_out_of_range_are_refused(folder, pixels, argument, value, match):
    """transformers silently selects nothing for an index out of range; vitrail names it and the valid range."""
    model = VitrailModel.from_pretrained(folder).eval()
    with pytest.raises(ValueError, match=match):
        model(pixels, **{argument: value})


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pooling="mean", use_cls_token=False, num_register_tokens=2),
        dict(pooling="cls_mean", num_register_tokens=1),
        dict(pooling="mean", use_fc_norm=True),
    ],
    ids=["mean-registers", "cls_mean", "fc_norm"],
)
def test_feature_extraction_pipeline_pools_as_the_model_does(overrides, tmp_path):
    """`pool=True` returns vitrail's `pooler_output` (the pooling `config.pooling` names, registers left out,
    the final norm where `use_fc_norm` puts it), recomputed here from the tokens; `pool=False` every token."""
    config = tiny_config(**overrides)
    model = VitrailModel(config).eval()
    model.save_pretrained(tmp_path)
    VitrailImageProcessor(size={"height": 30, "width": 30}).save_pretrained(tmp_path)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8))
    extract = pipeline("image-feature-extraction", model=str(tmp_path))
    pooled = torch.tensor(extract(image, pool=True))
    tokens = torch.tensor(extract(image))

    pixel_values = VitrailImageProcessor(size={"height": 30, "width": 30})(
        image, return_tensors="pt"
    ).pixel_values
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=[-1])
        last = out.hidden_states[-1]  # before the final norm
        patches = last[:, config.num_prefix_tokens :].mean(dim=1)
        if config.pooling == "mean" and config.use_fc_norm:
            expected = model.layernorm(patches)
        elif config.pooling == "mean":
            expected = model.layernorm(last)[:, config.num_prefix_tokens :].mean(dim=1)
        else:
            normed = model.layernorm(last)
            expected = torch.cat([normed[:, 0], normed[:, config.num_prefix_tokens :].mean(dim=1)], dim=-1)
    assert pooled.shape == (1, config.pooled_size)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, out.last_hidden_state, atol=1e-5, rtol=0)
