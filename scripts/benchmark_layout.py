"""Measure three layout choices of the ViT block at ViT-B/16 shapes on this CPU.

Each question pits layout A against layout B, both computing the same function from the same parameters:

  (a) attention input projection, full attention block (projection -> SDPA -> out-projection):
      A = one fused Linear(768, 2304) split into q, k, v;  B = three Linear(768, 768).
  (b) where the learned positions are added (class token + 196 patch tokens):
      A = concatenate the class token, then add the (1, 197, 768) table;
      B = add rows 1: to the patches and row 0 to the class token, then concatenate.
  (c) MLP Linear(768, 3072) -> GELU -> Linear(3072, 768): A = exact erf GELU;  B = tanh approximation.

Every question is timed at batch 8 and 32 (197 tokens, width 768, 12 heads) for inference (forward under
`torch.inference_mode`) and training (forward + backward, gradients for the parameters and the input), in fp32
and, where the CPU has native bf16 (AVX512-BF16 or AMX), under bf16 autocast. Each round times A and B back to
back, alternating which goes first; the table gives the median ms per call, B/A as the median of the per-round
ratios, and their interquartile range as the noise band. Freed memory is kept for reuse (`keep_freed_memory`;
`--stock-malloc` turns that off), so that page faults do not drown the small ops.

Command (`--threads`, `--batch-sizes`, `--rounds`, `--precisions fp32 bf16`; `--quick` is a ~15 s smoke run):

    .venv/bin/python scripts/benchmark_layout.py

Here it takes 2.3-2.6 min, less when the machine is quiet. "Here" is a 2-core AMD EPYC VM (Zen 3: AVX2, no
AVX-512, no AMX, no native bf16), torch 2.14.1, shared with other jobs: tasks queued for a CPU 30-73% of each
run, one block's time varied up to 2.6x between runs, and a single B/A wanders by about +-10%. The verdicts
below hold over three default runs and one `--threads 1` run (ranges are over those four).

Result here, fp32:
  (a) qkv: no reliable winner. Inference B/A 0.88-1.12 at batch 8, 0.98-1.01 at 32; training 0.96-1.14.
      The two GEMMs, identical FLOPs in both layouts, are 70-80% of the time. Keep the fused (C, 3C)
      projection for its single parameter, not for speed.
  (b) positions: irrelevant. Inference B/A 0.99-1.11. In training add-then-concat runs a few more small
      kernels (slices and their gradients): 1.1-1.2x with one thread; 1.75-1.85x (once 0.99) with two
      threads on the busy machine, where each parallel kernel waits for a scheduler slice (these timings
      snap to multiples of 4 ms), but 0.99-1.09 in a quiet spell. The gap is at most 33 ms, once per step,
      against 12 layers at 1-5 s each: under 0.3% of a ViT-B/16 training step.
  (c) GELU: tanh is not faster. Inference B/A 0.96-1.08 (the erf form usually ahead by ~5%), training
      0.94-1.08. Keep the exact GELU that the original ViT checkpoints were trained with.
bf16 autocast (`--precisions bf16 --batch-sizes 8 --rounds 3`, 4.5 min): emulated on this CPU, so the
attention and MLP blocks are 2-6x slower than fp32 for inference and 12-36x slower for training (attention
trains in 8-10 s per call instead of 0.3-0.8 s). The ratios there (qkv 1.09 inference / 0.81 training,
positions 1.20 / 1.29, GELU 1.05 / 0.99) are moot until a CPU with AMX or AVX512-BF16 reruns them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ViT-B/16 at 224 px.
WIDTH = 768
HEADS = 12
MLP_WIDTH = 3072
PATCHES = 196
TOKENS = PATCHES + 1


class FusedQKVAttention(nn.Module):
    """Attention with one (C, 3C) input projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, 3C) -> (3, B, heads, N, C/heads)
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        # (B, heads, N, C/heads) -> (B, N, C)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class SeparateQKVAttention(nn.Module):
    """Attention with three (C, C) input projections."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    @classmethod
    def like(cls, fused: FusedQKVAttention) -> SeparateQKVAttention:
        # Same weights as `fused`, so the timed variants are checked to compute the same function.
        new = cls(fused.proj.in_features, fused.heads)
        with torch.no_grad():
            for linear, w, b in zip(
                (new.q, new.k, new.v), fused.qkv.weight.chunk(3), fused.qkv.bias.chunk(3), strict=True
            ):
                linear.weight.copy_(w)
                linear.bias.copy_(b)
        new.proj.load_state_dict(fused.proj.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        # (B, N, C) -> (B, heads, N, C/heads)
        q = self.q(x).view(b, n, self.heads, d).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, d).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, d).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)
        # (B, heads, N, C/heads) -> (B, N, C)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class ConcatThenAdd(nn.Module):
    """Prepend the class token, then add the whole (1, 1 + P, C) position table."""

    def __init__(self, cls_token: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(cls_token.clone())
        self.positions = nn.Parameter(positions.clone())

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        # (B, P, C) -> (B, 1 + P, C)
        return torch.cat([cls, patches], dim=1) + self.positions


class AddThenConcat(nn.Module):
    """Add positions to the patches and to the class token separately, then prepend the class token."""

    def __init__(self, cls_token: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__()
        # One (1, 1 + P, C) table sliced at run time, not two tables: both layouts then load the same
        # checkpoint, which is how the question arises in practice (the model, not the file format, decides).
        self.cls_token = nn.Parameter(cls_token.clone())
        self.positions = nn.Parameter(positions.clone())

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # The class token's add is on one row, before the batch expand, so it costs nothing per image.
        cls = (self.cls_token + self.positions[:, :1]).expand(patches.shape[0], -1, -1)
        # (B, P, C) -> (B, 1 + P, C)
        return torch.cat([cls, patches + self.positions[:, 1:]], dim=1)


class Mlp(nn.Module):
    """The transformer MLP with a choice of GELU."""

    def __init__(self, width: int, hidden: int, approximate: str) -> None:
        super().__init__()
        self.approximate = approximate
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


@dataclass
class Question:
    label: str  # "A vs B", as the table prints it
    # Builds (module A, module B, input shape, input dtype under bf16 autocast, fp32 tolerance of A vs B).
    build: Callable[[int], tuple[nn.Module, nn.Module, tuple[int, ...], torch.dtype, float]]


def build_attention(batch: int):
    fused = FusedQKVAttention(WIDTH, HEADS)
    # Under CPU autocast LayerNorm returns fp32, so the attention input stays fp32 and each of the three
    # separate projections casts it to bf16 on its own: part of the real cost of layout B.
    return fused, SeparateQKVAttention.like(fused), (batch, TOKENS, WIDTH), torch.float32, 1e-5


def build_positions(batch: int):
    cls_token = torch.randn(1, 1, WIDTH) * 0.02
    positions = torch.randn(1, TOKENS, WIDTH) * 0.02
    a, b = ConcatThenAdd(cls_token, positions), AddThenConcat(cls_token, positions)
    # The patch embedding is a Conv2d, which autocast runs in bf16: the patches arrive in bf16.
    return a, b, (batch, PATCHES, WIDTH), torch.bfloat16, 1e-6


def build_mlp(batch: int):
    exact = Mlp(WIDTH, MLP_WIDTH, "none")
    tanh = Mlp(WIDTH, MLP_WIDTH, "tanh")
    tanh.load_state_dict(exact.state_dict())
    # The tanh form differs from erf by up to 4.7e-4 per unit, so only a loose check applies.
    return exact, tanh, (batch, TOKENS, WIDTH), torch.float32, 1e-2


QUESTIONS = {
    "qkv": Question("qkv: fused vs 3 separate", build_attention),
    "pos": Question("pos: cat+add vs add+cat", build_positions),
    "gelu": Question("gelu: erf vs tanh", build_mlp),
}


def make_runner(module: nn.Module, x: torch.Tensor, bf16: bool, train: bool) -> Callable[[int], None]:
    """Return `run(calls)`, which performs `calls` steps of one variant."""
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if not train:

        def run(calls: int) -> None:
            with torch.inference_mode(), autocast():
                for _ in range(calls):
                    module(x)

        return run

    x = x.detach().requires_grad_(True)  # the block's input comes from earlier layers and needs a gradient
    params = list(module.parameters())
    with autocast():
        grad_out = torch.ones_like(module(x))

    def run(calls: int) -> None:
        for _ in range(calls):
            # set_to_none, as `optimizer.zero_grad()` does: backward then writes fresh gradients, not `+=`.
            for p in params:
                p.grad = None
            x.grad = None
            with autocast():
                out = module(x)
            out.backward(grad_out)

    return run


def time_pair(
    run_a: Callable[[int], None], run_b: Callable[[int], None], rounds: int, warmup_s: float, sample_s: float
) -> tuple[list[float], list[float]]:
    """Per-call seconds of A and B: one sample of each per round, interleaved."""
    # The first calls create oneDNN primitives and grow the allocator's pools; keep them out of the samples.
    # At least one call each, which for the large cases is all the warm-up the time budget allows.
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run_a(1)
        per_call = time.perf_counter() - t0
        run_b(1)
        if time.perf_counter() - start >= warmup_s:
            break
    # Small ops take well under a millisecond, where timer and Python overhead would dominate one call:
    # repeat them so that each sample lasts at least `sample_s`. A and B use the same count.
    calls = max(1, math.ceil(sample_s / max(per_call, 1e-6)))

    # A and B back to back form one round, so both see about the same background load, and the order flips
    # every round (A B B A A B ...) so that load rising or falling within a round favours neither.
    times_a, times_b = [], []
    for r in range(rounds):
        pair = ((run_a, times_a), (run_b, times_b))
        for run, times in pair if r % 2 == 0 else pair[::-1]:
            t0 = time.perf_counter()
            run(calls)
            times.append((time.perf_counter() - t0) / calls)
    return times_a, times_b


def native_bf16() -> bool:
    """Whether oneDNN has a bf16 path on this CPU (AVX512-BF16 or AMX); without one, bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # the op is private; assume yes rather than hide a precision
        return True


def check_same_function(a: nn.Module, b: nn.Module, x: torch.Tensor, tolerance: float) -> None:
    with torch.inference_mode():
        ya, yb = a(x.float()), b(x.float())
    err = (ya - yb).abs().max().item()
    if err > tolerance:
        raise AssertionError(f"{type(a).__name__} and {type(b).__name__} disagree by {err:.2e} > {tolerance}")


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory instead of returning it to the kernel; False where that is not possible.

    By default glibc serves large blocks with fresh mmap pages and hands them back on free, so every (B, N, C)
    temporary costs a page fault per 4 KiB on first touch. In this VM that is ~2-7 us a page: 6 ms of faults
    against 0.8 ms of work for the position add at batch 8, and the count flips with glibc's adaptive
    threshold, so the layouts' own costs drown. Caching allocators (jemalloc, tcmalloc, PyTorch's CUDA one)
    keep freed memory in the same way.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))


def cpu_stall_s() -> float | None:
    """Seconds since boot in which a runnable task waited for a CPU (Linux PSI), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(dict(field.split("=") for field in f.readline().split()[1:])["total"]) / 1e6
    except (OSError, ValueError, KeyError):
        return None


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=7, help="A/B samples per variant (default 7)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=list(QUESTIONS), default=list(QUESTIONS))
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["fp32", "bf16"],
        help="default: fp32, and bf16 autocast where the CPU has native bf16 (emulated, it is 2-36x slower)",
    )
    parser.add_argument("--warmup", type=float, default=0.3, help="seconds of warm-up per comparison")
    parser.add_argument("--sample", type=float, default=0.05, help="minimum seconds per timed sample")
    parser.add_argument(
        "--stock-malloc",
        action="store_true",
        help="keep glibc's default of returning freed memory to the kernel",
    )
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 rounds, short warm-up: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.rounds, args.warmup, args.sample = [8], 3, 0.05, 0.01
    if args.precisions is None:
        args.precisions = ["fp32", "bf16"] if native_bf16() else ["fp32"]
        if "bf16" not in args.precisions:
            print(
                "No native bf16 on this CPU: skipping bf16 (`--precisions fp32 bf16` forces it).",
                file=sys.stderr,
            )

    torch.set_num_threads(args.threads)
    reuse_memory = not args.stock_malloc and keep_freed_memory()
    torch.manual_seed(0)
    began, stall_began = time.perf_counter(), cpu_stall_s()

    rows = []
    for key in args.only:
        question = QUESTIONS[key]
        for batch in args.batch_sizes:
            module_a, module_b, shape, bf16_input_dtype, tolerance = question.build(batch)
            x32 = torch.randn(shape)
            check_same_function(module_a, module_b, x32, tolerance)
            for precision in args.precisions:
                bf16 = precision == "bf16"
                x = x32.to(bf16_input_dtype) if bf16 else x32
                for mode in ("infer", "train"):
                    train = mode == "train"
                    module_a.train(train)
                    module_b.train(train)
                    gc.collect()
                    times_a, times_b = time_pair(
                        make_runner(module_a, x, bf16, train),
                        make_runner(module_b, x, bf16, train),
                        args.rounds,
                        args.warmup,
                        args.sample,
                    )
                    med_a, med_b = statistics.median(times_a), statistics.median(times_b)
                    # The ratio is taken per round, then the median: a busy spell slows both members of a
                    # round and cancels, where it would shift a ratio of two separately taken medians.
                    ratios = [b / a for a, b in zip(times_a, times_b, strict=True)]
                    ratio = statistics.median(ratios)
                    low, high = quartiles(ratios)
                    rows.append((question.label, batch, precision, mode, med_a, med_b, ratio, low, high))
                    print(
                        f"[{time.perf_counter() - began:5.0f} s] {question.label:26} B={batch:<3} "
                        f"{precision} {mode}: A {med_a * 1e3:8.3f} ms  B {med_b * 1e3:8.3f} ms  "
                        f"B/A {ratio:.3f}",
                        file=sys.stderr,
                    )

    # With no more threads than cores ours never queue, so time spent waiting means other work shared them.
    elapsed, stall_ended = time.perf_counter() - began, cpu_stall_s()
    busy = (
        ""
        if stall_ended is None
        else f", tasks queued for a CPU {(stall_ended - stall_began) / elapsed:.0%} of it"
    )
    print(
        f"\ntorch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16 {native_bf16()}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
        f"{'freed memory reused' if reuse_memory else 'stock malloc'}, {elapsed:.0f} s"
        f"{busy}. ms: median per call. B/A: median of the per-round ratios (< 1: B is faster).\n"
    )
    print("| A vs B | batch | precision | pass | A ms | B ms | B/A | B/A IQR |")
    print("|---|--:|---|---|--:|--:|--:|--:|")
    for label, batch, precision, mode, med_a, med_b, ratio, low, high in rows:
        print(
            f"| {label} | {batch} | {precision} | {mode} | {med_a * 1e3:.3f} | {med_b * 1e3:.3f} "
            f"| {ratio:.3f} | {low:.2f}–{high:.2f} |"
        )


if __name__ == "__main__":
    main()
