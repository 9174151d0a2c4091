"""Property-based tests (hypothesis): over processor inputs and config values, vitrail either gives a correct
result or refuses with a ValueError/TypeError of its own; never a crash deep in torch/numpy/PIL, never NaN.

Examples are derandomized so that every run checks the same cases; `VITRAIL_HYPOTHESIS=explore pytest
tests/test_properties.py` draws new ones (and ten times as many).
"""

import dataclasses
import os
import traceback

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers.activations import ACT2FN

from vitrail import (
    VitrailConfig,
    VitrailForImageClassification,
    VitrailForMaskedImageModeling,
    VitrailImageProcessor,
)

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "explore", database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=2000
)
PROFILE = os.environ.get("VITRAIL_HYPOTHESIS", "ci")
settings.load_profile(PROFILE)


def examples(count: int) -> settings:
    """`count` examples in CI, the profile's number when exploring."""
    return settings(max_examples=count) if PROFILE == "ci" else settings()


def raised_in(error: BaseException, filename: str) -> bool:
    """Whether the innermost frame of `error`'s traceback is in `filename`: vitrail's own check, not a library's."""
    return traceback.extract_tb(error.__traceback__)[-1].filename.endswith(filename)


# ---- processor inputs ------------------------------------------------------------------------------------------

INTEGER_DTYPES = [np.uint8, np.uint16, np.int8, np.int32, np.int64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
PIL_MODES = ["1", "L", "LA", "P", "P+transparency", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "I", "F"]
RAW_BANDS = {"LA": 2, "RGBA": 4, "RGBX": 4}


@st.composite
def pixel_values(draw, dtype, shape):
    """An array of `dtype`: mostly within the dtype's usual pixel range, sometimes anywhere (extremes, NaN)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        elements = st.booleans()
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        usual = st.integers(0, min(int(info.max), 65535 if dtype == np.uint16 else 255))
        elements = draw(st.sampled_from([usual, usual, st.integers(int(info.min), int(info.max))]))
    else:
        width = dtype.itemsize * 8
        elements = draw(
            st.sampled_from(
                [
                    st.floats(0, 1, width=width),
                    st.floats(0, 255, width=width),
                    st.floats(-3, 3, width=width),
                    st.floats(width=width),  # any value, NaN and infinities included
                ]
            )
        )
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def array_images(draw, num_channels: int, height: int | None = None, width: int | None = None):
    """A numpy array or torch tensor image: (H, W), (C, H, W) or (H, W, C), of a drawn dtype and channel count."""
    dtype = np.dtype(draw(st.sampled_from([*INTEGER_DTYPES, *FLOAT_DTYPES, np.bool_])))
    channels = draw(st.sampled_from([num_channels, num_channels, 1, 2, 3, 4, None]))
    height = draw(st.integers(0, 7)) if height is None else height
    width = draw(st.integers(0, 7)) if width is None else width
    if channels is None:
        shape = (height, width)
    else:
        shape = draw(st.sampled_from([(channels, height, width), (height, width, channels)]))
    array = draw(pixel_values(dtype, shape))
    kind = draw(
        st.sampled_from(["numpy", "torch", "torch-bfloat16"] if dtype.kind == "f" else ["numpy", "torch"])
    )
    if kind == "numpy":
        return array
    tensor = torch.from_numpy(array)
    return tensor.to(torch.bfloat16) if kind == "torch-bfloat16" else tensor


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(PIL_MODES))
    width, height = draw(st.integers(0, 7)), draw(st.integers(0, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "I;16":
        return PIL.Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return PIL.Image.fromarray(rng.integers(-(2**31), 2**31 - 1, (height, width), dtype=np.int32))
    if mode == "F":
        return PIL.Image.fromarray(rng.normal(size=(height, width)).astype(np.float32))
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P+transparency":
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = 0
        return image
    return rgba.convert(mode)


@st.composite
def processor_settings(draw):
    num_channels = draw(st.sampled_from([1, 2, 3, 4, 5]))
    kwargs = {
        "num_channels": num_channels,
        "do_resize": draw(st.booleans()),
        "size": {"height": draw(st.integers(1, 9)), "width": draw(st.integers(1, 9))},
        "resample": draw(st.sampled_from(list(PIL.Image.Resampling))),
        "crop_pct": draw(st.none() | st.floats(0.2, 1.0)),
        "center_crop_rounding": draw(st.sampled_from(["floor", "round"])),
        "do_rescale": draw(st.sampled_from([True, True, True, False])),
        "do_normalize": draw(st.booleans()),
    }
    statistics = draw(st.sampled_from(["default", "scalar", "per-channel"]))
    if statistics == "scalar":
        kwargs.update(image_mean=draw(st.floats(0, 1)), image_std=draw(st.floats(0.05, 1)))
    elif statistics == "per-channel":
        kwargs.update(
            image_mean=draw(st.lists(st.floats(0, 1), min_size=num_channels, max_size=num_channels)),
            image_std=draw(st.lists(st.floats(0.05, 1), min_size=num_channels, max_size=num_channels)),
        )
    return kwargs


def as_numpy(image) -> np.ndarray:
    return image.float().numpy() if image.dtype == torch.bfloat16 else np.asarray(image)


def array_expectation(image, num_channels: int, do_rescale: bool) -> np.ndarray | None:
    """The README's rules for one array, stated apart from the code: the image channels-first if it must be
    read, None if it must be refused."""
    array = as_numpy(image)
    readable = (1, 3, 4) if num_channels in (1, 3) else (num_channels,)
    if array.ndim == 2:
        array = array[None]
    else:
        first, last = array.shape[0] in readable, array.shape[-1] in readable
        if first == last:  # ambiguous, or no end holds a readable channel count
            return None
        array = array if first else np.moveaxis(array, -1, 0)
    if array.shape[0] not in readable or 0 in array.shape[1:]:
        return None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return None
    if do_rescale and array.dtype not in (np.bool_, np.uint8, np.uint16):
        if array.min() < 0 or array.max() > 255:
            return None
    return array


def unit_values(array: np.ndarray, do_rescale: bool) -> np.ndarray:
    """What the README says pixel values become before normalisation (8-bit levels / 255)."""
    values = array.astype(np.float64)
    if not do_rescale:
        return values
    if array.dtype == np.bool_:
        return values
    if array.dtype == np.uint16:
        return np.round(values / 257) / 255
    if array.dtype.kind == "f" and values.max() <= 1:
        return values
    return values / 255


def pil_expectation(image: PIL.Image.Image, num_channels: int):
    if image.width == 0 or image.height == 0:
        return None
    if num_channels in (1, 3):
        return None if image.mode in ("I", "F") else (num_channels, image.height, image.width)
    return (num_channels, image.height, image.width) if RAW_BANDS.get(image.mode) == num_channels else None


def check_output(pixels: torch.Tensor, count: int, kwargs: dict, sizes: list) -> None:
    channels = kwargs["num_channels"]
    height, width = (kwargs["size"]["height"], kwargs["size"]["width"]) if kwargs["do_resize"] else sizes[0]
    assert pixels.shape == (count, channels, height, width)
    assert pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()
    if not kwargs["do_rescale"]:
        return
    low, high = torch.zeros(channels), torch.ones(channels)
    if kwargs["do_normalize"]:
        mean = torch.tensor(kwargs.get("image_mean", 0.5), dtype=torch.float64).expand(channels)
        std = torch.tensor(kwargs.get("image_std", 0.5), dtype=torch.float64).expand(channels)
        low, high = (low - mean) / std, (high - mean) / std
    values = pixels.double().transpose(0, 1).reshape(channels, -1)
    assert (values >= low[:, None].double() - 1e-5).all() and (values <= high[:, None].double() + 1e-5).all()


def run_processor(images, kwargs: dict, expected: list | None) -> torch.Tensor | None:
    """Process `images`; `expected` holds each image's `(C, H, W)` when all must be read, None when one must be
    refused. Returns the pixel values, checked, or None after a (correct) refusal."""
    processor = VitrailImageProcessor(**kwargs)
    if expected is not None and not kwargs["do_resize"] and len({shape[1:] for shape in expected}) > 1:
        expected = None  # different sizes cannot form one tensor
    try:
        pixels = processor(images, return_tensors="pt")["pixel_values"]
    except (ValueError, TypeError) as error:
        assert raised_in(error, "image_processing_vitrail.py"), "".join(traceback.format_exception(error))
        assert expected is None, f"a valid input was refused: {error}"
        return None
    assert expected is not None, "an invalid input was accepted"
    check_output(pixels, len(expected), kwargs, [shape[1:] for shape in expected])
    return pixels


@examples(400)
@given(data=st.data(), kwargs=processor_settings())
def test_processor_single_images(data, kwargs):
    """One array, tensor or PIL image of any dtype, mode, shape (1x1, odd, empty) and value range. Where no
    conversion or resize happens, the values are checked against the README's rules too."""
    num_channels = kwargs["num_channels"]
    if data.draw(st.booleans()):
        image = data.draw(pil_images())
        expected = pil_expectation(image, num_channels)
        run_processor(image, kwargs, None if expected is None else [expected])
        return
    image = data.draw(array_images(num_channels))
    array = array_expectation(image, num_channels, kwargs["do_rescale"])
    pixels = run_processor(image, kwargs, None if array is None else [array.shape])
    if pixels is not None and not kwargs["do_resize"] and array.shape[0] == num_channels:
        values = unit_values(array, kwargs["do_rescale"])
        if kwargs["do_normalize"]:
            mean = np.broadcast_to(np.asarray(kwargs.get("image_mean", 0.5), np.float64), (num_channels,))
            std = np.broadcast_to(np.asarray(kwargs.get("image_std", 0.5), np.float64), (num_channels,))
            values = (values - mean[:, None, None]) / std[:, None, None]
        np.testing.assert_allclose(pixels[0].double().numpy(), values, rtol=1e-5, atol=1e-5)


@examples(150)
@given(data=st.data(), kwargs=processor_settings())
def test_processor_batches_and_lists(data, kwargs):
    """A batch `(B, ...)` of one array kind (B = 0 included), or a list mixing kinds (empty included): every
    image must be readable for a result."""
    num_channels = kwargs["num_channels"]
    if data.draw(st.booleans()):
        size = (data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)))
        item = data.draw(array_images(num_channels, *size))
        item = item[None] if item.ndim == 2 else item
        count = data.draw(st.integers(0, 3))
        items = [item] * count
        stack = np.stack if isinstance(item, np.ndarray) else torch.stack
        images = stack(items) if count else item[None][:0]
    else:
        items = data.draw(st.lists(pil_images() | array_images(num_channels), min_size=0, max_size=3))
        images = items
    expected = [
        pil_expectation(item, num_channels)
        if isinstance(item, PIL.Image.Image)
        else getattr(array_expectation(item, num_channels, kwargs["do_rescale"]), "shape", None)
        for item in items
    ]
    run_processor(images, kwargs, None if not expected or None in expected else expected)


@st.composite
def views(draw, array: np.ndarray) -> np.ndarray:
    """`array` seen another way, holding the same or a subset of its values: in a byte order (native or
    swapped), C or Fortran memory order, then sliced with steps of either sign along each axis (flips as
    `image[..., ::-1]` or `np.fliplr` make them) and possibly with its axes reversed."""
    order = draw(st.sampled_from(["=", "<", ">"]))
    view = array.astype(array.dtype.newbyteorder(order), order=draw(st.sampled_from(["C", "F"])))
    steps = [draw(st.sampled_from([1, 1, -1, 2, -2])) for _ in range(view.ndim)]
    view = view[tuple(slice(None, None, step) for step in steps)]
    return view.T if draw(st.booleans()) else view


def outcome(processor: VitrailImageProcessor, image):
    """The pixel values, or the refusal (type and message) of vitrail's own checks."""
    try:
        return processor(image, return_tensors="np")["pixel_values"]
    except (ValueError, TypeError) as error:
        assert raised_in(error, "image_processing_vitrail.py"), "".join(traceback.format_exception(error))
        return type(error), str(error)


@examples(200)
@given(data=st.data(), kwargs=processor_settings())
def test_views_and_byte_orders_read_as_their_native_copy(data, kwargs):
    """Any view of an array (flipped, strided, transposed, Fortran-ordered) in any byte order gives the pixel values
    of its contiguous copy in native byte order, or the same refusal."""
    image = as_numpy(
        data.draw(
            array_images(kwargs["num_channels"], data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7)))
        )
    )
    view = data.draw(views(image))
    copy = np.ascontiguousarray(view).astype(view.dtype.newbyteorder("="))
    processor = VitrailImageProcessor(**kwargs)
    expected, got = outcome(processor, copy), outcome(processor, view)
    if isinstance(expected, tuple):
        assert got == expected
    else:
        assert not isinstance(got, tuple), got
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@examples(200)
@given(
    channels=st.integers(1, 5),
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    floats=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_bilinear_resize_tracks_pil(channels, shape, size, floats, seed):
    """Any channel count, shrinking or enlarging, 1-pixel sides included: a bilinear resize lands within one 8-bit
    level of PIL's band-by-band resize for uint8 images, and within float rounding of PIL's mode F for floats."""
    array = np.random.default_rng(seed).integers(0, 256, (channels, *shape), dtype=np.uint8)
    image = array.astype(np.float32) if floats else array
    processor = VitrailImageProcessor(
        size={"height": size[0], "width": size[1]}, num_channels=channels, do_normalize=False
    )
    kwargs = {"input_data_format": "channels_first", "return_tensors": "np"}
    levels = processor(image, do_rescale=not floats, **kwargs)["pixel_values"][0] * (1 if floats else 255)
    mode = "F" if floats else "L"
    expected = np.stack(
        [
            np.asarray(PIL.Image.fromarray(band, mode).resize(size[::-1], PIL.Image.Resampling.BILINEAR))
            for band in image
        ]
    )
    np.testing.assert_allclose(levels, expected, atol=1e-3 if floats else 1 + 1e-3)


# ---- configs ---------------------------------------------------------------------------------------------------


# One field at a time is set to a value the validators must refuse; combinations of valid values (a pooling
# without its token, a size the patch does not divide, ...) are drawn freely.
INVALID_VALUES = {
    "hidden_size": [0, -4, 8.0],
    "num_hidden_layers": [0],
    "num_attention_heads": [0, -1],
    "intermediate_size": [0],
    "hidden_act": ["not_an_activation"],
    "mlp_type": ["moe"],
    "image_size": [0, [4, 4, 4], [4]],
    "patch_size": [0, [2, -2]],
    "num_channels": [0],
    "encoder_stride": [0],
    "pooling": ["max"],
    "num_register_tokens": [-1],
    "position_embedding_type": ["rope"],
    "prefix_position_embeddings": ["some"],
    "layer_scale_init_value": [0.0, -0.1],
    "drop_path_rate": [1.0, -0.1],
    "position_interpolation": ["area"],
}


def side(patch: int):
    """An image side: a multiple of the patch mostly, any size sometimes."""
    return st.one_of(*[st.just(m * patch) for m in (1, 1, 2, 3)], st.integers(1, 9))


@st.composite
def config_kwargs(draw):
    """Tiny configs over every option, with at most one invalid value."""
    heads = draw(st.integers(1, 4))
    patch = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    image = (draw(side(patch[0])), draw(side(patch[1])))
    kwargs = {
        "hidden_size": heads * draw(st.sampled_from([4, 4, 8, 8, 1, 2, 3]))
        + draw(st.sampled_from([0] * 7 + [1])),
        "num_hidden_layers": draw(st.integers(1, 2)),
        "num_attention_heads": heads,
        "intermediate_size": draw(st.integers(1, 12)),
        "hidden_act": draw(st.sampled_from(["gelu", "relu", "silu", "quick_gelu"])),
        "mlp_type": draw(st.sampled_from(["mlp", "swiglu"])),
        "image_size": image[0] if image[0] == image[1] and draw(st.booleans()) else list(image),
        "patch_size": patch[0] if patch[0] == patch[1] and draw(st.booleans()) else list(patch),
        "num_channels": draw(st.integers(1, 4)),
        "encoder_stride": draw(st.sampled_from([patch[0], patch[0], patch[1], 3])),
        "pooling": draw(st.sampled_from(["cls", "mean", "cls_mean"])),
        "use_cls_token": draw(st.sampled_from([True, True, True, False])),
        "use_distillation_token": draw(st.sampled_from([False, False, True])),
        "num_register_tokens": draw(st.integers(0, 2)),
        "position_embedding_type": draw(st.sampled_from(["learned", "sincos2d", "none"])),
        "prefix_position_embeddings": draw(st.sampled_from([None, None, None, "cls", "all", "none"])),
        "use_fc_norm": draw(st.booleans()),
        "qk_norm": draw(st.booleans()),
        "layer_scale_init_value": draw(st.none() | st.floats(1e-6, 1.0)),
        "drop_path_rate": draw(st.sampled_from([0.0, 0.1])),
        "hidden_dropout_prob": draw(st.sampled_from([0.0, 0.1])),
        "dynamic_image_size": draw(st.sampled_from([False, False, True])),
        "position_interpolation": draw(st.sampled_from(["bicubic_antialias", "bicubic"])),
        "qkv_bias": draw(st.booleans()),
        "layer_norm_eps": draw(st.sampled_from([1e-12, 1e-6])),
    }
    broken = draw(st.sampled_from([None] * 2 * len(INVALID_VALUES) + list(INVALID_VALUES)))
    if broken is not None:
        kwargs[broken] = draw(st.sampled_from(INVALID_VALUES[broken]))
    return kwargs


def build_config(kwargs: dict) -> VitrailConfig | None:
    """The config, or None when it is refused at construction with a validator's ValueError/TypeError."""
    try:
        return VitrailConfig(num_labels=3, **kwargs)
    except StrictDataclassError as error:
        # `@strict` wraps the validator's (or the type check's) own error, which says what to change.
        assert isinstance(error.__cause__, (ValueError, TypeError)), repr(error.__cause__)
        assert "`" in str(error) or "Field '" in str(error), str(error)  # it names the field
        return None


@examples(150)
@given(kwargs=config_kwargs(), seed=st.integers(0, 2**16))
def test_valid_configs_build_models_that_run(kwargs, seed):
    """A config is either refused at construction, or a classifier built from it runs a forward pass with
    finite outputs (at its size, and at another size when sizes are dynamic), and so does masked image modeling
    where `encoder_stride` equals the patch."""
    config = build_config(kwargs)
    event("config refused" if config is None else "config built")
    if config is None:
        return
    torch.manual_seed(seed)
    model = VitrailForImageClassification(config).eval()
    height, width = config.image_hw
    other = [(height + 3, max(width - 1, 1))] if config.dynamic_image_size else []
    for h, w in [(height, width), *other]:
        with torch.no_grad():
            logits = model(pixel_values=torch.randn(2, config.num_channels, h, w)).logits
        assert logits.shape == (2, 3)
        assert torch.isfinite(logits).all()
    if config.patch_hw == (config.encoder_stride, config.encoder_stride):
        mim = VitrailForMaskedImageModeling(config).eval()
        pixels = torch.randn(2, config.num_channels, height, width)
        mask = torch.rand(2, config.num_patches) < 0.5
        with torch.no_grad():
            output = mim(pixel_values=pixels, bool_masked_pos=mask)
        assert output.reconstruction.shape == pixels.shape
        assert torch.isfinite(output.loss)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (dict(hidden_act="gelu2"), r"Unknown `hidden_act` 'gelu2'.*ACT2FN"),
        (dict(pooling="cls_mean", use_fc_norm=True), r"`pooling='cls_mean'`.*`use_fc_norm=False`"),
    ],
    ids=["unknown-activation", "cls_mean-with-fc_norm"],
)
def test_configs_the_property_test_found(overrides, fragment):
    """Found by the property test above: these configs used to pass construction and then fail in torch (a bare
    KeyError when building the MLP; a LayerNorm shape error in the forward pass)."""
    with pytest.raises(StrictDataclassError, match=fragment):
        VitrailConfig(**overrides)


# ---- every config field ----------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def probabilities():
    return st.floats(-0.5, 1.5) | st.sampled_from([0, 1, 0.0, 0.999, 1.0, NAN, INF, -INF])


def positive_floats(high: float):
    """The usual range, with zero, negatives, NaN and infinities among the draws."""
    return st.floats(1e-12, high) | st.sampled_from([0.0, -1e-6, -1.0, NAN, INF, -INF])


def sizes(low: int, high: int):
    """An image or patch size: an int, or a pair as a list or tuple, with wrong lengths and non-positive sides."""
    side = st.integers(low, high)
    return (
        side
        | st.lists(side, min_size=1, max_size=3)
        | st.tuples(side, side)
        | st.sampled_from([[4, 4.0], True])
    )


def label_names(ids):
    return st.dictionaries(ids, st.text("abc", min_size=1, max_size=2), max_size=4)


# Every field of VitrailConfig (transformers' inherited fields included), with what the generic property test
# draws for it: usual values and values the validators must refuse (wrong type, out of range, NaN, unknown
# choice). A field without a row fails `test_every_config_field_has_a_strategy`: add one with the field.
# Magnitudes stay where float32 does not overflow (a LayerScale of 1e30 overflows whatever the config says).
FIELD_VALUES = {
    "hidden_size": st.integers(-4, 24) | st.just(8.0),
    "num_hidden_layers": st.integers(-1, 3),
    "num_attention_heads": st.integers(-1, 6),
    "intermediate_size": st.integers(-1, 40),
    "hidden_act": st.sampled_from([*sorted(ACT2FN), "not_an_activation"]),
    "mlp_type": st.sampled_from(["mlp", "swiglu", "moe"]),
    "hidden_dropout_prob": probabilities(),
    "attention_probs_dropout_prob": probabilities(),
    "initializer_range": positive_floats(10.0),
    "layer_norm_eps": positive_floats(10.0),
    "image_size": sizes(-1, 12),
    "patch_size": sizes(-1, 5),
    "num_channels": st.integers(-1, 4),
    "qkv_bias": st.booleans() | st.just(1),
    "encoder_stride": st.integers(-1, 5),
    "pooling": st.sampled_from(["cls", "mean", "cls_mean", "map", "max"]),
    "use_cls_token": st.booleans(),
    "use_distillation_token": st.booleans(),
    "num_register_tokens": st.integers(-1, 3),
    "position_embedding_type": st.sampled_from(["learned", "sincos2d", "none", "rope"]),
    "prefix_position_embeddings": st.sampled_from([None, "cls", "all", "none", "some"]),
    "use_fc_norm": st.booleans(),
    "drop_path_rate": probabilities(),
    "layer_scale_init_value": st.none() | positive_floats(10.0),
    "qk_norm": st.booleans(),
    "dynamic_image_size": st.booleans(),
    "position_interpolation": st.sampled_from(["bicubic_antialias", "bicubic", "area"]),
    "_out_features": st.none()
    | st.lists(st.sampled_from(["stem", "stage1", "stage2", "stage9"]), max_size=3),
    "_out_indices": st.none() | st.lists(st.integers(-4, 4), max_size=3),
    "apply_layernorm": st.booleans(),
    # options of other ViT families: norms, biases, attention pooling
    "norm_type": st.sampled_from(["layernorm", "rmsnorm", "batchnorm"]),
    "patch_embedding_bias": st.booleans(),
    "patch_embedding_norm": st.booleans(),
    "pre_norm": st.booleans(),
    "final_norm": st.booleans(),
    "attention_norm": st.booleans(),
    "mlp_norm": st.booleans(),
    "proj_bias": st.booleans(),
    "mlp_bias": st.booleans(),
    "map_intermediate_size": st.none() | st.integers(-1, 12),
    "map_num_heads": st.none() | st.integers(-1, 4),
    # positions inside attention
    "key_bias": st.booleans(),
    "rope_type": st.sampled_from(["none", "axial", "mixed", "mrope"]),
    "rope_theta": positive_floats(1e4),
    "rope_coordinates": st.sampled_from(["index", "centered", "polar"]),
    "rope_offset": st.floats(-2.0, 2.0) | st.sampled_from([NAN, INF]),
    "rope_reference_grid": st.none() | sizes(-1, 6),
    "rope_axis_order": st.sampled_from(["yx", "xy", "zz"]),
    "rope_layout": st.sampled_from(["interleaved", "half", "quarter"]),
    "rope_train_shift": st.none() | positive_floats(2.0),
    "rope_train_jitter": st.none() | st.floats(0.5, 3.0) | st.sampled_from([NAN, INF]),
    "rope_train_rescale": st.none() | st.floats(0.5, 3.0) | st.sampled_from([NAN, INF]),
    "relative_position_bias": st.sampled_from(["none", "table", "mlp", "swin"]),
    "relative_position_bias_shared": st.booleans(),
    "relative_position_bias_hidden_size": st.integers(-1, 16),
    # transformers' PreTrainedConfig fields
    "transformers_version": st.sampled_from([None, "5.0.0"]),
    "architectures": st.sampled_from([None, ["VitrailForImageClassification"], ["SomethingElse"]]),
    "output_hidden_states": st.booleans(),
    "return_dict": st.booleans(),
    "dtype": st.sampled_from([None, "float32", "bfloat16", "float16"]),
    "chunk_size_feed_forward": st.integers(-1, 4),
    "is_encoder_decoder": st.booleans(),
    "id2label": label_names(st.integers(-1, 4)),
    "label2id": st.dictionaries(st.text("abc", min_size=1, max_size=2), st.integers(-1, 4), max_size=4),
    "problem_type": st.sampled_from(
        [None, "single_label_classification", "multi_label_classification", "regression", "multiclass"]
    ),
}


def test_every_config_field_has_a_strategy():
    """The generic test below draws every field; one added to VitrailConfig needs its row in FIELD_VALUES."""
    fields = {field.name for field in dataclasses.fields(VitrailConfig)}
    assert not fields - FIELD_VALUES.keys(), (
        f"add these fields to FIELD_VALUES: {sorted(fields - FIELD_VALUES.keys())}"
    )
    assert not FIELD_VALUES.keys() - fields, f"no such fields: {sorted(FIELD_VALUES.keys() - fields)}"


def head_labels(config: VitrailConfig, batch: int) -> torch.Tensor:
    """Labels of the kind the config's `problem_type` trains on (single-label when unset)."""
    if config.problem_type == "regression":
        return torch.randn(batch, config.num_labels)
    if config.problem_type == "multi_label_classification":
        return (torch.rand(batch, config.num_labels) < 0.5).float()
    return torch.randint(0, config.num_labels, (batch,))


@st.composite
def valid_config_kwargs(draw):
    """A small config that the validators accept, with the options that interact drawn too."""
    heads, patch = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    use_cls_token = draw(st.booleans())
    return {
        "hidden_size": heads * draw(st.sampled_from([4, 8])),
        "num_attention_heads": heads,
        "num_hidden_layers": draw(st.integers(1, 2)),
        "intermediate_size": draw(st.integers(1, 12)),
        "patch_size": patch,
        "encoder_stride": patch,
        "image_size": patch * draw(st.integers(1, 3)),
        "use_cls_token": use_cls_token,
        "pooling": draw(st.sampled_from(["cls", "mean", "cls_mean"])) if use_cls_token else "mean",
        "num_register_tokens": draw(st.integers(0, 2)),
        "layer_scale_init_value": draw(st.sampled_from([None, 1e-4])),
        "qk_norm": draw(st.booleans()),
        "layer_norm_eps": 1e-6,
    }


@pytest.mark.parametrize("field", sorted(FIELD_VALUES))
@examples(6)
@given(data=st.data(), base=valid_config_kwargs(), seed=st.integers(0, 2**16))
def test_every_field_value_is_refused_by_name_or_runs(field, data, base, seed):
    """Each field of a valid tiny config set to a value of FIELD_VALUES, together with up to two other fields: the
    config is either refused at construction by an error that names one of the changed fields, or gives a
    classifier whose outputs are finite in evaluation and whose loss and gradients are finite in training."""
    others = data.draw(
        st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=2, unique=True), label="others"
    )
    changes = {name: data.draw(FIELD_VALUES[name], label=name) for name in dict.fromkeys([field, *others])}
    kwargs = {**base, "id2label": {0: "a", 1: "b", 2: "c"}}
    # The backbone's stages are fields `_out_features` / `_out_indices`, passed as `out_features=` / `out_indices=`.
    kwargs.update({name.lstrip("_"): value for name, value in changes.items()})
    try:
        config = VitrailConfig(**kwargs)
    except (StrictDataclassError, ValueError, TypeError) as error:
        event("refused")
        cause = error.__cause__ if isinstance(error, StrictDataclassError) else error
        assert isinstance(cause, (ValueError, TypeError)), repr(cause)
        named = [name for name in changes if name.lstrip("_") in str(error)]
        assert named, f"the refusal of {changes} names none of them: {error}"
        return
    event("built")
    torch.manual_seed(seed)
    model = VitrailForImageClassification(config)
    pixels = torch.randn(2, config.num_channels, *config.image_hw)
    with torch.no_grad():
        output = model.eval()(pixel_values=pixels)
    logits = output[0] if isinstance(output, tuple) else output.logits
    assert logits.shape == (2, config.num_labels or config.pooled_size)
    assert torch.isfinite(logits).all()
    if config.num_labels:
        loss = model.train()(pixel_values=pixels, labels=head_labels(config, 2), return_dict=True).loss
        assert torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
