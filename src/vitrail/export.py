"""Export of a vitrail classifier: `torch.export` and ONNX, checked against PyTorch with onnxruntime.

The batch size is always dynamic; height and width are too when the config has `dynamic_image_size=True` (any
size from two patches a side, padded to whole patches as in PyTorch), fixed at `config.image_size` otherwise.
`torch.onnx.export(dynamo=True)` needs `onnx` and `onnxscript`, checking needs `onnxruntime` (the `export` extra).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .modeling_vitrail import VitrailForImageClassification

logger = logging.getLogger(__name__)


class ClassifierLogits(nn.Module):
    """The classifier as an exported graph sees it: `pixel_values` in, `logits` out."""

    def __init__(self, model: VitrailForImageClassification):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


def export_program(
    model: VitrailForImageClassification, dynamic_size: bool = False
) -> torch.export.ExportedProgram:
    """`torch.export` of `model` (`pixel_values` -> `logits`), in eval mode, with a dynamic batch and, with
    `dynamic_size`, a dynamic height and width; that needs `config.dynamic_image_size=True`, or the model
    refuses every size but `config.image_size` (the error says how to allow it)."""
    config = model.config
    if dynamic_size and not config.dynamic_image_size:
        raise ValueError(
            f"A dynamic image size needs a model that accepts any size, but this config has "
            f"`dynamic_image_size=False` (it takes {config.image_hw[0]}x{config.image_hw[1]} only). Load it with "
            "`from_pretrained(..., dynamic_image_size=True)` (positions are resampled to each input's grid), or "
            "export at the fixed size."
        )
    parameter = next(model.parameters())
    # Batch 2: torch.export fixes a dimension whose example is 0 or 1.
    example = torch.zeros(
        2, config.num_channels, *config.image_hw, dtype=parameter.dtype, device=parameter.device
    )
    dims = {0: torch.export.Dim("batch")}
    if dynamic_size:
        # From two patches a side: a one-patch side would broadcast, a case export cannot keep symbolic.
        patch_h, patch_w = config.patch_hw
        dims.update(
            {2: torch.export.Dim("height", min=2 * patch_h), 3: torch.export.Dim("width", min=2 * patch_w)}
        )
    wrapper = ClassifierLogits(model).eval()
    return torch.export.export(wrapper, (example,), dynamic_shapes={"pixel_values": dims}, strict=False)


def export_onnx(model: VitrailForImageClassification, path: str | Path, dynamic_size: bool = False) -> Path:
    """Write `model` as an ONNX graph (input `pixel_values`, output `logits`) through `export_program`; the
    weights go beside it, in `<path>.data` (ONNX's external data: a graph file alone is capped at 2 GB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(model, dynamic_size)
    torch.onnx.export(
        program,
        input_names=["pixel_values"],
        output_names=["logits"],
        f=str(path),
        dynamo=True,
        verbose=False,
    )
    return path


def onnx_max_difference(
    path: str | Path, model: VitrailForImageClassification, inputs: list[torch.Tensor]
) -> float:
    """The largest absolute difference between onnxruntime's logits for the ONNX file at `path` and `model`'s,
    over `inputs` (each a `(batch, channels, height, width)` tensor)."""
    import onnxruntime  # a dev dependency; only checking needs it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for pixel_values in inputs:
        (logits,) = session.run(["logits"], {"pixel_values": pixel_values.float().numpy()})
        with torch.no_grad():
            expected = model(pixel_values).logits
        difference = float((torch.from_numpy(logits) - expected).abs().max())
        logger.info("%s: max abs logit difference %.3g", tuple(pixel_values.shape), difference)
        worst = max(worst, difference)
    return worst


def check_inputs(config, dynamic_size: bool, seed: int = 0) -> list[torch.Tensor]:
    """Inputs that exercise what the export promises: batch sizes other than the example's (1 and 3) and, with a
    dynamic size, a smaller size with a side no patch divides (positions shrink, padding runs) and a larger
    non-square one (positions grow)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = config.image_hw
    sizes = [(1, height, width), (3, height, width)]
    if dynamic_size:
        patch_h, patch_w = config.patch_hw
        smaller = (max(2 * height // 3 + 1, 2 * patch_h), max(width - 1, 2 * patch_w))
        sizes += [(2, *smaller), (1, 2 * height, 3 * width // 2)]
    return [torch.randn(b, config.num_channels, h, w, generator=generator) for b, h, w in sizes]
