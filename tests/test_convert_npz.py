"""Conversion of JAX `.npz` ViT checkpoints (google-research/vision_transformer and big_vision layouts), checked
against timm reading the very same files. The checkpoints are tiny random ones written here in the JAX layouts."""

import logging
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitrail import VitrailForImageClassification, VitrailModel
from vitrail.convert.npz import (
    load_npz_checkpoint,
    npz_image_processor,
    open_source,
    read_npz,
    vitrail_config_from_npz,
)

from .conftest import load_script

WIDTH, DEPTH, HEADS, MLP, PATCH, GRID, CLASSES = 32, 2, 4, 37, 2, 5, 5
IMAGE = PATCH * GRID
TOLERANCE = 1e-5

# Flax module names inside an encoder block, written out here independently of the converter's table.
BLOCKS = {
    "vit": ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "big_vision": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}


def jax_arrays(
    layout="vit",
    *,
    cls=True,
    positions="learned",
    classes=CLASSES,
    scanned=False,
    prefix="",
    grid=(GRID, GRID),
):
    """Random parameters with the names and shapes a JAX ViT checkpoint has."""
    rng = np.random.default_rng(0)

    def rand(*shape, scale=0.2, offset=0.0):
        return (offset + rng.standard_normal(shape) * scale).astype(np.float32)

    head_dim = WIDTH // HEADS
    out = {
        "embedding/kernel": rand(PATCH, PATCH, 3, WIDTH),  # HWIO
        "embedding/bias": rand(WIDTH),
        "Transformer/encoder_norm/scale": rand(WIDTH, offset=1.0),
        "Transformer/encoder_norm/bias": rand(WIDTH),
    }
    if cls:
        out["cls"] = rand(1, 1, WIDTH)
    patches = grid[0] * grid[1]
    if positions == "learned" and layout == "vit":
        out["Transformer/posembed_input/pos_embedding"] = rand(1, patches + int(cls), WIDTH)
    elif positions == "learned":
        out["pos_embedding"] = rand(1, patches, WIDTH)
    ln1, mha, ln2, mlp = BLOCKS[layout]
    blocks = []
    for _ in range(DEPTH):
        block = {
            f"{ln}/{p}": rand(WIDTH, offset=float(p == "scale"))
            for ln in (ln1, ln2)
            for p in ("scale", "bias")
        }
        for name in ("query", "key", "value"):
            block[f"{mha}/{name}/kernel"] = rand(WIDTH, HEADS, head_dim)
            block[f"{mha}/{name}/bias"] = rand(HEADS, head_dim)
        block[f"{mha}/out/kernel"] = rand(HEADS, head_dim, WIDTH)
        block[f"{mha}/out/bias"] = rand(WIDTH)
        block[f"{mlp}/Dense_0/kernel"] = rand(WIDTH, MLP)
        block[f"{mlp}/Dense_0/bias"] = rand(MLP)
        block[f"{mlp}/Dense_1/kernel"] = rand(MLP, WIDTH)
        block[f"{mlp}/Dense_1/bias"] = rand(WIDTH)
        blocks.append(block)
    if scanned:  # big_vision scan=True: one stack per parameter, depth first
        out.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    else:
        out.update(
            {f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()}
        )
    if classes is not None:
        out["head/kernel"] = rand(WIDTH, classes)
        out["head/bias"] = rand(classes)
    return {prefix + k: v for k, v in out.items()}


def save(tmp_path, arrays, name="ckpt.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def timm_vit(source, *, cls, no_embed_class, classes=CLASSES, act="gelu", image=IMAGE):
    """timm's own ViT with its own .npz loader (`_load_weights`) on the same file."""
    model = VisionTransformer(
        img_size=image, patch_size=PATCH, num_classes=classes, global_pool="token" if cls else "avg",
        embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / WIDTH, class_token=cls,
        no_embed_class=no_embed_class, fc_norm=False, dynamic_img_size=True, act_layer=act,
    )  # fmt: skip
    model.load_pretrained(source)
    return model.eval()


def pixels(size=IMAGE, batch=2):
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def max_diff(a, b, label):
    diff = (a - b).abs().max().item()
    print(f"max abs diff [{label}]: {diff:.2e}")
    return diff


def outputs(model, x):
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits if isinstance(model, VitrailForImageClassification) else out.last_hidden_state


CASES = {
    # (layout, class token, prefix, scanned) -> (pooling, prefix positions)
    "vit-token": (("vit", True, "", False), ("cls", "cls")),
    "vit-gap": (("vit", False, "opt/target/", False), ("mean", "none")),
    "big_vision-gap": (("big_vision", False, "params/img/", False), ("mean", "none")),
    "big_vision-tok-scanned": (("big_vision", True, "params/", True), ("cls", "none")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layouts_match_timm(tmp_path, case):
    (layout, cls, prefix, scanned), (pooling, prefix_positions) = CASES[case]
    path = save(tmp_path, jax_arrays(layout, cls=cls, prefix=prefix, scanned=scanned))
    model = load_npz_checkpoint(path)
    config = model.config
    assert isinstance(model, VitrailForImageClassification)
    assert (config.pooling, config.prefix_position_embeddings, config.use_cls_token) == (
        pooling,
        prefix_positions,
        cls,
    )
    assert (config.num_attention_heads, config.num_hidden_layers, config.intermediate_size) == (
        HEADS,
        DEPTH,
        MLP,
    )
    assert (config.image_size, config.patch_size, config.layer_norm_eps, config.hidden_act) == (
        IMAGE,
        PATCH,
        1e-6,
        "gelu",
    )
    assert config.position_interpolation == "bicubic_antialias" and config.num_labels == CLASSES
    reference = timm_vit(str(path), cls=cls, no_embed_class=layout == "big_vision")
    x = pixels()
    assert max_diff(outputs(model, x), reference(x), case) <= TOLERANCE


def test_tanh_gelu_option_matches_jax_activation(tmp_path):
    path = save(tmp_path, jax_arrays("vit"))
    exact, tanh = load_npz_checkpoint(path), load_npz_checkpoint(path, exact_gelu=False)
    assert tanh.config.hidden_act == "gelu_pytorch_tanh"
    x = pixels()
    reference = timm_vit(str(path), cls=True, no_embed_class=False, act="gelu_tanh")
    assert max_diff(outputs(tanh, x), reference(x), "tanh GELU vs timm gelu_tanh") <= TOLERANCE
    assert (outputs(tanh, x) - outputs(exact, x)).abs().max() > 1e-5  # the choice is visible


def numpy_posemb_sincos_2d(rows, cols, width, temperature=10_000.0):
    """big_vision/models/vit.py posemb_sincos_2d, in float64."""
    y, x = np.mgrid[:rows, :cols]
    omega = np.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]


@pytest.mark.parametrize("cls", [False, True], ids=["gap", "tok"])
def test_sincos_positions_match_big_vision_formula(tmp_path, cls):
    arrays = jax_arrays("big_vision", cls=cls, positions="sincos2d", prefix="params/")
    path = save(tmp_path, arrays)
    model = load_npz_checkpoint(path, image_size=IMAGE)
    config = model.config
    assert (config.position_embedding_type, config.prefix_position_embeddings) == ("sincos2d", "none")
    assert model.vitrail.embeddings.position_embeddings is None
    want = numpy_posemb_sincos_2d(GRID, GRID, WIDTH)
    table = model.vitrail.embeddings.sincos_position_embeddings.double().numpy()
    assert np.abs(table - want).max() <= 1e-6

    # timm with big_vision's table (from the formula above) as a learned one runs the same model.
    with_table = save(tmp_path, {**arrays, "params/pos_embedding": want.astype(np.float32)}, "table.npz")
    x = pixels()
    reference = timm_vit(str(with_table), cls=cls, no_embed_class=True)
    assert max_diff(outputs(model, x), reference(x), f"sincos {'tok' if cls else 'gap'}") <= TOLERANCE
    # open_source's own reference (numpy port inside the converter) agrees, at the native size and another one.
    converted = open_source(path, image_size=IMAGE)
    assert max_diff(outputs(model, x), converted.reference(x), "sincos open_source reference") <= TOLERANCE
    model.set_image_size(14)
    big = pixels(14)
    assert max_diff(outputs(model, big), converted.reference(big), "sincos reference at 14 px") <= TOLERANCE


def test_sincos_without_image_size_assumes_224(tmp_path, caplog):
    arrays = read_npz(save(tmp_path, jax_arrays("big_vision", cls=False, positions="sincos2d")))
    with caplog.at_level(logging.WARNING, logger="vitrail.convert.npz"):
        config = vitrail_config_from_npz(arrays)
    assert config.image_size == 224 and "224" in caplog.text


def test_non_square_grid_needs_image_size(tmp_path):
    path = save(tmp_path, jax_arrays("big_vision", cls=False, grid=(5, 7)))
    with pytest.raises(ValueError, match="not a square grid"):
        load_npz_checkpoint(path)
    model = load_npz_checkpoint(path, image_size=(10, 14))
    assert model.config.image_hw == (10, 14)
    reference = timm_vit(str(path), cls=False, no_embed_class=True, image=(10, 14))
    x = pixels((10, 14))
    assert max_diff(outputs(model, x), reference(x), "non-square grid") <= TOLERANCE


@pytest.mark.parametrize("classes", [None, 0], ids=["no-head", "zero-class-head"])
def test_backbone_npz_gives_vitrail_model(tmp_path, classes):
    path = save(tmp_path, jax_arrays("vit", classes=classes))
    model = load_npz_checkpoint(path)
    assert type(model) is VitrailModel
    reference = timm_vit(str(path), cls=True, no_embed_class=False, classes=0)
    x = pixels()
    with torch.no_grad():
        want = reference.forward_features(x)
    assert max_diff(outputs(model, x), want, f"backbone ({classes} classes)") <= TOLERANCE


def test_unexpressible_heads_are_refused(tmp_path):
    map_head = jax_arrays("big_vision", cls=False, prefix="params/img/")
    map_head["params/img/MAPHead_0/probe"] = np.zeros((1, 1, WIDTH), np.float32)
    with pytest.raises(NotImplementedError, match="MAPHead_0/probe"):
        load_npz_checkpoint(save(tmp_path, map_head, "map.npz"))
    assert type(load_npz_checkpoint(tmp_path / "map.npz", backbone_only=True)) is VitrailModel

    pre_logits = jax_arrays("vit")
    pre_logits.update(
        {"pre_logits/kernel": np.zeros((WIDTH, WIDTH), np.float32), "pre_logits/bias": np.zeros(WIDTH)}
    )
    path = save(tmp_path, pre_logits, "pre_logits.npz")
    with pytest.raises(NotImplementedError, match="pre_logits/kernel.*backbone_only=True"):
        load_npz_checkpoint(path)
    # The encoder alone is exact (timm ignores pre_logits and the head here).
    backbone = load_npz_checkpoint(path, backbone_only=True)
    assert type(backbone) is VitrailModel
    reference = timm_vit(str(path), cls=True, no_embed_class=False, classes=0)
    x = pixels()
    with torch.no_grad():
        want = reference.forward_features(x)
    assert max_diff(outputs(backbone, x), want, "backbone_only with pre_logits") <= TOLERANCE


def test_hybrid_resnet_stem_is_refused(tmp_path):
    """R50+ViT checkpoints carry a ResNet stem before the patch projection; vitrail has none, even for a backbone."""
    arrays = jax_arrays("vit")
    arrays["conv_root/kernel"] = np.zeros((7, 7, 3, 64), np.float32)
    for backbone_only in (False, True):
        with pytest.raises(NotImplementedError, match=r"\['conv_root/kernel'\]: a hybrid ResNet\+ViT stem"):
            load_npz_checkpoint(save(tmp_path, arrays), backbone_only=backbone_only)


def test_unknown_key_is_named(tmp_path):
    arrays = jax_arrays("vit")
    arrays["Transformer/encoderblock_1/LayerScale_0/scale"] = np.ones(WIDTH, np.float32)
    with pytest.raises(ValueError, match="LayerScale_0/scale"):
        load_npz_checkpoint(save(tmp_path, arrays))


def test_wrong_num_heads_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num_heads=8 contradicts"):
        load_npz_checkpoint(save(tmp_path, jax_arrays("vit")), num_heads=8)


def test_pickles_are_refused(tmp_path):
    arrays = jax_arrays("vit")
    arrays["meta"] = np.array([{"step": 1}], dtype=object)
    path = save(tmp_path, arrays)  # np.savez pickles object arrays
    with pytest.raises(ValueError, match="pickle"):
        read_npz(path)
    plain = tmp_path / "plain.npz"
    plain.write_bytes(pickle.dumps({"embedding/kernel": [1.0]}))
    with pytest.raises(ValueError, match="pickle"):
        read_npz(plain)


def test_bfloat16_arrays_are_widened(tmp_path):
    arrays = jax_arrays("big_vision", cls=False, prefix="params/")
    bits = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in arrays.items()}
    path = save(tmp_path, {k: b.view("V2") for k, b in bits.items()})  # how JAX saves bfloat16
    read = read_npz(path)["embedding/bias"]
    assert read.dtype == np.float32
    np.testing.assert_array_equal(
        read, (bits["params/embedding/bias"].astype(np.uint32) << 16).view(np.float32)
    )
    # timm reads bfloat16 only through jax: its reference gets the widened arrays.
    converted = open_source(path)
    x = pixels()
    assert max_diff(outputs(converted.model, x), converted.reference(x), "bfloat16 file") <= TOLERANCE


@pytest.mark.parametrize("layout, cls", [("vit", True), ("big_vision", False)])
def test_reference_at_another_size(tmp_path, layout, cls):
    prefix = "params/" if layout == "big_vision" else ""
    converted = open_source(save(tmp_path, jax_arrays(layout, cls=cls, prefix=prefix)))
    model = converted.model
    assert not model.training and converted.reference is not None
    x = pixels()
    assert max_diff(outputs(model, x), converted.reference(x), f"{layout} open_source native") <= TOLERANCE
    model.set_image_size(14)
    big = pixels(14)
    assert (
        max_diff(outputs(model, big), converted.reference(big), f"{layout} resampled to 14 px") <= TOLERANCE
    )


def test_processor_scales_to_minus_one_one(tmp_path):
    config = load_npz_checkpoint(save(tmp_path, jax_arrays("vit"))).config
    processor = npz_image_processor(config)
    assert not processor.do_center_crop and processor.crop_pct is None
    ramp = np.tile(np.linspace(0, 255, 41).round().astype(np.uint8)[None, :, None], (23, 1, 3))
    image = PIL.Image.fromarray(ramp)  # 41 x 23: squashed to a square, not cropped
    values = processor(image, return_tensors="pt")["pixel_values"]
    assert values.shape == (1, 3, IMAGE, IMAGE)
    assert -1.0 <= values.min() < -0.8 and 0.8 < values.max() <= 1.0
    extremes = [PIL.Image.new("RGB", (40, 30), c) for c in ((0, 0, 0), (255, 255, 255))]
    black, white = processor(extremes, return_tensors="pt")["pixel_values"]
    assert torch.all(black == -1.0) and torch.all(white == 1.0)


@pytest.mark.parametrize("positions", ["learned", "sincos2d"])
def test_script_from_npz(tmp_path, capsys, positions):
    """`--from npz` end to end: timm reads the same file as the reference, at the native size and at 14 px."""
    import json

    script = load_script("scripts/convert_checkpoint.py")
    layout = "vit" if positions == "learned" else "big_vision"
    src = save(tmp_path, jax_arrays(layout, cls=positions == "learned", positions=positions))
    argv = ["--from", "npz", "--input", str(src), "--output", str(tmp_path / "out"), "--image-size", "14"]
    if positions == "sincos2d":
        argv += ["--source-image-size", str(IMAGE)]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    diff = float(out.split("max abs logit difference: ")[-1].split()[0])
    assert diff < TOLERANCE and "(resampled to 14x14)" in out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["image_size"] == 14 and config["position_embedding_type"] == positions


def test_from_pretrained_opens_an_npz_file(tmp_path):
    path = save(tmp_path, jax_arrays("big_vision", cls=False))
    reference = load_npz_checkpoint(path)
    model = VitrailForImageClassification.from_pretrained(path, image_size=14)
    assert model.config.image_hw == (14, 14)
    backbone = VitrailModel.from_pretrained(str(path))
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x).last_hidden_state, reference.vitrail(x).last_hidden_state)
