"""The `vitrail` command (also `python -m vitrail`): one subcommand per job.

    vitrail train --output_dir runs/digits ...      # fine-tune or train from scratch (`vitrail train --help`)
    vitrail predict photo.jpg --model runs/digits   # classify files
    vitrail info                                    # versions, CPU, GPU, installed extras

Each subcommand parses its flags and calls the job in the package (`vitrail.training`, `vitrail.predict`, ...);
`scripts/*.py` call the same functions. The jobs are imported only once their extra is known to be installed, so
that a base install answers `vitrail train` with the `pip install` line it needs instead of a traceback. Exit
status: what the job returns (predict, convert, export), 0 otherwise; 1 for a failed job or a missing extra, 2 for
bad flags (argparse's own).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from . import __version__

# The optional extras, as in pyproject.toml: distribution name -> the module it installs.
EXTRAS = {
    "train": {
        "datasets": "datasets",
        "accelerate": "accelerate",
        "evaluate": "evaluate",
        "scikit-learn": "sklearn",
        "matplotlib": "matplotlib",
    },
    "export": {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"},
    "fp8": {"torchao": "torchao"},
}
# Modules a job imports only when a flag asks for them, and how to get each.
OPTIONAL = {"torchvision": "pip install torchvision (the release built for your torch)"}
BASE = ("torch", "transformers", "safetensors", "huggingface-hub", "numpy", "pillow")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class MissingExtra(SystemExit):
    """A job needs packages of an extra that is not installed; exits with status 1 and the `pip install` line."""

    def __init__(self, what: str, extra: str, missing: Iterable[str]):
        super().__init__(
            f"vitrail {what} needs the {extra!r} extra, which is not installed (missing: {', '.join(missing)}). "
            f'Install it with: pip install "vitrail[{extra}]"'
        )


def missing_from(extra: str, only: Iterable[str] | None = None) -> list[str]:
    """The distributions of `extra` (or of its subset `only`) whose module cannot be imported."""
    wanted = EXTRAS[extra] if only is None else {name: EXTRAS[extra][name] for name in only}
    return [name for name, module in wanted.items() if importlib.util.find_spec(module) is None]


def require(what: str, extra: str, only: Iterable[str] | None = None) -> None:
    """Stop with `MissingExtra` unless `extra` (or its subset `only`) is installed."""
    if missing := missing_from(extra, only):
        raise MissingExtra(what, extra, missing)


class _HfHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and, as `HfArgumentParser` does by default, shows the defaults."""


def _parser_options(name: str, job: Callable, formatter=argparse.RawDescriptionHelpFormatter) -> dict:
    return {"prog": f"vitrail {name}", "description": inspect.getdoc(job), "formatter_class": formatter}


class CommandParser(argparse.ArgumentParser):
    """An `ArgumentParser` that keeps the arguments it was given, in order (`arguments`): the command-line
    reference of the docs is made from them."""

    def __init__(self, *args, **kwargs):
        self.arguments: list[argparse.Action] = []  # before argparse's own __init__, which adds --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.arguments.append(action)
        return action


def _parser(name: str, job: Callable) -> CommandParser:
    return CommandParser(**_parser_options(name, job))


def _result_line(metrics: dict, output_dir: str) -> str:
    # With --test_size 0 the report is on the validation split, and without one there is none.
    accuracy = next(
        (f"{k}={metrics[k]:.4f} " for k in ("test_accuracy", "eval_accuracy") if k in metrics), ""
    )
    return f"{accuracy}train_runtime={metrics['train_runtime']:.1f}s output_dir={output_dir}"


# ---- jobs ------------------------------------------------------------------------------------------------------


def _train_parser():
    from .training import argument_parser

    return argument_parser(**_parser_options("train", train, _HfHelpFormatter))


def train(argv: list[str] | None = None) -> dict:
    """Fine-tune or train a vitrail image classifier with transformers' Trainer.

    The main job (`make train`) trains from scratch on the embedded digits (scikit-learn's 1,797 real 8x8 scans,
    split 70/10/20 stratified, seed 0) and reports accuracy on the held-out 20% test split:

        vitrail train --output_dir runs/digits  <recipe flags: see DIGITS_RECIPE in the Makefile>

    Other data: `--train_dir DIR [--validation_dir DIR]` (image folders, <dir>/<class>/<image>) or `--dataset_name`
    (a Hub dataset, when online). Other models: `--model_name_or_path CKPT` fine-tunes a checkpoint (a new label
    set re-initialises the head, `--image_size` resamples positions), `--variant S/16 [--config_overrides ...]`
    trains from scratch. Every `TrainingArguments` flag works (`--bf16`, `--resume_from_checkpoint`,
    `--push_to_hub`, ...). Several processes: `accelerate launch --multi_gpu --num_processes N -m vitrail train ...`
    (or `scripts/train.py ...` in place of `-m vitrail train` in a checkout); add `--use_cpu true` on CPUs, where
    FSDP is refused (see docs/guides/training.md, "Several processes").

    Rerun in the same `--output_dir`, it resumes from the newest complete checkpoint, or prints the results of the
    finished run (and, with `--push_to_hub`, pushes it: after a failed push, rerun the same command); with other
    settings it stops and names them (`--overwrite_output_dir` starts again).

    Output folder: model.safetensors, config.json, preprocessor_config.json, the code files (opens with
    `trust_remote_code=True` without vitrail), all_results.json (with test_accuracy and train_runtime),
    README.md (model card), training_curves.png, confusion_matrix.png, run_settings.json, data_split.json, and
    with --push_to_hub hub_push.json (whether the push landed). Needs the "train" extra.
    """
    require("train", "train")
    from transformers.utils import logging as hf_logging

    from . import training

    # Parsing the arguments already forms the process group of a multi-process launch; every rank ends it.
    with training.closing_process_group():
        model_args, data_args, training_args = training.parse_args(argv, _train_parser())
        logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
        hf_logging.set_verbosity_warning()
        metrics = training.train(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(_result_line(metrics, training_args.output_dir))
    return metrics


def _pretrain_parser():
    from transformers import HfArgumentParser

    from .pretraining import PretrainArguments
    from .training import DataArguments, VitrailTrainingArguments

    return HfArgumentParser(
        (PretrainArguments, DataArguments, VitrailTrainingArguments),
        **_parser_options("pretrain", pretrain, _HfHelpFormatter),
    )


def pretrain(argv: list[str] | None = None) -> dict:
    """SimMIM masked-image-modeling pretraining of a vitrail encoder on unlabeled images.

        vitrail pretrain --output_dir runs/mim --config_overrides image_size=8,patch_size=2,encoder_stride=2,\\
    num_channels=1,hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=512 \\
            --num_train_epochs 20 --learning_rate 1e-3 --per_device_train_batch_size 128 --use_cpu true
        vitrail train --model_name_or_path runs/mim --output_dir runs/mim-ft ...

    Data as for `vitrail train`: `--train_dir` (an image folder; labels are ignored), `--dataset_name`, or the
    embedded digits. The masked L1 loss is logged; the output folder is a complete vitrail checkpoint (weights,
    config, processor, code). Runs under `accelerate launch scripts/pretrain_mim.py ...` unchanged. Needs the
    "train" extra.
    """
    require("pretrain", "train")
    from .pretraining import pretrain as run_pretraining
    from .training import closing_process_group

    with closing_process_group():  # every rank ends the process group of a multi-process launch
        parser = _pretrain_parser()
        args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
        metrics = run_pretraining(args, data_args, training_args)
    print(f"train_loss={metrics['train_loss']:.4f} output_dir={training_args.output_dir}")
    return metrics


def _evaluate_parser():
    from transformers import HfArgumentParser

    from .evaluate_checkpoint import EvaluateArguments
    from .training import DataArguments

    return HfArgumentParser(
        (EvaluateArguments, DataArguments), **_parser_options("evaluate", evaluate, _HfHelpFormatter)
    )


def evaluate(argv: list[str] | None = None) -> dict:
    """Score a vitrail classifier on a data split and write metrics.json and confusion_matrix.png.

        vitrail evaluate --model runs/digits            # the embedded digits' held-out test split
        vitrail evaluate --model DIR --train_dir IMAGES --split validation --output_dir out/

    Data arguments are `vitrail train`'s (same splits for the same seed and fractions); a split other than the one
    in the checkpoint's data_split.json is refused unless `--allow_split_mismatch` is given. Takes a few seconds
    on the digits. Needs the "train" extra.
    """
    require("evaluate", "train")
    from .evaluate_checkpoint import evaluate_checkpoint

    parser = _evaluate_parser()
    args, data_args = parser.parse_args_into_dataclasses(args=argv)
    metrics = evaluate_checkpoint(args, data_args)
    for name, value in sorted(metrics.items()):
        print(f"{name} = {value:.4f}" if isinstance(value, float) else f"{name} = {value}")
    return metrics


def _predict_parser() -> CommandParser:
    parser = _parser("predict", predict)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    parser.add_argument("--model", required=True, help="a classifier checkpoint: folder or Hub repo id")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument(
        "--attention-map", metavar="OUT_DIR", help="write an attention-map PNG per image here"
    )
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    return parser


def predict(argv: list[str] | None = None) -> int:
    """Classify image files (or folders of them) with a vitrail checkpoint, and draw what it attends to.

        vitrail predict photo.jpg more_photos/ --model runs/digits --top-k 3
        vitrail predict images/ --model DIR_OR_REPO --json --attention-map maps/

    Prints a table, or with `--json` one JSON object per line (`file`, `labels`, `scores`, best first; and
    `attention_map` with `--attention-map`). Scores are softmax probabilities (sigmoid for multi-label
    checkpoints). Folders are walked recursively for .bmp .gif .jpeg .jpg .png .ppm .tif .tiff .webp files (any
    case); files named on the command line are tried whatever their name. A file that cannot be read is reported
    by name on stderr and the others are still classified; the exit status is 1 if any input failed.
    `--attention-map DIR` writes one PNG per image: the attention rollout and each last-layer head over the image
    as the model saw it (`vitrail.visualize`; needs matplotlib, from the "train" extra). The checkpoint's own
    image processor prepares the images (transformers and timm checkpoints are converted on loading). A few
    seconds for the digits model here, most of it start-up.
    """
    parser = _predict_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be positive")
    if args.attention_map:
        require("predict --attention-map", "train", only=["matplotlib"])
    _check_model(parser, args.model)
    from transformers.utils import logging as hf_logging

    from .predict import run

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    hf_logging.disable_progress_bar()  # "Loading weights" bars would mix with the failures on stderr
    return run(
        args.inputs, args.model, args.top_k, args.attention_map, args.json, args.batch_size, args.device
    )


def _check_model(parser: argparse.ArgumentParser, source: str) -> None:
    """A missing checkpoint folder named as such, before transformers reads it as a Hub repo id."""
    from .run_folder import check_model_source

    try:
        check_model_source(source, "--model")
    except ValueError as error:
        parser.error(str(error))


def _size(text: str) -> int | list[int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive integers, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _convert_parser() -> CommandParser:
    parser = _parser("convert", convert)
    parser.add_argument(
        "--from",
        dest="source_format",
        required=True,
        choices=["hf", "timm", "npz"],
        help="the source's format: a transformers folder, a timm folder or file, a JAX .npz",
    )
    parser.add_argument("--input", required=True, type=Path, help="source checkpoint folder or file")
    parser.add_argument("--output", required=True, type=Path, help="vitrail folder to write")
    parser.add_argument(
        "--image-size", type=_size, help="target resolution, N or HxW: the position table is resampled to it"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickled weights (.bin/.pth) when no safetensors exist",
    )
    parser.add_argument(
        "--num-heads", type=int, help="attention heads, when the source does not say (timm, npz)"
    )
    parser.add_argument(
        "--global-pool", choices=["token", "avg"], help="timm: the pooling the model was built with"
    )
    parser.add_argument("--architecture", help="timm: the architecture, when no config.json names it")
    parser.add_argument(
        "--source-image-size", type=_size, help="npz without a stored position table: its training resolution"
    )
    return parser


def convert(argv: list[str] | None = None) -> int:
    """Convert a foreign Vision Transformer checkpoint into a complete vitrail folder, and prove it predicts the same.

        vitrail convert --from hf   --input /tmp/vit-b16      --output /tmp/vit-b16-vitrail
        vitrail convert --from timm --input /tmp/timm-vit-s16 --output /tmp/s16-vitrail
        vitrail convert --from npz  --input ViT-B_16.npz      --output /tmp/b16-jax --image-size 384

    Sources (`--input`, local):
    - `hf`: a transformers checkpoint folder of a type vitrail converts (ViT, DeiT, DINOv2 and DINOv3, MAE, MSN,
      I-JEPA, SimMIM, BEiT, data2vec-vision, the vision towers of CLIP and its kin, SigLIP, AIMv2), or a timm
      model saved through transformers' TimmWrapper classes;
    - `timm`: a timm folder (config.json + model.safetensors, as timm's Hub repos are laid out) or a bare
      `.safetensors` file (then pass `--architecture`, timm's name for it);
    - `npz`: a JAX `.npz` of google-research/vision_transformer or big_vision.

    Steps: convert (`vitrail.convert.<source>.open_source`), run the source's own implementation (transformers;
    timm for timm and .npz files) and the converted model on one fixed input and compare; with `--image-size`,
    resample the position table (`set_image_size`) and compare again against the source run at that size with its
    own position interpolation; save the model (safetensors + config + code files) and an image processor
    reproducing the source's evaluation preprocessing; reopen the saved folder and compare once more. Prints
    `max abs logit difference: ...` (last hidden state for backbones) and exits with status 1 above 1e-4. When
    the source library is not installed the comparison with it is skipped and said so. Runtime: about 14 s for a
    ViT-B/16 with 1,000 classes on a 2-core CPU, 2 s for the tiny models of the tests.
    """
    parser = _convert_parser()
    args = parser.parse_args(argv)
    if not args.input.exists():  # local only: a missing path would otherwise be looked up as a Hub repo id
        parser.error(
            f"--input {args.input}: no such file or folder. Give a checkpoint folder or file on this disk."
        )
    from .convert.checked import TOLERANCE, convert_checked

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = {
        "hf": {"allow_pickle": args.allow_pickle},
        "timm": {
            "allow_pickle": args.allow_pickle,
            "num_heads": args.num_heads,
            "global_pool": args.global_pool,
            "architecture": args.architecture,
        },
        "npz": {"num_heads": args.num_heads, "image_size": args.source_image_size},
    }[args.source_format]
    diff = convert_checked(
        args.source_format, args.input, args.output, target_size=args.image_size, **options
    )
    print(f"max abs logit difference: {diff:.3e}")
    if diff > TOLERANCE:
        print(f"FAILED: difference above {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


def _push_parser() -> CommandParser:
    from .hub import DEFAULT_TIMEOUT

    parser = _parser("push", push)
    parser.add_argument("folder", help="checkpoint folder, e.g. runs/digits")
    parser.add_argument("repo_id", help="model repo, 'namespace/name' (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private (if it is new)")
    parser.add_argument("--revision", help="branch to commit to (default main; created if missing)")
    parser.add_argument("--commit-message", help="commit title")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the saved login)")
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also push the top-level files matching this pattern, e.g. '*.txt' (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds each request may wait for the Hub (default {DEFAULT_TIMEOUT:g})",
    )
    return parser


def push(argv: list[str] | None = None):
    """Check a vitrail checkpoint folder and push it to a Hugging Face Hub model repo, as one commit.

        vitrail push runs/digits your-name/vitrail-digits                # main branch
        vitrail push runs/digits your-name/vitrail-digits --revision v2 --private
        vitrail push runs/digits your-name/vitrail-digits --include "*.txt" --timeout 30

    The folder must be a complete checkpoint (model.safetensors or an index and its shards, config.json, the code
    files, preprocessor_config.json; no pickle files, no symbolic links); it is loaded with its own code and run
    once before anything is uploaded (a few seconds). Pushed: the weights, the two configs, the code files their
    auto_map names, README.md and the PNGs it shows, the trainer's plots and result files. Everything else in the
    folder is printed as "not pushed"; --include PATTERN (repeatable) adds top-level files on purpose. Files that
    already match the branch are left out of the commit, and an unchanged folder makes no commit; weights of the
    other layout on the branch are deleted in the same commit. The token comes from --token, HF_TOKEN or
    `hf auth login`; HF_ENDPOINT selects another Hub. Prints the commit URL, or says that nothing changed; on an
    error, prints it and exits with status 1.
    """
    from .hub import CheckpointError, HubError, not_pushed, push_checkpoint

    parser = _push_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    try:
        commit = push_checkpoint(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            include=args.include,
            timeout=args.timeout,
        )
    except (CheckpointError, HubError) as error:
        parser.exit(1, f"error: {error}\n")
    print(
        f"pushed: {commit.commit_url}" if commit else f"unchanged: {args.repo_id} already holds {args.folder}"
    )
    if left_out := not_pushed(args.folder, args.include):
        print(f"not pushed: {', '.join(left_out)}")
    return commit


def _pull_parser() -> CommandParser:
    from .hub import DEFAULT_TIMEOUT

    parser = _parser("pull", pull)
    parser.add_argument("repo_id", help="model repo, 'namespace/name'")
    parser.add_argument("--revision", help="branch, tag or commit sha (default main)")
    parser.add_argument("--local-dir", help="put the files here instead of the HF cache")
    parser.add_argument("--token", help="Hub token, for private repos (default: HF_TOKEN or the saved login)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds each request may wait for the Hub (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files in --local-dir that a checkpoint would hold (README.md, results, plots, ...) "
        "even where no checkpoint or earlier pull put them there; other files stay",
    )
    return parser


def pull(argv: list[str] | None = None) -> str:
    """Download a vitrail checkpoint from a Hugging Face Hub model repo, every file checked.

        vitrail pull your-name/vitrail-digits                 # into the HF cache
        vitrail pull your-name/vitrail-digits --revision v2 --local-dir models/digits-v2
        vitrail pull your-name/vitrail-digits --local-dir my-project --overwrite
        HF_HUB_OFFLINE=1 vitrail pull your-name/vitrail-digits  # from the cache, no network

    The revision (a branch, tag or commit sha) is resolved to one commit, and only what loading needs is
    downloaded at that commit: config.json and preprocessor_config.json, the code files their auto_map names
    (never a name that is not a plain module file name or would shadow an importable module), the weights and
    README.md. Each file must match the sha the Hub lists for it. With --local-dir the files arrive in a hidden
    folder beside it and replace the checkpoint there only when all of them arrived intact; .vitrail-pull.json
    records the revision. Only what an earlier pull recorded, or the files of a vitrail checkpoint that is there,
    is replaced; a folder holding files a checkpoint would (README.md, all_results.json, ...) but no checkpoint is
    refused before any download, naming them, unless --overwrite says to replace them. Files no checkpoint holds
    always stay. Offline, a --local-dir not in the cache is used only if its record names this repo and revision.
    Prints the folder; it opens with `AutoModelForImageClassification.from_pretrained(folder,
    trust_remote_code=True)`, with or without vitrail. On an error, prints it and exits with status 1.
    HF_ENDPOINT selects another Hub.
    """
    from .hub import HubError, pull_checkpoint

    parser = _pull_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    try:
        folder = pull_checkpoint(
            args.repo_id,
            revision=args.revision,
            local_dir=args.local_dir,
            token=args.token,
            timeout=args.timeout,
            overwrite=args.overwrite,
        )
    except HubError as error:
        parser.exit(1, f"error: {error}\n")
    print(folder)
    return folder


def _export_parser() -> CommandParser:
    parser = _parser("export", export)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub repo id")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--dynamic-size", action="store_true", help="dynamic height and width as well as batch"
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest logit difference accepted")
    return parser


def export(argv: list[str] | None = None) -> int:
    """Export a vitrail classifier to ONNX and check it against PyTorch with onnxruntime.

        vitrail export --model runs/digits --output runs/digits/model.onnx
        vitrail export --model DIR --output model.onnx --dynamic-size   # any image size too

    The graph takes `pixel_values` `(batch, channels, height, width)`, preprocessed as the checkpoint's image
    processor does, and gives `logits`. The batch is always dynamic; `--dynamic-size` makes height and width
    dynamic too (from two patches a side), for checkpoints whose config has `dynamic_image_size=True`. The file is
    then run with onnxruntime on batch sizes 1 and 3 (and, with `--dynamic-size`, two other image sizes) and
    compared with PyTorch: prints `max abs logit difference: ...` and exits with status 1 above `--tolerance`
    (1e-4). Needs the "export" extra (`onnx`, `onnxscript`, `onnxruntime`). About 15 s of CPU for a digits model
    on a 2-core CPU.
    """
    parser = _export_parser()
    args = parser.parse_args(argv)
    require("export", "export")
    _check_model(parser, args.model)
    from . import export as exporting
    from .modeling_vitrail import VitrailForImageClassification

    logging.basicConfig(format="%(message)s")
    logging.getLogger("vitrail").setLevel(logging.INFO)  # our per-input differences, not onnxscript's passes

    model = VitrailForImageClassification.from_pretrained(args.model).eval()
    if args.dynamic_size and not model.config.dynamic_image_size:
        height, width = model.config.image_hw
        parser.error(
            f"--dynamic-size needs a checkpoint whose config has `dynamic_image_size=True`; {args.model} takes "
            f"{height}x{width} images only. Export it without --dynamic-size, or save a copy that accepts any "
            f"size: `VitrailForImageClassification.from_pretrained({args.model!r}, dynamic_image_size=True)"
            ".save_pretrained(NEW_DIR)`."
        )
    path = exporting.export_onnx(model, args.output, dynamic_size=args.dynamic_size)
    inputs = exporting.check_inputs(model.config, args.dynamic_size)
    difference = exporting.onnx_max_difference(path, model, inputs)
    print(f"wrote {path} (weights in {path}.data)")
    print(f"max abs logit difference: {difference:.3g} (onnxruntime vs PyTorch)")
    if difference > args.tolerance:
        print(f"above the tolerance {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


# ---- info ------------------------------------------------------------------------------------------------------

# CPU features that decide which kernels run: AVX2 / AVX-512 (x86), native bf16 (AVX512-BF16, AMX), Arm's SVE.
CPU_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "sve", "sve2", "bf16", "i8mm",
)  # fmt: skip


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu() -> dict:
    """The CPU's model name and kernel-relevant flags (from /proc/cpuinfo where there is one)."""
    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "model name" and value.strip():
                name = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    import torch

    return {
        "name": name,
        "cores": os.cpu_count(),
        "flags": [flag for flag in CPU_FLAGS if flag in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }


def _gpus() -> dict:
    import torch

    found = {"cuda": torch.version.cuda, "hip": torch.version.hip, "devices": []}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            found["devices"].append(
                {
                    "name": properties.name,
                    "memory_gib": round(properties.total_memory / 2**30, 1),
                    "capability": f"{properties.major}.{properties.minor}",
                }
            )
    found["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return found


def collect_info() -> dict:
    """What `vitrail info` reports, as a dictionary."""
    extras = {}
    for extra, members in EXTRAS.items():
        missing = missing_from(extra)
        extras[extra] = {
            "installed": not missing,
            "versions": {name: _version(name) for name in members if name not in missing},
            "missing": missing,
        }
    return {
        "vitrail": __version__,
        "location": str(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in BASE},
        "extras": extras,
        "optional": {name: _version(name) for name in (*OPTIONAL, "timm")},
        "cpu": _cpu(),
        "gpu": _gpus(),
    }


def _info_parser() -> CommandParser:
    parser = _parser("info", info)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    return parser


def info(argv: list[str] | None = None) -> dict:
    """Versions, CPU flags, GPUs and installed extras: what to paste into a bug report.

    vitrail info
    vitrail info --json
    """
    parser = _info_parser()
    args = parser.parse_args(argv)
    report = collect_info()
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"vitrail {report['vitrail']} ({report['location']})")
    print(f"python {report['python']} ({report['executable']}), {report['platform']}")
    print("packages: " + ", ".join(f"{name} {version}" for name, version in report["packages"].items()))
    for extra, state in report["extras"].items():
        if state["installed"]:
            listed = ", ".join(f"{name} {version}" for name, version in state["versions"].items())
            print(f"extra {extra}: installed ({listed})")
        else:
            print(
                f"extra {extra}: not installed (missing: {', '.join(state['missing'])}); "
                f'pip install "vitrail[{extra}]"'
            )
    print(
        "optional: "
        + ", ".join(f"{name} {version or 'not installed'}" for name, version in report["optional"].items())
    )
    cpu = report["cpu"]
    print(
        f"cpu: {cpu['name']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags']) or 'none of interest'}; "
        f"torch kernels: {cpu['torch_capability']}, {cpu['torch_threads']} threads"
    )
    gpu = report["gpu"]
    devices = [
        f"{d['name']} ({d['memory_gib']} GiB, compute capability {d['capability']})" for d in gpu["devices"]
    ]
    built = f"torch built with CUDA {gpu['cuda']}" if gpu["cuda"] else "torch built without CUDA"
    if gpu["hip"]:
        built = f"torch built with ROCm {gpu['hip']}"
    print(
        f"gpu: {'; '.join(devices) if devices else 'none'} ({built}{', MPS available' if gpu['mps'] else ''})"
    )
    return report


# ---- dispatch --------------------------------------------------------------------------------------------------

COMMANDS: dict[str, Callable] = {
    "train": train,
    "pretrain": pretrain,
    "evaluate": evaluate,
    "predict": predict,
    "convert": convert,
    "push": push,
    "pull": pull,
    "export": export,
    "info": info,
}


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "train": _train_parser,
    "pretrain": _pretrain_parser,
    "evaluate": _evaluate_parser,
    "predict": _predict_parser,
    "convert": _convert_parser,
    "push": _push_parser,
    "pull": _pull_parser,
    "export": _export_parser,
    "info": _info_parser,
}


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `vitrail NAME`, as the command builds it, without running anything: a `CommandParser`, or
    for train, pretrain and evaluate a transformers `HfArgumentParser` whose `dataclass_types` hold the flags
    (these three need the "train" extra)."""
    if name not in PARSERS:
        raise ValueError(f"no vitrail command {name!r}; the commands are {', '.join(PARSERS)}")
    return PARSERS[name]()


def _command_parser() -> argparse.ArgumentParser:
    listing = "\n".join(
        f"  {name:<9} {inspect.getdoc(job).splitlines()[0]}" for name, job in COMMANDS.items()
    )
    parser = argparse.ArgumentParser(
        prog="vitrail",
        usage="vitrail [-h] [--version] COMMAND [flags]",
        description="The Vision Transformer as a first-class citizen of the Hugging Face ecosystem.",
        epilog=f"commands:\n{listing}\n\n`vitrail COMMAND --help` shows a command's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vitrail {__version__}")
    parser.add_argument(
        "command", choices=COMMANDS, metavar="COMMAND", help="the job to run, one of those below"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`vitrail COMMAND [flags]`: runs the command's job and returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _command_parser()
    # Only the first word is the command's name; everything after it belongs to the command's own parser.
    name = parser.parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv).command
    try:
        status = COMMANDS[name](argv[1:])
    except ModuleNotFoundError as error:
        module = (error.name or "").partition(".")[0]
        extra = next((extra for extra, members in EXTRAS.items() if module in members.values()), None)
        if extra is not None:
            raise MissingExtra(name, extra, [d for d, m in EXTRAS[extra].items() if m == module]) from error
        if module in OPTIONAL:
            raise SystemExit(
                f"vitrail {name} needs {module} for the flags given: {OPTIONAL[module]}"
            ) from error
        raise
    return status if isinstance(status, int) else 0
