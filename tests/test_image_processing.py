"""VitrailImageProcessor: every input kind and PIL mode in, the right `pixel_values` out, checked by hand."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from vitrail import VitrailImageProcessor

H, W = 12, 10  # odd, non-square input so that a swapped height/width cannot pass
STEP = 2 / 255  # one 8-bit level after normalisation with mean = std = 0.5


def rgb_array(seed: int = 0, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def by_hand(array_hwc: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> (C, H, W) float, rescaled and normalised with the defaults (mean = std = 0.5)."""
    return (np.moveaxis(array_hwc, -1, 0).astype(np.float64) / 255 - 0.5) / 0.5


def run(processor, images, **kwargs) -> np.ndarray:
    return processor(images, return_tensors="np", **kwargs)["pixel_values"]


@pytest.fixture
def identity() -> VitrailImageProcessor:
    """No resize: output pixel (i, j) is input pixel (i, j), so values can be compared one to one."""
    return VitrailImageProcessor(do_resize=False)


def pil_image(mode: str) -> PIL.Image.Image:
    rgb = PIL.Image.fromarray(rgb_array())
    if mode == "I;16":
        return PIL.Image.fromarray(np.random.default_rng(1).integers(0, 65536, (H, W), dtype=np.uint16))
    if mode == "P+transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 0
        return image
    if mode in ("LA", "RGBA"):
        image = rgb.convert(mode)
        image.putalpha(PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (H, W), dtype=np.uint8)))
        return image
    return rgb.convert(mode)


MODES = ["L", "LA", "P", "P+transparency", "RGB", "RGBA", "CMYK", "I;16"]


# ---- PIL modes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_channels", [3, 1])
@pytest.mark.parametrize("mode", MODES)
def test_pil_modes_give_model_shape(mode, num_channels):
    """Every common PIL mode becomes a float32 (B, num_channels, H, W) batch inside [-1, 1]."""
    processor = VitrailImageProcessor(size={"height": 8, "width": 6}, num_channels=num_channels)
    image = pil_image(mode)
    assert image.mode == mode.split("+")[0]
    out = processor([image, image], return_tensors="pt")["pixel_values"]
    assert out.shape == (2, num_channels, 8, 6)
    assert out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.std() > 0.1  # the content survived (a blank or constant image would have no spread)


def test_rgba_transparent_pixels_become_white(identity):
    """Alpha 0 -> white (1.0 once normalised), alpha 255 -> the pixel's own colour, for PIL and numpy RGBA."""
    rgba = np.concatenate([rgb_array(), np.zeros((H, W, 1), np.uint8)], axis=-1)
    rgba[: H // 2, :, 3] = 255  # top half opaque, bottom half fully transparent
    for image in (PIL.Image.fromarray(rgba, "RGBA"), rgba):
        out = run(identity, image)[0]
        np.testing.assert_array_equal(out[:, H // 2 :], 1.0)
        np.testing.assert_allclose(out[:, : H // 2], by_hand(rgba[: H // 2, :, :3]), atol=1e-6)


def test_rgba_numpy_and_pil_composite_identically(identity):
    """Half-transparent pixels are blended over white and rounded like PIL, whatever the input type."""
    rgba = np.random.default_rng(3).integers(0, 256, (H, W, 4), dtype=np.uint8)
    from_pil = run(identity, PIL.Image.fromarray(rgba, "RGBA"))
    from_numpy = run(identity, rgba)
    from_tensor = run(identity, torch.from_numpy(np.moveaxis(rgba, -1, 0).copy()))
    alpha = rgba[..., 3:] / 255
    expected = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    np.testing.assert_allclose(from_pil[0], by_hand(expected), atol=1e-6)
    np.testing.assert_array_equal(from_numpy, from_pil)
    np.testing.assert_array_equal(from_tensor, from_pil)


def test_palette_transparency_becomes_white(identity):
    """A P image's transparent index turns white; without `transparency` the palette colour is kept."""
    indices = np.random.default_rng(4).integers(0, 3, (H, W), dtype=np.uint8)
    palette = [(200, 10, 30), (0, 90, 250), (17, 34, 51)]
    image = PIL.Image.fromarray(indices, "P")
    image.putpalette([c for rgb in palette for c in rgb])
    opaque = run(identity, image)[0]
    np.testing.assert_allclose(opaque, by_hand(np.array(palette, np.uint8)[indices]), atol=1e-6)

    image.info["transparency"] = 2
    transparent = run(identity, image)[0]
    np.testing.assert_array_equal(transparent[:, indices == 2], 1.0)
    np.testing.assert_array_equal(transparent[:, indices != 2], opaque[:, indices != 2])


def test_la_composites_over_white(identity):
    """LA: gray value blended with white by alpha, then repeated on three channels."""
    gray = np.random.default_rng(5).integers(0, 256, (H, W), dtype=np.uint8)
    alpha = np.random.default_rng(6).integers(0, 256, (H, W), dtype=np.uint8)
    out = run(identity, PIL.Image.fromarray(np.stack([gray, alpha], -1), "LA"))[0]
    blended = np.round(gray * (alpha / 255) + 255 * (1 - alpha / 255))
    np.testing.assert_allclose(out[0], (blended / 255 - 0.5) / 0.5, atol=STEP + 1e-6)


def test_grayscale_to_rgb_repeats_the_channel(identity):
    """An L image read by a 3-channel model gives three identical channels equal to the gray values."""
    gray = np.random.default_rng(7).integers(0, 256, (H, W), dtype=np.uint8)
    for image in (PIL.Image.fromarray(gray, "L"), gray, gray[..., None], torch.from_numpy(gray)[None]):
        out = run(identity, image)[0]
        assert out.shape == (3, H, W)
        np.testing.assert_array_equal(out[0], out[1])
        np.testing.assert_array_equal(out[0], out[2])
        np.testing.assert_allclose(out[0], (gray / 255 - 0.5) / 0.5, atol=1e-6)


def test_rgb_to_grayscale_uses_luma(identity):
    """num_channels=1 converts RGB with ITU-R 601 luma: PIL's convert("L") within one level, PIL or numpy."""
    rgb = rgb_array(8)
    expected = np.asarray(PIL.Image.fromarray(rgb).convert("L"), dtype=np.float64)
    expected = (expected / 255 - 0.5) / 0.5
    for image in (PIL.Image.fromarray(rgb), rgb, np.moveaxis(rgb, -1, 0)):
        out = run(identity, image, num_channels=1)
        assert out.shape == (1, 1, H, W)
        np.testing.assert_allclose(out[0, 0], expected, atol=STEP + 1e-6)
    # A plain channel average would be far off on saturated colours: the weights matter.
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    assert run(identity, red, num_channels=1)[0, 0, 0, 0] == pytest.approx((76 / 255 - 0.5) / 0.5, abs=STEP)


def test_sixteen_bit_images_scale_the_full_range(identity):
    """I;16 spans 0..65535: black stays -1, white reaches 1 and mid-gray 128, instead of clipping at 255."""
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    out = run(identity, PIL.Image.fromarray(values), num_channels=1)[0, 0, 0]
    np.testing.assert_allclose(out, [-1.0, (128 / 255 - 0.5) / 0.5, 1.0], atol=1e-6)


def test_32_bit_pil_modes_are_refused():
    """Mode I and F have no fixed range; the processor says so rather than guessing a scale."""
    with pytest.raises(ValueError, match="32-bit values"):
        VitrailImageProcessor()(PIL.Image.fromarray(np.zeros((4, 4), np.int32)))


# ---- arrays, tensors, lists --------------------------------------------------------------------------------


def test_arrays_and_tensors_match_pil():
    """HWC and CHW arrays, CHW and BCHW tensors and a file path all give the PIL image's output."""
    processor = VitrailImageProcessor(size={"height": 7, "width": 9})
    rgb = rgb_array(9)
    chw = np.moveaxis(rgb, -1, 0).copy()
    reference = run(processor, PIL.Image.fromarray(rgb))
    assert reference.shape == (1, 3, 7, 9)
    for image in (rgb, chw, torch.from_numpy(chw)):
        np.testing.assert_array_equal(run(processor, image), reference)
    batch = torch.from_numpy(np.stack([chw, chw[:, ::-1].copy()]))
    out = run(processor, batch)
    assert out.shape == (2, 3, 7, 9)
    np.testing.assert_array_equal(out[0], reference[0])
    np.testing.assert_array_equal(out[1], run(processor, PIL.Image.fromarray(rgb[::-1].copy()))[0])


def test_image_path_is_read(tmp_path, identity):
    """A path string is opened as an image (transformers' `load_image`)."""
    path = tmp_path / "image.png"
    PIL.Image.fromarray(rgb_array(10)).save(path)
    np.testing.assert_array_equal(run(identity, str(path)), run(identity, PIL.Image.fromarray(rgb_array(10))))


def test_mixed_list(identity):
    """One list may mix PIL, HWC array, CHW tensor and 2-D grayscale array; each keeps its own values."""
    rgb, gray = rgb_array(11), rgb_array(12)[..., 0]
    images = [gray, PIL.Image.fromarray(rgb), rgb, torch.from_numpy(np.moveaxis(rgb, -1, 0).copy())]
    out = run(identity, images)
    assert out.shape == (4, 3, H, W)
    np.testing.assert_allclose(out[0], by_hand(np.repeat(gray[..., None], 3, -1)), atol=1e-6)
    for row in out[1:]:
        np.testing.assert_allclose(row, by_hand(rgb), atol=1e-6)


def test_values_match_a_hand_computation():
    """Resize with PIL bilinear, /255, (x - 0.5) / 0.5: the processor's numbers, computed independently."""
    rgb = rgb_array(13, height=23, width=17)
    processor = VitrailImageProcessor(size={"height": 8, "width": 6})
    resized = np.asarray(PIL.Image.fromarray(rgb).resize((6, 8), PIL.Image.Resampling.BILINEAR))
    for image in (PIL.Image.fromarray(rgb), rgb):
        out = processor(image, return_tensors="pt")["pixel_values"]
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out[0].numpy(), by_hand(resized), atol=1e-6)


def test_float_input_without_rescale(identity):
    """Float images already in [0, 1] with `do_rescale=False` are only normalised."""
    image = np.random.default_rng(14).random((H, W, 3), dtype=np.float32)
    out = run(identity, image, do_rescale=False)
    np.testing.assert_allclose(out[0], (np.moveaxis(image, -1, 0) - 0.5) / 0.5, atol=1e-6)


# ---- crop_pct ----------------------------------------------------------------------------------------------


def manual_crop(image: PIL.Image.Image, resize_to: tuple[int, int], crop: tuple[int, int]) -> np.ndarray:
    """PIL resize to (width, height), then the central (width, height) window."""
    image = image.resize(resize_to, PIL.Image.Resampling.BILINEAR)
    left, top = (resize_to[0] - crop[0]) // 2, (resize_to[1] - crop[1]) // 2
    return np.asarray(image.crop((left, top, left + crop[0], top + crop[1])))


@pytest.mark.parametrize(
    ("image_wh", "crop_pct", "resize_wh"),
    [
        ((32, 16), 0.5, (32, 16)),
        ((40, 20), 0.5, (32, 16)),
        ((15, 45), 0.5, (16, 48)),
        ((32, 20), 0.875, (14, 9)),  # floor(8 / 0.875) = 9, as timm
    ],
)
def test_crop_pct_resizes_shorter_side_then_center_crops(image_wh, crop_pct, resize_wh):
    """size 8x8: shorter side to floor(8 / crop_pct) keeping the aspect ratio, then the central 8x8."""
    image = PIL.Image.fromarray(rgb_array(15, height=image_wh[1], width=image_wh[0]))
    processor = VitrailImageProcessor(size={"height": 8, "width": 8}, crop_pct=crop_pct)
    out = run(processor, image)
    assert out.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(out[0], by_hand(manual_crop(image, resize_wh, (8, 8))), atol=1e-6)
    # Without crop_pct the whole image is squeezed into 8x8 instead: a different picture.
    assert not np.allclose(out, run(VitrailImageProcessor(size={"height": 8, "width": 8}), image))


def test_crop_pct_non_square_size():
    """A non-square size scales both sides by 1 / crop_pct (floored), then crops the centre."""
    image = PIL.Image.fromarray(rgb_array(16, height=30, width=50))
    out = run(VitrailImageProcessor(size={"height": 8, "width": 12}, crop_pct=0.875), image)
    assert out.shape == (1, 3, 8, 12)
    np.testing.assert_allclose(out[0], by_hand(manual_crop(image, (13, 9), (12, 8))), atol=1e-6)


def test_crop_pct_out_of_range():
    """crop_pct is a kept fraction: 0 and values above 1 are refused."""
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="crop_pct"):
            VitrailImageProcessor(crop_pct=bad)(rgb_array())


# ---- save / load -------------------------------------------------------------------------------------------


def test_save_and_auto_load(tmp_path):
    """preprocessor_config.json names the class and keeps crop_pct and num_channels; AutoImageProcessor
    rebuilds an equal processor that gives equal outputs."""
    processor = VitrailImageProcessor(size={"height": 16, "width": 16}, crop_pct=0.875, num_channels=1)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "VitrailImageProcessor"
    assert saved["crop_pct"] == 0.875 and saved["num_channels"] == 1
    assert saved["size"] == {"height": 16, "width": 16}

    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is VitrailImageProcessor
    assert loaded.to_dict() == processor.to_dict()
    images = [PIL.Image.fromarray(rgb_array(17, height=40, width=25)), rgb_array(18)]
    out = run(loaded, images)
    assert out.shape == (2, 1, 16, 16)
    np.testing.assert_array_equal(out, run(processor, images))


def test_grayscale_statistics():
    """num_channels=1 reduces an equal per-RGB mean/std to one value and refuses an ambiguous one."""
    gray = rgb_array(19)[..., 0]
    out = run(VitrailImageProcessor(do_resize=False, num_channels=1, image_mean=[0.5] * 3), gray)
    np.testing.assert_allclose(out[0, 0], (gray / 255 - 0.5) / 0.5, atol=1e-6)
    imagenet = VitrailImageProcessor(num_channels=1, image_mean=[0.485, 0.456, 0.406], image_std=[0.2] * 3)
    with pytest.raises(ValueError, match="one value per RGB channel"):
        imagenet(gray)
    out = run(imagenet, gray, image_mean=[0.449], do_resize=False)
    np.testing.assert_allclose(out[0, 0], (gray / 255 - 0.449) / 0.2, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "error", "fragment"),
    [
        (
            np.zeros((H, W, 2), np.uint8),
            ValueError,
            r"shape \(12, 10, 2\): expected 1 \(grayscale\), 3 \(RGB\)",
        ),
        (np.zeros((1, 2, 3, H, W), np.uint8), ValueError, r"image array of shape \(1, 2, 3, 12, 10\)"),
        (np.zeros((W,), np.uint8), ValueError, r"image array of shape \(10,\)"),
        ("not an image", ValueError, "Incorrect image source"),
        (42, TypeError, "got type=<class 'int'>"),
    ],
    ids=["two-channels", "5-d", "1-d", "string", "int"],
)
def test_bad_input_is_refused_clearly(image, error, fragment):
    """Inputs that are not images fail with a message that says what is wrong."""
    with pytest.raises(error, match=fragment):
        VitrailImageProcessor()(image)


def test_bad_num_channels():
    """Only 1 and 3 output channels exist."""
    with pytest.raises(ValueError, match="`num_channels` must be 1 or 3, got 2"):
        VitrailImageProcessor(num_channels=2)(rgb_array())


# ---- torchvision is optional -------------------------------------------------------------------------------


def test_works_without_torchvision(tmp_path):
    """Without torchvision, vitrail imports and the processor runs, directly and via AutoImageProcessor."""
    VitrailImageProcessor(size={"height": 16, "width": 24}, crop_pct=0.9).save_pretrained(tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torchvision"] = None
        import numpy as np
        import PIL.Image
        from transformers import AutoImageProcessor
        from transformers.utils import is_torchvision_available
        import vitrail

        assert not is_torchvision_available()
        image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 4), dtype=np.uint8))
        direct = vitrail.VitrailImageProcessor(size={{"height": 16, "width": 24}})(image, return_tensors="pt")
        auto = AutoImageProcessor.from_pretrained({str(tmp_path)!r})
        loaded = auto([image, image], return_tensors="pt")
        print("torchvision imported:", sys.modules.get("torchvision") is not None)
        print("direct", tuple(direct["pixel_values"].shape), direct["pixel_values"].dtype)
        print("auto", type(auto).__name__, tuple(loaded["pixel_values"].shape))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "torchvision imported: False" in result.stdout
    assert "direct (1, 3, 16, 24) torch.float32" in result.stdout
    assert "auto VitrailImageProcessor (2, 3, 16, 24)" in result.stdout
