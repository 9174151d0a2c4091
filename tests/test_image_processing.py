"""VitrailImageProcessor: every input kind and PIL mode in, the right `pixel_values` out, checked by hand."""

import base64
import http.server
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from functools import partial

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from vitrail import VitrailImageProcessor

H, W = 12, 10  # odd, non-square input so that a swapped height/width cannot pass
STEP = 2 / 255  # one 8-bit level after normalisation with mean = std = 0.5
# Bilinear resizes run torch's antialiased uint8 kernel, which rounds its fixed-point weights differently from
# PIL's: a few pixels land one 8-bit level from PIL's resize (test_bilinear_within_one_level_of_pil), never more.
ONE_LEVEL = STEP + 1e-6


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


# ---- the resize: torch for bilinear, PIL for the other filters ------------------------------------------------


def pil_bands(
    array_chw: np.ndarray, height: int, width: int, resample=PIL.Image.Resampling.BILINEAR
) -> np.ndarray:
    """What the processor computed before it resized with torch: PIL, band by band (mode L, or F for floats)."""
    mode = "L" if array_chw.dtype == np.uint8 else "F"
    return np.stack(
        [
            np.asarray(
                PIL.Image.fromarray(np.ascontiguousarray(band), mode).resize((width, height), resample)
            )
            for band in array_chw
        ]
    )


def photo_crops(count: int) -> list[np.ndarray]:
    """`count` crops of varied size and place from sklearn's two real photos (427 x 640), as (H, W, 3) uint8."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(40)
    crops = []
    for index in range(count):
        height, width = int(rng.integers(60, 427)), int(rng.integers(60, 640))
        top, left = int(rng.integers(0, 427 - height + 1)), int(rng.integers(0, 640 - width + 1))
        crops.append(photos[index % 2][top : top + height, left : left + width])
    return crops


def test_bilinear_within_one_level_of_pil():
    """On real photos (shrunk and enlarged) and on noise, bilinear outputs stay within one 8-bit level of PIL's
    resize, which the processor used before; most pixels are equal."""
    images = [*photo_crops(12), rgb_array(41, height=23, width=17), rgb_array(42, height=5, width=300)]
    processor = VitrailImageProcessor(size={"height": 224, "width": 160})
    out = run(processor, images)
    differing = 0
    for image, row in zip(images, out, strict=True):
        expected = (pil_bands(np.moveaxis(image, -1, 0), 224, 160) / 255 - 0.5) / 0.5
        np.testing.assert_allclose(row, expected, atol=ONE_LEVEL)
        differing += np.count_nonzero(np.abs(row - expected) > 1e-6)
    share = differing / out.size
    print(f"{share:.2%} of the values are one level from PIL's")
    assert share < 0.1  # 2.9% here


def test_bilinear_equals_transformers_torchvision_backend():
    """Bilinear to 224 x 224 with the default statistics gives exactly transformers' ViTImageProcessor with its
    torchvision backend (the same torch kernel, the same fused (x - 127.5) / 127.5), here on photo crops."""
    pytest.importorskip(
        "torchvision", reason="transformers' torchvision backend needs torchvision (a dev dependency)"
    )
    from transformers import ViTImageProcessor

    reference = ViTImageProcessor()
    assert reference.backend == "torchvision"
    images = [PIL.Image.fromarray(crop) for crop in photo_crops(8)]
    ours = VitrailImageProcessor()(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(ours, reference(images, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_one_pixel_wide_outputs_match_pil(dtype):
    """torch 2.14's generic antialiased kernel (any CPU for 5 bands; CPUs without AVX2 for all) resamples to
    one-pixel-wide outputs wrongly, by up to a third of the range: such outputs go through PIL."""
    bands = np.random.default_rng(43).integers(0, 256, (5, 57, 2), dtype=np.uint8).astype(dtype)
    processor = VitrailImageProcessor(size={"height": 18, "width": 1}, num_channels=5, do_normalize=False)
    out = run(processor, bands, input_data_format="channels_first")[0]
    np.testing.assert_allclose(out * 255, pil_bands(bands, 18, 1), atol=1e-3)


def test_floats_resize_as_pil_float_mode():
    """Float images resize in float (torch's kernel on float32) to PIL's mode F numbers, within float rounding."""
    image = np.random.default_rng(44).random((3, 31, 45), dtype=np.float32)
    out = run(VitrailImageProcessor(size={"height": 13, "width": 20}, do_normalize=False), image)[0]
    np.testing.assert_allclose(out * 255, pil_bands(image * 255, 13, 20), atol=1e-3)


@pytest.mark.parametrize("resample", [PIL.Image.Resampling.BICUBIC, PIL.Image.Resampling.LANCZOS])
def test_other_filters_are_pil_exactly(resample):
    """Bicubic and the other filters stay PIL's, pixel for pixel: torch's bicubic lands up to 8 levels from PIL's
    8-bit bicubic at sharp edges (measured on the photos), and timm's evaluation transform is PIL's."""
    crop = photo_crops(1)[0]
    out = run(VitrailImageProcessor(size={"height": 50, "width": 70}, resample=resample), crop)[0]
    np.testing.assert_allclose(
        out, by_hand(np.moveaxis(pil_bands(np.moveaxis(crop, -1, 0), 50, 70, resample), 0, -1)), atol=1e-6
    )


def test_read_only_images_raise_no_warning():
    """PIL's pixels arrive as read-only arrays; torch warns on those, so the processor copies them first."""
    image = PIL.Image.fromarray(rgb_array(45, height=30, width=20))
    assert not np.asarray(image).flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VitrailImageProcessor(size={"height": 8, "width": 8})(image)
        VitrailImageProcessor(do_resize=False)(image)


VIEWS = {
    "bgr-to-rgb": lambda image: image[..., ::-1],
    "fliplr": np.fliplr,
    "flipud": lambda image: image[::-1],
    "rot90": np.rot90,
    "every-other-row": lambda image: image[::-2],
    "channels-first-flipped": lambda image: np.moveaxis(image, -1, 0)[:, :, ::-1],
}


@pytest.mark.parametrize("resample", [PIL.Image.Resampling.BILINEAR, PIL.Image.Resampling.BICUBIC])
@pytest.mark.parametrize("view", list(VIEWS))
def test_views_with_negative_strides_read_as_their_copy(view, resample):
    """Flips and BGR -> RGB slices are numpy views with negative strides, which torch cannot take: they give the
    pixel values of their contiguous copy, resized or not, as uint8 and as float."""
    for image in (rgb_array(46, height=30, width=20), rgb_array(47, height=30, width=20) / np.float32(255)):
        flipped = VIEWS[view](image)
        assert any(stride < 0 for stride in flipped.strides)
        for processor in (
            VitrailImageProcessor(size={"height": 9, "width": 7}, resample=resample),
            VitrailImageProcessor(do_resize=False),
        ):
            np.testing.assert_allclose(
                run(processor, flipped), run(processor, np.ascontiguousarray(flipped)), rtol=0, atol=1e-5
            )


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        (">u2", np.random.default_rng(48).integers(0, 65536, (H, W, 3))),
        (">i2", np.random.default_rng(49).integers(0, 256, (H, W, 3))),
        (">i4", np.random.default_rng(50).integers(0, 256, (H, W, 3))),
        (">f2", np.random.default_rng(51).random((H, W, 3))),
        (">f4", np.random.default_rng(52).random((H, W, 3))),
        (">f8", np.random.default_rng(53).random((H, W, 3)) * 255),
    ],
)
def test_big_endian_arrays_read_by_value(dtype, values):
    """A big-endian array (as read from a big-endian file) holds the same numbers as its native twin and gives
    the same pixel values: `>u2` is a 16-bit image, not an integer image out of the 8-bit range."""
    swapped = values.astype(dtype)
    native = values.astype(np.dtype(dtype).newbyteorder("="))
    assert not swapped.dtype.isnative and np.array_equal(swapped, native)
    for processor in (
        VitrailImageProcessor(size={"height": 5, "width": 7}),
        VitrailImageProcessor(do_resize=False),
    ):
        np.testing.assert_array_equal(run(processor, swapped), run(processor, native))
    # And flipped at once: both rules together.
    np.testing.assert_array_equal(
        run(VitrailImageProcessor(do_resize=False), swapped[::-1, ::-1]),
        run(VitrailImageProcessor(do_resize=False), native[::-1, ::-1].copy()),
    )


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_unusual_array_and_tensor_kinds_read_by_value(tmp_path, identity):
    """A numpy subclass (`np.matrix`), a sparse tensor and a `pathlib` path are read as the plain array, dense
    tensor and path string; a complex tensor and a meta tensor are refused by name."""
    gray = rgb_array(54)[..., 0]
    np.testing.assert_array_equal(run(identity, np.matrix(gray)), run(identity, gray))
    rgb = torch.from_numpy(rgb_array(55))
    np.testing.assert_array_equal(run(identity, rgb.to_sparse()), run(identity, rgb))
    path = tmp_path / "image.png"
    PIL.Image.fromarray(rgb_array(56)).save(path)
    np.testing.assert_array_equal(run(identity, path), run(identity, str(path)))
    with pytest.raises(TypeError, match="dtype complex64 are not supported"):
        identity(rgb.to(torch.complex64).conj())
    with pytest.raises(ValueError, match="meta device, which holds no values"):
        identity(torch.empty(H, W, 3, device="meta"))


@pytest.mark.parametrize("factor", [0, -1 / 255, float("inf"), float("nan"), True])
def test_rescale_factor_must_be_positive(factor):
    """The rescale factor divides the statistics into 8-bit levels: zero, negative or infinite factors are refused."""
    with pytest.raises(ValueError, match="`rescale_factor` must be a positive number"):
        VitrailImageProcessor(rescale_factor=factor)(rgb_array())


# ---- value ranges -----------------------------------------------------------------------------------------


def test_white_is_plus_one_in_every_dtype(identity):
    """White is +1 after the default normalisation whether it arrives as uint8 255, float 255.0, float 1.0 (what
    torchvision's ToTensor makes), uint16 65535, bool True or an int64 tensor of 255."""
    whites = [
        np.full((H, W, 3), 255, np.uint8),
        np.full((H, W, 3), 255.0, np.float32),
        np.ones((H, W, 3), np.float64),
        torch.ones(3, H, W),
        torch.ones(3, H, W, dtype=torch.bfloat16),
        np.full((H, W, 3), 65535, np.uint16),
        np.ones((H, W), bool),
        torch.full((3, H, W), 255),
    ]
    for image in whites:
        np.testing.assert_allclose(run(identity, image), 1.0, atol=1e-6, err_msg=str(image.dtype))


def test_unit_floats_are_not_rescaled_twice():
    """A float image in [0, 1] (e.g. `ToTensor()` output) gives the output of the uint8 image it came from: exactly
    without resize, within one 8-bit level with one (PIL rounds uint8 bands after each resize pass, floats not)."""
    rgb = rgb_array(20, height=23, width=17)
    unit = torch.from_numpy(np.moveaxis(rgb, -1, 0).copy()).float() / 255
    identity = VitrailImageProcessor(do_resize=False)
    np.testing.assert_allclose(run(identity, unit), run(identity, rgb), atol=1e-6)
    resizing = VitrailImageProcessor(size={"height": 8, "width": 6})
    np.testing.assert_allclose(run(resizing, unit), run(resizing, rgb), atol=STEP + 1e-6)


def test_floats_are_resized_without_rounding():
    """A float value between two 8-bit levels survives a resize (the uint8 path would round it to a level)."""
    value = 0.5 + 0.3 / 255  # 127.8 levels, between 127 and 128
    out = run(VitrailImageProcessor(size={"height": 5, "width": 7}), np.full((H, W, 3), value, np.float32))
    np.testing.assert_allclose(out, (value - 0.5) / 0.5, atol=1e-6)


def test_float_levels_and_integers_read_as_eight_bit(identity):
    """Floats above 1 are 0..255 levels and integers of any dtype in 0..255 are 8-bit: same output as uint8."""
    rgb = rgb_array(21)
    reference = run(identity, rgb)
    for image in (
        rgb.astype(np.float32),
        rgb.astype(np.int32),
        torch.from_numpy(rgb).long().permute(2, 0, 1),
    ):
        np.testing.assert_allclose(run(identity, image), reference, atol=1e-6)


def test_uint16_arrays_match_pil_sixteen_bit():
    """A uint16 array is a 16-bit image, read as PIL reads mode I;16 (scaled to 8 bits), resized or not."""
    values = np.random.default_rng(22).integers(0, 65536, (H, W), dtype=np.uint16)
    image = PIL.Image.fromarray(values)
    assert image.mode.startswith("I;16")
    for processor in (
        VitrailImageProcessor(do_resize=False),
        VitrailImageProcessor(size={"height": 5, "width": 7}),
    ):
        np.testing.assert_array_equal(run(processor, values), run(processor, image))


def test_bool_arrays_match_pil_bilevel(identity):
    """A bool array is black and white, as PIL's mode "1": False -> -1, True -> +1."""
    mask = np.random.default_rng(23).random((H, W)) < 0.5
    np.testing.assert_array_equal(run(identity, mask), run(identity, PIL.Image.fromarray(mask)))
    np.testing.assert_array_equal(run(identity, mask)[0, 0], np.where(mask, 1.0, -1.0))


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (
            np.full((H, W, 3), -0.5, np.float32),
            r"-0.5..-0.5 fit neither \[0, 1\] nor \[0, 255\].*`do_rescale=False`",
        ),
        (np.full((H, W, 3), 300.0, np.float32), r"300..300 fit neither"),
        (np.full((H, W, 3), np.nan, np.float32), "NaN or infinite"),
        (
            np.full((H, W, 3), 1e300, np.float64),
            r"NaN or infinite values \(or values beyond float32's range\)",
        ),
        (
            np.full((H, W, 3), 256, np.int64),
            r"Integer pixel values must lie in 0..255 \(8-bit\), got 256..256",
        ),
        (np.full((H, W, 3), -1, np.int8), r"got -1..-1 \(int8\)"),
    ],
    ids=["negative-float", "float-above-255", "nan", "beyond-float32", "int-above-255", "negative-int"],
)
@pytest.mark.filterwarnings("error::RuntimeWarning")  # no overflow warning on the way
def test_out_of_range_values_are_refused(image, fragment):
    """Values that fit no pixel scale are refused, never read as something else."""
    with pytest.raises(ValueError, match=fragment):
        VitrailImageProcessor()(image)


def test_do_rescale_false_keeps_values(identity):
    """With `do_rescale=False` the caller's values are kept: already normalised floats pass through untouched."""
    normalised = np.random.default_rng(24).normal(size=(3, H, W)).astype(np.float32)
    out = run(identity, normalised, do_rescale=False, do_normalize=False)
    np.testing.assert_array_equal(out[0], normalised)


def test_pixel_values_are_float32_whatever_the_flags(identity):
    """Even with rescale and normalisation off, uint8 input comes out as float32, the dtype the model reads."""
    out = identity(rgb_array(25), return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out[0].numpy(), np.moveaxis(rgb_array(25), -1, 0))


def test_different_sizes_without_resize_name_the_fix(identity):
    """Images of different sizes cannot form one tensor without resizing: the error says so; as a list they pass."""
    images = [rgb_array(26), rgb_array(27, height=5, width=7)]
    with pytest.raises(ValueError, match=r"different shapes .*do_resize=True"):
        identity(images, return_tensors="pt")
    assert [x.shape for x in identity(images)["pixel_values"]] == [(3, H, W), (3, 5, 7)]


# ---- channel counts beyond 1 and 3 (multi-band images) -------------------------------------------------------


def test_four_band_arrays_pass_through_untouched():
    """num_channels=4: a 4-band array (RGB + near infrared) keeps every band as it is, whatever the layout; each
    band is only rescaled and normalised (and resized on its own: the fourth band is not alpha)."""
    bands = np.random.default_rng(28).integers(0, 256, (H, W, 4), dtype=np.uint8)
    bands[..., 3] = 0  # as alpha, this band would blank out the colours
    chw = np.moveaxis(bands, -1, 0).copy()
    identity = VitrailImageProcessor(do_resize=False, num_channels=4)
    for image in (bands, chw, torch.from_numpy(chw), torch.from_numpy(np.stack([chw, chw]))):
        out = run(identity, image)
        np.testing.assert_allclose(out[0], by_hand(bands), atol=1e-6)
    size = {"height": 5, "width": 7}
    out = run(VitrailImageProcessor(size=size, num_channels=4), bands)
    rgb_model, gray_model = VitrailImageProcessor(size=size), VitrailImageProcessor(size=size, num_channels=1)
    np.testing.assert_array_equal(out[0, :3], run(rgb_model, bands[..., :3])[0])
    np.testing.assert_array_equal(out[0, 3:], run(gray_model, chw[3])[0])


def test_four_band_statistics():
    """Four channels take one mean/std per band; the default 0.5 triple applies to every band; a per-RGB triple
    of different values cannot be spread over four bands and is refused."""
    bands = np.random.default_rng(29).integers(0, 256, (4, H, W), dtype=np.uint8)
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.2, 0.1]
    processor = VitrailImageProcessor(do_resize=False, num_channels=4, image_mean=mean, image_std=std)
    out = run(processor, bands)[0]
    expected = (bands / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    imagenet = VitrailImageProcessor(num_channels=4, image_mean=[0.485, 0.456, 0.406])
    with pytest.raises(
        ValueError, match=r"`image_mean` has 3 values.*`num_channels=4`.*one value per channel"
    ):
        imagenet(bands)


def test_four_band_pil_images():
    """A 4-channel model reads an RGBA/RGBX PIL image's bands as they are (as the same array); an RGB, CMYK or
    grayscale PIL image is refused with what the model expects."""
    bands = np.random.default_rng(30).integers(0, 256, (H, W, 4), dtype=np.uint8)
    identity = VitrailImageProcessor(do_resize=False, num_channels=4)
    np.testing.assert_array_equal(run(identity, PIL.Image.fromarray(bands, "RGBA")), run(identity, bands))
    rgbx = PIL.Image.fromarray(bands, "RGBA").convert("RGBX")
    np.testing.assert_array_equal(run(identity, rgbx), run(identity, np.asarray(rgbx)))
    for mode in ("RGB", "CMYK", "L"):
        with pytest.raises(ValueError, match=rf"reads 4 channels .* mode '{mode}'.*RGBA/RGBX PIL images"):
            identity(PIL.Image.fromarray(bands, "RGBA").convert(mode))


def test_rgb_array_into_four_channels_is_refused():
    """Three bands cannot become four: the error names the shape and the model's channel count."""
    with pytest.raises(
        ValueError, match=r"shape \(12, 10, 3\) for a model with `num_channels=4`: expected 4"
    ):
        VitrailImageProcessor(num_channels=4)(rgb_array())


def test_four_channel_array_into_rgb_model_is_rgba():
    """For a 1- or 3-channel model a 4-channel array is RGBA (PIL reads H x W x 4 uint8 so): composited over white."""
    rgba = np.random.default_rng(31).integers(0, 256, (H, W, 4), dtype=np.uint8)
    gray = VitrailImageProcessor(do_resize=False, num_channels=1)
    np.testing.assert_array_equal(run(gray, rgba), run(gray, PIL.Image.fromarray(rgba, "RGBA")))


@pytest.mark.parametrize("num_channels", [2, 5])
def test_other_channel_counts_pass_through(num_channels):
    """Any channel count: an array with exactly that many channels passes (2 also from an LA PIL image)."""
    bands = np.random.default_rng(32).integers(0, 256, (H, W, num_channels), dtype=np.uint8)
    identity = VitrailImageProcessor(do_resize=False, num_channels=num_channels)
    np.testing.assert_allclose(run(identity, bands)[0], by_hand(bands), atol=1e-6)
    if num_channels == 2:
        np.testing.assert_array_equal(run(identity, PIL.Image.fromarray(bands, "LA")), run(identity, bands))
    with pytest.raises(ValueError, match=rf"`num_channels={num_channels}`: expected {num_channels} channels"):
        identity(rgb_array())
    # A grayscale (H, W) array is one channel: refused, naming the shape that was passed.
    with pytest.raises(
        ValueError, match=rf"shape \({H}, {W}\) for a model with `num_channels={num_channels}`"
    ):
        identity(rgb_array()[..., 0])


def test_four_band_processor_feeds_a_four_channel_model(tmp_path):
    """Processor and model agree on 4 channels, also after saving and loading the processor."""
    from vitrail import VitrailConfig, VitrailModel

    config = VitrailConfig(
        num_channels=4, image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16,
    )  # fmt: skip
    VitrailImageProcessor(size={"height": 8, "width": 8}, num_channels=4).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    bands = np.random.default_rng(33).integers(0, 256, (2, 4, 13, 11), dtype=np.uint8)
    inputs = processor(bands, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 4, 8, 8)
    assert VitrailModel(config)(**inputs).last_hidden_state.shape == (2, 1 + 4, 16)


# ---- EXIF orientation ------------------------------------------------------------------------------------------


def jpeg_with_orientation(path, orientation: int = 6) -> np.ndarray:
    """Write a 6x10 JPEG whose EXIF tag says "rotate"; return the pixels as stored (before any rotation)."""
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = orientation
    PIL.Image.fromarray(rgb_array(34, height=6, width=10)).save(path, exif=exif, quality=95)
    with PIL.Image.open(path) as image:
        return np.asarray(image)


def test_exif_orientation_same_for_training_and_inference(tmp_path):
    """datasets' imagefolder (the training data path) rotates by the EXIF tag on decode; the processor does the
    same for `Image.open` images and paths, so both see the same upright picture."""
    import datasets

    (tmp_path / "data" / "cat").mkdir(parents=True)
    path = tmp_path / "data" / "cat" / "photo.jpg"
    stored = jpeg_with_orientation(path)
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), split="train"
    )
    decoded = dataset[0]["image"]
    assert decoded.size == (6, 10)  # width 6, height 10: datasets rotated the 10x6 stored picture
    processor = VitrailImageProcessor(do_resize=False)
    from_training = run(processor, decoded)
    assert from_training.shape == (1, 3, 10, 6)
    np.testing.assert_array_equal(run(processor, PIL.Image.open(path)), from_training)
    np.testing.assert_array_equal(run(processor, str(path)), from_training)
    # Orientation 6 means "rotate 90 degrees clockwise to view"; the stored pixels say so too.
    np.testing.assert_allclose(from_training[0], by_hand(np.rot90(stored, k=-1)), atol=1e-6)
    resizing = VitrailImageProcessor(size={"height": 8, "width": 8})
    np.testing.assert_array_equal(run(resizing, PIL.Image.open(path)), run(resizing, decoded))


# ---- sources: paths, URLs, base64 -------------------------------------------------------------------------------


def test_image_path_keeps_alpha(tmp_path, identity):
    """A path opens the file in its own mode, so an RGBA PNG is composited over white as the PIL image is
    (transformers' loader would convert it to RGB and show the colours under transparent pixels)."""
    rgba = np.random.default_rng(35).integers(0, 256, (H, W, 4), dtype=np.uint8)
    path = tmp_path / "rgba.png"
    PIL.Image.fromarray(rgba, "RGBA").save(path)
    np.testing.assert_array_equal(run(identity, str(path)), run(identity, PIL.Image.fromarray(rgba, "RGBA")))


def test_missing_path_names_it(tmp_path):
    """A path that does not exist is a FileNotFoundError naming it, not a base64 decoding error."""
    missing = str(tmp_path / "no_such_image.png")
    with pytest.raises(FileNotFoundError, match=r"No image file at '.*no_such_image\.png'"):
        VitrailImageProcessor()(missing)
    with pytest.raises(FileNotFoundError, match="No image file at 'not an image'"):
        VitrailImageProcessor()(["not an image"])


def test_unreadable_sources_name_them(tmp_path):
    """A folder, or a file that is not an image, is refused by name."""
    with pytest.raises(ValueError, match="is a folder"):
        VitrailImageProcessor()(str(tmp_path))
    text = tmp_path / "notes.png"
    text.write_text("not pixels")
    with pytest.raises(ValueError, match=r"Cannot read an image from '.*notes\.png'"):
        VitrailImageProcessor()(str(text))
    if hasattr(os, "mkfifo"):  # a named pipe called like an image: opening it would wait for a writer
        os.mkfifo(tmp_path / "pipe.png")
        with pytest.raises(ValueError, match=r"'.*pipe\.png' is not a regular file \(a named pipe"):
            VitrailImageProcessor()(tmp_path / "pipe.png")


def test_base64_and_data_uri(identity):
    """Base64 image data, bare or as a `data:image/png;base64,` URI, reads as the image it encodes."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgb_array(36)).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    expected = run(identity, rgb_array(36))
    np.testing.assert_array_equal(run(identity, encoded), expected)
    np.testing.assert_array_equal(run(identity, f"data:image/png;base64,{encoded}"), expected)


def test_base64_keeps_alpha_and_depth(identity):
    """Base64 data opens in its own mode like a path: an RGBA PNG is composited over white and a 16-bit one keeps
    its levels (a loader that converts to RGB first would show the colours under transparent pixels)."""
    rgba = np.random.default_rng(38).integers(0, 256, (H, W, 4), dtype=np.uint8)
    deep = np.random.default_rng(39).integers(0, 65536, (H, W), dtype=np.uint16)
    for image in (PIL.Image.fromarray(rgba, "RGBA"), PIL.Image.fromarray(deep)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode()
        np.testing.assert_array_equal(run(identity, encoded), run(identity, image))


def test_urls(tmp_path, identity, monkeypatch):
    """An http URL is downloaded and read like the file; a URL that answers 404 is refused by name."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    PIL.Image.fromarray(rgb_array(37)).save(tmp_path / "image.png")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        np.testing.assert_array_equal(run(identity, f"{base}/image.png"), run(identity, rgb_array(37)))
        with pytest.raises(
            FileNotFoundError, match=r"Could not download an image from 'http://.*/missing\.png'"
        ):
            identity(f"{base}/missing.png")
    finally:
        server.shutdown()
        server.server_close()


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
    np.testing.assert_allclose(out[0], by_hand(manual_crop(image, resize_wh, (8, 8))), atol=ONE_LEVEL)
    # Without crop_pct the whole image is squeezed into 8x8 instead: a different picture.
    assert not np.allclose(out, run(VitrailImageProcessor(size={"height": 8, "width": 8}), image))


def test_crop_pct_non_square_size():
    """A non-square size scales both sides by 1 / crop_pct (floored), then crops the centre."""
    image = PIL.Image.fromarray(rgb_array(16, height=30, width=50))
    out = run(VitrailImageProcessor(size={"height": 8, "width": 12}, crop_pct=0.875), image)
    assert out.shape == (1, 3, 8, 12)
    np.testing.assert_allclose(out[0], by_hand(manual_crop(image, (13, 9), (12, 8))), atol=ONE_LEVEL)


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
    with pytest.raises(
        ValueError, match=r"`image_mean` has 3 values.*`num_channels=1`.*image_mean=\[0.449\]"
    ):
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
            r"shape \(12, 10, 2\) for a model with `num_channels=3`: expected 1 \(grayscale\), 3 \(RGB\)",
        ),
        (np.zeros((1, 2, 3, H, W), np.uint8), ValueError, r"image array of shape \(1, 2, 3, 12, 10\)"),
        (np.zeros((W,), np.uint8), ValueError, r"image array of shape \(10,\)"),
        (42, TypeError, "Unsupported image type int: pass PIL images, numpy arrays, torch tensors"),
        ([], ValueError, "No images given"),
        (np.zeros((0, 3, H, W), np.uint8), ValueError, "No images given"),
        (np.zeros((3, H, W), np.complex64), TypeError, "dtype complex64 are not supported"),
    ],
    ids=["two-channels", "5-d", "1-d", "int", "empty-list", "empty-batch", "complex"],
)
def test_bad_input_is_refused_clearly(image, error, fragment):
    """Inputs that are not images fail with a message that says what is wrong."""
    with pytest.raises(error, match=fragment):
        VitrailImageProcessor()(image)


@pytest.mark.parametrize("num_channels", [0, -1, 2.5])
def test_bad_num_channels(num_channels):
    """A channel count is a positive integer."""
    with pytest.raises(ValueError, match="`num_channels` must be a positive integer"):
        VitrailImageProcessor(do_resize=False)(rgb_array(), num_channels=num_channels)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((0, W), np.uint8),
        torch.zeros(3, H, 0),
        PIL.Image.new("RGB", (0, 5)),
    ],
    ids=["0x0", "0xN", "Nx0-tensor", "pil-5x0"],
)
def test_empty_images_are_refused(image):
    """An image without pixels is an error naming its shape, not a valid-looking tensor."""
    with pytest.raises(ValueError, match=r"The image of shape \(.*0.*\) has no pixels"):
        VitrailImageProcessor()(image)


@pytest.mark.parametrize("shape", [(3, 3, 3), (4, 5, 3), (1, 5, 3)])
def test_ambiguous_layouts_ask_for_input_data_format(shape):
    """When both ends of an array could be its channels, the processor asks instead of guessing; passing
    `input_data_format` settles it."""
    image = np.random.default_rng(38).integers(0, 256, shape, dtype=np.uint8)
    identity = VitrailImageProcessor(do_resize=False)
    with pytest.raises(ValueError, match=r"ambiguous.*input_data_format=\"channels_first\""):
        identity(image)
    last = run(identity, image, input_data_format="channels_last")
    np.testing.assert_array_equal(last, run(identity, PIL.Image.fromarray(image)))
    first = run(identity, image, input_data_format="channels_first")
    as_last = np.moveaxis(image, 0, -1).copy()
    np.testing.assert_array_equal(first, run(identity, as_last, input_data_format="channels_last"))
    assert not np.array_equal(first, last)


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
