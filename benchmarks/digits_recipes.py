#!/usr/bin/env python
"""The experiment table behind `make train`'s recipe: scripts/train.py on the embedded digits, one run per row.

    .venv/bin/python benchmarks/digits_recipes.py [--only NAME ...] [--seeds 0 1 2]

Each run takes 1.5-2 minutes here (2-core CPU); the default set is 8 runs, about 15 minutes. Every row is the
base recipe (the Makefile's DIGITS_RECIPE) with the changes in its `changes` column. The recipe was chosen on
validation accuracy; test accuracy is reported beside it and was not used to choose.
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = (
    "image_size=8,patch_size=2,encoder_stride=2,num_channels=1,hidden_size={width},num_hidden_layers={depth},"
    "num_attention_heads=4,intermediate_size={mlp},pooling=mean,use_cls_token=false,layer_norm_eps=1e-6"
)
BASE = dict(width=64, depth=4, mlp=128, epochs=150, lr="2e-3", smoothing="0.1")
VARIANTS = {
    "recipe": {},
    "width 96": dict(width=96, mlp=192, epochs=100),
    "depth 6": dict(depth=6, epochs=100, lr="3e-3"),
    "100 epochs, lr 3e-3": dict(epochs=100, lr="3e-3"),
    "lr 3e-3, no label smoothing": dict(lr="3e-3", smoothing="0.0"),
}


def command(output_dir: str, seed: int, width, depth, mlp, epochs, lr, smoothing) -> list[str]:
    return [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--output_dir", output_dir,
        "--config_overrides", MODEL.format(width=width, depth=depth, mlp=mlp),
        "--rotation", "11", "--translate", "0.15", "--scale_jitter", "0.1",
        "--label_smoothing_factor", smoothing, "--num_train_epochs", str(epochs),
        "--per_device_train_batch_size", "128", "--learning_rate", lr, "--weight_decay", "0.05",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1", "--seed", str(seed),
        "--eval_strategy", "steps", "--eval_steps", "150", "--logging_steps", "30", "--save_strategy", "no",
        "--per_device_eval_batch_size", "512", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run these rows only")
    parser.add_argument(
        "--seeds", nargs="*", type=int, default=None, help="seeds for the 'recipe' row (0 1 2)"
    )
    args = parser.parse_args()
    rows = []
    for name in args.only or list(VARIANTS):
        seeds = (args.seeds or [0, 1, 2]) if name == "recipe" else [0]
        for seed in seeds:
            settings = {**BASE, **VARIANTS[name]}
            with tempfile.TemporaryDirectory() as out:
                cmd = command(out, seed, **settings)
                print("$", shlex.join(cmd[1:]), flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                results = json.loads((Path(out) / "all_results.json").read_text())
            changes = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "-"
            rows.append((name, changes, seed, results))
            print(f"{name} seed {seed}: test {results['test_accuracy']:.4f} val {results['eval_accuracy']:.4f} "
                  f"train_runtime {results['train_runtime']:.1f}s", flush=True)  # fmt: skip
    print("\n| run | changes from the recipe | seed | val acc | test acc | train_runtime (s) |")
    print("|---|---|--:|--:|--:|--:|")
    for name, changes, seed, r in rows:
        print(f"| {name} | {changes} | {seed} | {r['eval_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
              f"{r['train_runtime']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
