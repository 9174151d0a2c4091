#!/usr/bin/env python
"""vitrail against its peers, transformers' ViTForImageClassification (sdpa) and timm's VisionTransformer, built
with the same architecture (random weights: speed does not depend on them), timed on this machine, in one table.

    python benchmarks/peers.py [--variant B/16] [--batch 8] [--dtype float32,bfloat16] [--device cpu|cuda]
        [--rounds 5] [--threads N] [--compile] [--sdpa-backends flash,math] [--baseline-processor FILE]
        [--force-bf16] [--fp8] [--quick]

Rows: inference (bf16 rows with bf16 weights) and a training step (forward, backward, AdamW; bf16 rows under
autocast with fp32 weights) per `--dtype`; with `--sdpa-backends`, inference under each named SDPA backend; with
`--compile`, the same under `torch.compile` plus the time of the first compiled call; with `--fp8`, vitrail's
bf16 training step with its encoder's linear layers in float8 (`vitrail train --fp8 true`'s conversion, torchao),
eager and, with `--compile training`, compiled, on an NVIDIA GPU of compute capability 8.9 or later; the image
processor on
varied crops of scikit-learn's two sample photos (vitrail against transformers' `ViTImageProcessor`, its
torchvision backend where torchvision is installed); `pipeline("image-classification")` end to end on a list of
PIL images; `from_pretrained` time and peak memory of a checkpoint of the variant (ViT-B/16 by default) saved to a
temporary folder. Model rows give each model's achieved FLOP/s as a share of this machine's measured GEMM rate
(a 2048 x 2048 matmul of the row's dtype); FLOPs are counted analytically (`forward_flops`). Their notes give the
time of the kernels all three must run (every linear map's GEMMs and each layer's SDPA, `shared_kernels`), timed
in the same rounds, and so the largest ratio an implementation running them could reach against each peer here.
On a GPU whose dense bf16 peak `BF16_DENSE_PEAKS` holds, every model row's note adds model FLOP utilisation
(MFU) against that peak, fp32 and fp8 rows included, so that all rows share one scale.

Each round runs the three models one after another, the order rotated from round to round, so that a slow spell
of a shared machine hits all of them; a cell is the median over rounds with the min-max spread; a ratio is the
median (and min-max) of the per-round ratios, > 1 meaning vitrail is better (faster, or less memory). On a CPU
without native bf16 (no `amx_bf16` or `avx512_bf16` flag) bf16 is emulated and its rows read "not measurable"
unless `--force-bf16`. `--quick` (2 rounds, fewer images) is a smoke run for tests.

On the 2-core Xeon (AMX) here the default run takes about 15 minutes, and `--compile` added about 21 more in a
run on a shared machine; docs/benchmarks.md shows the table of a quiet run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import psutil
import timm
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, pipeline

from vitrail import VitrailConfig, VitrailForImageClassification, VitrailImageProcessor

PEERS = ("vitrail", "transformers", "timm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# timm's names for the ViT sizes it registers with 16-pixel patches (vit_<name>_patch16_224).
TIMM_SIZES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large"}
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
GEMM_SIZE = 2048
# bf16 tensor-core peaks without sparsity, by a part of the name torch gives the device, the more specific first.
# NVIDIA's datasheets list the rates "with sparsity", twice the dense ones: H100 SXM and H200 1,979 TFLOPS, H100
# NVL 1,671, H100 PCIe 1,513. Model FLOP utilisation (MFU) is against these.
BF16_DENSE_PEAKS = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12}
FP8_MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and later
NUM_LABELS = 1000
FLOOR = "shared kernels"  # timed in the model rows' rounds beside the peers (`shared_kernels`)


# ---- the machine ----------------------------------------------------------------------------------------------


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and which of `CPU_FLAGS` it has (read from /proc/cpuinfo; none elsewhere)."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return name, [flag for flag in CPU_FLAGS if flag in flags]


def native_bf16(device: str, flags: list[str]) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else lambda: None


def gemm_rate(dtype: torch.dtype, device: str) -> float:
    """FLOP/s of a GEMM_SIZE x GEMM_SIZE matmul in `dtype`: the median of 5 timings after one warm-up. A GPU does
    one in tens of microseconds, so there each timing covers 50 matmuls."""
    sync, repeats = synchronizer(device), 50 if device == "cuda" else 1
    a, b = (torch.randn(GEMM_SIZE, GEMM_SIZE, device=device).to(dtype) for _ in range(2))
    a @ b
    sync()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        times.append((time.perf_counter() - start) / repeats)
    return 2 * GEMM_SIZE**3 / statistics.median(times)


def forward_flops(config: VitrailConfig) -> float:
    """FLOPs (2 per multiply-add) of one image's forward pass: the patch projection, per layer the qkv and output
    projections, QK^T and attention x V, the MLP; then the head. LayerNorm, softmax, GELU and the residual adds
    are left out (under 1% at ViT-B/16)."""
    patches, (patch_h, patch_w) = config.num_patches, config.patch_hw
    tokens = patches + config.num_prefix_tokens
    width, mlp = config.hidden_size, config.intermediate_size
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    embedding = 2 * patches * config.num_channels * patch_h * patch_w * width
    return embedding + config.num_hidden_layers * per_layer + 2 * width * config.num_labels


def linear_shapes(config: VitrailConfig, batch: int) -> list[tuple[int, int, int, int]]:
    """(count, m, k, n) of every linear map in one forward of `batch` images: the patch projection (the GEMM a
    Conv2d with kernel = stride amounts to), per layer the qkv, output and two MLP projections, then the head."""
    patches, (patch_h, patch_w) = config.num_patches, config.patch_hw
    rows = batch * (patches + config.num_prefix_tokens)
    width, layers = config.hidden_size, config.num_hidden_layers
    return [
        (1, batch * patches, config.num_channels * patch_h * patch_w, width),
        (layers, rows, width, 3 * width),
        (layers, rows, width, width),
        (layers, rows, width, config.intermediate_size),
        (layers, rows, config.intermediate_size, width),
        (1, batch, width, config.num_labels),
    ]


def shared_kernels(config: VitrailConfig, batch: int, dtype: torch.dtype, device: str, training: bool):
    """A call that runs the kernels each of the three models must run for one forward of `batch` images (with
    `training`, forward and backward), on tensors made once: every linear map's GEMM (for training also its
    input- and weight-gradient GEMMs, in the layouts autograd hands the kernels) and each layer's
    `scaled_dot_product_attention`. The models add LayerNorm, GELU, residual adds, casts and the optimizer step
    around these. Timed in the same rounds as the models, a peer's time over this call's is the largest ratio an
    implementation running these kernels could reach against that peer on this machine."""
    gemms = []
    for count, m, k, n in linear_shapes(config, batch):
        x, w, dy = (torch.randn(*shape, device=device).to(dtype) for shape in [(m, k), (n, k), (m, n)])
        gemms.append((count, lambda x=x, w=w: x @ w.mT))
        if training:
            gemms += [(count, lambda dy=dy, w=w: dy @ w), (count, lambda dy=dy, x=x: dy.mT @ x)]
    shape = (
        batch,
        config.num_attention_heads,
        config.num_patches + config.num_prefix_tokens,
        config.head_dim,
    )
    q, k, v = (torch.randn(shape, device=device).to(dtype).requires_grad_(training) for _ in range(3))
    grad = torch.randn(shape, device=device).to(dtype)

    def attention():
        out = F.scaled_dot_product_attention(q, k, v)
        if training:
            torch.autograd.grad(out, (q, k, v), grad)

    def call():
        with torch.inference_mode(not training):
            for count, gemm in gemms:
                for _ in range(count):
                    gemm()
            for _ in range(config.num_hidden_layers):
                attention()

    return call


def floor_note(row: Row) -> str:
    """The shared kernels' time in `row`'s rounds, and the ratio cap it sets against each peer: the median over
    rounds of the peer's time over the kernels'."""
    floor = row.values.pop(FLOOR, None)
    if floor is None:  # its kernels failed here; measure_row's note says why
        return ""
    caps = [
        f"{statistics.median(p / f for p, f in zip(row.values[peer], floor, strict=True)):.2f}× {peer}"
        for peer in PEERS[1:]
        if peer in row.values
    ]
    return (
        f"shared kernels alone {spread(floor, 1000.0, digits_for([f * 1000 for f in floor]))} ms: ratio cap "
        + ", ".join(caps)
    )


# ---- results ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: per-round values of each peer, or why a peer has none."""

    label: str
    unit: str  # "ms/batch", "ms/step", "s", "img/s" or "MB"
    higher_is_better: bool = False
    values: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    flops: float | None = None  # per call, for the share of the GEMM rate
    gemm: float | None = None
    note: str = ""


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    median = statistics.median(values) * scale
    low, high = min(values) * scale, max(values) * scale
    return f"{median:.{digits}f} [{low:.{digits}f}–{high:.{digits}f}]"


def digits_for(values: list[float]) -> int:
    median = abs(statistics.median(values))
    return 0 if median >= 100 else 1 if median >= 10 else 2 if median >= 1 else 3


def cell(row: Row, peer: str) -> str:
    if peer in row.missing:
        return row.missing[peer]
    if peer not in row.values:
        return "–"
    values = row.values[peer]
    scale = 1000.0 if row.unit.startswith("ms") else 1.0
    text = spread(values, scale, digits_for([v * scale for v in values]))
    if row.flops and row.gemm:
        text += f" ({row.flops / statistics.median(values) / row.gemm:.0%})"
    return text


def ratio_cell(row: Row, peer: str) -> str:
    if "vitrail" not in row.values or peer not in row.values:
        return "–"
    pairs = zip(row.values["vitrail"], row.values[peer], strict=True)
    ratios = [v / p if row.higher_is_better else p / v for v, p in pairs]
    return spread(ratios, digits=2)


def table(rows: list[Row]) -> str:
    lines = [
        "| measure (median [min–max] over rounds; share of the GEMM rate) | vitrail | transformers | timm "
        "| vitrail ÷ transformers | vitrail ÷ timm | notes |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        cells = [f"{row.label}, {row.unit}", *(cell(row, peer) for peer in PEERS)]
        cells += [ratio_cell(row, "transformers"), ratio_cell(row, "timm"), row.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unmeasurable(label: str, unit: str, reason: str) -> Row:
    return Row(label, unit, missing=dict.fromkeys(PEERS, reason))


# ---- timing -----------------------------------------------------------------------------------------------------


def median_time(call: Callable[[], object], iters: int, sync: Callable[[], None]) -> float:
    """Median seconds of `iters` calls."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(calls: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """One value per round from each call; round r starts with the r-th call (A B C, B C A, C A B, ...)."""
    names = list(calls)
    values = {name: [] for name in names}
    for index in range(rounds):
        shift = index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            values[name].append(calls[name]())
    return values


def measure_row(row: Row, calls: dict[str, Callable[[], object]], args, sync) -> Row:
    """Warm each call up once, then fill `row` with interleaved per-round medians of `args.iters` calls. A peer
    whose call fails (a backend that has no kernel here) shows the error instead."""
    timed = {}
    for name, call in calls.items():
        try:
            call()
            sync()
        except RuntimeError as error:
            row.missing[name] = "unavailable"
            row.note = f"unavailable: {str(error).splitlines()[0][:100]}"
            continue
        timed[name] = functools.partial(median_time, call, args.iters, sync)
    row.values.update(interleaved(timed, args.rounds))
    progress(row.label)
    return row


def progress(label: str) -> None:
    """A line on stderr per measured row: a full run takes many minutes and prints its table at the end."""
    print(f"[{time.strftime('%H:%M:%S')}] measured: {label}", file=sys.stderr, flush=True)


# ---- models -----------------------------------------------------------------------------------------------------


@dataclass
class Peer:
    model: torch.nn.Module
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def build_peers(args) -> tuple[VitrailConfig, dict[str, Peer]]:
    """The three models of one architecture; stops if their parameter counts differ."""
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    config = VitrailConfig.from_variant(
        args.variant, image_size=args.image_size, num_labels=NUM_LABELS, **overrides
    )
    vitrail = VitrailForImageClassification(config)
    hf = ViTForImageClassification(
        ViTConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            image_size=args.image_size,
            patch_size=config.patch_size,
            num_labels=NUM_LABELS,
        )
    )
    for model in (vitrail, hf):
        model.set_attn_implementation("sdpa")
    timm_model = timm.create_model(timm_name(args.variant), num_classes=NUM_LABELS, **timm_overrides(config))
    peers = {
        "vitrail": Peer(vitrail, lambda model, x: model(pixel_values=x).logits),
        "transformers": Peer(hf, lambda model, x: model(pixel_values=x).logits),
        "timm": Peer(timm_model, lambda model, x: model(x)),
    }
    sizes = {name: sum(p.numel() for p in peer.model.parameters()) for name, peer in peers.items()}
    if len(set(sizes.values())) != 1:
        raise SystemExit(f"The three models differ in parameter count, so not in architecture: {sizes}")
    for peer in peers.values():
        peer.model.to(args.device).eval()
    return config, peers


def timm_name(variant: str) -> str:
    return f"vit_{TIMM_SIZES[variant.partition('/')[0]]}_patch16_224"


def timm_overrides(config: VitrailConfig) -> dict:
    return {"img_size": config.image_size, "patch_size": config.patch_size, "depth": config.num_hidden_layers}


def inference_calls(
    peers: dict[str, Peer], x: torch.Tensor, context: Callable = contextlib.nullcontext
) -> dict[str, Callable[[], object]]:
    def call(peer: Peer):
        with torch.inference_mode(), context():
            return peer.logits(peer.model, x)

    return {name: functools.partial(call, peer) for name, peer in peers.items()}


def training_calls(
    peers: dict[str, Peer], x: torch.Tensor, labels: torch.Tensor, autocast: bool, device: str
) -> dict[str, Callable[[], object]]:
    """A step per peer, each with its own AdamW: zero the gradients, forward (under bf16 autocast if asked),
    cross-entropy, backward, optimizer step. The AdamW is the fused one, which the Trainer (and so
    scripts/train.py) uses by default with torch >= 2.8 (`adamw_torch_fused`); the plain `torch.optim.AdamW`
    loops over the parameters on a CPU and took a sixth of a bf16 step here."""

    def step(peer: Peer, optimizer: torch.optim.Optimizer):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(peer.logits(peer.model, x), labels)
        loss.backward()
        optimizer.step()

    return {
        name: functools.partial(step, peer, torch.optim.AdamW(peer.model.parameters(), lr=1e-5, fused=True))
        for name, peer in peers.items()
    }


# ---- rows -------------------------------------------------------------------------------------------------------


def model_rows(args, config, peers: dict[str, Peer], dtype_name: str, gemm: float | None, bf16_ok: bool):
    dtype, tag = DTYPES[dtype_name], "fp32" if dtype_name == "float32" else "bf16"
    labels = [f"inference {tag}" + (" (bf16 weights)" if tag == "bf16" else ""), f"training step {tag}"]
    labels[1] += " (fwd+bwd+AdamW" + (", autocast)" if tag == "bf16" else ")")
    if tag == "bf16" and not bf16_ok:
        reason = "not measurable: bf16 emulated"
        return [unmeasurable(labels[0], "ms/batch", reason), unmeasurable(labels[1], "ms/step", reason)]
    sync = synchronizer(args.device)
    flops = forward_flops(config) * args.batch
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(args.device)
    targets = torch.randint(0, NUM_LABELS, (args.batch,), generator=generator).to(args.device)
    rows = []
    # bf16 inference runs bf16 weights: the models are cast in place (random weights, so nothing is lost) and
    # back to fp32 for the autocast training step, which keeps fp32 master weights.
    for peer in peers.values():
        peer.model.to(dtype)
    inputs = x.to(dtype)
    inference = Row(labels[0], "ms/batch", flops=flops, gemm=gemm)
    calls = inference_calls(peers, inputs)
    calls[FLOOR] = shared_kernels(config, args.batch, dtype, args.device, training=False)
    rows.append(measure_row(inference, calls, args, sync))
    inference.note = "; ".join(filter(None, [inference.note, floor_note(inference)]))
    for backend in args.sdpa_backends:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def context(backend=backend):
            return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend]))

        row = Row(f"{labels[0]}, SDPA {backend} backend only", "ms/batch", flops=flops, gemm=gemm)
        rows.append(measure_row(row, inference_calls(peers, inputs, context), args, sync))
    if "inference" in args.compile:
        rows += compiled_rows(args, peers, inference, lambda compiled: inference_calls(compiled, inputs))
    for peer in peers.values():
        peer.model.float().train()
    autocast = tag == "bf16"
    training = Row(labels[1], "ms/step", flops=3 * flops, gemm=gemm)  # backward ~ twice the forward
    calls = training_calls(peers, x, targets, autocast, args.device)
    calls[FLOOR] = shared_kernels(config, args.batch, dtype, args.device, training=True)
    rows.append(measure_row(training, calls, args, sync))
    training.note = "; ".join(filter(None, [training.note, floor_note(training)]))
    if "training" in args.compile:
        rows += compiled_rows(
            args,
            peers,
            training,
            lambda compiled: training_calls(compiled, x, targets, autocast, args.device),
        )
    if autocast and args.fp8:
        rows += fp8_rows(args, peers["vitrail"], x, targets, training)
    for peer in peers.values():
        peer.model.zero_grad(set_to_none=True)
        peer.model.eval()
    gc.collect()  # the optimizers' state
    return rows


def fp8_problem(device: str) -> str | None:
    """Why float8 training cannot be measured here, or None."""
    if device != "cuda" or torch.cuda.get_device_capability() < FP8_MIN_CAPABILITY:
        return "not measurable: needs an NVIDIA GPU with compute capability >= 8.9"
    if importlib.util.find_spec("torchao") is None:
        return "not measurable: needs torchao (pip install torchao)"
    return None


def fp8_rows(args, vitrail: Peer, x: torch.Tensor, targets: torch.Tensor, bf16: Row) -> list[Row]:
    """vitrail's bf16 training step with its encoder's linear layers in float8, converted as `vitrail train --fp8
    true` converts them, on a copy of the model; with `--compile training`, compiled too. The peers have no such
    switch; the note gives the speed-up over the bf16 step."""
    label = "training step bf16, fp8 linear layers (torchao)"
    problem = fp8_problem(args.device)
    if problem:
        return [unmeasurable(label, "ms/step", problem)]
    from vitrail.training import convert_to_fp8

    converted = {"vitrail": Peer(convert_to_fp8(copy.deepcopy(vitrail.model)), vitrail.logits)}
    make_calls = functools.partial(training_calls, x=x, labels=targets, autocast=True, device=args.device)
    row = Row(label, "ms/step", flops=bf16.flops, gemm=bf16.gemm)
    row.missing = {name: "– (no fp8 switch)" for name in PEERS[1:]}
    rows = [measure_row(row, make_calls(converted), args, synchronizer(args.device))]
    if "vitrail" in row.values:
        ratio = statistics.median(bf16.values["vitrail"]) / statistics.median(row.values["vitrail"])
        row.note = "; ".join(filter(None, [row.note, f"speed-up over the bf16 step: {ratio:.2f}x"]))
        if "training" in args.compile:
            rows += compiled_rows(args, converted, row, make_calls)
    return rows


def compiled_rows(args, peers, eager: Row, make_calls: Callable[[dict[str, Peer]], dict]) -> list[Row]:
    """`eager`'s measure with `torch.compile(model)` per peer (parameters shared): the first call's time, which
    includes the compile, then interleaved rounds; the note gives the speed-up over `eager`."""
    sync = synchronizer(args.device)
    compiled = {name: Peer(torch.compile(peer.model), peer.logits) for name, peer in peers.items()}
    calls = make_calls(compiled)
    first = Row(f"{eager.label}, torch.compile: first call (compiles)", "s")
    for name, call in calls.items():
        first.values[name] = [median_time(call, 1, sync)]
    progress(first.label)
    row = measure_row(
        Row(f"{eager.label}, torch.compile", eager.unit, flops=eager.flops, gemm=eager.gemm),
        calls,
        args,
        sync,
    )
    speedups = [
        f"{name} {statistics.median(eager.values[name]) / statistics.median(row.values[name]):.2f}x"
        for name in PEERS
        if name in row.values and name in eager.values
    ]
    row.note = "speed-up over eager: " + ", ".join(speedups)
    torch._dynamo.reset()
    return [row, first]


def photo_crops(count: int, seed: int = 0) -> list[PIL.Image.Image]:
    """`count` crops of varied size and place (120-427 x 160-640 px) of scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    photos = [PIL.Image.fromarray(array) for array in load_sample_images().images]
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        width, height = int(rng.integers(160, 641)), int(rng.integers(120, 428))
        left, top = int(rng.integers(0, 640 - width + 1)), int(rng.integers(0, 427 - height + 1))
        crops.append(photos[index % 2].crop((left, top, left + width, top + height)))
    return crops


def load_processor_class(path: str):
    """`VitrailImageProcessor` from another copy of image_processing_vitrail.py (it imports no vitrail module)."""
    spec = importlib.util.spec_from_file_location("baseline_image_processing_vitrail", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VitrailImageProcessor


def processor_row(args, processors: dict, crops) -> Row:
    size = args.image_size
    row = Row(f"image processor, {len(crops)} photo crops -> {size}x{size}", "img/s", higher_is_better=True)
    calls = {
        name: functools.partial(processor, crops, return_tensors="pt")
        for name, processor in processors.items()
    }
    if args.baseline_processor:
        baseline = load_processor_class(args.baseline_processor)(size={"height": size, "width": size})
        calls["baseline"] = functools.partial(baseline, crops, return_tensors="pt")
    per_second(measure_row(row, calls, args, lambda: None), len(crops))
    row.missing["timm"] = "– (no processor object)"
    row.note = f"transformers: ViTImageProcessor, {processors['transformers'].backend} backend"
    if "baseline" in row.values:
        baseline_values = row.values.pop("baseline")
        ratios = [v / b for v, b in zip(row.values["vitrail"], baseline_values, strict=True)]
        row.note += (
            f"; baseline {Path(args.baseline_processor).name}: {spread(baseline_values, digits=0)} img/s, "
            f"vitrail ÷ baseline {spread(ratios, digits=2)}"
        )
    return row


def per_second(row: Row, count: int) -> Row:
    """Seconds per call -> items per second."""
    row.values = {name: [count / seconds for seconds in times] for name, times in row.values.items()}
    return row


def pipeline_row(args, peers: dict[str, Peer], processors: dict, images) -> Row:
    row = Row(
        f'pipeline("image-classification"), {len(images)} PIL images, batch {args.batch}',
        "img/s",
        higher_is_better=True,
    )
    pipes = {
        name: pipeline(
            "image-classification",
            model=peers[name].model,
            image_processor=processors[name],
            device=args.device,
        )
        for name in ("vitrail", "transformers")
    }
    calls = {name: functools.partial(pipe, images, batch_size=args.batch) for name, pipe in pipes.items()}
    per_second(measure_row(row, calls, args, synchronizer(args.device)), len(images))
    row.missing["timm"] = "– (no pipeline for a bare timm model)"
    return row


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every millisecond by psutil, minus the
    resident memory when it started."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.growth = self.peak - self.start
        return False


def from_pretrained_rows(args, config, peers: dict[str, Peer]) -> list[Row]:
    """Save each peer in its own format, then time loading it back and record the memory it took."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        peers["vitrail"].model.save_pretrained(folder / "vitrail")
        peers["transformers"].model.save_pretrained(folder / "transformers")
        (folder / "timm").mkdir()
        save_file(peers["timm"].model.state_dict(), folder / "timm" / "model.safetensors")
        loaders = {
            "vitrail": lambda: VitrailForImageClassification.from_pretrained(folder / "vitrail"),
            "transformers": lambda: ViTForImageClassification.from_pretrained(folder / "transformers"),
            "timm": lambda: timm.create_model(
                timm_name(args.variant),
                pretrained=True,
                pretrained_cfg_overlay={"file": str(folder / "timm" / "model.safetensors")},
                num_classes=NUM_LABELS,
                **timm_overrides(config),
            ),
        }
        memory = {name: [] for name in loaders}

        def load(name: str) -> float:
            gc.collect()
            with PeakRSS() as peak:
                start = time.perf_counter()
                model = loaders[name]()
                elapsed = time.perf_counter() - start
            del model
            memory[name].append(peak.growth / 2**20)
            return elapsed

        for name in loaders:  # warm-up: lazy imports and first-use set-up of each library
            load(name)
            memory[name].clear()
        seconds = interleaved({name: functools.partial(load, name) for name in loaders}, args.load_rounds)
    progress("from_pretrained")
    label = f"from_pretrained, {args.variant} checkpoint in a temporary folder"
    return [
        Row(label, "s", values=seconds),
        Row(f"{label}: peak RSS growth (psutil, sampled every 1 ms)", "MB", values=memory),
    ]


# ---- command line -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="B/16", help="vitrail size name: Ti/16, S/16, B/16 or L/16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; 2 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layers", type=int, help="override the variant's depth (a small model for tests)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inference,training",
        default="",
        help="add torch.compile rows: inference, training or both (the default); minutes on a CPU",
    )
    parser.add_argument("--sdpa-backends", default="", help="comma-separated: flash, efficient, cudnn, math")
    parser.add_argument(
        "--baseline-processor", help="another image_processing_vitrail.py to time beside vitrail's"
    )
    parser.add_argument("--force-bf16", action="store_true", help="measure bf16 even where it is emulated")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="add vitrail's bf16 training step with fp8 linear layers (torchao; a GPU of compute capability 8.9+)",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 call each, few images: a smoke run")
    args = parser.parse_args(argv)

    size, _, patch = args.variant.partition("/")
    if size not in TIMM_SIZES or patch != "16":
        parser.error(
            f"--variant {args.variant!r}: choose one of {[f'{s}/16' for s in TIMM_SIZES]} (timm's "
            "vit_*_patch16 sizes)"
        )
    args.dtypes = [name.strip() for name in args.dtype.split(",") if name.strip()]
    unknown = [name for name in args.dtypes if name not in DTYPES]
    if unknown or not args.dtypes:
        parser.error(f"--dtype {args.dtype!r}: write a comma-separated list of {list(DTYPES)}")
    args.compile = [name.strip() for name in args.compile.split(",") if name.strip()]
    if set(args.compile) - {"inference", "training"}:
        parser.error(f"--compile: write inference, training or both, got {','.join(args.compile)!r}")
    args.sdpa_backends = [name.strip() for name in args.sdpa_backends.split(",") if name.strip()]
    unknown = [name for name in args.sdpa_backends if name not in SDPA_BACKENDS]
    if unknown:
        parser.error(f"--sdpa-backends: unknown {unknown}; choose from {list(SDPA_BACKENDS)}")
    for name in ("batch", "rounds", "threads", "image_size", "layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.image_size % 16:
        parser.error(f"--image-size {args.image_size} is not a multiple of the 16-pixel patch")
    if args.device == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        parser.error(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, {built}); "
            "use --device cpu"
        )
    if args.baseline_processor and not Path(args.baseline_processor).is_file():
        parser.error(f"--baseline-processor {args.baseline_processor!r} is not a file")
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.iters = 1 if args.quick else 3
    args.load_rounds = 1 if args.quick else 3
    args.processor_images = 8 if args.quick else 96
    args.pipeline_images = args.batch if args.quick else min(4 * args.batch, 64)
    return args


def bf16_dense_peak(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU `device_name` names, if `BF16_DENSE_PEAKS` knows it."""
    return next((peak for part, peak in BF16_DENSE_PEAKS.items() if part in device_name), None)


def add_mfu(row: Row, peak: float) -> None:
    """Append each measured peer's model FLOP utilisation against `peak` to `row`'s note."""
    if not (row.flops and row.values):
        return
    mfu = ", ".join(
        f"{name} {row.flops / statistics.median(values) / peak:.1%}" for name, values in row.values.items()
    )
    row.note = "; ".join(filter(None, [row.note, f"MFU: {mfu}"]))


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cpu, flags = cpu_description()
    bf16_ok = native_bf16(args.device, flags) or args.force_bf16
    load_before = os.getloadavg()[0]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"device: {args.device} ({device_name}); CPU: {cpu}, flags: {' '.join(flags) or 'none of ' + str(CPU_FLAGS)}, "
        f"{os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
        f"Python {platform.python_version()}",
    ]
    gemms = {}
    for name in args.dtypes:
        if name == "bfloat16" and not bf16_ok:
            lines.append(f"GEMM {GEMM_SIZE}² {name}: not measurable: bf16 emulated (no amx_bf16/avx512_bf16)")
            continue
        gemms[name] = gemm_rate(DTYPES[name], args.device)
        lines.append(f"GEMM {GEMM_SIZE}² {name}: {gemms[name] / 1e9:,.0f} GFLOP/s")

    config, peers = build_peers(args)
    flops = forward_flops(config)
    lines.append(
        f"model: {args.variant} at {args.image_size} px, {config.num_hidden_layers} layers, "
        f"{sum(p.numel() for p in peers['vitrail'].model.parameters()) / 1e6:.1f} M parameters, "
        f"{flops / 1e9:.2f} GFLOP per image forward; batch {args.batch}; {args.rounds} rounds"
    )
    rows = []
    for name in args.dtypes:
        rows += model_rows(args, config, peers, name, gemms.get(name), bf16_ok)
    peak = bf16_dense_peak(device_name)
    if peak:
        lines.append(
            f"MFU: against the {device_name}'s dense bf16 peak, {peak / 1e12:,.0f} TFLOP/s, in every row"
        )
        for row in rows:
            add_mfu(row, peak)

    size = {"height": args.image_size, "width": args.image_size}
    processors = {"vitrail": VitrailImageProcessor(size=size), "transformers": ViTImageProcessor(size=size)}
    crops = photo_crops(max(args.processor_images, args.pipeline_images))
    rows.append(processor_row(args, processors, crops[: args.processor_images]))
    rows.append(pipeline_row(args, peers, processors, crops[: args.pipeline_images]))
    rows += from_pretrained_rows(args, config, peers)
    lines.append(f"load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (1 min)")
    report = "\n".join([*lines, "", table(rows)])
    print(report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
