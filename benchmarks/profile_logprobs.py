#!/usr/bin/env python
"""Where one fused log-prob call spends its time: torch.profiler's kernel table per fastnpo impl.

    python benchmarks/profile_logprobs.py --device cuda                       # N=8192, D=4096, V=128256, bf16
    .venv/bin/python benchmarks/profile_logprobs.py --device cpu --shape 64x32x1031 --impls torch

bench_logprobs.py says how fast each design is; this says why: for each impl, a few warm-up
forward + backward calls, then PROFILED_CALLS profiled ones, and the operators / kernels sorted by
their own device time (per call), with the wall time of one call beside them. The GPU suite runs it
as its `profile` part (the tables go to log.txt).
"""

from __future__ import annotations

import argparse
import time

import torch

import fastnpo
from fastnpo.ops import cublas

PROFILED_CALLS = 3


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        n, d, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shape {text!r}: expected NxDxV, e.g. 8192x4096x128256") from None
    return n, d, v


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_impl(impl: str, hidden, weight, labels, *, row_limit: int) -> None:
    device = hidden.device

    def call():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        fastnpo.token_logprobs(h, w, labels, impl=impl).sum().backward()

    for _ in range(2):  # compile, autotune, allocator warm-up
        call()
    synchronize(device)
    started = time.perf_counter()
    call()
    synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(PROFILED_CALLS):
            call()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- impl={impl}: one fwd+bwd call {wall_ms:.1f} ms wall; profile of {PROFILED_CALLS} calls ---")
    print(prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=70))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="8192x4096x128256", help="NxDxV")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--impls", default="cublas,triton", help="comma-separated fastnpo impls")
    parser.add_argument("--rows", type=int, default=15, help="table rows per impl")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, d, v = parse_shape(args.shape)
    generator = torch.Generator(device="cpu").manual_seed(0)
    # logits of std ~1.5 (hidden and weight entries N(0, 1) and N(0, (1.5 / sqrt(d))^2))
    hidden = torch.randn(n, d, generator=generator).to(device, dtype)
    weight = (torch.randn(v, d, generator=generator) * (1.5 / d**0.5)).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=generator).to(device)
    mode = cublas.matmul_mode(device.type, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    split = cublas.split_kernels(device)  # where Triton runs, the cublas impl is the split design
    layout = (
        f"split design, dlogits blocks (rows, vocab) {cublas.split_blocks(n, v, hidden.element_size(), split[2])}"
        if split is not None
        else f"torch blocks (rows, vocab) {cublas.blocks(n, v)}"
    )
    print(
        f"profile: N={n} D={d} V={v} {args.dtype} on {device} ({name}); "
        f"torch {torch.__version__}; cublas: {layout}, matmul_mode {mode}; "
        f"allow_tf32 {torch.backends.cuda.matmul.allow_tf32}"
    )
    for impl in filter(None, args.impls.split(",")):
        profile_impl(impl, hidden, weight, labels, row_limit=args.rows)


if __name__ == "__main__":
    main()
