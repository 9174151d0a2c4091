"""The transformers model types beyond ViT/DeiT/DINOv2 (tests/test_convert.py): MAE, MSN, I-JEPA, SimMIM models,
timm models saved through transformers' TimmWrapper classes, their preprocessing, and the refusal of every type
vitrail does not convert. Each reference is a tiny random transformers model with every parameter perturbed, saved
with `save_pretrained` (and in the 5.x in-memory layout where transformers has one), converted and compared."""

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import save_file

from vitrail import (
    VitrailForImageClassification,
    VitrailForMaskedImageModeling,
    VitrailImageProcessor,
    VitrailModel,
)
from vitrail.convert import (
    REFUSED_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    convert_hf_state_dict,
    load_hf_checkpoint,
    load_image_processor,
)
from vitrail.convert.hf import FAMILIES, hf_rename_rows

from .conftest import load_script
from .hf_references import (
    CASES,
    LABELS,
    PATCHES,
    SHAPE,
    TIMM_ARCHITECTURES,
    mae_encoder,
    reference_output,
    save,
    timm_wrapper,
    vision_tower,
)


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "name, layout", [(name, layout) for name, case in CASES.items() for layout in case.layouts]
)
def test_parity_at_the_native_size_and_another(name, layout, tmp_path, pixels):
    case = CASES[name]
    reference = case.build()
    model = load_hf_checkpoint(save(reference, tmp_path, layout))
    assert type(model) is case.vitrail_class and not model.training
    for key, value in case.config.items():
        assert getattr(model.config, key) == value, key
    with torch.no_grad():
        got = getattr(model(pixels), case.output)
    torch.testing.assert_close(got, reference_output(case, reference, pixels), atol=1e-5, rtol=0)
    if case.pooler:
        with torch.no_grad():
            want = getattr(reference, "vision_model", reference)(pixels).pooler_output
            torch.testing.assert_close(model(pixels).pooler_output, want, atol=1e-5, rtol=0)
    # Another (non-square) size: transformers resamples its table with `interpolate_pos_encoding=True` (plain
    # bicubic), and so does the converted model.
    if case.other_size is None:
        return
    other = torch.randn(2, 3, *case.other_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = getattr(model(other, interpolate_pos_encoding=True), case.output)
    want = reference_output(
        case, reference, other, **({} if case.resamples else {"interpolate_pos_encoding": True})
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_from_pretrained_opens_each_type_as_each_class(name, tmp_path, pixels):
    """`from_pretrained` converts on the way in; `VitrailModel` gives the backbone of any of them."""
    case = CASES[name]
    reference = case.build()
    reference.save_pretrained(tmp_path)
    model = case.vitrail_class.from_pretrained(tmp_path)
    backbone = VitrailModel.from_pretrained(tmp_path)
    with torch.no_grad():
        got = getattr(model(pixels), case.output)
        tokens = backbone(pixels).last_hidden_state
        if name.startswith("vit_mae"):
            want_tokens = mae_encoder(reference, pixels)
        elif name.startswith("clip-head"):  # the tokens before the post-LayerNorm, which the head skips
            want_tokens = vision_tower(reference, pixels)
        elif name.startswith("dinov3"):
            want_tokens = reference(pixels).last_hidden_state
        else:
            want_tokens = getattr(reference, "vision_model", reference.base_model)(pixels).last_hidden_state
    torch.testing.assert_close(got, reference_output(case, reference, pixels), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, want_tokens, atol=1e-5, rtol=0)


def test_the_mae_decoder_is_dropped_with_its_reason(tmp_path, caplog):
    reference = CASES["vit_mae-pretraining"].build()
    with caplog.at_level(logging.INFO, logger="vitrail.convert"):
        load_hf_checkpoint(save(reference, tmp_path, "hub"))
    assert "Dropped decoder.decoder_embed.weight: MAE's pixel decoder" in caplog.text
    assert "mask_ratio=0.0 and noise=arange" in caplog.text


def test_ijepa_pooler_is_dropped_and_the_head_reads_the_token_mean(tmp_path, pixels, caplog):
    reference = CASES["ijepa"].build()
    with caplog.at_level(logging.INFO, logger="vitrail.convert"):
        model = load_hf_checkpoint(save(reference, tmp_path, "hub"))
    assert "Dropped pooler.dense.weight" in caplog.text
    with torch.no_grad():
        out = model(pixels)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["vit-simmim", "deit-simmim"])
def test_simmim_loss_and_reconstruction_match(name, tmp_path, pixels):
    """The same masked patches give the same reconstruction and L1 loss (transformers divides by the channel count
    after adding its epsilon, vitrail before: the losses differ by far less than the tolerance)."""
    reference = CASES[name].build()
    model = VitrailForMaskedImageModeling.from_pretrained(save(reference, tmp_path, "hub"))
    mask = torch.rand(2, PATCHES, generator=torch.Generator().manual_seed(3)) > 0.5
    with torch.no_grad():
        got, want = model(pixels, bool_masked_pos=mask), reference(pixels, bool_masked_pos=mask)
    torch.testing.assert_close(got.reconstruction, want.reconstruction, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)


def test_a_simmim_checkpoint_opens_as_a_classifier_without_its_decoder(tmp_path, pixels, caplog):
    reference = CASES["vit-simmim"].build()
    reference.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO):
        model = VitrailForImageClassification.from_pretrained(tmp_path, num_labels=3)
    assert "decoder and mask token are not loaded" in caplog.text
    assert not hasattr(model.vitrail.embeddings, "mask_token") or model.vitrail.embeddings.mask_token is None
    with torch.no_grad():
        want = reference.vit(pixels).last_hidden_state
        torch.testing.assert_close(model.vitrail(pixels).last_hidden_state, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "cls_name, reason",
    [
        ("BeitForMaskedImageModeling", "predicts the ids of a visual tokenizer"),
        ("BeitForSemanticSegmentation", "semantic-segmentation heads"),
    ],
)
def test_beit_heads_vitrail_lacks_are_refused_by_name(cls_name, reason, tmp_path):
    # Four layers: BEiT's segmentation model reads four stages.
    config = transformers.BeitConfig(**{**SHAPE, "num_hidden_layers": 4}, out_indices=[1, 2, 3, 4], **LABELS)
    model = getattr(transformers, cls_name)(config)
    model.save_pretrained(tmp_path)
    for load in (load_hf_checkpoint, VitrailModel.from_pretrained):
        with pytest.raises(NotImplementedError, match=reason):
            load(tmp_path)
    # Without the config's word for it, the head's tensors say it too.
    with pytest.raises(NotImplementedError, match=reason):
        convert_hf_state_dict(model.state_dict(), transformers.BeitConfig(**SHAPE))


@pytest.mark.parametrize("head", [True, False], ids=["classifier", "model"])
@pytest.mark.parametrize("architecture", list(TIMM_ARCHITECTURES))
def test_timm_wrapper_saves_convert_through_the_timm_converter(architecture, head, tmp_path, pixels, caplog):
    reference = timm_wrapper(head, architecture)
    reference.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "timm_wrapper"
    with caplog.at_level(logging.INFO, logger="vitrail.convert"):
        model = load_hf_checkpoint(tmp_path)
    assert "'timm_model.' prefix taken off" in caplog.text
    loaded = (VitrailForImageClassification if head else VitrailModel).from_pretrained(tmp_path)
    with torch.no_grad():
        want = reference(pixels)
        for converted in (model, loaded):
            got = converted(pixels)
            if head:
                assert converted.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
                torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
            else:
                assert type(converted) is VitrailModel
                torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)


def test_timm_wrapper_tensors_without_the_prefix_are_refused(tmp_path):
    from safetensors.torch import load_file

    timm_wrapper(True, "vit_small_patch16_224").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["blocks.0.stray"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"tensors all start with 'timm_model\.', but \['blocks\.0\.stray'\]"
    ):
        load_hf_checkpoint(tmp_path)


# ---- the script ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["vit_mae-pretraining", "ijepa-head", "vit-simmim", "timm_wrapper", "clip", "siglip_vision_model",
     "beit-head-shared-absolute", "dinov3_vit"],
)  # fmt: skip
def test_script_compares_each_type_with_transformers(name, tmp_path, capsys):
    """`convert_checkpoint.py --from hf` runs transformers' own model beside the converted one: MAE's encoder
    without masking, SimMIM's reconstruction, a TimmWrapper through timm, the vision tower of an image-text model;
    at the native size and another one."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    reference = timm_wrapper(True, "vit_small_patch16_224") if name == "timm_wrapper" else CASES[name].build()
    reference.save_pretrained(src)
    size = "26" if name == "vit-simmim" else "38x26"  # transformers' SimMIM reshapes to a square grid
    argv = ["--from", "hf", "--input", str(src), "--output", str(dst), "--image-size", size]
    assert load_script("scripts/convert_checkpoint.py").main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "max abs logit difference" in line]
    assert len(lines) == 4 and all(float(line.rsplit(": ", 1)[1]) < 1e-5 for line in lines)


# ---- preprocessing ------------------------------------------------------------------------------------------------


IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


@pytest.mark.parametrize(
    "backend, settings",
    [
        # facebook/vit-mae-*: 224 squash, bicubic. vitrail resizes bicubic as PIL does (transformers' PIL backend).
        ("ViTImageProcessorPil", dict(size={"height": 224, "width": 224}, resample=3, **IMAGENET)),
        # bilinear (ViTImageProcessor's default) as torch's antialiased kernel does (the torchvision backend).
        ("ViTImageProcessor", dict(size={"height": 448, "width": 448}, resample=2, **IMAGENET)),
    ],
)
def test_vit_processor_configs_translate_and_match_on_a_photo(backend, settings, tmp_path):
    """MAE, MSN and I-JEPA repos carry a ViTImageProcessor config; load_image_processor gives the same pixels."""
    from sklearn.datasets import load_sample_images

    theirs = getattr(transformers, backend)(**settings)
    theirs.save_pretrained(tmp_path)
    ours = load_image_processor(tmp_path)
    assert isinstance(ours, VitrailImageProcessor)
    photo = load_sample_images().images[0]
    want = theirs(photo, return_tensors="pt").pixel_values
    torch.testing.assert_close(ours(photo, return_tensors="pt").pixel_values, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "backend",
    [
        "CLIPImageProcessorPil",  # CLIP and its kin, AIMv2: shortest edge 224, center crop, bicubic, CLIP statistics
        "SiglipImageProcessorPil",  # SigLIP: squash to 224, bicubic, mean and std 0.5, no crop
        "BeitImageProcessorPil",  # BEiT, data2vec-vision: squash, bicubic, 0.5 (label reduction is for masks only)
    ],
)
def test_tower_processors_translate_with_their_defaults(backend, tmp_path):
    """Each family's processor, saved with its own defaults, gives the same pixels through vitrail's."""
    from sklearn.datasets import load_sample_images

    theirs = getattr(transformers, backend)()
    theirs.save_pretrained(tmp_path)
    ours = load_image_processor(tmp_path)
    photo = load_sample_images().images[1]
    want = theirs(photo, return_tensors="pt").pixel_values
    torch.testing.assert_close(ours(photo, return_tensors="pt").pixel_values, want, atol=1e-5, rtol=0)


def test_dinov3_processor_translates_within_one_level_and_says_so(tmp_path, caplog):
    """DINOv3's processor (squash, bilinear, ImageNet statistics) rescales before it resizes, resizing floats where
    vitrail resizes 8-bit levels: a pixel differs by at most one level (1/255, over the channel's std), and the
    translation warns that it can."""
    from sklearn.datasets import load_sample_images

    theirs = transformers.DINOv3ViTImageProcessor()
    theirs.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vitrail.convert"):
        ours = load_image_processor(tmp_path)
    assert "rescales to [0, 1] before resizing" in caplog.text
    photo = load_sample_images().images[1]
    got, want = ours(photo, return_tensors="pt").pixel_values, theirs(photo, return_tensors="pt").pixel_values
    level = torch.tensor(1 / 255) / torch.tensor(theirs.image_std).reshape(1, 3, 1, 1)
    assert got.shape == want.shape and bool(((got - want).abs() <= level + 1e-6).all())


def test_timm_wrapper_processor_comes_from_its_pretrained_cfg(tmp_path):
    """A TimmWrapper save keeps timm's `pretrained_cfg` in config.json, as timm's repos do; the processor
    translated from it gives the pixels transformers' TimmWrapperImageProcessor gives (timm's own transform)."""
    from sklearn.datasets import load_sample_images

    pretrained_cfg = dict(input_size=[3, 30, 30], crop_pct=0.9, crop_mode="center", interpolation="bicubic",
                          mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])  # fmt: skip
    timm_wrapper(True, "vit_small_patch16_224", pretrained_cfg=pretrained_cfg).save_pretrained(tmp_path)
    ours = load_image_processor(tmp_path)
    theirs = transformers.TimmWrapperImageProcessor(pretrained_cfg=pretrained_cfg)
    photo = load_sample_images().images[1]
    want = theirs(photo, return_tensors="pt").pixel_values
    torch.testing.assert_close(ours(photo, return_tensors="pt").pixel_values, want, atol=1e-5, rtol=0)


# ---- what converts, what is refused -------------------------------------------------------------------------------


def test_every_family_fills_the_same_names_in_both_layouts():
    for family in FAMILIES:
        hub = {row.target for row in hf_rename_rows(family, "hub")}
        assert hub == {row.target for row in hf_rename_rows(family, "v5")}, family


@pytest.mark.parametrize("model_type", sorted(REFUSED_MODEL_TYPES))
def test_types_vitrail_does_not_convert_are_refused_naming_what_is_missing(model_type, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    reason = REFUSED_MODEL_TYPES[model_type]
    assert model_type not in SUPPORTED_MODEL_TYPES
    with pytest.raises(NotImplementedError, match=f"does not convert transformers '{model_type}'") as error:
        VitrailModel.from_pretrained(tmp_path)
    assert reason in str(error.value)
