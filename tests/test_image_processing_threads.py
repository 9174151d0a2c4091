"""The processor prepares a list of images on several threads (torch's thread count): the same numbers as one
thread, in order, each object once, errors raised as they are."""

import io
import threading

import numpy as np
import PIL.Image
import pytest
import torch

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


@pytest.mark.parametrize("kwargs", [{}, {"crop_pct": 0.875}])
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


def test_work_runs_on_the_pool_only_with_several_threads(threads, monkeypatch):
    """With 2 torch threads the images are converted and resized on the processor's pool; with 1 (what a
    DataLoader worker has) in the calling thread."""
    names = []
    real = VitrailImageProcessor.process_image

    def recording(self, *args, **kwargs):
        names.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(VitrailImageProcessor, "process_image", recording)
    processor = VitrailImageProcessor(size={"height": 16, "width": 16})
    threads(2)
    processor(mixed_images()[:6])
    assert len(names) == 6 and all(name.startswith("vitrail-images") for name in names)
    names.clear()
    threads(1)
    processor(mixed_images()[:6])
    assert names == [threading.current_thread().name] * 6


def test_an_image_given_twice_is_processed_once(threads, monkeypatch):
    """Two threads must never load one lazily opened PIL image at once: a repeated object is processed once and
    its result used at every place it was given."""
    calls = []
    real = VitrailImageProcessor.process_image

    def counting(self, image, *args, **kwargs):
        calls.append(id(image))
        return real(self, image, *args, **kwargs)

    monkeypatch.setattr(VitrailImageProcessor, "process_image", counting)
    images = mixed_images()
    lazy = images[5]
    threads(2)
    pixels = VitrailImageProcessor(size={"height": 16, "width": 16})(
        [lazy, images[0], lazy, lazy], return_tensors="pt"
    ).pixel_values
    assert sorted(calls) == sorted([id(lazy), id(images[0])])
    assert torch.equal(pixels[0], pixels[2]) and torch.equal(pixels[0], pixels[3])
    assert not torch.equal(pixels[0], pixels[1])


def test_a_bad_image_among_many_raises_its_own_error(threads):
    images = mixed_images()
    images[4] = np.zeros((0, 5, 3), np.uint8)
    threads(2)
    with pytest.raises(ValueError, match=r"The image of shape \(0, 5, 3\) has no pixels"):
        VitrailImageProcessor()(images)


class NamesOfThreads(torch.utils.data.Dataset):
    """One item: the names of the threads that converted each of six images."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        names = []
        real = VitrailImageProcessor.process_image

        class Recording(VitrailImageProcessor):
            def process_image(self, *args, **kwargs):
                names.append(threading.current_thread().name)
                return real(self, *args, **kwargs)

        Recording(size={"height": 16, "width": 16})(mixed_images()[:6])
        return names


def test_dataloader_workers_prepare_images_in_their_own_thread(threads):
    """A DataLoader worker runs with one torch thread, so the processor adds no threads of its own there."""
    threads(2)
    loader = torch.utils.data.DataLoader(NamesOfThreads(), num_workers=1, collate_fn=lambda items: items[0])
    assert next(iter(loader)) == ["MainThread"] * 6
