"""The model: shapes, save/load, attention backends, checkpointing, each config option, HF parity, errors."""

import json

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    pipeline,
)

import vitrail.modeling_vitrail
from vitrail import (
    VitrailForImageClassification,
    VitrailForMaskedImageModeling,
    VitrailImageProcessor,
    VitrailModel,
)
from vitrail.convert import convert_hf_state_dict
from vitrail.modeling_vitrail import sincos_2d_position_embeddings

from .conftest import tiny_config

HEADS = [VitrailModel, VitrailForImageClassification, VitrailForMaskedImageModeling]


def main_output(model, outputs):
    if isinstance(model, VitrailForImageClassification):
        return outputs.logits
    if isinstance(model, VitrailForMaskedImageModeling):
        return outputs.reconstruction
    return outputs.last_hidden_state


# ---- shapes ---------------------------------------------------------------------------------------------------


def test_shapes_of_every_head(config, pixels):
    base = VitrailModel(config).eval()
    out = base(pixels, output_hidden_states=True, output_attentions=True)
    assert out.last_hidden_state.shape == (3, 1 + 225, 32)
    assert out.pooler_output.shape == (3, 32)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (3, 226, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, 226, 226)

    logits = VitrailForImageClassification(config).eval()(pixels).logits
    assert logits.shape == (3, 5)

    mask = torch.zeros(3, 225, dtype=torch.bool)
    mask[:, ::3] = True
    mim = VitrailForMaskedImageModeling(config).eval()(pixels, bool_masked_pos=mask)
    assert mim.reconstruction.shape == pixels.shape and mim.loss.ndim == 0 and mim.loss > 0


def test_tuple_outputs(config, pixels):
    model = VitrailForImageClassification(config).eval()
    as_tuple = model(pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(pixels).logits)


# ---- save / load --------------------------------------------------------------------------------------------


OPTIONS = dict(
    position_embedding_type="sincos2d", num_register_tokens=2, layer_scale_init_value=0.1, qk_norm=True
)


@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["default", "sincos-registers-layerscale-qknorm"])
@pytest.mark.parametrize("cls", HEADS)
def test_save_load_gives_identical_outputs(cls, options, pixels, tmp_path):
    """Every tensor round-trips, including the sin-cos table that is recomputed rather than saved."""
    model = cls(tiny_config(num_labels=5, **options)).eval()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_vitrail.py", "modeling_vitrail.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    loaded = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(main_output(model, model(pixels)), main_output(loaded, loaded(pixels)))


def test_auto_map_covers_every_auto_class(config, tmp_path):
    VitrailForImageClassification(config).save_pretrained(tmp_path)
    auto_map = VitrailForImageClassification.config_class.from_pretrained(tmp_path).auto_map
    assert auto_map == {
        "AutoConfig": "configuration_vitrail.VitrailConfig",
        "AutoModel": "modeling_vitrail.VitrailModel",
        "AutoBackbone": "modeling_vitrail.VitrailBackbone",
        "AutoModelForImageClassification": "modeling_vitrail.VitrailForImageClassification",
        "AutoImageProcessor": "image_processing_vitrail.VitrailImageProcessor",
    }
    assert (tmp_path / "image_processing_vitrail.py").exists()


def test_auto_classes_open_vitrail_checkpoints(config, pixels, tmp_path):
    classifier = VitrailForImageClassification(config).eval()
    classifier.save_pretrained(tmp_path)
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path)) is VitrailForImageClassification
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert type(backbone) is VitrailModel
    with torch.no_grad():
        pooled = backbone(pixels).pooler_output
        assert torch.equal(classifier.classifier(pooled), classifier(pixels).logits)
    VitrailForMaskedImageModeling(config).save_pretrained(tmp_path / "mim")
    assert (
        type(AutoModelForMaskedImageModeling.from_pretrained(tmp_path / "mim"))
        is VitrailForMaskedImageModeling
    )


def pickle_only_folder(model, folder):
    """A vitrail folder whose weights are only a pickled `pytorch_model.bin` (as older tools write)."""
    model.save_pretrained(folder)
    VitrailImageProcessor(size={"height": 30, "width": 30}).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize(
    "load",
    [
        VitrailForImageClassification.from_pretrained,
        VitrailModel.from_pretrained,
        AutoModelForImageClassification.from_pretrained,
        AutoModel.from_pretrained,
        lambda folder, **kw: pipeline("image-classification", model=str(folder), model_kwargs=kw).model,
    ],
    ids=["class", "backbone-class", "AutoModelForImageClassification", "AutoModel", "pipeline"],
)
def test_pickled_weights_need_allow_pickle(load, config, pixels, tmp_path):
    """One policy on every load path of an installed vitrail: pickles are refused, naming the opt-in."""
    model = VitrailForImageClassification(config).eval()
    folder = pickle_only_folder(model, tmp_path / "pickled")
    # (the pipeline wraps each class's loading error, text included, in a ValueError)
    with pytest.raises(
        (OSError, ValueError), match=r"only pickled ones \(pytorch_model.bin\).*allow_pickle=True"
    ):
        load(folder)
    loaded = load(folder, allow_pickle=True).eval()
    with torch.no_grad():
        want = model(pixels) if hasattr(loaded, "classifier") else model.vitrail(pixels)
        got = loaded(pixels)
    assert torch.equal(main_output(loaded, got), main_output(loaded, want))


def test_use_safetensors_false_is_not_an_opt_in(config, tmp_path):
    folder = pickle_only_folder(VitrailForImageClassification(config), tmp_path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        VitrailForImageClassification.from_pretrained(folder, use_safetensors=False)


def test_a_folder_without_weights_says_so(config, tmp_path):
    VitrailForImageClassification(config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match="holds no weights"):
        VitrailForImageClassification.from_pretrained(tmp_path)


def test_saved_auto_map_names_only_code_the_folder_carries(config, tmp_path, monkeypatch, caplog):
    """With the processor's code file at hand, it is copied and mapped; without it (as Hub-carried code can be),
    `AutoImageProcessor` is left out instead of naming a file that is not there, even if the loaded config
    mapped it."""
    model = VitrailForImageClassification(config)
    model.save_pretrained(tmp_path / "full")
    loaded = VitrailForImageClassification.from_pretrained(tmp_path / "full")
    assert "AutoImageProcessor" in loaded.config.auto_map
    monkeypatch.setattr(vitrail.modeling_vitrail, "_PROCESSOR_FILE", "not_here.py")
    loaded.save_pretrained(tmp_path / "alone")
    auto_map = json.loads((tmp_path / "alone" / "config.json").read_text())["auto_map"]
    files = {p.name for p in (tmp_path / "alone").iterdir() if p.suffix == ".py"}
    assert "AutoImageProcessor" not in auto_map and "not_here.py" in caplog.text
    assert {f"{ref.split('.')[0]}.py" for ref in auto_map.values()} <= files
    assert files == {"configuration_vitrail.py", "modeling_vitrail.py"}


# ---- attention backends -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, dict(qk_norm=True, num_register_tokens=3, pooling="cls_mean")])
def test_eager_equals_sdpa(overrides, pixels, tmp_path):
    config = tiny_config(num_labels=5, **overrides)
    VitrailForImageClassification(config).save_pretrained(tmp_path)
    eager = VitrailForImageClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = VitrailForImageClassification.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(pixels).logits, sdpa(pixels).logits, atol=1e-5, rtol=0)


def test_attention_weights_are_real_under_sdpa(config, pixels, tmp_path):
    VitrailModel(config).save_pretrained(tmp_path)
    sdpa = VitrailModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    eager = VitrailModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        got = sdpa(pixels, output_attentions=True).attentions
        want = eager(pixels, output_attentions=True).attentions
    for a, b in zip(got, want, strict=True):
        assert a is not None
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


def test_set_attn_implementation_switches_a_loaded_model(config, pixels, tmp_path, monkeypatch):
    """sdpa -> eager -> sdpa on a loaded model: the kernel really changes (counted at torch's sdpa entry point),
    the logits stay the same, and attention weights come back under either."""
    VitrailForImageClassification(config).save_pretrained(tmp_path)
    model = VitrailForImageClassification.from_pretrained(tmp_path).eval()
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )

    def run(expected: str, fused_calls: int):
        calls.clear()
        assert model.config._attn_implementation == expected
        assert model.vitrail.encoder.layers[0].attention.config._attn_implementation == expected
        with torch.no_grad():
            logits = model(pixels).logits
            weights = model(pixels, output_attentions=True).attentions
        assert len(calls) == fused_calls  # the second call asked for weights: eager for every layer
        assert len(weights) == config.num_hidden_layers and all(w.shape == (3, 4, 226, 226) for w in weights)
        return logits, weights

    first, first_weights = run("sdpa", config.num_hidden_layers)
    model.set_attn_implementation("eager")
    eager, eager_weights = run("eager", 0)
    model.set_attn_implementation("sdpa")
    again, _ = run("sdpa", config.num_hidden_layers)
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    for a, b in zip(first_weights, eager_weights, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---- gradient checkpointing ---------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_same_gradients(config, pixels):
    model = VitrailForImageClassification(config).train()
    labels = torch.tensor([0, 3, 4])

    def grads():
        model.zero_grad()
        model(pixels, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.vitrail.encoder.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)


# ---- each option does what it says -------------------------------------------------------------------------


def test_registers_lengthen_the_sequence_but_not_the_pool(pixels):
    model = VitrailModel(tiny_config(num_register_tokens=4, pooling="mean")).eval()
    out = model(pixels)
    assert out.last_hidden_state.shape == (3, 1 + 4 + 225, 32)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 5:].mean(1))
    assert model.embeddings.register_tokens.shape == (1, 4, 32)
    assert model.embeddings.position_embeddings.shape == (1, 1 + 225, 32)  # registers own no position
    everything = VitrailModel(tiny_config(num_register_tokens=4, prefix_position_embeddings="all"))
    assert everything.embeddings.position_embeddings.shape == (1, 5 + 225, 32)


def test_pooling_modes(pixels):
    cls_model = VitrailModel(tiny_config()).eval()
    state = cls_model.state_dict()
    out = cls_model(pixels)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])

    mean_model = VitrailModel(tiny_config(pooling="mean")).eval()
    mean_model.load_state_dict(state)
    mean_out = mean_model(pixels)
    torch.testing.assert_close(
        mean_out.last_hidden_state, out.last_hidden_state
    )  # pooling changes only the pool
    torch.testing.assert_close(mean_out.pooler_output, out.last_hidden_state[:, 1:].mean(1))
    assert not torch.allclose(mean_out.pooler_output, out.pooler_output)

    both = VitrailForImageClassification(tiny_config(pooling="cls_mean", num_labels=2))
    assert both.classifier.in_features == 64


def test_mean_pooling_without_class_token(pixels):
    model = VitrailModel(tiny_config(pooling="mean", use_cls_token=False)).eval()
    out = model(pixels)
    assert model.embeddings.cls_token is None
    assert model.embeddings.position_embeddings.shape == (1, 225, 32)
    assert out.last_hidden_state.shape == (3, 225, 32)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(1))


def test_fc_norm_normalises_the_pool_not_the_tokens(pixels):
    model = VitrailModel(tiny_config(pooling="mean", use_fc_norm=True)).eval()
    out = model(pixels, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, out.hidden_states[-1])
    expected = model.layernorm(out.last_hidden_state[:, 1:].mean(1))
    torch.testing.assert_close(out.pooler_output, expected)


def test_sincos_positions_are_fixed_and_follow_big_vision(pixels):
    model = VitrailModel(tiny_config(position_embedding_type="sincos2d"))
    assert model.embeddings.position_embeddings is None
    assert not any("position" in name for name in model.state_dict())  # recomputed, never saved
    table = sincos_2d_position_embeddings(15, 15, 32)
    torch.testing.assert_close(model.embeddings.sincos_position_embeddings, table)
    # Row (y=1, x=2): channels [sin(2w), cos(2w), sin(w), cos(w)] with w = 10000^-(k/7), k = 0..7.
    omega = 10000.0 ** -(torch.arange(8, dtype=torch.float64) / 7)
    expected = torch.cat([(2 * omega).sin(), (2 * omega).cos(), omega.sin(), omega.cos()]).float()
    torch.testing.assert_close(table[0, 1 * 15 + 2], expected)
    # A 30x22 input gets a freshly computed 15x11 table, not a resampled one.
    dynamic = VitrailModel(tiny_config(position_embedding_type="sincos2d", dynamic_image_size=True)).eval()
    torch.testing.assert_close(dynamic.embeddings.patch_positions((15, 11), torch.float32),
                               sincos_2d_position_embeddings(15, 11, 32))  # fmt: skip


def test_no_positions_makes_the_encoder_permutation_equivariant():
    """Without positions nothing tells tokens apart but their content: permuting them permutes the output."""
    model = VitrailModel(
        tiny_config(position_embedding_type="none", pooling="mean", use_cls_token=False)
    ).eval()
    assert model.embeddings.position_embeddings is None
    tokens = torch.randn(2, 225, 32)
    perm = torch.randperm(225)
    with torch.no_grad():
        out, _, _ = model.encoder(tokens)
        out_perm, _, _ = model.encoder(tokens[:, perm])
    torch.testing.assert_close(out[:, perm], out_perm, atol=1e-5, rtol=1e-5)


def test_layer_scale_and_qk_norm_parameters():
    model = VitrailModel(tiny_config(layer_scale_init_value=1e-3, qk_norm=True))
    layer = model.encoder.layers[0]
    assert torch.equal(layer.layer_scale1.scale, torch.full((32,), 1e-3))
    assert torch.equal(layer.layer_scale2.scale, torch.full((32,), 1e-3))
    assert layer.attention.q_norm.normalized_shape == (8,) and layer.attention.k_norm.normalized_shape == (8,)
    plain = VitrailModel(tiny_config())
    assert not any("scale" in n or "q_norm" in n for n, _ in plain.named_parameters())


def test_layer_scale_scales_the_residual_branches(pixels):
    """With LayerScale at a tiny value, every layer is nearly the identity on its input."""
    model = VitrailModel(tiny_config(layer_scale_init_value=1e-9)).eval()
    out = model(pixels, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], out.hidden_states[0], atol=1e-6, rtol=0)


def test_drop_path_is_linear_over_depth_and_off_in_eval(pixels):
    config = tiny_config(num_hidden_layers=5, drop_path_rate=0.4, num_labels=5)
    model = VitrailForImageClassification(config)
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.vitrail.encoder.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    model.eval()
    torch.testing.assert_close(model(pixels).logits, model(pixels).logits)
    model.train()
    torch.manual_seed(1)
    first = model(pixels).logits
    torch.manual_seed(2)
    assert not torch.allclose(first, model(pixels).logits)


def test_dynamic_size_accepts_any_input(pixels):
    config = tiny_config(dynamic_image_size=True, num_labels=5)
    model = VitrailForImageClassification(config).eval()
    assert model(pixels).logits.shape == (3, 5)
    non_square = torch.randn(2, 3, 30, 22)
    assert model(non_square).logits.shape == (2, 5)
    odd = torch.randn(2, 3, 17, 9)  # not multiples of the patch: padded to 18x10 -> 9x5 patches
    out = model.vitrail(odd)
    assert out.last_hidden_state.shape == (2, 1 + 45, 32)
    # At the native size, dynamic and static models agree exactly.
    static = VitrailForImageClassification(tiny_config(num_labels=5)).eval()
    static.load_state_dict(model.state_dict())
    torch.testing.assert_close(static(pixels).logits, model(pixels).logits, atol=0, rtol=0)


def test_dynamic_size_pads_instead_of_dropping_pixels():
    """A pixel in the last (partial) row changes the output: it is padded in, not cut off."""
    model = VitrailModel(tiny_config(dynamic_image_size=True)).eval()
    image = torch.zeros(1, 3, 31, 31)
    changed = image.clone()
    changed[..., 30, 30] = 5.0
    assert not torch.allclose(model(image).last_hidden_state, model(changed).last_hidden_state)


@pytest.mark.parametrize("method", ["bicubic_antialias", "bicubic"])
def test_position_resampling_keeps_the_native_grid_and_resizes_others(method):
    model = VitrailModel(tiny_config(dynamic_image_size=True, position_interpolation=method))
    table = model.embeddings.position_embeddings[:, 1:]
    assert torch.equal(model.embeddings.patch_positions((15, 15), torch.float32), table)
    grid = table.reshape(1, 15, 15, 32).permute(0, 3, 1, 2)
    antialias = method == "bicubic_antialias"
    for size in [(20, 18), (5, 7)]:  # growing and shrinking, non-square
        got = model.embeddings.patch_positions(size, torch.float32)
        want = torch.nn.functional.interpolate(
            grid, size=size, mode="bicubic", align_corners=False, antialias=antialias
        )
        torch.testing.assert_close(got, want.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], 32))
    # Antialiasing smooths a high-frequency table when shrinking instead of subsampling it.
    if antialias:
        aliased = torch.nn.functional.interpolate(grid, size=(5, 5), mode="bicubic", align_corners=False)
        assert model.embeddings.patch_positions((5, 5), torch.float32).std() < aliased.std()


def test_interpolate_pos_encoding_per_call(config, pixels):
    model = VitrailForImageClassification(config).eval()
    bigger = torch.randn(1, 3, 40, 36)
    assert model(bigger, interpolate_pos_encoding=True).logits.shape == (1, 5)


# ---- losses -------------------------------------------------------------------------------------------------


def test_classification_losses_follow_problem_type(pixels):
    single = VitrailForImageClassification(tiny_config(num_labels=5)).eval()
    out = single(pixels, labels=torch.tensor([0, 1, 4]))
    torch.testing.assert_close(
        out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 4]))
    )

    multi = VitrailForImageClassification(
        tiny_config(num_labels=5, problem_type="multi_label_classification")
    )
    targets = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.float32)
    out = multi.eval()(pixels, labels=targets)
    torch.testing.assert_close(
        out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets)
    )

    regression = VitrailForImageClassification(tiny_config(num_labels=1)).eval()
    target = torch.tensor([0.5, -1.0, 2.0])
    out = regression(pixels, labels=target)
    assert regression.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), target))


def test_mim_loss_counts_masked_pixels_only(pixels):
    model = VitrailForMaskedImageModeling(tiny_config()).eval()
    mask = torch.zeros(3, 225, dtype=torch.bool)
    mask[:, :10] = True
    out = model(pixels, bool_masked_pos=mask)
    pixel_mask = mask.reshape(3, 1, 15, 15).repeat_interleave(2, 2).repeat_interleave(2, 3).float()
    error = (out.reconstruction - pixels).abs() * pixel_mask
    torch.testing.assert_close(out.loss, error.sum() / (pixel_mask.sum() * 3 + 1e-5))
    # The mask token really replaces the masked patches.
    unmasked = model(pixels).reconstruction
    assert not torch.allclose(unmasked, out.reconstruction)


def test_mim_loss_falls_when_training(pixels):
    model = VitrailForMaskedImageModeling(tiny_config()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mask = torch.rand(3, 225, generator=torch.Generator().manual_seed(0)) < 0.5
    losses = []
    for _ in range(30):
        loss = model(pixels, bool_masked_pos=mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ---- parity with transformers' ViT --------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_parity_with_transformers_vit(attn, pixels):
    from transformers import ViTConfig, ViTForImageClassification

    shape = dict(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, num_labels=5, layer_norm_eps=1e-12)  # fmt: skip
    reference = ViTForImageClassification(ViTConfig(**shape, attn_implementation=attn)).eval()
    # Random init leaves LayerNorms at identity and biases at zero; perturb them so parity covers every tensor.
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = VitrailForImageClassification(tiny_config(**shape, attn_implementation=attn)).eval()
    # vitrail.convert's rename table (checked key by key there); tests/test_convert.py covers the other layouts.
    converted = convert_hf_state_dict(reference.state_dict(), reference.config)
    missing, unexpected = model.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        want = reference(pixels, output_hidden_states=True)
        got = model(pixels, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---- bad input ----------------------------------------------------------------------------------------------


def test_wrong_channel_count_is_named(config):
    model = VitrailModel(config)
    with pytest.raises(ValueError, match="has 1 channels but the model expects 3"):
        model(torch.randn(1, 1, 30, 30))


def test_wrong_image_size_is_named_when_sizes_are_static(config):
    model = VitrailModel(config)
    with pytest.raises(ValueError, match=r"Input image size 32x30 does not match the model's 30x30"):
        model(torch.randn(1, 3, 32, 30))


def test_other_bad_inputs(config):
    model = VitrailModel(config)
    with pytest.raises(ValueError, match="pixel_values` is required"):
        model()
    with pytest.raises(ValueError, match=r"shape \(batch, channels, height, width\)"):
        model(torch.randn(3, 30, 30))
    with pytest.raises(ValueError, match="needs a mask token"):
        model(torch.randn(1, 3, 30, 30), bool_masked_pos=torch.zeros(1, 225, dtype=torch.bool))
    mim = VitrailForMaskedImageModeling(config)
    with pytest.raises(ValueError, match=r"must have shape \(batch, num_patches\) = \(1, 225\)"):
        mim(torch.randn(1, 3, 30, 30), bool_masked_pos=torch.zeros(1, 100, dtype=torch.bool))
    with pytest.raises(ValueError, match="must equal `patch_size`"):
        VitrailForMaskedImageModeling(tiny_config(encoder_stride=16))


@pytest.mark.slow  # reason: torch.compile of the flex kernel takes ~50 s on this 2-core CPU
def test_flex_attention_matches_eager_at_inference(config, pixels, tmp_path):
    VitrailForImageClassification(config).save_pretrained(tmp_path)
    eager = VitrailForImageClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    flex = VitrailForImageClassification.from_pretrained(
        tmp_path, attn_implementation="flex_attention"
    ).eval()
    with torch.no_grad():  # torch has no flex-attention backward on CPU
        torch.testing.assert_close(flex(pixels).logits, eager(pixels).logits, atol=1e-5, rtol=0)


def test_swiglu_mlp_gates_the_second_half_with_the_first():
    config = tiny_config(mlp_type="swiglu", hidden_act="silu")
    mlp = VitrailModel(config).encoder.layers[0].mlp
    assert mlp.fc1.weight.shape == (2 * 37, 32) and mlp.fc2.weight.shape == (32, 37)
    x = torch.randn(2, 5, 32)
    gate, value = (x @ mlp.fc1.weight.T + mlp.fc1.bias).split(37, dim=-1)
    expected = (torch.nn.functional.silu(gate) * value) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected)


def test_distillation_token_and_head(pixels, tmp_path):
    """[cls, distillation, registers, patches]; two heads averaged; both survive save/load and a head reset."""
    config = tiny_config(num_labels=5, use_distillation_token=True, num_register_tokens=2)
    model = VitrailForImageClassification(config).eval()
    out = model(pixels, output_hidden_states=True)
    assert out.hidden_states[0].shape == (3, 1 + 1 + 2 + 225, 32)
    torch.testing.assert_close(out.logits, (out.cls_logits + out.distillation_logits) / 2)
    token = model.vitrail(pixels).last_hidden_state[:, 1]
    torch.testing.assert_close(out.distillation_logits, model.distillation_classifier(token))
    model.save_pretrained(tmp_path)
    loaded = VitrailForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(pixels).logits, out.logits, atol=0, rtol=0)
    loaded.reset_classifier({0: "a", 1: "b"})
    assert loaded(pixels).distillation_logits.shape == (3, 2)
