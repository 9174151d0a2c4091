"""The processor resizes a list of images on several threads (torch's thread count): the same numbers as one
thread, in order, errors raised as they are, and no threads of its own inside DataLoader workers."""

import io
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.image_utils import PILImageResampling

import vitrail.image_processing_vitrail as image_processing
from vitrail import VitrailImageProcessor


@pytest.fixture
def threads():
    """Set torch's thread count for one test and put it back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def mixed_images() -> list:
    """Photos of several sizes and kinds: PIL RGB, a lazily opened JPEG, grayscale, RGBA, a uint8 array, a float
    tensor."""
    rng = np.random.default_rng(0)
    images = [
        PIL.Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60 - 5 * i, 3), np.uint8)) for i in range(5)
    ]
    buffer = io.BytesIO()
    images[0].save(buffer, "JPEG")
    images.append(PIL.Image.open(io.BytesIO(buffer.getvalue())))
    images.append(images[1].convert("L"))
    images.append(images[2].convert("RGBA"))
    images.append(rng.integers(0, 256, (33, 45, 3), np.uint8))
    images.append(torch.rand(3, 50, 31, generator=torch.Generator().manual_seed(0)))
    return images


def recording_resizes(monkeypatch) -> list[str]:
    """Patch the processor's resize to note the name of the thread each call runs on."""
    names, real = [], image_processing.resize_image

    def recording(*args, **kwargs):
        names.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(image_processing, "resize_image", recording)
    return names


@pytest.mark.parametrize("kwargs", [{}, {"crop_pct": 0.875}, {"resample": PILImageResampling.BICUBIC}])
def test_threads_give_the_numbers_one_thread_gives(threads, kwargs):
    processor = VitrailImageProcessor(size={"height": 24, "width": 24}, **kwargs)
    threads(1)
    alone = processor(mixed_images(), return_tensors="pt").pixel_values
    threads(2)
    spread = processor(mixed_images(), return_tensors="pt").pixel_values
    assert alone.shape == (10, 3, 24, 24)
    assert torch.equal(alone, spread)
    # and each row is that image processed by itself: the order is kept
    for index, image in enumerate(mixed_images()):
        assert torch.equal(processor(image, return_tensors="pt").pixel_values[0], spread[index])


def test_resizes_run_on_the_pool_only_with_several_threads(threads, monkeypatch):
    """With 2 torch threads the images are resized on the processor's pool; with 1 in the calling thread."""
    names = recording_resizes(monkeypatch)
    processor = VitrailImageProcessor(size={"height": 16, "width": 16})
    threads(2)
    processor(mixed_images()[:6])
    assert len(names) == 6 and all(name.startswith("vitrail-images") for name in names)
    names.clear()
    threads(1)
    processor(mixed_images()[:6])
    assert names == [threading.current_thread().name] * 6


def test_an_error_on_the_pool_is_raised_as_it_is(threads, monkeypatch):
    real = image_processing.resize_image

    def failing(image, *args, **kwargs):
        if image.shape[-2:] == (33, 45):
            raise ValueError("the (33, 45) image")
        return real(image, *args, **kwargs)

    monkeypatch.setattr(image_processing, "resize_image", failing)
    threads(2)
    with pytest.raises(ValueError, match=r"^the \(33, 45\) image$"):
        VitrailImageProcessor()(mixed_images())


class ResizeThreads(torch.utils.data.Dataset):
    """One item: the names of the threads that resized each of six images."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        names, real = [], image_processing.resize_image

        def recording(*args, **kwargs):
            names.append(threading.current_thread().name)
            return real(*args, **kwargs)

        image_processing.resize_image = recording  # inside the worker process only
        VitrailImageProcessor(size={"height": 16, "width": 16})(mixed_images()[:6])
        return names


def test_dataloader_workers_resize_in_their_own_thread(threads):
    """A DataLoader worker runs with one torch thread, so the processor adds no threads of its own there."""
    threads(2)
    loader = torch.utils.data.DataLoader(ResizeThreads(), num_workers=1, collate_fn=lambda items: items[0])
    assert next(iter(loader)) == ["MainThread"] * 6
