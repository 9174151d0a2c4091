"""Image processor of vitrail: images in, `pixel_values` out, with no dependency on torchvision.

This file travels to the Hub with every checkpoint: it imports only numpy, PIL, torch and transformers.
Augmentation is not here: it belongs to training (`vitrail.data`); this processor is the evaluation transform.

The input rules live in small module functions (open a source, set it upright, read a PIL image, find the
channel axis, bring values to 8-bit levels, convert channels). After them, bilinear resizes run
`torch.nn.functional.interpolate(antialias=True)` (the kernel torchvision's tensor resize calls), other filters PIL
band by band, and the rescale and normalisation are one fused step per image into a batch allocated once.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import io
import math
import os
import urllib.request

import transformers

if int(transformers.__version__.split(".")[0]) < 5:  # the imports below exist in transformers 5 only
    raise ImportError(
        f"vitrail's checkpoint code needs transformers >= 5.0, not {transformers.__version__}: run "
        'pip install -U "transformers>=5".'
    )

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    PILImageResampling,
    get_image_size_for_max_height_width,
)
from transformers.processing_utils import ImagesKwargs

# PIL modes whose bands are raw 8-bit values (what PIL makes of a 2- or 4-band uint8 array or multi-band TIFF):
# a model with that many channels reads them as they are.
RAW_BAND_MODES = {"LA": 2, "RGBA": 4, "RGBX": 4}
# Channel counts a 1- or 3-channel model converts: grayscale, RGB, and 4 read as RGBA (as PIL reads HxWx4 uint8).
CONVERTIBLE_CHANNELS = (1, 3, 4)
EXIF_ORIENTATION = PIL.Image.ExifTags.Base.Orientation


class VitrailImageProcessorKwargs(ImagesKwargs, total=False):
    """Options beyond transformers' standard image kwargs.

    num_channels (`int`): channels the model reads; 1 and 3 convert any image, other counts take images with
        exactly that many channels (e.g. 4 for RGB + near infrared).
    crop_pct (`float`): evaluation crop ratio (timm's `crop_pct`): resize to `size / crop_pct`, then center-crop
        `size`. `None` resizes straight to `size`.
    center_crop_rounding (`str`): where an odd margin puts the crop: `"floor"` (transformers, the default) or
        `"round"` (torchvision, hence timm), one pixel further down/right.
    """

    num_channels: int | None
    crop_pct: float | None
    center_crop_rounding: str | None


# ---- input rules, one function each --------------------------------------------------------------------------


def open_image_source(source: str) -> PIL.Image.Image:
    """A path, an http(s) URL, or base64 image data (optionally as a `data:image/...` URI) -> a PIL image, in
    its own mode (alpha and bit depth kept; the processor converts later)."""
    # Not transformers' `load_image`: it converts to RGB (alpha and 16-bit depth lost before the rules below see
    # them), reads a URL without checking its HTTP status, and takes a missing path for bad base64 data.
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=30) as response:
                data = response.read()
        except OSError as error:  # URLError, HTTPError and timeouts are OSErrors
            raise FileNotFoundError(f"Could not download an image from {source!r}: {error}") from error
        return _open_pil(io.BytesIO(data), source)
    if os.path.isfile(source):
        return _open_pil(source, source)
    if os.path.isdir(source):
        raise ValueError(f"{source!r} is a folder; pass the path of an image file.")
    if os.path.exists(source):  # reading a named pipe would wait for a writer
        raise ValueError(
            f"{source!r} is not a regular file (a named pipe, socket or device); pass an image file."
        )
    payload = source.partition(",")[2] if source.startswith("data:image/") else source
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        data = None
    if data:
        try:
            return _open_pil(io.BytesIO(data), "base64 data")
        except ValueError:
            pass
    raise FileNotFoundError(
        f"No image file at {source!r}: it is not an existing file, an http(s) URL or base64-encoded image data."
    )


def _open_pil(file, name: str) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(file)
        image.load()  # reads the pixels now and closes the file
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read an image from {name!r}: {error}") from error
    return image


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """Apply the EXIF orientation tag, as `datasets`' Image feature does on decode, so that training and
    inference see the same picture. The result has no tag, so applying it twice changes nothing."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    return image


def pil_to_array(image: PIL.Image.Image, num_channels: int) -> np.ndarray:
    """A PIL image (any mode) -> a channels-first uint8 array with `num_channels` channels.

    1 or 3 channels: every mode converts (alpha composited over white, palette, CMYK, 16-bit scaled to 8 bits).
    Other counts: only images whose raw bands match (`LA` for 2, `RGBA`/`RGBX` for 4) pass, as they are.
    """
    if num_channels not in (1, 3):
        if RAW_BAND_MODES.get(image.mode) != num_channels:
            modes = [mode for mode, bands in RAW_BAND_MODES.items() if bands == num_channels]
            also = f" or {'/'.join(modes)} PIL images, whose bands it reads as they are" if modes else ""
            raise ValueError(
                f"The model reads {num_channels} channels (`num_channels={num_channels}`) but got a PIL image in "
                f"mode {image.mode!r} with {len(image.getbands())} band(s). PIL images convert only to 1 or 3 "
                f"channels; a {num_channels}-channel model takes arrays or tensors with {num_channels} "
                f"channels{also}."
            )
        return np.moveaxis(np.asarray(image), -1, 0)
    if image.mode.startswith("I;16"):
        image = PIL.Image.fromarray(sixteen_to_eight_bit(np.asarray(image)))
    elif image.mode in ("I", "F"):
        raise ValueError(
            f"PIL mode {image.mode!r} holds 32-bit values with no fixed range; scale the image to 8 bits "
            "(e.g. `Image.fromarray(array_uint8)`) or pass a normalised numpy array with `do_rescale=False`."
        )
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    target = "L" if num_channels == 1 else "RGB"
    if image.mode != target:  # convert() to the same mode would copy the whole image
        image = image.convert(target)
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def sixteen_to_eight_bit(array: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (PIL's own I;16 -> L conversion clips at 255 instead of scaling)."""
    return (array.astype(np.float32) / 257.0).round().astype(np.uint8)


def to_numpy(image) -> np.ndarray:
    """A numpy array (or a subclass: `np.matrix`, a masked array, whose mask is ignored), or a torch tensor on any
    device, in any layout and of any real dtype, -> a plain numpy array."""
    if isinstance(image, torch.Tensor):
        if image.is_meta:
            raise ValueError(
                "The image is a tensor on the meta device, which holds no values; pass real pixels."
            )
        image = image.detach().cpu()
        if image.layout != torch.strided:  # sparse tensors
            image = image.to_dense()
        if image.is_floating_point() and image.dtype not in (torch.float16, torch.float32, torch.float64):
            image = image.float()  # bfloat16 and float8 have no numpy dtype
        # A lazily conjugated or negated view cannot become numpy as it is; complex values are refused later.
        image = image.resolve_conj().resolve_neg().numpy()
    return np.asarray(image)


def native_layout(image: np.ndarray) -> np.ndarray:
    """Read any view of an image by value, as its contiguous copy: a non-native byte order (`>u2`, `>f4`, as
    big-endian files are read) becomes the native one, and negative strides (`image[..., ::-1]` from BGR to RGB,
    `np.fliplr`, `np.rot90`), which torch cannot take, are copied. Other arrays pass untouched."""
    if not image.dtype.isnative:
        image = image.astype(image.dtype.newbyteorder("="))
    if any(stride < 0 for stride in image.strides):
        image = np.ascontiguousarray(image)
    return image


def readable_channels(num_channels: int) -> tuple[int, ...]:
    """The channel counts an array may have for a model with `num_channels` channels."""
    return CONVERTIBLE_CHANNELS if num_channels in (1, 3) else (num_channels,)


def _channels_message(shape: tuple, num_channels: int) -> str:
    if num_channels in (1, 3):
        expected = "1 (grayscale), 3 (RGB) or 4 (RGBA) channels"
    else:
        expected = f"{num_channels} channels, as the model reads them"
    return (
        f"Cannot read an image of shape {shape} for a model with `num_channels={num_channels}`: expected "
        f"{expected}, first or last."
    )


def channels_first(
    image: np.ndarray, num_channels: int, input_data_format: str | ChannelDimension | None = None
) -> np.ndarray:
    """`(H, W)`, `(H, W, C)` or `(C, H, W)` -> `(C, H, W)`. The channel axis is the end whose size the model can
    read; when both ends could be channels (e.g. `(3, 5, 3)`), `input_data_format` must say which."""
    shape, readable = tuple(image.shape), readable_channels(num_channels)
    if image.ndim == 2:
        image, input_data_format = image[None], ChannelDimension.FIRST
    if input_data_format is None:
        if shape[0] in readable and shape[-1] in readable:
            raise ValueError(
                f"The image of shape {shape} is ambiguous: its first and its last dimension could both hold the "
                'channels. Pass `input_data_format="channels_first"` or `input_data_format="channels_last"`.'
            )
        input_data_format = ChannelDimension.FIRST if shape[0] in readable else ChannelDimension.LAST
    if ChannelDimension(input_data_format) == ChannelDimension.LAST:
        image = np.moveaxis(image, -1, 0)
    if image.shape[0] not in readable:  # also when neither end could be the channels
        raise ValueError(_channels_message(shape, num_channels))
    return image


def check_not_empty(height: int, width: int, shape: tuple) -> None:
    """Refuse an image with no pixels (`shape` is the input's, to name it in the message)."""
    if height == 0 or width == 0:
        raise ValueError(f"The image of shape {shape} has no pixels: height and width must be at least 1.")


def to_levels(image: np.ndarray, do_rescale: bool = True) -> np.ndarray:
    """A non-empty image's values -> 8-bit levels (uint8, or float32 within 0..255), the scale `rescale_factor`
    (1/255) expects.

    uint8 as is; bool False/True -> 0/255; uint16 is 16-bit (/257, as PIL I;16); other integers must lie in
    0..255. Floats must be finite: within [0, 1] they are already scaled (x255, so the rescale restores them),
    up to 255 they are levels; negative or larger values are refused. With `do_rescale=False` the values are the
    caller's and are kept (finite floats, any range).
    """
    kind = image.dtype.kind
    if kind not in "biuf":
        raise TypeError(
            f"Pixel values of dtype {image.dtype} are not supported: pass uint8, uint16, bool, other integers "
            "in 0..255, or floats."
        )
    if kind == "f":
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused next
            image = image.astype(np.float32, copy=False)
        if not np.isfinite(image).all():
            raise ValueError(
                "The image holds NaN or infinite values (or values beyond float32's range); pass finite pixel "
                "values."
            )
    if not do_rescale:
        if kind == "f" or image.dtype == np.uint8:
            return image
        return image.astype(np.uint8) if image.min() >= 0 and image.max() <= 255 else image.astype(np.float32)
    if kind == "b":
        return image.astype(np.uint8) * np.uint8(255)
    if image.dtype == np.uint16:
        return sixteen_to_eight_bit(image)
    low, high = image.min(), image.max()
    if kind in "iu":
        if low < 0 or high > 255:
            raise ValueError(
                f"Integer pixel values must lie in 0..255 (8-bit), got {low}..{high} ({image.dtype}). Scale them "
                "to 8 bits, pass uint16 for 16-bit images, or pass floats in [0, 1]."
            )
        return image.astype(np.uint8, copy=False)
    if low < 0 or high > 255:
        raise ValueError(
            f"Float pixel values {low:g}..{high:g} fit neither [0, 1] nor [0, 255]. Negative values look "
            "already normalised: pass `do_rescale=False` (and `do_normalize=False`) for pixel values that are "
            "ready, or scale the image to [0, 1]."
        )
    return image * np.float32(255.0) if high <= 1.0 else image


def convert_channels(image: np.ndarray, num_channels: int, white: float = 255.0) -> np.ndarray:
    """A channels-first array -> `num_channels` channels. Equal counts pass untouched (any count, e.g. 4-band
    RGB + near infrared). For a 1- or 3-channel model, 4 channels are RGBA composited over `white`, grayscale is
    repeated, and RGB becomes ITU-R 601-2 luma, the weights PIL uses for mode "L"."""
    channels = image.shape[0]
    if channels == num_channels:
        return image
    integer = np.issubdtype(image.dtype, np.integer)
    if channels == 4:
        # Composite over white, as a viewer shows a transparent image, instead of dropping alpha.
        alpha = image[3:4].astype(np.float32) / white
        composite = image[:3].astype(np.float32) * alpha + white * (1.0 - alpha)
        # Round integer pixels (as PIL's alpha_composite does) rather than truncate them a level down.
        image = (composite.round() if integer else composite).astype(image.dtype)
        if num_channels == 3:
            return image
    elif num_channels == 3:
        return np.repeat(image, 3, axis=0)
    luma = 0.299 * image[0].astype(np.float32) + 0.587 * image[1] + 0.114 * image[2]
    return (luma.round() if integer else luma)[None].astype(image.dtype)


def channel_statistic(value, name: str, num_channels: int):
    """`image_mean` / `image_std` for `num_channels` channels: one value or one per channel. A triple of equal
    values (the default 0.5) collapses to one value for any channel count; other lengths raise."""
    values = [float(v) for v in np.ravel(value)]
    if not all(math.isfinite(v) for v in values) or (name == "image_std" and min(values) <= 0):
        raise ValueError(f"`{name}` must hold finite values (and `image_std` positive ones), got {value!r}.")
    if len(values) == 1 or len(set(values)) == 1:
        return values[0]
    if len(values) == num_channels:
        return tuple(values)
    hint = f"`{name}=[{sum(values) / len(values):.3f}]`" if num_channels == 1 else f"{num_channels} values"
    raise ValueError(
        f"`{name}` has {len(values)} values, {tuple(values)}, but the images have {num_channels} channel(s) "
        f"(`num_channels={num_channels}`). Pass one value per channel or a single value, e.g. {hint}."
    )


def output_size(image: np.ndarray, size) -> tuple[int, int]:
    """The `(height, width)` a `SizeDict` asks for, for a channels-first `image` (transformers' rules)."""
    height, width = image.shape[-2:]
    if size.shortest_edge and size.longest_edge:
        return get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
    if size.shortest_edge:
        return get_resize_output_image_size(
            image,
            size=size.shortest_edge,
            default_to_square=False,
            input_data_format=ChannelDimension.FIRST,
        )
    if size.max_height and size.max_width:
        return get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
    if size.height and size.width:
        return size.height, size.width
    raise ValueError(
        "`size` must hold 'height' and 'width', 'shortest_edge' (and optionally 'longest_edge'), or 'max_height' "
        f"and 'max_width'; got {dict(size)}."
    )


def resize_bands(
    image: np.ndarray, height: int, width: int, resample: PILImageResampling, reducing_gap: int | None = None
) -> np.ndarray:
    """Resize a channels-first array band by band with PIL: uint8 bands as mode L (PIL's RGB resize gives the
    same numbers), float bands as mode F (no 8-bit rounding). Bands stay independent: no band is treated as
    alpha, so 4-band images keep their fourth band."""
    mode = "L" if image.dtype == np.uint8 else "F"
    bands = image if mode == "L" else image.astype(np.float32, copy=False)
    resized = np.stack(
        [
            np.asarray(
                PIL.Image.fromarray(np.ascontiguousarray(band), mode).resize(
                    (width, height), resample=resample, reducing_gap=reducing_gap
                )
            )
            for band in bands
        ]
    )
    if mode == "L":
        return resized
    # Bicubic and Lanczos overshoot at edges. Mode L clips to 0..255; float levels get the same clip, and values
    # outside 0..255 (the caller's own scale, `do_rescale=False`) are kept within their own range.
    return np.clip(resized, min(bands.min(), 0.0), max(bands.max(), 255.0))


def resize_image(
    image: np.ndarray, height: int, width: int, resample=None, reducing_gap: int | None = None
) -> np.ndarray:
    """Resize a channels-first uint8 or float32 array. Bilinear runs torch's antialiased kernel, the one
    torchvision's tensor resize calls and transformers' torchvision backend uses: on uint8 it rounds to 8-bit
    levels as PIL does, and lands within one level of PIL's numbers (PIL and torch round their fixed-point
    weights differently); floats are not rounded. Other filters, `reducing_gap`, and one-pixel-wide outputs (which
    torch 2.14's generic antialiased kernel resamples wrongly) go through PIL band by band (`resize_bands`).
    `resample` is a `PILImageResampling` (or its int); `None` is bilinear."""
    resample = PILImageResampling(PILImageResampling.BILINEAR if resample is None else resample)
    if resample != PILImageResampling.BILINEAR or reducing_gap is not None or width == 1:
        return resize_bands(image, height, width, resample, reducing_gap)
    if not image.flags.writeable:  # torch warns on read-only arrays (PIL's); order="K" keeps the layout
        image = image.copy(order="K")
    tensor = torch.from_numpy(image)[None]
    # uint8 runs torch's vectorised kernel on channels-last memory (what HWC images already are: no copy);
    # float runs fastest channels-first. Bilinear weights are positive, so floats need no overshoot clip.
    layout = torch.channels_last if tensor.dtype == torch.uint8 else torch.contiguous_format
    tensor = tensor.contiguous(memory_format=layout)
    return F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True)[0].numpy()


def map_images(function, images: list[np.ndarray]) -> list[np.ndarray]:
    """`[function(image) for image in images]`, spread over `torch.get_num_threads()` threads when there are
    several images. It runs the resize, whose torch kernel works on one thread per image and releases the GIL,
    so a batch of resizes goes about as many times faster as there are free cores (the PIL conversion before it
    holds the GIL, and stays a plain loop). DataLoader workers run with one torch thread, so inside them this is a
    plain loop too, as with `torch.set_num_threads(1)`. The results keep the images' order; an image's error is
    raised as it is."""
    workers = min(torch.get_num_threads(), len(images))
    if workers < 2:
        return [function(image) for image in images]
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="vitrail-images") as pool:
        return list(pool.map(function, images))


def crop_pct_size(image: np.ndarray, size, crop_pct: float) -> tuple[int, int]:
    """The size to resize a channels-first `image` to before center-cropping `size` (timm's evaluation
    transform): both sides of `size` over `crop_pct`, floored; for a square `size` the shorter side of the image
    goes there, keeping its aspect ratio."""
    height, width = image.shape[-2:]
    target_h = math.floor(size.height / crop_pct)
    target_w = math.floor(size.width / crop_pct)
    if size.height == size.width:
        scale = target_h / min(height, width)
        target_h, target_w = round(height * scale), round(width * scale)
    return target_h, target_w


def rescale_and_normalize(
    images: list[np.ndarray], offset: np.ndarray, divisor: np.ndarray
) -> np.ndarray | list[np.ndarray]:
    """`(image - offset) / divisor` per channel, as float32: the rescale (x 1/255) and the normalisation
    ((x - mean) / std) folded into one step, `(x - 255 mean) / (255 std)` (torchvision's fused form), which keeps
    8-bit black and white at exactly -1 and +1 with the default 0.5 statistics. Images of one shape land in one
    batch array, returned whole; otherwise a list.

    numpy, not torch: each torch elementwise call opens an OpenMP parallel region, and on a busy machine every
    region waits for a scheduler slice (measured on a shared 2-core VM: 31 ms per 224 x 224 image with 2 threads,
    against 0.3 ms for numpy). numpy also asks for huge pages for large arrays (316 page faults for a batch of
    96 x 3 x 224 x 224 floats, against 14,113 for `torch.empty`)."""
    shapes = {image.shape for image in images}
    batch = np.empty((len(images), *images[0].shape), np.float32) if len(shapes) == 1 else None
    rows = list(batch) if batch is not None else [np.empty(image.shape, np.float32) for image in images]
    for image, row in zip(images, rows, strict=True):
        np.subtract(image, offset, out=row, dtype=np.float32)
        row /= divisor
    return batch if batch is not None else rows


# ---- the processor ------------------------------------------------------------------------------------------


class VitrailImageProcessor(PilBackend):
    r"""
    Prepares images for vitrail: converts them to the model's channel count, resizes (optionally through a
    center crop with ratio `crop_pct`), rescales to [0, 1] and normalizes. Takes PIL images, numpy arrays, torch
    tensors and image paths/URLs (`(H, W)`, `(H, W, C)`, `(C, H, W)`, or batches `(B, C, H, W)`), one or a list.
    PIL images are first turned upright by their EXIF orientation. Grayscale, palette, RGBA (composited over
    white), CMYK and 16-bit PIL images are converted for 1- or 3-channel models; other channel counts (e.g. 4 for
    RGB + near infrared) take images with that many channels as they are. Float images within [0, 1] are taken
    as already scaled. `pixel_values` are float32.

    Args:
        size (`dict[str, int]`, defaults to 224 x 224): output size, `{"height": 224, "width": 224}`.
        resample (`PILImageResampling`, defaults to `BILINEAR`): resampling filter.
        crop_pct (`float`, *optional*): resize to `size / crop_pct` (shorter side for square outputs), then
            center-crop to `size`; 0.875 and 0.9 are common ImageNet evaluation ratios.
        do_rescale (`bool`, defaults to `True`): scale 8-bit levels to [0, 1]. With `do_rescale=False` pixel
            values are taken as they are.
        rescale_factor (`float`, defaults to 1/255): the factor `do_rescale` multiplies by.
        do_normalize (`bool`, defaults to `True`): normalise with `image_mean` and `image_std`.
        image_mean (`float` or `list[float]`, defaults to 0.5 per channel): one value, or one per channel (0.5 as
            in transformers' ViT).
        image_std (`float` or `list[float]`, defaults to 0.5 per channel): one value, or one per channel.
        num_channels (`int`, defaults to 3): channels of the output; 1 turns every input to grayscale; other
            counts than 1 and 3 pass images with exactly that many channels.
        center_crop_rounding (`str`, defaults to `"floor"`): `"floor"` places a center crop with an odd margin as
            transformers does, `"round"` as torchvision and timm do (converted timm checkpoints use it).
    """

    valid_kwargs = VitrailImageProcessorKwargs
    model_input_names = ["pixel_values"]

    size = {"height": 224, "width": 224}
    resample = PILImageResampling.BILINEAR
    do_resize = True
    do_center_crop = False
    crop_pct = None
    do_rescale = True
    do_normalize = True
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    num_channels = 3
    center_crop_rounding = "floor"

    def _validate_preprocess_kwargs(self, **kwargs):
        super()._validate_preprocess_kwargs(**kwargs)
        num_channels = kwargs.get("num_channels")
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"`num_channels` must be a positive integer, got {num_channels!r}.")
        for name in ("size", "crop_size"):
            values = dict(kwargs.get(name) or {})
            if any(not isinstance(v, int) or v < 1 for v in values.values()):
                raise ValueError(f"`{name}` must hold positive integers, got {values}.")
        rescale_factor = kwargs.get("rescale_factor")
        positive = isinstance(rescale_factor, float | int) and not isinstance(rescale_factor, bool)
        if kwargs.get("do_rescale") and not (positive and 0 < rescale_factor < math.inf):
            raise ValueError(
                f"`rescale_factor` must be a positive number (1/255 for 8-bit), got {rescale_factor!r}."
            )
        crop_pct = kwargs.get("crop_pct")
        if kwargs.get("do_resize") and crop_pct is not None and not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"`crop_pct` is the kept fraction of the image, in (0, 1]; got {crop_pct}.")
        if self.center_crop_rounding not in ("floor", "round"):
            raise ValueError(
                f"`center_crop_rounding` must be 'floor' or 'round', got {self.center_crop_rounding!r}."
            )

    def fetch_images(self, image_url_or_urls):
        """Open path/URL/base64 strings and `pathlib` paths as PIL images in their own mode (transformers'
        `load_image` would force RGB, dropping alpha); pass images through; refuse anything else by name."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            return open_image_source(os.fsdecode(image_url_or_urls))
        if not isinstance(image_url_or_urls, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            raise TypeError(
                f"Unsupported image type {type(image_url_or_urls).__name__}: pass PIL images, numpy arrays, "
                "torch tensors, or paths/URLs of image files (one, or a list)."
            )
        return image_url_or_urls

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        """Flatten the input into a list of single images: a 4-D array or tensor is a batch, a 2-D or 3-D one is
        one image (transformers' own flattening rejects 2-D grayscale arrays), lists may nest."""
        images = self.fetch_images(images)
        flat = []
        for item in images if isinstance(images, (list, tuple)) else [images]:
            if isinstance(item, (list, tuple)):
                flat.extend(self._prepare_images_structure(item, expected_ndims))
            elif isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
                flat.extend(item)
            elif isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim not in (2, 3):
                raise ValueError(
                    f"Cannot read an image array of shape {tuple(item.shape)}: pass (H, W), (H, W, C), (C, H, W) or "
                    "a batch (B, C, H, W)."
                )
            else:
                flat.append(item)
        return flat

    def process_image(
        self,
        image,
        num_channels: int | None = None,
        input_data_format: str | ChannelDimension | None = None,
        do_rescale: bool | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One raw image -> a channels-first array with `num_channels` channels, in 8-bit levels when
        rescaling (uint8, or float32 within 0..255)."""
        num_channels = num_channels or self.num_channels
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        if isinstance(image, PIL.Image.Image):
            image = upright(image)
            check_not_empty(image.height, image.width, (image.height, image.width))
            return pil_to_array(image, num_channels)
        image = native_layout(to_numpy(image))
        shape = tuple(image.shape)
        image = channels_first(image, num_channels, input_data_format)
        check_not_empty(*image.shape[-2:], shape)
        image = to_levels(image, do_rescale)
        white = 1.0 if image.dtype.kind == "f" and not do_rescale else 255.0
        return convert_channels(image, num_channels, white)

    def resize(self, image: np.ndarray, size, resample=None, reducing_gap: int | None = None, **kwargs):
        """Resize a channels-first image (any channel count, float bands kept in float): `resize_image`."""
        return resize_image(image, *output_size(image, size), resample, reducing_gap)

    def center_crop(self, image: np.ndarray, size, **kwargs) -> np.ndarray:
        height, width = image.shape[-2:]
        if self.center_crop_rounding == "floor" or size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size,
        resample,
        do_center_crop: bool,
        crop_size,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        return_tensors=None,
        crop_pct: float | None = None,
        num_channels: int | None = None,
        do_pad: bool | None = None,
        pad_size=None,
        **kwargs,
    ) -> BatchFeature:
        """Resize (through `crop_pct` when set), center-crop, then rescale and normalise in one step per image;
        the images come from `process_image` (channels-first, in 8-bit levels when rescaling)."""
        if not images:
            raise ValueError("No images given: pass an image or a non-empty list or batch of images.")
        if do_resize and crop_pct is not None:
            do_center_crop, crop_size = True, size

        def resize_and_crop(image: np.ndarray) -> np.ndarray:
            if do_resize:
                target = (
                    output_size(image, size) if crop_pct is None else crop_pct_size(image, size, crop_pct)
                )
                image = resize_image(image, *target, resample)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            return image

        prepared = map_images(resize_and_crop, images)
        # In the units of the images (8-bit levels when rescaling): (x - offset) / divisor.
        levels = 1.0 / rescale_factor if do_rescale else 1.0
        mean, std = 0.0, 1.0
        if do_normalize:
            mean = channel_statistic(image_mean, "image_mean", num_channels)
            std = channel_statistic(image_std, "image_std", num_channels)
        # (C,) -> (C, 1, 1), float32: what the pixels become
        offset, divisor = (
            np.broadcast_to(levels * np.asarray(v), num_channels).astype(np.float32)[:, None, None]
            for v in (mean, std)
        )
        pixels = rescale_and_normalize(prepared, offset, divisor)
        if do_pad:
            pixels = self.pad(list(pixels), pad_size=pad_size)
        shapes = sorted({image.shape for image in pixels})
        if return_tensors and len(shapes) > 1:
            raise ValueError(
                f"The processed images have different shapes {shapes} and cannot form one tensor: keep "
                "`do_resize=True` (or center-crop to one size), or pass `return_tensors=None` for a list."
            )
        if not return_tensors:
            pixels = list(pixels)
        return BatchFeature(data={"pixel_values": pixels}, tensor_type=return_tensors)


VitrailImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["VitrailImageProcessor"]
