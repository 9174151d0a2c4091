"""Which of transformers' Vision Transformer model types vitrail converts, measured on tiny random references.

    .venv/bin/python benchmarks/hf_coverage.py                 # writes docs/coverage_transformers.md
    .venv/bin/python benchmarks/hf_coverage.py --only 'clip'   # some model types, printed (a regex)

About 20 s of CPU (wall time under a minute on a busy 2-core machine). With transformers 5.25 every supported type
should load with parity and every other type be refused by its sentence.

The types swept: every type of `vitrail.convert.SUPPORTED_MODEL_TYPES` and `REFUSED_MODEL_TYPES`, plus every model
type in transformers' `CONFIG_MAPPING` whose config declares a Vision Transformer's shape itself (`image_size`,
`patch_size`, `hidden_size`, `num_hidden_layers`, `num_attention_heads`: a vision encoder, saved alone), so that a
type transformers adds cannot go unnoticed: such a type in neither list is reported as "unlisted".

A supported type is built tiny (2 layers, width 32, 4 heads, a 15 x 15 patch grid) by the references of
tests/hf_references.py, every parameter moved off its initial value, saved with `save_pretrained`, opened with
vitrail's `from_pretrained` and compared with transformers' own outputs (logits, or a backbone's tokens) within
1e-5, at the native size and at a non-square one where transformers resamples positions. A refused type's default
config is saved (without weights: the refusal comes before any weight is read) and must raise
`NotImplementedError` holding its sentence of `REFUSED_MODEL_TYPES`; any other error counts as misleading.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the references live beside the tests that also use them

from tests.hf_references import TYPE_CASES, reference_output  # noqa: E402

from vitrail import VitrailModel  # noqa: E402
from vitrail.convert import REFUSED_MODEL_TYPES, SUPPORTED_MODEL_TYPES, load_hf_checkpoint  # noqa: E402

TOLERANCE = 1e-5
# A config that declares these itself describes a Vision Transformer's encoder.
VIT_FIELDS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
OUTPUT = ROOT / "docs" / "coverage_transformers.md"


def _declares(config_class, names) -> bool:
    fields = (
        {f.name for f in dataclasses.fields(config_class)}
        if dataclasses.is_dataclass(config_class)
        else set()
    )
    return set(names) <= fields


def vit_like_types() -> list[str]:
    """The model types in `CONFIG_MAPPING` whose config declares `VIT_FIELDS` (vitrail's own type left out)."""
    found = []
    for model_type in CONFIG_MAPPING.keys():
        try:
            config_class = CONFIG_MAPPING[model_type]
        except (ImportError, AttributeError, KeyError):
            continue  # a type whose module this install cannot import
        if model_type != "vitrail" and _declares(config_class, VIT_FIELDS):
            found.append(model_type)
    return found


def swept_types() -> list[str]:
    return sorted({*SUPPORTED_MODEL_TYPES, *REFUSED_MODEL_TYPES, *vit_like_types()})


@dataclass
class Outcome:
    """`kind`: "parity", "differ", "refused", "misleading" (another error, or a refused type that loads),
    "unlisted" (in neither list) or "unbuilt"; `detail` the sizes compared or the error."""

    kind: str
    detail: str = ""
    diff: float | None = None


def _error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def check_supported(model_type: str, folder: Path) -> Outcome:
    case = TYPE_CASES[model_type]
    reference = case.build()
    reference.save_pretrained(folder)
    try:
        model = case.vitrail_class.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - every error is classified, none is hidden
        return Outcome("misleading", _error(error))
    generator = torch.Generator().manual_seed(1)
    sizes = [(30, 30)] + ([case.other_size] if case.other_size else [])
    diff = 0.0
    for size in sizes:
        pixels = torch.randn(2, 3, *size, generator=generator)
        other = size != (30, 30)
        with torch.no_grad():
            got = getattr(model(pixels, interpolate_pos_encoding=other), case.output)
        resample = {"interpolate_pos_encoding": True} if other and not case.resamples else {}
        want = reference_output(case, reference, pixels, **resample)
        diff = max(diff, (got - want).abs().max().item() if got.shape == want.shape else float("inf"))
    said = "native size" + (f" and {sizes[1][0]} x {sizes[1][1]} px" if len(sizes) > 1 else "")
    return Outcome("parity" if diff <= TOLERANCE else "differ", said, diff)


def _save_config(model_type: str, folder: Path) -> None:
    """The type's default config, or just its `model_type` where this transformers has no config class for it."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        CONFIG_MAPPING[model_type]().save_pretrained(folder)
    except Exception:  # noqa: BLE001 - a type transformers no longer builds (e.g. vit_hybrid) keeps its name
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))


def check_refused(model_type: str, folder: Path) -> Outcome:
    """Both ways in, `from_pretrained` and `load_hf_checkpoint`, must refuse with the type's sentence."""
    _save_config(model_type, folder)
    sentence = REFUSED_MODEL_TYPES.get(model_type)
    for load in (VitrailModel.from_pretrained, load_hf_checkpoint):
        try:
            load(folder)
        except NotImplementedError as error:
            if sentence is None or sentence not in str(error):
                return Outcome("misleading" if sentence else "unlisted", _error(error))
            continue
        except Exception as error:  # noqa: BLE001
            return Outcome("misleading" if sentence else "unlisted", _error(error))
        return Outcome("misleading", f"{load.__qualname__} loaded a config without weights")
    return Outcome("refused", sentence)


def check(model_type: str, folder: Path) -> Outcome:
    if model_type in TYPE_CASES:
        return check_supported(model_type, folder)
    return check_refused(model_type, folder)


def sweep(types, progress=None) -> dict[str, Outcome]:
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for model_type in types:
            start = time.perf_counter()
            try:
                outcome = check(model_type, Path(root) / model_type)
            except Exception as error:  # noqa: BLE001 - the harness could not build the reference
                outcome = Outcome("unbuilt", _error(error))
            results[model_type] = outcome
            if progress:
                progress(model_type, outcome, time.perf_counter() - start)
    return results


def table(results: dict[str, Outcome]) -> str:
    """docs/coverage_transformers.md: the totals and every model type's outcome."""
    count = {kind: sum(o.kind == kind for o in results.values()) for kind in
             ("parity", "refused", "differ", "misleading", "unlisted", "unbuilt")}  # fmt: skip
    lines = [
        "# transformers coverage",
        "",
        f"Generated by `python benchmarks/hf_coverage.py` with transformers {transformers.__version__}; do not edit "
        "by hand. The model types swept: those vitrail converts or refuses (`vitrail.convert.SUPPORTED_MODEL_TYPES`, "
        "`REFUSED_MODEL_TYPES`) and every type in transformers' `CONFIG_MAPPING` whose config declares a Vision "
        f"Transformer's shape ({', '.join(f'`{name}`' for name in VIT_FIELDS)}). Each type vitrail converts was "
        "built tiny (2 layers, width 32, 4 heads, a 15 x 15 patch grid) with random weights, every parameter "
        "perturbed, saved with `save_pretrained`, opened with vitrail's `from_pretrained` and compared with "
        f"transformers' own outputs within {TOLERANCE:g} (logits, or a backbone's tokens), at the native size and "
        "at a non-square size where transformers resamples positions. Parity is checked on these tiny random "
        "copies, not on the published weights. Each other type's default config must be refused by a sentence "
        "naming what vitrail lacks. timm models: [coverage.md](coverage.md).",
        "",
        f"**{count['parity']} of {len(results)} model types load with parity**; {count['refused']} are refused "
        f"naming what vitrail lacks; {count['differ']} load with different outputs; {count['misleading']} fail "
        f"with another error; {count['unlisted']} are in neither list; {count['unbuilt']} could not be built.",
        "",
        "| model type | outcome |",
        "|---|---|",
    ]
    for model_type, outcome in sorted(results.items()):
        lines.append(f"| `{model_type}` | {_said(outcome)} |")
    return "\n".join(lines) + "\n"


def _said(outcome: Outcome) -> str:
    if outcome.kind == "parity":
        return f"parity ({outcome.detail})"
    return f"{outcome.kind}: {outcome.detail}".replace("|", "/").replace("\n", " ")


def recorded_loads(text: str) -> int:
    """The number of model types loading with parity that a generated table records."""
    return int(re.search(r"\*\*(\d+) of \d+ model types load with parity\*\*", text).group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the table instead of writing it")
    parser.add_argument("--only", help="a regular expression: check only the model types it finds")
    args = parser.parse_args(argv)
    types = swept_types()
    if args.only:
        types = [t for t in types if re.search(args.only, t)]

    def progress(model_type, outcome, seconds):
        print(f"{seconds:5.2f}s {model_type}: {outcome.kind} {outcome.detail}", file=sys.stderr)

    torch.set_num_threads(1)  # tiny models: threads only add overhead
    text = table(sweep(types, progress))
    if args.print or args.only:
        print(text)
    else:
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
