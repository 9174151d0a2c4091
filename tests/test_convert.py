"""Conversion of transformers ViT/DeiT checkpoints (both key layouts) into vitrail, checked by logit parity."""

import importlib.util
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
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from vitrail import VitrailForImageClassification, VitrailImageProcessor, VitrailModel
from vitrail.convert import (
    HF_LAYER_RENAMES,
    convert_hf_state_dict,
    detect_hf_layout,
    load_hf_checkpoint,
    vitrail_config_from_hf,
)

ROOT = Path(__file__).resolve().parents[1]
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
    assert f"{layout} layout" in caplog.text and "Fused q/k/v projections of 2 layers" in caplog.text
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
    assert "distillation token becomes register token 0" in caplog.text
    assert model.config.num_register_tokens == 1 and model.config.prefix_position_embeddings == "all"
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)


def test_distilled_deit_is_refused_clearly(tmp_path):
    reference = hf_vit(DeiTForImageClassificationWithTeacher, DeiTConfig)
    reference.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="distillation_classifier.*averaged"):
        load_hf_checkpoint(tmp_path)
    # Also when the config does not say so: the two heads' keys give it away.
    config = DeiTConfig(**SHAPE)
    with pytest.raises(NotImplementedError, match="single `classifier`"):
        convert_hf_state_dict(reference.state_dict(), config)


def test_pickle_only_folder_is_refused_without_allow_pickle(tmp_path, pixels):
    reference = hf_vit()
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pytorch_model.bin.*allow_pickle=True"):
        load_hf_checkpoint(tmp_path)
    model = load_hf_checkpoint(tmp_path, allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=1e-5, rtol=0)


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


def test_rename_tables_cover_the_same_vitrail_names():
    """One table per layout, and both reach the same vitrail parameters in the same q/k/v slots."""
    hub, v5 = ([(dst, slot) for _, dst, slot in HF_LAYER_RENAMES[layout][1]] for layout in ("hub", "v5"))
    assert hub == v5


def _script():
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", ROOT / "scripts" / "convert_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

    assert _script().main(["--from", "hf", "--input", str(src), "--output", str(dst)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("max abs logit difference: "))
    assert float(line.split(": ")[1]) < 1e-5

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


@pytest.mark.parametrize("source", ["timm", "npz"])
def test_script_other_sources_not_implemented_yet(source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script().main(["--from", source, "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert f"--from {source} is not implemented yet" in capsys.readouterr().err
