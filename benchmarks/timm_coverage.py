"""Which of timm's pretrained Vision Transformers vitrail converts, measured on shrunk random copies.

    .venv/bin/python benchmarks/timm_coverage.py                  # writes docs/coverage.md
    .venv/bin/python benchmarks/timm_coverage.py --only 'eva02'   # some architectures, printed (a regex)

About 25 s of CPU on one thread for the 290 copies (wall time 1.5 to 2 minutes on a busy 2-core machine). With
timm 1.0.31 it should report 422 of 515 tags loading with parity and none with different outputs.

For every architecture with a pretrained tag in timm's ViT families (`FAMILIES`), timm builds a shrunk copy: 2
blocks, width 64, 4 heads, a 4 x 4 patch grid, a small head, every other option as the architecture has it. Every
parameter is moved off its initial value (biases, norms and layer scales included: a fresh model would hide a
misplaced one), and the copy is saved in timm's Hub layout by timm's own `save_for_hf` (config.json with
`architecture`, `model_args`, `num_classes`, `pretrained_cfg`, and model.safetensors). vitrail converts the folder
(`vitrail.convert.timm.load_timm_checkpoint`) and its outputs are compared with timm's on one random batch (the
logits; for a model without a head its tokens and pooled vector), and again at a 5 x 6 patch grid where timm
resamples its positions at run time (`dynamic_img_size=True`). A checkpoint vitrail does not convert must be refused
by one of the sentences of `vitrail.convert.timm.TIMM_REFUSALS`; any other error counts as misleading.

The copies have the published architectures, not their weights (which the test suite cannot download). Counts are by pretrained tag: an architecture counts once per tag timm lists for it.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf

from vitrail.convert.timm import TIMM_REFUSALS, load_timm_checkpoint

# timm's modules that hold Vision Transformers (timm 1.0.31: 515 pretrained tags in 281 architectures).
FAMILIES = (
    "vision_transformer",
    "deit",
    "eva",
    "beit",
    "vision_transformer_relpos",
    "naflexvit",
    "vision_transformer_hybrid",
    "vision_transformer_sam",
    "qwen3_vit",
    "deepseek_vit",
    "gemma4_vit",
)
TOLERANCE = 1e-5
WIDTH, HEADS, DEPTH, GRID, CLASSES = 64, 4, 2, 4, 7
SECOND_GRID = (5, 6)
OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"


def pretrained_tags() -> dict[str, list[str]]:
    """Architecture -> its pretrained tags (`architecture.tag`), for every family."""
    tags = collections.defaultdict(list)
    for family in FAMILIES:
        for name in timm.list_models(module=family, pretrained=True):
            tags[name.split(".")[0]].append(name)
    return dict(tags)


@functools.cache
def _families() -> dict[str, str]:
    return {arch: family for family in FAMILIES for arch in timm.list_models(module=family)}


def family_of(architecture: str) -> str:
    """The timm module (of `FAMILIES`) defining `architecture`."""
    return _families()[architecture]


def shrunk_args(architecture: str) -> dict:
    """The `create_model` overrides that shrink `architecture` and keep every other option it has: 2 blocks, width
    64 (48 or 96 where an MLP ratio needs an even hidden width), 4 heads, and an image of 4 x 4 patches (for a
    hybrid, 4 x 4 of its stem's stride)."""
    with torch.device("meta"):
        for args in _candidates(architecture):
            try:
                model = timm.create_model(architecture, pretrained=False, **args)
            except (AssertionError, ValueError, RuntimeError, TypeError):
                continue
            # The patch (for hybrids, the whole stem's stride) times the grid.
            return {**args, "img_size": model.feature_info[-1]["reduction"] * GRID}
    raise ValueError(f"No shrunk copy of {architecture} could be built.")


def _candidates(architecture: str):
    """Overrides to try, in order: the plain ones first, then the ones the full model (built on the meta device,
    slower) shows it needs."""
    plain = [{"depth": DEPTH, "embed_dim": width, "num_heads": HEADS} for width in (WIDTH, 48, 96)]
    yield from plain
    full = timm.create_model(architecture, pretrained=False)
    kv = [getattr(block.attn, "num_kv_heads", None) for block in getattr(full, "blocks", [])]
    if any(kv):  # Eva's per-block key/value heads: keep grouped-query attention where the model has it
        grouped = any(k != block.attn.num_heads for k, block in zip(kv, full.blocks, strict=True))
        yield from ({**c, "num_kv_heads": (HEADS, HEADS // 2 if grouped else HEADS)} for c in plain)
    if type(full).__name__ == "VisionTransformerSAM":
        yield {**plain[0], "global_attn_indexes": (1,), "neck_chans": 32, "window_size": 2}
    yield {"depth": DEPTH}  # a width the stem fixes (timm's MobileCLIP hybrids)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@dataclass
class Outcome:
    """What converting one shrunk copy gave: `kind` is "parity", "differ", "refused" or "misleading"; `detail` the
    refusal's table key, or the error / the differences."""

    kind: str
    detail: str = ""
    diff: float | None = None


def refusal_keys(message: str) -> list[str]:
    """The `TIMM_REFUSALS` keys whose sentences `message` holds."""
    return [key for key, sentence in TIMM_REFUSALS.items() if sentence in message]


def _outputs(model, pixels, timm_side: bool, **kwargs) -> dict[str, torch.Tensor]:
    """What is compared: the logits of a model with a head; else the tokens and the pooled vector (when timm's
    pooling gives one vector per image)."""
    with torch.no_grad():
        if timm_side:
            if model.num_classes:
                return {"logits": model(pixels)}
            tokens = model.forward_features(pixels)
            pooled = model.forward_head(tokens)
            return {"tokens": tokens, **({"pooled": pooled} if pooled.ndim == 2 else {})}
        out = model(pixel_values=pixels, **kwargs)
        if getattr(out, "logits", None) is not None:
            return {"logits": out.logits}
        return {"tokens": out.last_hidden_state, "pooled": out.pooler_output}


def _max_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    pairs = [(ours[k], theirs[k]) for k in theirs]
    if any(a.shape != b.shape for a, b in pairs):
        return float("inf")
    return max((a - b).abs().max().item() for a, b in pairs)


def check(architecture: str, num_classes: int, folder: Path, seed: int = 0) -> Outcome:
    """Build, save, convert and compare one shrunk copy of `architecture` (a head of `num_classes`, 0 for none)."""
    args = {**shrunk_args(architecture), "num_classes": num_classes}
    reference = perturbed(timm.create_model(architecture, pretrained=False, **args), seed)
    save_for_hf(reference, folder, safe_serialization=True)
    try:
        converted = load_timm_checkpoint(folder)
    except Exception as error:  # noqa: BLE001 - every error is classified, none is hidden
        message = f"{type(error).__name__}: {error}"
        keys = refusal_keys(message) if isinstance(error, NotImplementedError) else []
        return Outcome("refused", " + ".join(keys)) if keys else Outcome("misleading", message[:300])
    channels, side = reference.pretrained_cfg.get("input_size", (3,))[0], args["img_size"]
    generator = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(2, channels, side, side, generator=generator)
    diff = _max_diff(_outputs(converted, pixels, False), _outputs(reference, pixels, True))
    sizes = "native size"
    try:  # timm's own position resampling at run time, where the architecture has it
        dynamic = timm.create_model(architecture, pretrained=False, **args, dynamic_img_size=True).eval()
        dynamic.load_state_dict(reference.state_dict())
    except (TypeError, AssertionError, RuntimeError):
        dynamic = None
    if dynamic is not None:
        patch = side // GRID
        pixels = torch.randn(2, channels, SECOND_GRID[0] * patch, SECOND_GRID[1] * patch, generator=generator)
        resampled = _outputs(converted, pixels, False, interpolate_pos_encoding=True)
        diff = max(diff, _max_diff(resampled, _outputs(dynamic, pixels, True)))
        sizes = f"native and {SECOND_GRID[0]} x {SECOND_GRID[1]} patches"
    return Outcome("parity" if diff <= TOLERANCE else "differ", sizes, diff)


def sweep(architectures: dict[str, list[str]], progress=None) -> dict[tuple[str, int], Outcome]:
    """`check` every architecture once per head kind its tags have (with or without a head)."""
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for architecture, tags in architectures.items():
            heads = sorted({CLASSES if timm.get_pretrained_cfg(tag).num_classes else 0 for tag in tags})
            for num_classes in heads:
                folder = Path(root) / f"{architecture}-{num_classes}"
                start = time.perf_counter()
                try:
                    outcome = check(architecture, num_classes, folder)
                except Exception as error:  # noqa: BLE001 - the harness could not build the copy
                    outcome = Outcome("unbuilt", f"{type(error).__name__}: {error}"[:300])
                results[architecture, num_classes] = outcome
                if progress:
                    progress(architecture, num_classes, outcome, time.perf_counter() - start)
    return results


def tag_outcomes(architectures: dict[str, list[str]], results) -> dict[str, Outcome]:
    """Each pretrained tag's outcome: that of its architecture with its head kind."""
    return {
        tag: results[arch, CLASSES if timm.get_pretrained_cfg(tag).num_classes else 0]
        for arch, tags in architectures.items()
        for tag in tags
    }


def table(architectures: dict[str, list[str]], results) -> str:
    """docs/coverage.md: the totals, the refusals by feature, each family's counts and every architecture's
    outcome."""
    by_tag = tag_outcomes(architectures, results)
    kinds = collections.Counter(o.kind for o in by_tag.values())
    refused = [o.detail.split(" + ") for o in by_tag.values() if o.kind == "refused"]
    naming = collections.Counter(key for keys in refused for key in keys)
    alone = collections.Counter(keys[0] for keys in refused if len(keys) == 1)
    families = {arch: family_of(arch) for arch in architectures}
    lines = [
        "# timm coverage",
        "",
        f"Generated by `python benchmarks/timm_coverage.py` with timm {timm.__version__}; do not edit by hand. Every "
        f"architecture with a pretrained tag in timm's ViT families was built shrunk ({DEPTH} blocks, width "
        f"{WIDTH}, {HEADS} heads, a {GRID} x {GRID} patch grid, a {CLASSES}-class head where its tags have one, "
        "every other option kept), given random weights with every parameter perturbed, saved in timm's Hub layout "
        "by timm's `save_for_hf`, converted by vitrail and compared with timm: the logits (a backbone's tokens and "
        f"pooled vector) within {TOLERANCE:g}, at the native size and, where timm resamples positions at run "
        f"time, at a {SECOND_GRID[0]} x {SECOND_GRID[1]} patch grid. Parity is checked on these shrunk random "
        "copies of each architecture, not on the published weights. Counts are pretrained tags "
        "(`timm.list_pretrained()`), each counted with its architecture. transformers model types: "
        "[coverage_transformers.md](coverage_transformers.md).",
        "",
        f"**{kinds['parity']} of {len(by_tag)} tags load with parity**; {kinds['refused']} are refused naming the "
        f"features vitrail lacks; {kinds['differ']} load with different outputs; {kinds['misleading']} fail with "
        f"another error; {kinds['unbuilt']} could not be built shrunk.",
        "",
        "| timm module | tags | parity | refused |",
        "|---|--:|--:|--:|",
    ]
    for family in FAMILIES:
        outcomes = [by_tag[t] for a, tags in architectures.items() if families[a] == family for t in tags]
        counts = collections.Counter(o.kind for o in outcomes)
        lines.append(f"| `{family}` | {len(outcomes)} | {counts['parity']} | {counts['refused']} |")
    lines += [
        "",
        "Refusals by feature: a tag refused for several features counts in the row of each; the last column counts "
        "the tags that feature alone keeps out.",
        "",
        "| feature vitrail lacks (`TIMM_REFUSALS` key) | tags refused naming it | tags it alone keeps out |",
        "|---|--:|--:|",
        *(f"| {TIMM_REFUSALS[key]} (`{key}`) | {n} | {alone[key]} |" for key, n in naming.most_common()),
        "",
        "| architecture | timm module | tags | outcome |",
        "|---|---|--:|---|",
    ]
    for arch, tags in sorted(architectures.items()):
        said = sorted({_said(by_tag[tag]) for tag in tags})
        lines.append(f"| `{arch}` | `{families[arch]}` | {len(tags)} | {'; '.join(said)} |")
    return "\n".join(lines) + "\n"


def _said(outcome: Outcome) -> str:
    if outcome.kind == "refused":
        return f"refused: {outcome.detail.replace(' + ', ', ')}"
    if outcome.kind == "parity":
        return f"parity ({outcome.detail})"
    return f"{outcome.kind}: {outcome.detail}".replace("|", "/").replace("\n", " ")


def recorded_loads(text: str) -> int:
    """The number of tags loading with parity that a generated coverage table records."""
    return int(re.search(r"\*\*(\d+) of \d+ tags load with parity\*\*", text).group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--print", action="store_true", help="print the table instead of writing docs/coverage.md"
    )
    parser.add_argument("--only", help="a regular expression: check only the architectures it finds")
    parser.add_argument("--json", type=Path, help="also write every outcome to this JSON file")
    args = parser.parse_args(argv)
    architectures = pretrained_tags()
    if args.only:
        architectures = {a: t for a, t in architectures.items() if re.search(args.only, a)}

    def progress(arch, num_classes, outcome, seconds):
        print(
            f"{seconds:5.2f}s {arch} ({num_classes} classes): {outcome.kind} {outcome.detail}",
            file=sys.stderr,
        )

    torch.set_num_threads(1)  # tiny models: threads only add overhead, and on a busy machine much of it
    results = sweep(architectures, progress)
    text = table(architectures, results)
    if args.json:
        by_tag = tag_outcomes(architectures, results)
        args.json.write_text(json.dumps({t: [o.kind, o.detail, o.diff] for t, o in by_tag.items()}, indent=1))
    if args.print or args.only:
        print(text)
    else:
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
