"""Speed properties of the model that hold on any machine, so they are tested by counting work, not by timing it:
the memory copies a training step makes around the fused qkv projection."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitrail import VitrailConfig
from vitrail.modeling_vitrail import VitrailAttention

# Odd sizes, so that no other tensor of the step has the qkv gradient's element count by chance.
CONFIG = dict(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
BATCH, TOKENS = 3, 26
# aten operations that write a new tensor from another's values (views, such as permute or t, write nothing).
COPYING = {"stack", "cat", "clone", "copy_", "_to_copy", "contiguous", "new_empty_strided", "empty_like"}


class Operations(TorchDispatchMode):
    """Records the name and output sizes of every aten operation run inside the block."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, list[int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, tuple | list) else [out]
        self.seen.append(
            (func.overloadpacket.__name__, [t.numel() for t in outputs if isinstance(t, torch.Tensor)])
        )
        return out


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_qkv_gradient_is_copied_once(implementation):
    """Backward gathers the query, key and value gradients into the projection's `(B, N, 3, heads, d)` output with
    one copy (the stack of the three); splitting the fused output by permuting it whole cost a second, full-size
    copy (a clone to undo the permute) in every layer."""
    config = VitrailConfig(**CONFIG)
    config._attn_implementation = implementation
    attention = VitrailAttention(config)
    hidden = torch.randn(BATCH, TOKENS, config.hidden_size, requires_grad=True)
    output, _ = attention(hidden)
    with Operations() as operations:
        output.sum().backward()
    qkv_size = BATCH * TOKENS * 3 * config.hidden_size
    writes = [name for name, sizes in operations.seen if qkv_size in sizes and name in COPYING]
    assert writes == ["stack"], writes
    assert hidden.grad is not None and attention.qkv.weight.grad is not None
