"""The conversion engine every source format shares: declarative rename rows, one checked pass over a state
dict, safe weight reading, and the record a conversion hands to `scripts/convert_checkpoint.py`.

A source format (transformers, timm, JAX .npz) contributes only tables: `Rename` rows saying where each foreign
tensor goes (and how it is reshaped or fused on the way) and `Drop` rows saying which tensors have no vitrail
counterpart and why. `rename_state_dict` then places every source tensor exactly once or drops it with a logged
reason, fills every vitrail tensor with the expected shape, and raises a `ValueError` naming anything that does
not fit.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

logger = logging.getLogger("vitrail.convert")


@dataclass(frozen=True)
class Rename:
    """Source tensors whose name fully matches `source` (a regex) go to `target`.

    `target` is a `str.format` template: `{0}`, `{1}`... are the regex groups and `{backbone}` is `"vitrail."` for
    head models and `""` for the bare `VitrailModel`. `transform` reshapes the tensor first (e.g. a JAX kernel
    transposed to a torch weight). `slot=(k, n)` says the result is block `k` of `n` concatenated along dim 0 of
    the target (q, k and v go into one fused `qkv`). `note` is logged once if the row is used.
    """

    source: str
    target: str
    slot: tuple[int, int] | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    note: str | None = None


@dataclass(frozen=True)
class Drop:
    """Source tensors matching `source` have no vitrail counterpart; each is dropped with `reason` logged."""

    source: str
    reason: str


def expected_shapes(model_cls, config) -> dict[str, torch.Size]:
    """Names and shapes of the state dict `model_cls(config)` has, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in model_cls(config).state_dict().items()}


def rename_state_dict(
    state: Mapping[str, torch.Tensor],
    rows: Iterable[Rename],
    expected: Mapping[str, torch.Size],
    *,
    drops: Iterable[Drop] = (),
    backbone: str = "",
    strip_prefix: str = "",
    source_name: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename `state` into vitrail's names and check the result completely.

    `strip_prefix` is removed from source names before matching. Raises `ValueError` naming the source keys that
    match no row (and no `Drop`), keys that land on a tensor already filled, incomplete fused slots, and missing,
    unexpected or mis-shaped vitrail tensors.
    """
    compiled = [(re.compile(row.source), row) for row in rows]
    dropped = [(re.compile(d.source), d.reason) for d in drops]
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    fused_sizes: dict[str, int] = {}
    unplaced: list[str] = []
    placed_twice: list[str] = []
    notes: list[str] = []
    for key, tensor in state.items():
        name = key[len(strip_prefix) :] if strip_prefix and key.startswith(strip_prefix) else key
        hit = next(((m, row) for rx, row in compiled if (m := rx.fullmatch(name))), None)
        if hit is None:
            reason = next((why for rx, why in dropped if rx.fullmatch(name)), None)
            if reason is None:
                unplaced.append(key)
            else:
                logger.info("Dropped %s: %s.", key, reason)
            continue
        match, row = hit
        target = row.target.format(*match.groups(), backbone=backbone)
        if row.transform is not None:
            tensor = row.transform(tensor)
        if row.note and row.note not in notes:
            notes.append(row.note)
        if row.slot is None:
            if target in out:
                placed_twice.append(key)
            out[target] = tensor
            continue
        index, count = row.slot
        parts = fused.setdefault(target, {})
        fused_sizes[target] = count
        if index in parts:
            placed_twice.append(key)
        parts[index] = (key, tensor)
    if unplaced:
        raise ValueError(
            f"{len(unplaced)} tensor(s) of the {source_name} match no rename row and are not known to be "
            f"droppable: {sorted(unplaced)[:20]}{' ...' if len(unplaced) > 20 else ''}. Is this really a "
            f"{source_name}?"
        )
    if placed_twice:
        raise ValueError(f"Source tensor(s) land on a vitrail tensor already filled: {sorted(placed_twice)}.")
    for target, parts in fused.items():
        count = fused_sizes[target]
        if sorted(parts) != list(range(count)):
            have = sorted(k for k, _ in parts.values())
            raise ValueError(
                f"{target} joins {count} source tensors, but only {have} are in the {source_name}."
            )
        out[target] = torch.cat([parts[i][1] for i in range(count)], dim=0)
    if fused:
        logger.info(
            "Joined %d source tensors into %d vitrail tensors along dim 0 (e.g. %s).",
            sum(len(parts) for parts in fused.values()),
            len(fused),
            next(iter(fused)),
        )
    for note in notes:
        logger.info(note)

    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The converted {source_name} does not fit vitrail: missing {missing}, unexpected {unexpected}."
        )
    wrong = {k: (tuple(out[k].shape), tuple(s)) for k, s in expected.items() if out[k].shape != s}
    if wrong:
        raise ValueError(f"Shape mismatches (got, expected): {wrong}.")
    logger.info("All %d vitrail tensors filled from %d source tensors.", len(out), len(state))
    return {k: v.contiguous() for k, v in out.items()}


def read_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a `.safetensors` file, a folder with `model.safetensors` (or a sharded index), or
    -- only with `allow_pickle=True` -- a pickled `pytorch_model.bin` / `.pth` / `.pt`, read with
    `weights_only=True`."""
    path = Path(path)
    if path.is_dir():
        single, index = path / "model.safetensors", path / "model.safetensors.index.json"
        if single.is_file():
            return load_file(single)
        if index.is_file():
            state = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load_file(path / shard))
            return state
        pickles = [p for p in ("pytorch_model.bin", "model.pth", "model.pt") if (path / p).is_file()]
        if not pickles:
            raise FileNotFoundError(f"No model.safetensors (or sharded index) in {path}.")
        path = path / pickles[0]
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix in (".bin", ".pth", ".pt"):
        if not allow_pickle:
            raise ValueError(
                f"{path} is a pickle, which can run code when loaded. Re-save it as safetensors "
                "(`safetensors.torch.save_file(state_dict, 'model.safetensors')`) or, if you trust the source, "
                "opt in with `allow_pickle=True` (`--allow-pickle` on the command line)."
            )
        logger.warning("Loading pickled weights from %s (allow_pickle=True, weights_only=True).", path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):  # training checkpoints often nest the weights
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        return state
    raise ValueError(
        f"Unsupported weight file {path}: expected .safetensors (or .bin/.pth/.pt with allow_pickle)."
    )


@dataclass
class Converted:
    """What a source format hands to `scripts/convert_checkpoint.py`.

    `model` is the vitrail model in eval mode; `processor` a `VitrailImageProcessor` reproducing the source's
    evaluation preprocessing (None if the source says nothing about it); `reference` maps pixel values of any
    size to the source implementation's own outputs (its logits, or its last hidden state for backbones), running
    the source's own position interpolation when the size differs -- None when the source library is not
    installed; `notes` are lines to print.
    """

    model: torch.nn.Module
    processor: object | None = None
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)


def model_outputs(model, pixels: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """The tensor conversions are compared on: logits for classifiers, the last hidden state for backbones."""
    with torch.no_grad():
        out = model(pixel_values=pixels, **forward_kwargs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state
