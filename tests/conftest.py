"""Shared fixtures: a tiny, deliberately odd-sized config so that shape bugs cannot hide behind round numbers."""

import pytest
import torch

from vitrail import VitrailConfig

TINY = dict(
    image_size=30,
    patch_size=2,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    encoder_stride=2,
    layer_norm_eps=1e-6,
)


def tiny_config(**overrides) -> VitrailConfig:
    return VitrailConfig(**{**TINY, **overrides})


@pytest.fixture
def config() -> VitrailConfig:
    return tiny_config(num_labels=5)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
