"""Conversion of transformers ViT/DeiT checkpoints (both key layouts) into vitrail, checked by logit parity."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from vitrail import VitrailForImageClassification, VitrailImageProcessor, VitrailModel
from vitrail.convert import (
    convert_hf_state_dict,
    detect_hf_layout,
    load_hf_checkpoint,
    vitrail_config_from_hf,
)
from vitrail.convert import npz as npz_format
from vitrail.convert import timm as timm_format
from vitrail.convert.common import (
    Drop,
    Refuse,
    Rename,
    grid_of_positions,
    in_layers,
    refuse,
    rename_state_dict,
)
from vitrail.convert.hf import FAMILIES, hf_rename_rows

from .conftest import load_script

SHAPE = dict(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, layer_norm_eps=1e-12)  # fmt: skip
LABELS = {0: "cat", 1: "dog", 2: "emu", 3: "fox", 4: "gnu"}


def perturbed(model):
    """Random init leaves LayerNorms at identity and biases at zero; perturb them so parity covers every tensor."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_vit(cls=ViTForImageClassification, config_cls=ViTConfig, **kw):
    labels = {} if cls is ViTModel else dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    return perturbed(cls(config_cls(**SHAPE, **labels, **kw)))


def save_in_layout(model, folder: Path, layout: str):
    """A checkpoint folder in the "hub" layout (what `save_pretrained` writes) or the "v5" one (transformers 5.x
    in-memory names, written by hand)."""
    if layout == "hub":
        model.save_pretrained(folder)
        return
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))


def test_save_pretrained_writes_hub_layout_and_state_dict_is_v5(tmp_path):
    from safetensors.torch import load_file

    model = hf_vit()
    model.save_pretrained(tmp_path)
    assert detect_hf_layout(load_file(tmp_path / "model.safetensors")) == "hub"
    assert detect_hf_layout(model.state_dict()) == "v5"


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_vit_classification_parity(layout, tmp_path, pixels, caplog):
    reference = hf_vit()
    save_in_layout(reference, tmp_path, layout)
    with caplog.at_level(logging.INFO, logger="vitrail.convert"):
        model = load_hf_checkpoint(tmp_path)
    assert (
        f"{layout} layout" in caplog.text and "Joined 12 source tensors into 4 vitrail tensors" in caplog.text
    )
    assert isinstance(model, VitrailForImageClassification)
    assert model.config.id2label == LABELS and model.config.label2id["emu"] == 2
    assert model.config.layer_norm_eps == 1e-12 and model.config.image_hw == (30, 30)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_in_memory_state_dict_converts(qkv_bias, pixels):
    """Supersedes the hand-written mapping in test_modeling: `state_dict()` names straight in."""
    reference = hf_vit(attn_implementation="eager", qkv_bias=qkv_bias)
    converted = convert_hf_state_dict(reference.state_dict(), reference.config)
    model = VitrailForImageClassification(vitrail_config_from_hf(reference.config)).eval()
    model.load_state_dict(converted, strict=True)
    assert ("vitrail.encoder.layers.0.attention.qkv.bias" in converted) == qkv_bias
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_vit_model_with_pooler(layout, tmp_path, pixels, caplog):
    reference = hf_vit(ViTModel)
    assert "pooler.dense.weight" in reference.state_dict()
    save_in_layout(reference, tmp_path, layout)
    with caplog.at_level(logging.INFO, logger="vitrail.convert"):
        model = load_hf_checkpoint(tmp_path)
    assert isinstance(model, VitrailModel)
    assert "Dropped pooler.dense.weight" in caplog.text and "Dropped pooler.dense.bias" in caplog.text
    with torch.no_grad():
        got, want = model(pixels).last_hidden_state, reference(pixels).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_deit_classification_parity(layout, tmp_path, pixels, caplog):
    reference = hf_vit(DeiTForImageClassification, DeiTConfig)
    save_in_layout(reference, tmp_path, layout)
    with caplog.at_level(logging.INFO, logger="vitrail.convert"):
        model = load_hf_checkpoint(tmp_path)
    assert "becomes register token 0" in caplog.text
    assert model.config.num_register_tokens == 1 and model.config.prefix_position_embeddings == "all"
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_distilled_deit_parity(layout, tmp_path, pixels, caplog):
    """Two heads, averaged at inference, and each head's logits exposed as transformers does."""
    reference = hf_vit(DeiTForImageClassificationWithTeacher, DeiTConfig)
    save_in_layout(reference, tmp_path, layout)
    with caplog.at_level(logging.INFO, logger="vitrail.convert"):
        model = load_hf_checkpoint(tmp_path)
    assert "Distilled DeiT" in caplog.text
    assert model.config.use_distillation_token and model.config.num_register_tokens == 0
    with torch.no_grad():
        got, want = model(pixels), reference(pixels)
    for name in ("logits", "cls_logits", "distillation_logits"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=0)
    # Without the config's word for it, the second head's tensors identify a distilled checkpoint.
    config = DeiTConfig(**SHAPE, num_labels=5)
    assert "distillation_classifier.weight" in convert_hf_state_dict(reference.state_dict(), config)


def test_distilled_deit_trains_both_heads(tmp_path, pixels):
    model = load_hf_checkpoint(_saved(hf_vit(DeiTForImageClassificationWithTeacher, DeiTConfig), tmp_path))
    labels, teacher = torch.tensor([0, 1]), torch.tensor([2, 3])
    out = model(pixels, labels=labels, distillation_labels=teacher)
    ce = torch.nn.functional.cross_entropy
    expected = (ce(out.cls_logits, labels) + ce(out.distillation_logits, teacher)) / 2
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert (
        model.distillation_classifier.weight.grad.abs().sum() > 0
        and model.classifier.weight.grad.abs().sum() > 0
    )


def _saved(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


# ---- DINOv2 ----------------------------------------------------------------------------------------------------

DINO = dict(image_size=28, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
            layerscale_value=0.5)  # fmt: skip


def hf_dinov2(cls, **kw):
    config_cls = Dinov2WithRegistersConfig if "WithRegisters" in cls.__name__ else Dinov2Config
    labels = (
        dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
        if "Classification" in cls.__name__
        else {}
    )
    return perturbed(cls(config_cls(**DINO, **labels, **kw)))


DINOV2_CASES = {
    "dinov2": (Dinov2Model, {}),
    "dinov2-head": (Dinov2ForImageClassification, {}),
    "dinov2-swiglu-head": (Dinov2ForImageClassification, {"use_swiglu_ffn": True}),
    "dinov2-registers": (Dinov2WithRegistersModel, {"num_register_tokens": 4}),
    "dinov2-registers-head": (Dinov2WithRegistersForImageClassification, {"num_register_tokens": 4}),
}


@pytest.mark.parametrize("layout", ["hub", "v5"])
@pytest.mark.parametrize("case", list(DINOV2_CASES))
def test_dinov2_parity_at_native_and_other_sizes(case, layout, tmp_path):
    """DINOv2 resamples its position table to every input; so does the converted model, the same way."""
    cls, kw = DINOV2_CASES[case]
    reference = hf_dinov2(cls, **kw)
    save_in_layout(reference, tmp_path, layout)
    model = load_hf_checkpoint(tmp_path)
    config = model.config
    assert (
        config.layer_scale_init_value == 0.5 and config.layer_norm_eps == 1e-6 and config.dynamic_image_size
    )
    assert config.num_register_tokens == kw.get("num_register_tokens", 0)
    assert config.pooling == ("cls_mean" if "head" in case else "cls")
    if "swiglu" in case:
        assert config.mlp_type == "swiglu" and config.intermediate_size == 88
    generator = torch.Generator().manual_seed(2)
    for size in [(28, 28), (20, 20), (36, 24)]:  # native, smaller, larger and non-square
        pixels = torch.randn(2, 3, *size, generator=generator)
        with torch.no_grad():
            got, want = model(pixels), reference(pixels)
        if "head" in case:
            torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=0)


def test_dinov2_mask_token_is_dropped_with_a_reason(tmp_path, caplog):
    reference = hf_dinov2(Dinov2Model)
    with caplog.at_level(logging.INFO, logger="vitrail.convert"):
        load_hf_checkpoint(_saved(reference, tmp_path))
    assert "Dropped embeddings.mask_token: DINOv2's mask token serves only" in caplog.text


def test_pickle_only_folder_is_refused_without_allow_pickle(tmp_path, pixels):
    reference = hf_vit()
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin is a pickle.*allow_pickle=True"):
        load_hf_checkpoint(tmp_path)
    model = load_hf_checkpoint(tmp_path, allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)
    # The same policy through from_pretrained, which converts foreign folders on the way in.
    with pytest.raises(ValueError, match="pytorch_model.bin is a pickle.*allow_pickle=True"):
        VitrailForImageClassification.from_pretrained(tmp_path)
    model = VitrailForImageClassification.from_pretrained(tmp_path, allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)


def test_sharded_checkpoint_converts_and_a_missing_shard_is_named(tmp_path, pixels):
    reference = hf_vit()
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    model = load_hf_checkpoint(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)
    shards[-1].unlink()
    for load in (load_hf_checkpoint, VitrailForImageClassification.from_pretrained):
        with pytest.raises(OSError, match=rf"does not have: \['{shards[-1].name}'\]"):
            load(tmp_path)
    # The same check opens vitrail's own sharded checkpoints.
    from .conftest import tiny_config

    VitrailForImageClassification(tiny_config()).save_pretrained(tmp_path / "vitrail", max_shard_size="20KB")
    shards = sorted((tmp_path / "vitrail").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    shards[0].unlink()
    with pytest.raises(OSError, match=rf"does not have: \['{shards[0].name}'\]"):
        VitrailForImageClassification.from_pretrained(tmp_path / "vitrail")


def test_unknown_key_is_named(tmp_path):
    reference = hf_vit()
    state = dict(reference.state_dict())
    state["vit.layers.0.attention.rel_pos_bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"vit\.layers\.0\.attention\.rel_pos_bias"):
        convert_hf_state_dict(state, reference.config)


def test_missing_and_misshaped_keys_are_named():
    reference = hf_vit()
    state = dict(reference.state_dict())
    del state["vit.layers.1.attention.v_proj.bias"]
    with pytest.raises(ValueError, match=r"only \['vit.layers.1.attention.k_proj.bias'"):
        convert_hf_state_dict(state, reference.config)
    state = dict(reference.state_dict())
    del state["vit.layernorm.bias"]
    with pytest.raises(ValueError, match=r"missing \['vitrail.layernorm.bias'\]"):
        convert_hf_state_dict(state, reference.config)
    state = dict(reference.state_dict())
    state["vit.embeddings.position_embeddings"] = state["vit.embeddings.position_embeddings"][:, :-1]
    with pytest.raises(ValueError, match=r"position_embeddings.*\(1, 225, 32\), \(1, 226, 32\)"):
        convert_hf_state_dict(state, reference.config)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rename_tables_reach_the_same_vitrail_names_in_both_layouts(family):
    """Both layouts of a family fill the same vitrail tensors (SwiGLU's fused input is one row in one layout and
    two slots in the other, so slots are compared as a set of targets)."""

    def targets(layout):
        return {(row.target, row.slot and row.slot[1]) for row in hf_rename_rows(family, layout)}

    hub, v5 = targets("hub"), targets("v5")
    assert {t for t, _ in hub} == {t for t, _ in v5}


# ---- the row dialect every format shares -------------------------------------------------------------------------


def _all_tables():
    """Every table of every format: (name, rows)."""
    tables = {
        f"hf {family} {layout}": hf_rename_rows(family, layout)
        for family in FAMILIES
        for layout in ("hub", "v5")
    }
    tables.update({f"hf {family} drops": FAMILIES[family].drops for family in FAMILIES})
    tables["timm renames"] = timm_format.TIMM_RENAMES
    tables.update({f"npz {layout}": npz_format.npz_rename_rows(layout) for layout in npz_format.NPZ_LAYERS})
    tables.update({"npz refused": npz_format.NPZ_REFUSED + npz_format.NPZ_HEAD_REFUSED})
    tables.update({"npz drops": npz_format.NPZ_BACKBONE_DROPS + npz_format.NPZ_EMPTY_HEAD_DROPS})
    return tables


@pytest.mark.parametrize("table", list(_all_tables()))
def test_every_table_is_written_in_the_one_row_dialect(table):
    """Rows are `Rename` / `Drop` / `Refuse` objects; a placeholder a target fills is one its source captures, and
    every layer row lands inside vitrail's `encoder.layers.{n}.`."""
    rows = _all_tables()[table]
    assert rows and all(isinstance(row, (Rename, Drop, Refuse)) for row in rows)
    for row in rows:
        if isinstance(row, Rename):
            for placeholder in ("{n}", "{p}"):
                assert placeholder not in row.target or placeholder in row.source, row
            assert ("{n}" in row.source) == row.target.startswith("{backbone}encoder.layers.{n}."), row


def test_row_patterns_are_names_with_placeholders():
    """`{n}` is a layer number, `{p}` weight or bias, `*` anything; every other character is itself (a dot is
    not a regex wildcard)."""
    rows = in_layers("blocks.{n}.", [Rename("attn.qkv.{p}", "attention.qkv.{p}")])
    assert rows == (Rename("blocks.{n}.attn.qkv.{p}", "{backbone}encoder.layers.{n}.attention.qkv.{p}"),)
    expected = {
        f"encoder.layers.{n}.attention.qkv.{p}": torch.Size([3]) for n in (0, 10) for p in ("weight", "bias")
    }
    state = {f"blocks.{n}.attn.qkv.{p}": torch.ones(3) for n in (0, 10) for p in ("weight", "bias")}
    assert set(rename_state_dict(state, rows, expected)) == set(expected)
    with pytest.raises(ValueError, match=r"blocksX0\.attn\.qkv\.weight"):
        rename_state_dict({**state, "blocksX0.attn.qkv.weight": torch.ones(3)}, rows, expected)
    drops = [Drop("aux.*", "an auxiliary head")]
    assert set(
        rename_state_dict({**state, "aux.fc.weight": torch.ones(1)}, rows, expected, drops=drops)
    ) == set(expected)
    with pytest.raises(NotImplementedError, match=r"\['attn_pool.q', 'attn_pool.v'\]: attention pooling"):
        refuse(["cls_token", "attn_pool.v", "attn_pool.q"], [Refuse("attn_pool.*", "attention pooling")])


def test_grid_of_positions():
    """The image size behind a position table: a configured size that fits, else the one square grid."""
    patch = (8, 8)
    assert grid_of_positions(17, [1, 0], patch, name="t", hint="h") == ((32, 32), 1)
    assert grid_of_positions(10, [1, 0], patch, [(16, 40)], name="t", hint="h") == ((16, 40), 0)
    assert grid_of_positions(11, [1, 0], patch, [(16, 40)], name="t", hint="h") == ((16, 40), 1)
    with pytest.raises(ValueError, match="t has 11 rows .*not a square grid of patches; give the size"):
        grid_of_positions(11, [1, 0], patch, name="t", hint="give the size")
    # 9 rows with 5 prefix tokens: 3x3 patches without prefix rows, or 2x2 with them.
    with pytest.raises(ValueError, match="square grid with and without prefix rows"):
        grid_of_positions(9, [5, 0], patch, name="t", hint="h")
    assert grid_of_positions(9, [5, 0], patch, [(16, 16)], name="t", hint="h") == ((16, 16), 5)


def test_script_end_to_end(tmp_path, capsys, pixels):
    from transformers import DeiTImageProcessorPil

    src, dst = tmp_path / "src", tmp_path / "dst"
    reference = hf_vit(DeiTForImageClassification, DeiTConfig)
    reference.save_pretrained(src)
    # The PIL backend, as vitrail's processor; the torchvision one rounds a few pixels a level differently.
    hf_processor = DeiTImageProcessorPil(
        size={"height": 34, "width": 34},
        crop_size={"height": 30, "width": 30},
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.3, 0.25],
        resample=3,
    )
    hf_processor.save_pretrained(src)

    script = load_script("scripts/convert_checkpoint.py")
    assert script.main(["--from", "hf", "--input", str(src), "--output", str(dst)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("max abs logit difference: "))
    assert float(line.split(": ")[1]) < 1e-5 and "(converted, before saving)" in out

    model = VitrailForImageClassification.from_pretrained(dst).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)
    saved = json.loads((dst / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 34, "width": 34} and saved["crop_size"] == {"height": 30, "width": 30}
    assert saved["image_mean"] == [0.4, 0.5, 0.6] and saved["resample"] == 3 and saved["do_center_crop"]
    # The processors agree on a real photo.
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0]
    ours = VitrailImageProcessor.from_pretrained(dst)(photo, return_tensors="pt").pixel_values
    theirs = hf_processor(photo, return_tensors="pt").pixel_values
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_script_resamples_to_another_size_and_compares_with_the_source(tmp_path, capsys):
    """`--image-size 38x26`: transformers' DeiT run with `interpolate_pos_encoding=True` at that size is the
    reference; vitrail resamples the table once, the same way (plain bicubic for this family)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    hf_vit(DeiTForImageClassificationWithTeacher, DeiTConfig).save_pretrained(src)
    argv = ["--from", "hf", "--input", str(src), "--output", str(dst), "--image-size", "38x26"]
    assert load_script("scripts/convert_checkpoint.py").main(argv) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("max abs logit difference (resampled to 38x26)"))
    assert float(line.rsplit(": ", 1)[1]) < 1e-5
    assert json.loads((dst / "config.json").read_text())["image_size"] == [38, 26]
    assert not (dst / "preprocessor_config.json").exists()  # the source had none; nothing is invented


# ---- from_pretrained on foreign checkpoints ----------------------------------------------------------------------

FOREIGN = {
    "vit-hub": (lambda: hf_vit(), "hub"),
    "vit-v5": (lambda: hf_vit(), "v5"),
    "deit-distilled": (lambda: hf_vit(DeiTForImageClassificationWithTeacher, DeiTConfig), "hub"),
    "dinov2-registers": (
        lambda: hf_dinov2(Dinov2WithRegistersForImageClassification, num_register_tokens=2),
        "hub",
    ),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_from_pretrained_opens_foreign_checkpoints(case, tmp_path):
    build, layout = FOREIGN[case]
    reference = build()
    save_in_layout(reference, tmp_path, layout)
    size = reference.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    model = VitrailForImageClassification.from_pretrained(tmp_path)
    assert not model.training and model.config.model_type == "vitrail"
    backbone = VitrailModel.from_pretrained(tmp_path)  # the head is left out
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)
        want = reference.base_model(pixels).last_hidden_state
        torch.testing.assert_close(backbone(pixels).last_hidden_state, want, atol=1e-5, rtol=0)


def test_from_pretrained_resamples_positions_to_a_new_non_square_size(tmp_path):
    """The converted model at 38x26 equals transformers' ViT run at 38x26 with its own interpolation."""
    reference = hf_vit()
    reference.save_pretrained(tmp_path)
    model = VitrailForImageClassification.from_pretrained(tmp_path, image_size=[38, 26])
    assert model.config.image_hw == (38, 26)
    assert model.vitrail.embeddings.position_embeddings.shape == (1, 1 + 19 * 13, 32)
    pixels = torch.randn(2, 3, 38, 26, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference(pixels, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(model(pixels).logits, want, atol=1e-5, rtol=0)


def test_from_pretrained_new_labels_reinitialise_only_the_heads(tmp_path, caplog):
    reference = hf_vit(DeiTForImageClassificationWithTeacher, DeiTConfig)
    reference.save_pretrained(tmp_path)
    full = VitrailForImageClassification.from_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = VitrailForImageClassification.from_pretrained(tmp_path, id2label={0: "yes", 1: "no"})
    assert "predicts 5 classes" in caplog.text and "re-initialised" in caplog.text
    assert model.config.num_labels == 2 and model.config.label2id == {"yes": 0, "no": 1}
    assert model.classifier.weight.shape == (2, 32) and model.distillation_classifier.weight.shape == (2, 32)
    for name, tensor in full.vitrail.state_dict().items():
        torch.testing.assert_close(model.vitrail.state_dict()[name], tensor, atol=0, rtol=0)
    # The same label count and names: nothing is re-initialised.
    same = VitrailForImageClassification.from_pretrained(tmp_path, num_labels=5)
    torch.testing.assert_close(same.classifier.weight, full.classifier.weight, atol=0, rtol=0)


def test_from_pretrained_backbone_checkpoint_gets_a_new_head(tmp_path, caplog):
    hf_dinov2(Dinov2Model).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = VitrailForImageClassification.from_pretrained(tmp_path, num_labels=3)
    assert "backbone without a classification head" in caplog.text
    assert model.classifier.weight.shape == (3, 32)  # DINOv2 backbones pool the class token


def test_from_pretrained_applies_config_fields_and_refuses_unknown_arguments(tmp_path):
    hf_vit().save_pretrained(tmp_path)
    model = VitrailForImageClassification.from_pretrained(
        tmp_path, drop_path_rate=0.1, attn_implementation="eager", dtype=torch.float64
    )
    assert model.config.drop_path_rate == 0.1 and model.config._attn_implementation == "eager"
    assert model.classifier.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="cannot apply.*'frobnicate'"):
        VitrailForImageClassification.from_pretrained(tmp_path, frobnicate=1)


def test_from_pretrained_names_unsupported_model_types(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'bert' checkpoint"):
        VitrailModel.from_pretrained(tmp_path)


def test_vitrail_checkpoint_from_pretrained_resamples_and_relabels(tmp_path, pixels):
    """The same two additions on vitrail's own checkpoints."""
    from .conftest import tiny_config

    source = perturbed(VitrailForImageClassification(tiny_config(num_labels=5)))
    source.save_pretrained(tmp_path)
    model = VitrailForImageClassification.from_pretrained(tmp_path, image_size=20, num_labels=2)
    assert model.config.image_hw == (20, 20) and model.classifier.weight.shape == (2, 32)
    expected = source.vitrail.embeddings.position_embeddings.detach().clone()
    source.set_image_size(20)
    torch.testing.assert_close(
        model.vitrail.embeddings.position_embeddings, source.vitrail.embeddings.position_embeddings
    )
    assert not torch.equal(expected[:, 1:26], model.vitrail.embeddings.position_embeddings[:, 1:26])


def test_indivisible_image_size_keeps_the_whole_patch_grid(tmp_path):
    """transformers' ViT at 31 px with patch 2 has a 15x15 table (the last pixel row/column is dropped)."""
    reference = perturbed(ViTForImageClassification(ViTConfig(**{**SHAPE, "image_size": 31})))
    model = load_hf_checkpoint(_saved(reference, tmp_path))
    assert model.config.image_hw == (30, 30)
    pixels = torch.randn(2, 3, 31, 31)
    with torch.no_grad():
        want = reference(pixels).logits
        torch.testing.assert_close(model(pixels[..., :30, :30]).logits, want, atol=1e-5, rtol=0)


def test_dinov2_processor_translates_and_matches_on_a_photo(tmp_path):
    """DINOv2 repos carry a BitImageProcessor config (shortest edge 256, crop 224, bicubic, ImageNet statistics);
    load_image_processor turns it into a VitrailImageProcessor that gives the same pixels."""
    from sklearn.datasets import load_sample_images
    from transformers import BitImageProcessorPil

    from vitrail.convert import load_image_processor

    theirs = BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # fmt: skip
    theirs.save_pretrained(tmp_path)
    ours = load_image_processor(tmp_path)
    assert isinstance(ours, VitrailImageProcessor)
    photo = load_sample_images().images[1]
    want = theirs(photo, return_tensors="pt").pixel_values
    torch.testing.assert_close(ours(photo, return_tensors="pt").pixel_values, want, atol=1e-5, rtol=0)


def test_script_names_a_missing_input_with_status_2(tmp_path, capsys):
    """A missing --input is named before anything is read (transformers would take it for a malformed Hub repo id;
    the converter reads local files only)."""
    script = load_script("scripts/convert_checkpoint.py")
    for source, missing in (
        ("hf", tmp_path / "nope"),
        ("timm", tmp_path / "nope.safetensors"),
        ("npz", "x.npz"),
    ):
        with pytest.raises(SystemExit) as exit_:
            script.main(["--from", source, "--input", str(missing), "--output", str(tmp_path / "out")])
        assert exit_.value.code == 2
        assert f"--input {missing}: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
