#!/usr/bin/env python
"""Full-size conversion check: random checkpoints of the real architectures, through scripts/convert_checkpoint.py.

    .venv/bin/python benchmarks/conversion_parity.py [--only NAME ...]

The Hub is out of reach here, so each source is a randomly initialised model of the published architecture with
every parameter perturbed (plain random init leaves LayerNorms at identity and biases at zero, which would hide a
swapped scale/shift), saved the way its library saves it. Each one then goes through the conversion script,
which compares the source library's own outputs with vitrail's on a fixed input -- at the checkpoint's resolution
and, where a row says so, after resampling the positions to another one -- and after reloading the saved folder.
Prints one markdown row per source; about 4 minutes and 3 GB of memory on the 2-core CPU here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import convert_checkpoint  # noqa: E402


def perturbed(model, scale: float = 0.02):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


def hf_vit_b16(folder: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    perturbed(ViTForImageClassification(ViTConfig(num_labels=1000))).save_pretrained(folder)


def hf_deit_b16_distilled(folder: Path) -> None:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    perturbed(DeiTForImageClassificationWithTeacher(DeiTConfig(num_labels=1000))).save_pretrained(folder)


def hf_dinov2_s14_registers(folder: Path) -> None:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification

    config = Dinov2WithRegistersConfig(
        hidden_size=384,
        num_attention_heads=6,
        num_register_tokens=4,
        image_size=518,
        patch_size=14,
        num_labels=1000,
    )
    perturbed(Dinov2WithRegistersForImageClassification(config)).save_pretrained(folder)


def hf_dinov2_s14_swiglu(folder: Path) -> None:
    """DINOv2-g's SwiGLU MLP at S width (the giant itself needs ~9 GB for two copies)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=384, num_attention_heads=6, use_swiglu_ffn=True, image_size=518, patch_size=14
    )
    perturbed(Dinov2Model(config)).save_pretrained(folder)


def timm_vit_b16_reg4(folder: Path) -> None:
    import timm
    from timm.models._hub import save_for_hf

    model = timm.create_model("vit_base_patch16_reg4_gap_256", pretrained=False, num_classes=1000)
    save_for_hf(perturbed(model), folder, safe_serialization=True)


def timm_vit_s16(folder: Path) -> None:
    import timm
    from timm.models._hub import save_for_hf

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000)
    save_for_hf(perturbed(model), folder, safe_serialization=True)


def timm_deit_b16_distilled(folder: Path) -> None:
    import timm
    from timm.models._hub import save_for_hf

    model = timm.create_model("deit_base_distilled_patch16_224", pretrained=False, num_classes=1000)
    save_for_hf(perturbed(model), folder, safe_serialization=True)


def npz_vit_b16(folder: Path) -> Path:
    """A ViT-B/16 in google-research/vision_transformer's .npz layout, written from a timm model's tensors."""
    import timm

    state = perturbed(
        timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000)
    ).state_dict()
    width, heads = 768, 12
    arrays = {
        "embedding/kernel": state["patch_embed.proj.weight"].permute(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": state["patch_embed.proj.bias"],
        "cls": state["cls_token"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
        "head/kernel": state["head.weight"].T,
        "head/bias": state["head.bias"],
    }
    for i in range(12):
        t, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        qkv_w, qkv_b = state[b + "attn.qkv.weight"].chunk(3), state[b + "attn.qkv.bias"].chunk(3)
        for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            arrays[f"{t}MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(width, heads, -1)
            arrays[f"{t}MultiHeadDotProductAttention_1/{name}/bias"] = bias.reshape(heads, -1)
        arrays[f"{t}MultiHeadDotProductAttention_1/out/kernel"] = state[b + "attn.proj.weight"].T.reshape(
            heads, -1, width
        )
        arrays[f"{t}MultiHeadDotProductAttention_1/out/bias"] = state[b + "attn.proj.bias"]
        for jax, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            arrays[f"{t}{jax}/scale"], arrays[f"{t}{jax}/bias"] = (
                state[b + ours + ".weight"],
                state[b + ours + ".bias"],
            )
        for jax, ours in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            arrays[f"{t}MlpBlock_3/{jax}/kernel"] = state[b + f"mlp.{ours}.weight"].T
            arrays[f"{t}MlpBlock_3/{jax}/bias"] = state[b + f"mlp.{ours}.bias"]
    path = folder / "ViT-B_16.npz"
    folder.mkdir(parents=True)
    np.savez(path, **{k: v.detach().numpy() for k, v in arrays.items()})
    return path


# name -> (builder, --from, extra arguments)
SOURCES = {
    "transformers ViT-B/16 (Hub layout), 224 -> 384": (hf_vit_b16, "hf", ["--image-size", "384"]),
    "transformers DeiT-B/16 distilled, 224": (hf_deit_b16_distilled, "hf", []),
    "transformers DINOv2-S/14 + 4 registers, 518 -> 224": (
        hf_dinov2_s14_registers,
        "hf",
        ["--image-size", "224"],
    ),
    "transformers DINOv2-S/14 SwiGLU backbone, 518 -> 224": (
        hf_dinov2_s14_swiglu,
        "hf",
        ["--image-size", "224"],
    ),
    "timm vit_small_patch16_224, 224 -> 288": (timm_vit_s16, "timm", ["--image-size", "288"]),
    "timm vit_base_patch16_reg4_gap_256, 256": (timm_vit_b16_reg4, "timm", []),
    "timm deit_base_distilled_patch16_224, 224 -> 160x192": (
        timm_deit_b16_distilled,
        "timm",
        ["--image-size", "160x192"],
    ),
    "JAX .npz ViT-B/16 (vision_transformer layout), 224 -> 384": (
        npz_vit_b16,
        "npz",
        ["--image-size", "384"],
    ),
}


def run(name: str, workdir: Path) -> tuple[float, float, str]:
    builder, source_format, extra = SOURCES[name]
    src = workdir / re.sub(r"\W+", "-", name)
    made = builder(src)
    src = made if made is not None else src
    captured = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(captured):
        status = convert_checkpoint.main(
            [
                "--from",
                source_format,
                "--input",
                str(src),
                "--output",
                str(workdir / f"{src.name}-out"),
                *extra,
            ]
        )
    seconds = time.perf_counter() - start
    lines = [x for x in captured.getvalue().splitlines() if x.startswith("max abs logit difference (")]
    diffs = ", ".join(line.split("(", 1)[1].replace("):", ":") for line in lines)
    diffs = re.sub(r"reloaded from \S+ vs converted", "reloaded", diffs)
    final = float(captured.getvalue().split("max abs logit difference: ")[-1].split()[0])
    return (final if status == 0 else float("nan")), seconds, diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(SOURCES), default=list(SOURCES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| source | max abs difference | each comparison | seconds |")
    print("|---|--:|---|--:|")
    failed = False
    for name in args.only:
        with tempfile.TemporaryDirectory() as workdir:
            diff, seconds, detail = run(name, Path(workdir))
        failed |= not diff <= convert_checkpoint.TOLERANCE
        print(f"| {name} | {diff:.1e} | {detail} | {seconds:.0f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
