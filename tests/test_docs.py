"""The documentation, run as written: README.md and every page of docs/.

Every Python example of README.md and docs/**/*.md is executed, unchanged, by the test named for it (EXAMPLES: each
example is found by a line only it has, in whichever file it lives): in a scratch folder, with the few names the
text leaves to the reader (`pil_image`, `image`, `pixel_values`) supplied, the "without vitrail installed" examples
in a process that cannot import vitrail, and the Hub repos they name served by `tests/hub_server.py`, holding tiny
stand-ins of the checkpoints (same formats, a few kilobytes). What the examples' comments promise (shapes, files
written, two heads, a new image size) is asserted after them. The model card's examples run the same way. Every
command the pages show names a script, flag or make target that exists. The site builds with `mkdocs build
--strict`, its generated reference pages list every command, flag and config field, and no page a user reads
speaks of how the project was made.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import io
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, Dinov2WithRegistersModel

from vitrail import VitrailConfig, VitrailForImageClassification, VitrailImageProcessor, VitrailModel

from .conftest import run_without_vitrail, tiny_config
from .hub_server import client_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
README_MAX_LINES = 250

# Each Python example of the README and the docs, by a line only it has.
EXAMPLES = {
    # README.md
    "readme push and pull": 'push_checkpoint("runs/pets", "your-name/vitrail-pets")',
    "readme without vitrail": 'classify("photo.jpg", top_k=3)',
    "readme conversion": 'load_image_processor(source).save_pretrained("vit-b16")',
    # docs/
    "use": 'VitrailConfig.from_variant("S/16"',
    "use elsewhere": 'AutoModelForImageClassification.from_pretrained("my-vit", trust_remote_code=True)',
    "chosen layers": "output_attentions=[-1], output_hidden_states=[0, -1]",
    "backbone": 'VitrailBackbone.from_pretrained("my-vit"',
    "attention maps": "attention_maps(model, pixels",
    "hub": 'push_checkpoint("runs/digits", "your-name/vitrail-digits"',
    "hub elsewhere": 'from_pretrained("your-name/vitrail-digits", trust_remote_code=True)',
    "conversion": 'from_pretrained("google/vit-base-patch16-224")',
}


def doc_files() -> list[Path]:
    """The pages a reader sees: README.md and the Markdown of docs/ (the build hook's folder is code)."""
    pages = sorted(path for path in DOCS.rglob("*.md") if "_hooks" not in path.parts)
    return [README, *pages]


def python_examples() -> list[tuple[str, str]]:
    """`(file, code)` of every Python block of the README and the docs."""
    return [
        (str(path.relative_to(ROOT)), body)
        for path in doc_files()
        for language, body in FENCED.findall(path.read_text())
        if language == "python"
    ]


def example(name: str) -> str:
    found = [(where, body) for where, body in python_examples() if EXAMPLES[name] in body]
    assert len(found) == 1, (
        f"{len(found)} Python examples of the README and docs have {EXAMPLES[name]!r} "
        f"({', '.join(where for where, _ in found) or 'none'}), not one"
    )
    return found[0][1]


def test_every_python_example_is_run_by_a_test():
    """A new example in the README or a page of docs/ fails this until a test below runs it; so does one that two
    markers claim, and a marker whose example is gone."""
    for where, body in python_examples():
        claimed = [name for name, marker in EXAMPLES.items() if marker in body]
        assert len(claimed) == 1, f"this example of {where} is run by {claimed or 'no test'}:\n{body}"
    for name in EXAMPLES:
        example(name)


def photo() -> PIL.Image.Image:
    """An odd-sized RGB image, as a reader's `pil_image` would be."""
    levels = np.random.default_rng(0).integers(0, 256, (190, 260, 3), dtype=np.uint8)
    return PIL.Image.fromarray(levels)


# Runs an example where vitrail cannot be imported (`run_without_vitrail`), in the folder given as first argument,
# then uses what it made on an image; reports what the example printed too.
ELSEWHERE = """
import contextlib, io, json, os, sys
import numpy as np, PIL.Image
os.chdir(sys.argv[1])
namespace, printed = {}, io.StringIO()
with contextlib.redirect_stdout(printed):
    exec(sys.argv[2], namespace)
image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
report = {"model": type(namespace["model"]).__module__, "top": namespace["classify"](image)}
report["printed"] = printed.getvalue()
if "features" in namespace:
    report["features"] = list(np.shape(namespace["features"](image)))
json.dump(report, open(sys.argv[-1], "w"))
"""


def test_use_examples_run_as_written(tmp_path, monkeypatch):
    """The examples of getting-started.md ("use", "use elsewhere", "chosen layers"), then guides/dense.md's and
    guides/inspect.md's on the same model, in order."""
    monkeypatch.chdir(tmp_path)
    namespace = {"pil_image": photo(), "image": photo()}
    exec(example("use"), namespace)
    assert namespace["logits"].shape == (1, 10)
    code = {"configuration_vitrail.py", "modeling_vitrail.py", "image_processing_vitrail.py"}
    saved = {"model.safetensors", "config.json", "preprocessor_config.json", *code}
    assert saved <= {path.name for path in Path("my-vit").iterdir()}

    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "elsewhere_home"),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    report = run_without_vitrail(ELSEWHERE, tmp_path, example("use elsewhere"), root=tmp_path, env=env)
    assert report["model"].startswith("transformers_modules.")  # the folder's own code, not vitrail's
    labels = {f"LABEL_{i}" for i in range(10)}  # the example's 10 classes, unnamed
    assert len(report["top"]) == 5 and {row["label"] for row in report["top"]} <= labels
    assert report["features"] == [1, 196, 384]  # S/16 at 224 px, no class token: 14 x 14 patch tokens

    model, layers, heads = namespace["model"], 12, 6  # S/16
    exec(example("chosen layers"), namespace)
    out = namespace["out"]
    assert [a is None for a in out.attentions] == [True] * (layers - 1) + [False]
    assert out.attentions[-1].shape == (1, heads, 196, 196)
    assert [h is None for h in out.hidden_states] == [False] + [True] * (layers - 1) + [False]
    assert out.hidden_states[-1].shape == (1, 196, 384)

    namespace["pixel_values"] = namespace["inputs"]["pixel_values"]
    exec(example("backbone"), namespace)
    assert [tuple(m.shape) for m in namespace["maps"]] == [(1, 384, 14, 14)] * 3

    exec(example("attention maps"), namespace)
    maps = namespace["maps"]
    assert maps.rollout.shape == (1, 14, 14) and maps.heads.shape == (1, heads, 14, 14)
    assert PIL.Image.open("map.png").size[0] > 0
    assert namespace["model"] is model


def test_hub_examples_run_as_written(hub, tmp_path, monkeypatch):
    """The Python example of guides/hub.md, then the pushed repo opened where vitrail is not installed."""
    monkeypatch.chdir(tmp_path)
    VitrailForImageClassification(tiny_config()).save_pretrained("runs/digits")
    VitrailImageProcessor(size={"height": 30, "width": 30}).save_pretrained("runs/digits")
    namespace = {}
    exec(example("hub"), namespace)
    assert namespace["commit"] is not None and hub.repos["your-name/vitrail-digits"].private
    pulled = Path(namespace["folder"])
    assert pulled.resolve() == (tmp_path / "models" / "digits").resolve()
    want, got = load_file("runs/digits/model.safetensors"), load_file(pulled / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    env = client_env(hub, tmp_path / "elsewhere_home")
    report = run_without_vitrail(ELSEWHERE, tmp_path, example("hub elsewhere"), root=tmp_path, env=env)
    assert report["model"].startswith("transformers_modules.")
    assert len(report["top"]) == min(5, tiny_config().num_labels)


def _publish(hub, repo_id: str, folder: Path) -> None:
    """The files of `folder` as a new commit of the public repo `repo_id` (created if this module's server lacks it)."""
    if repo_id not in hub.repos:
        hub.create_repo(repo_id, private=False)
    hub.put(repo_id, {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()})


def test_conversion_examples_run_as_written(hub, tmp_path, monkeypatch):
    """The example of guides/conversion.md: each line opens a stand-in of the checkpoint it names, in that
    checkpoint's own format (a transformers ViT, a distilled DeiT, DINOv2 with registers, a timm folder, a JAX
    file)."""
    pytest.importorskip("timm", reason="timm writes the timm stand-in (a dev dependency)")
    from .test_convert import DINO, SHAPE, hf_vit
    from .test_convert_npz import jax_arrays
    from .test_convert_timm import TINY as TIMM_TINY
    from .test_convert_timm import make_timm, save_folder, timm_config

    monkeypatch.chdir(tmp_path)
    stand_ins = {
        "google/vit-base-patch16-224": hf_vit(),
        "facebook/deit-base-distilled-patch16-224": hf_vit(DeiTForImageClassificationWithTeacher, DeiTConfig),
        "facebook/dinov2-with-registers-small": Dinov2WithRegistersModel(
            Dinov2WithRegistersModel.config_class(**DINO, num_register_tokens=4)
        ),
    }
    for repo_id, model in stand_ins.items():
        model.save_pretrained(tmp_path / repo_id)
        _publish(hub, repo_id, tmp_path / repo_id)
    timm_model = make_timm()
    timm_folder = tmp_path / "timm_stand_in"
    save_folder(timm_folder, timm_model, timm_config(timm_model, num_heads=TIMM_TINY["num_heads"]))
    _publish(hub, "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", timm_folder)
    np.savez("ViT-B_16.npz", **jax_arrays())

    namespace, opened = {}, []
    for statement in ast.parse(example("conversion")).body:  # what each line opened
        exec(compile(ast.Module([statement], []), "guides/conversion.md", "exec"), namespace)
        if isinstance(statement, ast.Assign):
            opened.append(namespace[statement.targets[0].id])
    vit, deit, dinov2, timm_model, npz_model, resized = opened
    for model in (vit, deit, timm_model, npz_model, resized):
        assert type(model) is VitrailForImageClassification
    assert vit.config.id2label == hf_vit().config.id2label and vit.config.image_size == SHAPE["image_size"]
    assert deit.config.use_distillation_token and deit.distillation_classifier is not None  # two heads
    assert type(dinov2) is VitrailModel and dinov2.config.num_register_tokens == 4
    assert dinov2.config.layer_scale_init_value is not None
    assert timm_model.config.num_labels == TIMM_TINY["num_classes"]
    assert resized.config.image_size == 384 and resized.config.id2label == {0: "cat", 1: "dog"}
    assert resized.vitrail.embeddings.position_embeddings.shape[1] == 1 + (384 // SHAPE["patch_size"]) ** 2


# ---- the README's examples -----------------------------------------------------------------------------------

PETS = {0: "abyssinian", 1: "beagle", 2: "boxer", 3: "persian"}


def test_readme_share_and_open_elsewhere_run_as_written(hub, tmp_path, monkeypatch):
    """The README's push and pull of runs/pets, then its example that opens the pushed repo where vitrail is not
    installed and prints the three best labels for photo.jpg."""
    monkeypatch.chdir(tmp_path)
    VitrailForImageClassification(tiny_config(id2label=PETS)).save_pretrained("runs/pets")
    VitrailImageProcessor(size={"height": 30, "width": 30}).save_pretrained("runs/pets")
    namespace = {}
    exec(example("readme push and pull"), namespace)
    assert "your-name/vitrail-pets" in hub.repos
    pulled = Path(namespace["folder"])
    assert pulled.resolve() == (tmp_path / "models" / "pets").resolve()
    want, got = load_file("runs/pets/model.safetensors"), load_file(pulled / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    photo().save(tmp_path / "photo.jpg")
    env = client_env(hub, tmp_path / "elsewhere_home")
    report = run_without_vitrail(
        ELSEWHERE, tmp_path, example("readme without vitrail"), root=tmp_path, env=env
    )
    assert report["model"].startswith("transformers_modules.")  # the repo's own code, not vitrail's
    top3 = ast.literal_eval(report["printed"].strip())
    assert len(top3) == 3 and {row["label"] for row in top3} <= set(PETS.values())
    assert [row["score"] for row in top3] == sorted((row["score"] for row in top3), reverse=True)


# Opens a checkpoint folder (first argument) with transformers alone and reports its logits for an image file.
OPEN_FOLDER = """
import json, sys
import PIL.Image, torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    logits = model(**processor(PIL.Image.open(sys.argv[2]), return_tensors="pt")).logits
json.dump({"model": type(model).__module__, "logits": logits.tolist()}, open(sys.argv[-1], "w"))
"""


def test_readme_conversion_runs_as_written(hub, tmp_path, monkeypatch):
    """The README's conversion of google/vit-base-patch16-224 (a stand-in in its format, with transformers' image
    processor config): the folder it writes opens without vitrail and predicts what vitrail does."""
    from transformers import ViTImageProcessor

    from .test_convert import SHAPE, hf_vit

    monkeypatch.chdir(tmp_path)
    source = tmp_path / "stand_in"
    hf_vit().save_pretrained(source)
    side = SHAPE["image_size"]
    ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(source)
    _publish(hub, "google/vit-base-patch16-224", source)
    namespace = {}
    exec(example("readme conversion"), namespace)
    folder = tmp_path / "vit-b16"
    code = {"configuration_vitrail.py", "modeling_vitrail.py", "image_processing_vitrail.py"}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", *code} <= {
        path.name for path in folder.iterdir()
    }
    assert json.loads((folder / "config.json").read_text())["model_type"] == "vitrail"

    photo().save(tmp_path / "photo.png")
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "elsewhere_home"),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    report = run_without_vitrail(OPEN_FOLDER, folder, tmp_path / "photo.png", root=tmp_path, env=env)
    assert report["model"].startswith("transformers_modules.")
    processor = VitrailImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        want = namespace["model"].eval()(**processor(PIL.Image.open("photo.png"), return_tensors="pt")).logits
    torch.testing.assert_close(torch.tensor(report["logits"]), want, atol=1e-5, rtol=0)


# Runs the Python examples of a model card (a JSON list, second argument) in the folder given first, where vitrail
# cannot be imported, and reports what each printed.
CARD_ELSEWHERE = """
import contextlib, io, json, os, sys
os.chdir(sys.argv[1])
printed = []
for snippet in json.loads(sys.argv[2]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(snippet, {})
    printed.append(out.getvalue().strip())
json.dump({"printed": printed}, open(sys.argv[-1], "w"))
"""


def test_model_card_examples_run_as_written_without_vitrail(hub, tmp_path):
    """A card's "How to use" (vitrail/model_cards/vitrail_image_classification.md, as `render_model_card` fills
    it): both examples run unchanged where vitrail is not installed, on the repo the card names, with an
    `example.jpg`."""
    from vitrail.model_card import render_model_card

    from .test_reporting import CARD_ARGS

    repo_id, labels = "your-name/vitrail-card", {0: "cat", 1: "dog", 2: "emu", 3: "fox"}
    folder = tmp_path / "checkpoint"
    VitrailForImageClassification(tiny_config(id2label=labels)).save_pretrained(folder)
    VitrailImageProcessor(size={"height": 30, "width": 30}).save_pretrained(folder)
    card = render_model_card(
        **CARD_ARGS, output_dir=folder, metrics={"accuracy": 0.5}, dataset_id=None, repo_id=repo_id
    )
    _publish(hub, repo_id, folder)
    examples = [body for language, body in FENCED.findall(card.text) if language == "python"]
    assert len(examples) == 2 and all(repo_id in body for body in examples)
    photo().save(tmp_path / "example.jpg")

    env = client_env(hub, tmp_path / "elsewhere_home")
    report = run_without_vitrail(CARD_ELSEWHERE, tmp_path, json.dumps(examples), root=tmp_path, env=env)
    best, top3 = report["printed"]
    assert best in labels.values()
    top3 = ast.literal_eval(top3)
    assert [row["label"] for row in top3][0] == best and len(top3) == 3
    assert {row["label"] for row in top3} <= set(labels.values())


# ---- commands ------------------------------------------------------------------------------------------------

COMMAND_START = ("python ", "make ", "accelerate ", "torchrun ", "vitrail ", "pip ")
SCRIPT = re.compile(r"\b((?:scripts|benchmarks)/\w+\.py)")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


def page_commands(text: str) -> list[str]:
    """Every command line a page shows: shell blocks (continuations joined, comments cut), and inline code that
    starts with python, make, accelerate, torchrun, vitrail or pip, or names a script with flags
    (`scripts/train.py --seed`)."""
    commands = []
    for language, body in FENCED.findall(text):
        if language not in ("bash", "sh", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*", "", line).split())
            if not line:
                continue
            if line.startswith(COMMAND_START) or not commands:
                commands.append(line)
            else:  # a usage line wrapped without a backslash: `[--batch-size 32] [--device cpu]`
                commands[-1] += " " + line
    for span in re.findall(r"`([^`\n]+)`", FENCED.sub("", text)):
        if span.startswith(COMMAND_START) or (SCRIPT.match(span) and FLAG.search(span)):
            commands.append(span)
    return commands


def script_help(script: str) -> str:
    """What `python <script> --help` prints, run in this process (the imports are already paid for)."""
    out = io.StringIO()
    argv, path = sys.argv, list(sys.path)  # a benchmark puts scripts/ on sys.path
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
    assert exit_info.value.code in (0, None), f"{script} --help exited with {exit_info.value.code}"
    return out.getvalue()


def command_help(name: str) -> str:
    """What `vitrail <name> --help` prints."""
    from vitrail.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0, f"vitrail {name} --help exited with {exit_info.value.code}"
    return out.getvalue()


def vitrail_problems(command: str, helps: dict[str, str]) -> list[str]:
    """What is wrong with a `vitrail ...` command: a subcommand that does not exist, a flag it does not take."""
    from vitrail.cli import COMMANDS

    name, *rest = command.split()[1:] or ["--help"]
    if name.startswith("-"):
        return [] if name in ("--version", "--help", "-h") else [f"{command}: vitrail takes no {name}"]
    if name.isupper():  # a placeholder: `vitrail COMMAND --help`
        return []
    if name not in COMMANDS:
        return [f"{command}: no vitrail command {name!r}"]
    key = f"vitrail {name}"
    if key not in helps:
        helps[key] = command_help(name)
    return [
        f"{command}: {key} takes no {flag}"
        for flag in FLAG.findall(" ".join(rest))
        if not takes(helps[key], flag)
    ]


def extras_problems(command: str) -> list[str]:
    """A `pip install "vitrail[extra]"` naming an extra that pyproject.toml does not declare."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    declared = set(re.findall(r"^([\w-]+) = \[", section, re.MULTILINE))
    return [
        f"{command}: vitrail has no extra {extra!r}"
        for group in re.findall(r"vitrail\[([\w,-]+)\]", command)
        for extra in group.split(",")
        if extra not in declared
    ]


def takes(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){flag}(?![\w-])", help_text) is not None


def command_problems(commands: list[str], helps: dict[str, str]) -> list[str]:
    """What is wrong with `commands`: a make target or variable the Makefile lacks, a script or `vitrail` command
    that does not exist, a flag its `--help` (or `accelerate launch --help`) does not list, an extra pyproject.toml
    does not declare. `helps` caches each script's and command's help."""
    from accelerate.commands.launch import launch_command_parser

    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    problems = []
    for command in commands:
        if command.startswith("make "):
            for word in command.split()[1:]:
                if word.startswith("-"):  # make's own options (`make -n train`)
                    continue
                variable = word.split("=")[0]
                if "=" in word and f"$({variable})" not in makefile:
                    problems.append(f"{command}: the Makefile reads no {variable}")
                elif re.fullmatch(r"[\w-]+", word) and word not in targets:
                    problems.append(f"{command}: no make target {word!r}")
            continue
        if command.startswith(("vitrail ", "python -m vitrail")):
            problems += vitrail_problems(command.removeprefix("python -m "), helps)
            continue
        if command.startswith("pip "):
            problems += extras_problems(command)
            continue
        script = SCRIPT.search(command)
        if command.startswith("accelerate "):
            if not command.startswith("accelerate launch "):
                continue  # `accelerate config`
            # Its --help lists only the flags relevant to the ones on the command line: ask the parser itself.
            launcher = {
                option for action in launch_command_parser()._actions for option in action.option_strings
            }
            problems += [
                f"{command}: accelerate launch takes no {flag}"
                for flag in FLAG.findall(command[: script.start() if script else None])
                if flag not in launcher
            ]
            if script is None:  # the launcher's flags alone: `accelerate launch --cpu --num_processes 2`
                continue
        if script is None or not (ROOT / script.group(1)).is_file():
            problems.append(f"{command}: runs no script of this repository")
            continue
        path = script.group(1)
        if path not in helps:
            helps[path] = script_help(path)
        problems += [
            f"{command}: {path} takes no {flag}"
            for flag in FLAG.findall(command[script.end() :])
            if not takes(helps[path], flag)
        ]
    return problems


def test_commands_of_the_readme_and_docs_name_scripts_flags_and_targets_that_exist():
    helps: dict[str, str] = {}
    found, problems = [], []
    for path in doc_files():
        commands = page_commands(path.read_text())
        found += commands
        problems += [f"{path.relative_to(ROOT)}: {problem}" for problem in command_problems(commands, helps)]
    assert problems == []
    assert len(found) >= 30 and any(c.startswith("accelerate launch") for c in found)  # still found
    assert "scripts/train.py" in helps
    assert {"vitrail train", "vitrail predict", "vitrail convert", "vitrail push", "vitrail pull"} <= set(
        helps
    )


def test_the_command_check_catches_what_does_not_exist():
    text = (
        "Run `python scripts/predict.py x.png --model DIR --topk 3` or `make tests`.\n"
        "```bash\nmake train OUTPUT=runs/x\npython scripts/train.py \\\n  --output_dir o --epochs 3\n```\n"
        "`accelerate launch --gpus 2 scripts/train.py`, `accelerate launch --cpus 2` and `python scripts/nothing.py`"
        " (not `scripts/old.py`, which is named, not run)\n"
        "```bash\nvitrail predict x.png --model DIR --topk 3\nvitrail fit --output_dir o\nvitrail --verbose\n"
        'pip install "vitrail[train,gpu]"\n```\n'
    )
    commands = page_commands(text)
    assert commands[:2] == ["make train OUTPUT=runs/x", "python scripts/train.py --output_dir o --epochs 3"]
    assert command_problems(commands, {}) == [
        "make train OUTPUT=runs/x: the Makefile reads no OUTPUT",
        "python scripts/train.py --output_dir o --epochs 3: scripts/train.py takes no --epochs",
        "vitrail predict x.png --model DIR --topk 3: vitrail predict takes no --topk",
        "vitrail fit --output_dir o: no vitrail command 'fit'",
        "vitrail --verbose: vitrail takes no --verbose",
        "pip install \"vitrail[train,gpu]\": vitrail has no extra 'gpu'",
        "python scripts/predict.py x.png --model DIR --topk 3: scripts/predict.py takes no --topk",
        "make tests: no make target 'tests'",
        "accelerate launch --gpus 2 scripts/train.py: accelerate launch takes no --gpus",
        "accelerate launch --cpus 2: accelerate launch takes no --cpus",
        "python scripts/nothing.py: runs no script of this repository",
    ]


# ---- the site ----------------------------------------------------------------------------------------------------


def reference_hook():
    """docs/_hooks/reference.py, the mkdocs hook that writes the generated reference pages."""
    path = DOCS / "_hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("docs_reference_hook", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason="mkdocs builds the site (the docs extra, part of dev)")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_site_builds_strict_with_every_page(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs): no broken link, anchor or API reference, no page missing
    from the nav; the generated pages, the API page and the changelog are in the site."""
    from vitrail.cli import COMMANDS

    site = tmp_path / "site"
    result = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr[-5000:]
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert all(f'id="vitrail-{name}"' in cli for name in COMMANDS)
    fields = (site / "reference" / "config-fields" / "index.html").read_text()
    assert all(f'id="{field.name.lstrip("_")}"' in fields for field in dataclasses.fields(VitrailConfig))
    api = (site / "reference" / "api" / "index.html").read_text()
    for name in ("VitrailConfig", "VitrailModel", "VitrailForImageClassification", "VitrailImageProcessor"):
        assert f'id="vitrail.{name}"' in api
    assert 'id="vitrail.hub.push_checkpoint"' in api and 'id="vitrail.visualize.attention_maps"' in api
    first_version = re.search(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE).group(1)
    assert first_version in (site / "changelog" / "index.html").read_text()
    assert not (site / "_hooks").exists()  # the hook is code, not a page


# One page of a small site built with the project's mkdocs.yml; the control builds, each fault fails the build.
FAULTS = {
    "control": (
        "[Home](index.md#home), [the config][vitrail.VitrailConfig]\n\n::: vitrail.VitrailConfig\n",
        None,
    ),
    "missing page": ("[moved](guides/no-such-page.md)\n", "guides/no-such-page.md"),
    "missing anchor": ("[a section](index.md#no-such-section)\n", "no-such-section"),
    "missing object": ("::: vitrail.NoSuchClass\n", "vitrail.NoSuchClass"),
    "unresolved reference": ("[the config][vitrail.NoSuchConfig]\n", "vitrail.NoSuchConfig"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_the_strict_build_fails_on_a_broken_link_or_reference(fault, tmp_path):
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with mkdocs")
    text, named = FAULTS[fault]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nA page.\n")
    (docs / "page.md").write_text(f"# Page\n\n{text}")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir=str(docs), nav=["index.md", "page.md"], hooks=[])
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            python = plugin["mkdocstrings"]["handlers"]["python"]
            python["paths"] = [str(ROOT / "src")]
            python["options"]["extensions"] = [str(ROOT / e) for e in python["options"]["extensions"]]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    if named is None:
        assert result.returncode == 0, result.stderr[-5000:]
    else:
        assert result.returncode != 0 and named in result.stderr, result.stderr[-5000:]


def page_sections(page: str) -> dict[str, str]:
    """The CLI page's text under each `## vitrail NAME` heading."""
    parts = re.split(r"^## vitrail (\w+)$", page, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_cli_page_lists_every_command_and_flag_with_its_help():
    from transformers import TrainingArguments

    from vitrail.cli import COMMANDS, build_parser

    hook = reference_hook()
    sections = page_sections(hook.cli_page())
    assert list(sections) == list(COMMANDS)
    for name, section in sections.items():
        parser = build_parser(name)
        if hasattr(parser, "dataclass_types"):  # train, pretrain, evaluate: transformers dataclasses
            for kind in parser.dataclass_types:
                for field in dataclasses.fields(kind):
                    if field.init:
                        assert f"`--{field.name}`" in section, f"vitrail {name}: --{field.name}"
                if not issubclass(kind, TrainingArguments):
                    assert all(hook.cell(f.metadata["help"]) in section for f in dataclasses.fields(kind))
            continue
        for action in parser.arguments:
            if action.dest != "help":
                shown = action.option_strings or [action.metavar or action.dest]
                assert all(option in section for option in shown), f"vitrail {name}: {shown}"
                assert hook.cell(action.help) in section, f"vitrail {name}: help of {shown}"
    assert "--learning_rate" in sections["train"] and hook.TRAINING_ARGUMENTS_URL in sections["train"]


def test_the_config_fields_page_has_every_field_with_type_default_and_meaning():
    hook = reference_hook()
    rows = {
        match.group(1): match.group(0)
        for match in re.finditer(r'^\| <span id="(\w+)"></span>.*$', hook.config_fields_page(), re.MULTILINE)
    }
    fields = dataclasses.fields(VitrailConfig)
    assert len(rows) == len(fields) == 66
    defaults = VitrailConfig.__dataclass_fields__
    for field in fields:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[field.name.lstrip("_")])[1:-1]]
        assert len(cells) == 2 and cells[1], field.name  # the field with its type and default, a meaning
        kind, default = (
            hook.cell(f"`{hook.type_name(field.type)}`"),
            hook.cell(f"`{defaults[field.name].default!r}`"),
        )
        assert cells[0].endswith(f"<br>{kind}, default {default}"), cells[0]
    assert "depends on the offset between two patches" in rows["relative_position_bias"]
    assert "`'cls'`" in rows["pooling"] and "the class token" in rows["pooling"]


def test_the_config_fields_page_fails_naming_a_field_without_description(monkeypatch):
    hook = reference_hook()
    described = VitrailConfig.__doc__
    without = re.sub(r"\n {8}qk_norm \(.*?(?=\n {8}\w)", "", described, flags=re.DOTALL)
    assert without != described
    monkeypatch.setattr(VitrailConfig, "__doc__", without)
    with pytest.raises(hook.DocsError, match=r"does not describe the fields qk_norm: add"):
        hook.config_fields_page()
    stale = described.replace(
        "\n        qk_norm (", "\n        qk_normalised (`bool`): gone.\n        qk_norm ("
    )
    monkeypatch.setattr(VitrailConfig, "__doc__", stale)
    with pytest.raises(hook.DocsError, match=r"describes qk_normalised, which are not fields"):
        hook.config_fields_page()


def test_transformers_style_argument_docs_read_as_google_style():
    """docs/_hooks/hf_docstrings.py, which the API page's docstrings go through: types without backticks, the
    default after the whole description, transformers' `[`Name`]` links as code; other sections untouched."""
    path = DOCS / "_hooks" / "hf_docstrings.py"
    spec = importlib.util.spec_from_file_location("docs_hf_docstrings", path)
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    written = (
        "Run it on [`VitrailModel`].\n\nArgs:\n"
        "    size (`int` or `(height, width)`, *optional*, defaults to 224): the side\n        of the image\n"
        "    config ([`VitrailConfig`]): the config.\n    plain: no type.\n\n"
        "Returns:\n    out (`int`, defaults to 1): kept."
    )
    assert extension.google_style(written) == (
        "Run it on `VitrailModel`.\n\nArgs:\n"
        "    size (int or (height, width)): the side\n        of the image. Defaults to 224.\n"
        "    config (VitrailConfig): the config.\n    plain: no type.\n\n"
        "Returns:\n    out (`int`, defaults to 1): kept."
    )


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move details into docs/ (at most {README_MAX_LINES})"
    )


# Words that narrate how the project was made rather than what the software does.
PROCESS_WORDS = re.compile(
    r"\b(sessions?|issue \d+|issues? #\d+|lent|this machine kind|helpers?|borrowed machines?|work items?)\b",
    re.IGNORECASE,
)


def test_no_page_a_user_reads_narrates_how_the_project_was_made():
    """README.md, the docs (the generated pages included), pyproject.toml's description and the model-card
    template speak of the software only."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    hook = reference_hook()
    texts = {str(path.relative_to(ROOT)): path.read_text() for path in doc_files()}
    texts["pyproject.toml description"] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "description"
    ]
    for card in sorted((ROOT / "src" / "vitrail" / "model_cards").iterdir()):
        texts[str(card.relative_to(ROOT))] = card.read_text()
    texts[hook.CLI_PAGE] = hook.cli_page()
    texts[hook.CONFIG_FIELDS_PAGE] = hook.config_fields_page()
    found = [
        f"{where}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)!r}"
        for where, text in texts.items()
        for match in PROCESS_WORDS.finditer(text)
    ]
    assert found == []
    narrated = "As asked in issue 2, this session's helper ran it on a lent H100 (this machine kind)."
    assert [m.group(0) for m in PROCESS_WORDS.finditer(narrated)] == [
        "issue 2", "session", "helper", "lent", "this machine kind"
    ]  # fmt: skip


def api_objects() -> list[object]:
    """Every object the API page renders (its `::: dotted.name` lines), imported."""
    import importlib

    found = []
    for line in (ROOT / "docs" / "reference" / "api.md").read_text().splitlines():
        if line.startswith(":::"):
            module, _, name = line[3:].strip().rpartition(".")
            found.append((line[3:].strip(), getattr(importlib.import_module(module), name)))
    return found


def test_docstring_examples_on_the_api_page_run():
    """The `>>>` examples the API page shows (docstrings of its objects and their members, markdown fences
    dropped) run and print what they say; a page with none found would mean the finder broke."""
    import doctest
    import inspect

    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    ran = []
    for name, obj in api_objects():
        members = [(name, obj)]
        if inspect.isclass(obj):
            members += [(f"{name}.{key}", value) for key, value in vars(obj).items()]
        for label, member in members:
            text = inspect.getdoc(member) if inspect.isclass(member) or callable(member) else None
            if not text or ">>>" not in text:
                continue
            text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("```"))
            case = parser.get_doctest(text, {}, label, None, 0)
            result = runner.run(case, out=lambda report: None)
            assert result.failed == 0, f"the docstring example of {label} fails:\n{text}"
            ran.append(label)
    assert {"vitrail.VitrailConfig", "vitrail.VitrailBackbone"} <= set(ran), ran
