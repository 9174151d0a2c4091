"""Image processor of vitrail: images in, `pixel_values` out, with no dependency on torchvision.

This file travels to the Hub with every checkpoint: it imports only numpy, PIL, torch and transformers.
Augmentation is not here: it belongs to training (`vitrail.data`); this processor is the evaluation transform.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    PILImageResampling,
    infer_channel_dimension_format,
)
from transformers.processing_utils import ImagesKwargs


class VitrailImageProcessorKwargs(ImagesKwargs, total=False):
    """Options beyond transformers' standard image kwargs.

    num_channels (`int`): channels the model reads (1 or 3); every input is converted to this count.
    crop_pct (`float`): evaluation crop ratio (timm's `crop_pct`): resize to `size / crop_pct`, then center-crop
        `size`. `None` resizes straight to `size`.
    center_crop_rounding (`str`): where an odd margin puts the crop: `"floor"` (transformers, the default) or
        `"round"` (torchvision, hence timm), one pixel further down/right.
    """

    num_channels: int | None
    crop_pct: float | None
    center_crop_rounding: str | None


def _to_channel_count(image: np.ndarray, num_channels: int) -> np.ndarray:
    """Convert a channels-first array with 1, 3 or 4 (RGBA) channels to `num_channels` (1 or 3)."""
    channels = image.shape[0]
    if channels == 4:
        # Composite over white, as a viewer shows a transparent image, instead of dropping alpha.
        white = 255.0 if np.issubdtype(image.dtype, np.integer) else 1.0
        alpha = image[3:4].astype(np.float32) / white
        composite = image[:3].astype(np.float32) * alpha + white * (1.0 - alpha)
        # Round integer pixels (as PIL's alpha_composite does) rather than truncate them a level down.
        image = (composite.round() if white == 255.0 else composite).astype(image.dtype)
        channels = 3
    if channels not in (1, 3):
        raise ValueError(
            f"Cannot read an image with {channels} channels: expected 1 (grayscale), 3 (RGB) or 4 (RGBA), "
            "channels first or last."
        )
    if channels == num_channels:
        return image
    if num_channels == 3:
        return np.repeat(image, 3, axis=0)
    # ITU-R 601-2 luma, the weights PIL uses for mode "L".
    luma = 0.299 * image[0].astype(np.float32) + 0.587 * image[1] + 0.114 * image[2]
    return (
        luma[None].astype(image.dtype)
        if np.issubdtype(image.dtype, np.floating)
        else luma[None].round().astype(image.dtype)
    )


def _grayscale_statistic(value, name: str):
    """`image_mean` / `image_std` for a one-channel output: a per-RGB triple of equal values (the default 0.5)
    collapses to one value; a triple of different values is ambiguous for grayscale and raises."""
    if value is None or isinstance(value, (int, float)) or len(value) == 1:
        return value
    if len(set(value)) == 1:
        return float(value[0])
    raise ValueError(
        f"`num_channels=1` makes grayscale images, but `{name}` has one value per RGB channel: {tuple(value)}. "
        f"Pass a single value, e.g. `{name}=[{sum(value) / len(value):.3f}]`."
    )


def _pil_to_channel_count(image: PIL.Image.Image, num_channels: int) -> np.ndarray:
    """Any PIL mode (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I;16, ...) to a channels-first uint8 array."""
    if image.mode.startswith("I;16"):
        # PIL's own 16 -> 8 bit conversion clips at 255; scale the full range down instead.
        image = PIL.Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().astype(np.uint8))
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
    image = image.convert("L" if num_channels == 1 else "RGB")
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


class VitrailImageProcessor(PilBackend):
    r"""
    Prepares images for vitrail: converts them to the model's channel count, resizes (optionally through a
    center crop with ratio `crop_pct`), rescales to [0, 1] and normalizes. Takes PIL images, numpy arrays and
    torch tensors (`(H, W)`, `(H, W, C)`, `(C, H, W)`, or batches `(B, C, H, W)`), one or a list. Grayscale,
    palette, RGBA (composited over white), CMYK and 16-bit PIL images are converted.

    Args:
        size (`dict[str, int]`, defaults to `{"height": 224, "width": 224}`): output size.
        resample (`PILImageResampling`, defaults to `BILINEAR`): resampling filter.
        crop_pct (`float`, *optional*): resize to `size / crop_pct` (shorter side for square outputs), then
            center-crop to `size`; 0.875 and 0.9 are common ImageNet evaluation ratios.
        do_rescale (`bool`, defaults to `True`), rescale_factor (`float`, defaults to 1/255): scale pixel values.
        do_normalize (`bool`, defaults to `True`), image_mean, image_std (defaults to 0.5 per channel, as in
            transformers' ViT): normalisation.
        num_channels (`int`, defaults to 3): channels of the output; 1 turns every input to grayscale.
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

    def center_crop(self, image: np.ndarray, size, **kwargs) -> np.ndarray:
        if self.center_crop_rounding not in ("floor", "round"):
            raise ValueError(
                f"`center_crop_rounding` must be 'floor' or 'round', got {self.center_crop_rounding!r}."
            )
        height, width = image.shape[-2:]
        if self.center_crop_rounding == "floor" or size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]

    def process_image(
        self,
        image,
        num_channels: int | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One raw image -> a channels-first numpy array with `num_channels` channels."""
        num_channels = num_channels or self.num_channels
        if num_channels not in (1, 3):
            raise ValueError(f"`num_channels` must be 1 or 3, got {num_channels}.")
        if isinstance(image, PIL.Image.Image):
            return _pil_to_channel_count(image, num_channels)
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"Unsupported image type {type(image).__name__}: pass PIL images, numpy arrays or torch tensors."
            )
        if image.ndim == 2:
            image = image[None]
        elif image.ndim == 3:
            if input_data_format is None:
                try:
                    input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
                except ValueError:
                    raise ValueError(
                        f"Cannot read an image of shape {tuple(image.shape)}: expected 1 (grayscale), 3 (RGB) or "
                        "4 (RGBA) channels, first or last."
                    ) from None
            if input_data_format == ChannelDimension.LAST:
                image = np.moveaxis(image, -1, 0)
        else:
            raise ValueError(f"An image must have 2 or 3 dimensions, got shape {image.shape}.")
        return _to_channel_count(image, num_channels)

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

    def _preprocess(self, images, do_resize, size, resample, crop_pct=None, **kwargs):
        if (kwargs.get("num_channels") or self.num_channels) == 1 and kwargs.get("do_normalize"):
            for name in ("image_mean", "image_std"):
                kwargs[name] = _grayscale_statistic(kwargs.get(name), name)
        if do_resize and crop_pct is not None:
            if not 0.0 < crop_pct <= 1.0:
                raise ValueError(f"`crop_pct` is the kept fraction of the image, in (0, 1]; got {crop_pct}.")
            resized = []
            for image in images:
                height, width = image.shape[-2:]
                target_h = math.floor(size.height / crop_pct)
                target_w = math.floor(size.width / crop_pct)
                if (
                    size.height == size.width
                ):  # shorter side, keeping the aspect ratio (timm's eval transform)
                    scale = target_h / min(height, width)
                    target_h, target_w = round(height * scale), round(width * scale)
                resized.append(
                    self.resize(image, size=type(size)(height=target_h, width=target_w), resample=resample)
                )
            images = resized
            kwargs.update(do_center_crop=True, crop_size=size)
            do_resize = False
        return super()._preprocess(images, do_resize=do_resize, size=size, resample=resample, **kwargs)


VitrailImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["VitrailImageProcessor"]
