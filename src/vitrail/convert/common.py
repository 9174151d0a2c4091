"""The conversion engine every source format shares: declarative rows, one checked pass over a state dict, the
step from a checked state dict to a vitrail model, safe weight reading, and the record a conversion hands to
`scripts/convert_checkpoint.py`.

A source format (transformers, timm, JAX .npz) contributes tables and what it reads off a checkpoint. The tables
are rows of one dialect: `Rename` (where a foreign tensor goes, and how it is reshaped or fused on the way),
`Drop` (a tensor with no vitrail counterpart, and why) and `Refuse` (a tensor of a part vitrail cannot reproduce,
and what it is). What the format reads off a checkpoint -- the vitrail config its tensors fit, whether it has a
classification head -- goes into a `Plan`, and `Plan.load` does the rest: `rename_state_dict` places every source
tensor exactly once or drops it with a logged reason, fills every vitrail tensor with the expected shape, and
raises a `ValueError` naming anything that does not fit; the model is then built, loaded strictly and put in eval
mode.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.utils import cached_file

from ..configuration_vitrail import VitrailConfig
from ..modeling_vitrail import (
    VitrailForImageClassification,
    VitrailForMaskedImageModeling,
    VitrailModel,
    VitrailPreTrainedModel,
)

logger = logging.getLogger(__name__)

# What the placeholders of a row's `source` match; `{n}` and `{p}` carry the matched text into its `target`.
_PLACEHOLDERS = {"{n}": r"(?P<n>\d+)", "{p}": r"(?P<p>weight|bias)", "*": ".*"}


@functools.cache
def _pattern(source: str) -> re.Pattern:
    parts = re.split(r"(\{n\}|\{p\}|\*)", source)
    return re.compile("".join(_PLACEHOLDERS.get(part, re.escape(part)) for part in parts))


@dataclass(frozen=True)
class Rename:
    """Source tensors named `source` go to `target`.

    `source` is the foreign name as written, where `{n}` stands for a layer number, `{p}` for `weight` or `bias`
    and `*` for any text. `target` is the vitrail name, with `{n}` and `{p}` filled from the source, and
    `{backbone}` for `"vitrail."` in head models and `""` in the bare `VitrailModel`. `transform` reshapes the
    tensor first (e.g. a JAX kernel transposed to a torch weight). `slot=(k, n)` says the result is block `k` of
    `n` concatenated along dim 0 of the target (q, k and v go into one fused `qkv`). `note` is logged once if the
    row is used.
    """

    source: str
    target: str
    slot: tuple[int, int] | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    note: str | None = None


def fused_qkv(query: str, key: str, value: str, target: str = "attention.qkv.{p}") -> tuple[Rename, ...]:
    """The rows for separate query, key and value projections, which fill blocks 0, 1 and 2 of vitrail's fused
    `qkv` in that order."""
    return tuple(Rename(name, target, slot=(index, 3)) for index, name in enumerate((query, key, value)))


@dataclass(frozen=True)
class Drop:
    """Source tensors matching `source` (a `Rename` pattern) have no vitrail counterpart; each is dropped with
    `reason` logged."""

    source: str
    reason: str


@dataclass(frozen=True)
class Refuse:
    """Source tensors matching `source` (a `Rename` pattern) belong to a part vitrail cannot reproduce: `reason`
    says what it is (and what to do instead), and `refuse` stops the conversion with it."""

    source: str
    reason: str


def in_layers(source_prefix: str, rows: Iterable[Rename]) -> tuple[Rename, ...]:
    """`rows` written for the inside of one layer, made rows for every layer: `source_prefix` (which holds the
    `{n}` placeholder) goes before each source and vitrail's `{backbone}encoder.layers.{n}.` before each target."""
    return tuple(
        replace(row, source=source_prefix + row.source, target="{backbone}encoder.layers.{n}." + row.target)
        for row in rows
    )


def layer_count(names: Iterable[str], source: str) -> int:
    """The number of layers: one more than the highest `{n}` among `names` matching the pattern `source` (a gap in
    the numbering is left to `rename_state_dict`, which names the missing tensors)."""
    return 1 + max((int(m["n"]) for name in names if (m := _pattern(source).fullmatch(name))), default=-1)


def height_width(value) -> tuple[int, int] | None:
    """An image or patch size as checkpoints write it (an int, `(height, width)`, or timm's `input_size`
    `(channels, height, width)`) as `(height, width)`; None stays None."""
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    *_, height, width = value
    return int(height), int(width)


def grid_of_positions(
    rows: int, prefixes: Sequence[int], patch: tuple[int, int], sizes=(), *, name: str, hint: str
) -> tuple[tuple[int, int], int]:
    """`((height, width), prefix rows)` of a learned position table of `rows` rows: one per patch, plus one per
    prefix token that owns a position, as many as one of `prefixes`. The first of `sizes` (image sizes a config
    names) whose grid fits wins; otherwise the grid is the square that exactly one of `prefixes` leaves. Raises
    `ValueError` (ending with `hint`, how to name the size) when no square or two fit."""
    for size in sizes:
        prefix = rows - (size[0] // patch[0]) * (size[1] // patch[1])
        if prefix in prefixes:
            return tuple(size), prefix
    squares = [(side, p) for p in prefixes if rows > p and (side := math.isqrt(rows - p)) ** 2 == rows - p]
    if len(squares) == 1:
        if sizes:
            logger.warning(
                "%s has %d rows, which fits none of the image sizes %s; using a square grid.",
                name,
                rows,
                sizes,
            )
        [(side, prefix)] = squares
        return (side * patch[0], side * patch[1]), prefix
    problem = (
        "is not a square grid of patches" if not squares else "is a square grid with and without prefix rows"
    )
    raise ValueError(
        f"{name} has {rows} rows ({' or '.join(map(str, prefixes))} for prefix tokens), which {problem}; {hint}."
    )


def refuse(names: Iterable[str], rows: Iterable[Refuse], source_name: str = "checkpoint") -> None:
    """Raise `NotImplementedError` for the first `Refuse` row that some of `names` match, naming them."""
    names = sorted(names)
    for row in rows:
        hits = [name for name in names if _pattern(row.source).fullmatch(name)]
        if hits:
            raise NotImplementedError(
                f"The {source_name} has {hits[:4]}{' ...' if len(hits) > 4 else ''}: {row.reason}. vitrail cannot "
                "reproduce it, and dropping the tensors would change the outputs, so nothing is converted."
            )


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
    rows, drops = list(rows), list(drops)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[dict[int, tuple[str, torch.Tensor]], int]] = {}  # target -> (parts by slot, slots)
    unplaced: list[str] = []
    placed_twice: list[str] = []
    notes: list[str] = []
    for key, tensor in state.items():
        name = key[len(strip_prefix) :] if strip_prefix and key.startswith(strip_prefix) else key
        hit = next(((m, row) for row in rows if (m := _pattern(row.source).fullmatch(name))), None)
        if hit is None:
            reason = next((d.reason for d in drops if _pattern(d.source).fullmatch(name)), None)
            if reason is None:
                unplaced.append(key)
            else:
                logger.info("Dropped %s: %s.", key, reason)
            continue
        match, row = hit
        target = row.target.format(backbone=backbone, **match.groupdict())
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
        parts, _ = fused.setdefault(target, ({}, count))
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
    for target, (parts, count) in fused.items():
        if sorted(parts) != list(range(count)):
            have = sorted(k for k, _ in parts.values())
            raise ValueError(
                f"{target} joins {count} source tensors, but only {have} are in the {source_name}."
            )
        out[target] = torch.cat([parts[i][1] for i in range(count)], dim=0)
    if fused:
        logger.info(
            "Joined %d source tensors into %d vitrail tensors along dim 0 (e.g. %s).",
            sum(len(parts) for parts, _ in fused.values()),
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


@dataclass(frozen=True)
class Plan:
    """What a source format works out about one checkpoint, and all that the conversion needs.

    `state` is the source's tensors, `config` the `VitrailConfig` they fit, `head` whether the model has a
    classification head (`VitrailForImageClassification`, else `VitrailModel`), `masked_image_modeling` whether it
    is a SimMIM model instead (`VitrailForMaskedImageModeling`: mask token and decoder), `rows` and `drops` the
    format's tables; `strip_prefix` and `source_name` as in `rename_state_dict`.
    """

    state: Mapping[str, torch.Tensor]
    config: VitrailConfig
    head: bool
    rows: Sequence[Rename]
    drops: Sequence[Drop] = ()
    strip_prefix: str = ""
    source_name: str = "checkpoint"
    masked_image_modeling: bool = False

    @property
    def model_class(self) -> type[VitrailPreTrainedModel]:
        if self.masked_image_modeling:
            return VitrailForMaskedImageModeling
        return VitrailForImageClassification if self.head else VitrailModel

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The source's tensors under vitrail's names for `model_class`, checked by `rename_state_dict`."""
        target = self.model_class
        logger.info(
            "Converting %d tensors (%s) into %s: %s.",
            len(self.state),
            self.source_name,
            target.__name__,
            describe(self.config),
        )
        with torch.device("meta"):  # the names and shapes to fill, without memory
            expected = {k: v.shape for k, v in target(self.config).state_dict().items()}
        return rename_state_dict(
            self.state,
            self.rows,
            expected,
            drops=self.drops,
            backbone="" if target is VitrailModel else f"{target.base_model_prefix}.",
            strip_prefix=self.strip_prefix,
            source_name=self.source_name,
        )

    def load(self) -> VitrailPreTrainedModel:
        """The converted vitrail model, every tensor loaded strictly, in eval mode."""
        model = self.model_class(self.config)
        model.load_state_dict(self.state_dict(), strict=True)
        return model.eval()


def describe(config: VitrailConfig) -> str:
    """The architecture of `config` in one line, for logs and notes."""
    (height, width), (ph, pw) = config.image_hw, config.patch_hw
    tokens = {"class": config.use_cls_token, "distillation": config.use_distillation_token}
    tokens = [f"{name} token" for name, used in tokens.items() if used]
    tokens += [f"{config.num_register_tokens} registers"] if config.num_register_tokens else []
    return (
        f"{config.num_hidden_layers} layers, width {config.hidden_size}, {config.num_attention_heads} heads, MLP "
        f"{config.intermediate_size} ({config.hidden_act}), patch {ph}x{pw}, {height}x{width} px, "
        f"{', '.join(tokens) or 'no prefix tokens'}, {config.position_embedding_type} positions, "
        f"{config.pooling} pooling"
    )


# Pickled weight files, in the order transformers looks for them; read only with `allow_pickle=True`.
_PICKLES = ("pytorch_model.bin", "model.pth", "model.pt")


def unnest(state):
    """The weights of an unpickled checkpoint: training checkpoints often nest them under `state_dict` or `model`."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def weight_files(path_or_repo, allow_pickle: bool = False, **hub_kwargs) -> list[Path]:
    """The files a checkpoint's weights are read from, in transformers' order: `model.safetensors`, else the shards
    its index names (a shard it lacks is refused by name), else (only with `allow_pickle=True`) a pickle;
    downloaded to the cache for a Hub repo. Empty when there are none (loading then says why)."""

    def find(name: str) -> Path | None:
        file = cached_file(path_or_repo, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        return Path(file) if file else None

    if single := find("model.safetensors"):
        return [single]
    if index := find("model.safetensors.index.json"):
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            raise OSError(
                f"{index} is not a weight index (a JSON file with a `weight_map`): {error}"
            ) from error
        files = {shard: find(shard) for shard in shards}
        lacking = [shard for shard, file in files.items() if file is None]
        if lacking:
            raise OSError(f"{index} names weight files the checkpoint does not have: {lacking}.")
        return list(files.values())
    return [file for file in map(find, _PICKLES) if file][:1] if allow_pickle else []


def read_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a `.safetensors` file, a folder with `model.safetensors` (or a sharded index), or
    -- only with `allow_pickle=True` -- a pickled `pytorch_model.bin` / `.pth` / `.pt`, read with
    `weights_only=True`."""
    path = Path(path)
    if path.is_dir():
        files = weight_files(path, allow_pickle=True)  # a pickle is refused below without allow_pickle
        if not files:
            raise FileNotFoundError(f"No model.safetensors (or sharded index) in {path}.")
        if len(files) > 1:
            return {name: tensor for file in files for name, tensor in load_file(file).items()}
        path = files[0]
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
        return unnest(torch.load(path, map_location="cpu", weights_only=True))
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
    """The tensor conversions are compared on: logits for classifiers, the reconstruction for masked image
    modeling, the last hidden state for backbones."""
    with torch.no_grad():
        out = model(pixel_values=pixels, **forward_kwargs)
    for name in ("logits", "reconstruction"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out.last_hidden_state
