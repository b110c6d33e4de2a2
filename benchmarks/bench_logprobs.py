#!/usr/bin/env python
"""Per-token log-probs from hidden states and the lm_head, every implementation and peer side by side.

One process, one command:

    .venv/bin/python benchmarks/bench_logprobs.py            # CPU: 3 shapes, fp32, ~4 minutes on 2 cores
    .venv/bin/python benchmarks/bench_logprobs.py --quick    # the small shapes only, 1 timed repeat
    python benchmarks/bench_logprobs.py --device cuda        # GPU: N=8192, 4 real (D, V), bf16

Contenders (see README.md): naive PyTorch (full logits), torch.compile of naive, fastnpo impl="torch",
fastnpo impl="triton", Liger-Kernel's fused linear cross-entropy (reduction="none") and its chunked
selective log-prob op, Cut Cross-Entropy (reduction="none"), the NPO loss (npo-naive / -unfused /
-fused / -one-pass / -epilogue: npo_loss with impl="naive", then design="two_call", "two_sweep",
"one_pass", "epilogue") and the epilogue design's forward-only form
(fastnpo.ops.experimental.epilogue.epilogue_token_logprobs, fwd only).
A contender that cannot run here is recorded as skipped with the reason, never dropped.

Modes: "fwd" (under no_grad: reference log-probs, evaluation) and "fwd+bwd" (gradients for hidden and
weight from a random per-token upstream gradient; the NPO rows use the loss's own gradient).

Writes runs/benchmarks/logprobs_<device>[_<dtype>][_randn][_quick].{csv,md,png} (--out-dir benchmarks/results:
the committed results).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import (
    MIB,
    OUT_DIR,
    bar_panel,
    clean_memory,
    command_line,
    date_line,
    device_kind,
    fmt,
    load_average,
    machine_info,
    machine_line,
    make_inputs,
    parse_shape,
    pyplot,
    read_results_csv,
    sample_ms,
    save_figure,
    synchronize,
    versions_line,
    write_csv,
    write_markdown,
)

import fastnpo
from fastnpo.losses import npo_from_logprobs
from fastnpo.ops import IMPLS
from fastnpo.ops.backends import DEPRECATED_IMPLS
from fastnpo.ops.experimental.epilogue import epilogue_token_logprobs
from fastnpo.profiling import peak_memory_during

CUDA_SHAPES = [(8192, 4096, 128256), (8192, 3584, 152064), (8192, 2304, 256000), (8192, 2048, 128256)]
CPU_SHAPES = [(2048, 256, 131072), (1024, 256, 32768), (512, 128, 32000)]  # the first is the CPU target
CPU_QUICK_SHAPES = [(1024, 256, 32768), (512, 128, 32000)]
CUDA_QUICK_SHAPES = [(8192, 2048, 128256)]
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
MODES = ("fwd", "fwd+bwd")
NPO_SEQ_LEN = 512
NPO_BETA = 0.1


def logit_profile(hidden, weight, labels, rows: int = 256) -> dict:
    """Statistics of the softmax over a sample of rows (fp32 logits)."""
    logits = hidden[:rows].float() @ weight.float().T
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    target = probs.gather(1, labels[:rows, None])[:, 0]
    return {
        "mean p(target)": float(target.mean()),
        "rows p(target)>0.9": float((target > 0.9).float().mean()),
        "top-1 acc": float((logits.argmax(1) == labels[:rows]).float().mean()),
        "NLL": float(-logp.gather(1, labels[:rows, None]).mean()),
        "entropy": float(-(probs * logp).sum(1).mean()),
        "probs >= 2^-12": float((probs >= 2.0**-12).float().mean()),
        "logit std": float(logits.std(1).mean()),
        "max |logit|": float(logits.abs().max()),
    }


# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    fn: Callable | None  # token kind: (h, w, y) -> fp32 [N] log-probs; npo kind: (h, w, y) -> scalar loss
    kind: str = "token"  # "token" or "npo"
    skip: str | None = None
    note: str = ""
    modes: tuple = MODES
    mode_skip: dict = field(default_factory=dict)
    impl: str = "auto"  # npo kind only
    design: str = "two_call"  # npo kind only: npo_loss's design (fastnpo.ops.DESIGNS)


def naive_logprobs(hidden, weight, labels):
    """What torch.compile sees: matmul, upcast, log_softmax, gather (labels never ignored here)."""
    logits = (hidden @ weight.T).float()
    return logits.log_softmax(-1).gather(-1, labels[:, None])[:, 0]


def _fastnpo_impl(h, w, y, *, impl, filter_eps="auto"):
    return fastnpo.token_logprobs(h, w, y, impl=impl, filter_eps=filter_eps)


def build_contenders(device: torch.device, dtype: torch.dtype, skip_compile: bool) -> list[Contender]:
    on_cuda = device.type == "cuda"
    cuda_only = f"CUDA-only Triton kernel; device is {device.type}"
    out = [
        Contender(
            "naive",
            lambda h, w, y: fastnpo.token_logprobs(h, w, y, impl="naive"),
            note="fastnpo impl='naive': full [N, V] logits",
        ),
    ]
    if skip_compile:
        out.append(Contender("compile(naive)", None, skip="--no-compile"))
    else:
        out.append(Contender("compile(naive)", None, note="torch.compile(matmul, float, log_softmax, gather)"))
    out.append(
        Contender(
            "fastnpo-torch",
            lambda h, w, y: fastnpo.token_logprobs(h, w, y, impl="torch"),
            note="vocab-chunked PyTorch",
        )
    )
    # Every fastnpo design but the ones above: each impl name fastnpo.ops.IMPLS lists (a design added
    # there is benchmarked without touching this file). Off CUDA the Triton kernels run only under
    # TRITON_INTERPRET=1 (~1 ms per program iteration: tiny shapes only, e.g. the GPU suite's --smoke).
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for impl in IMPLS:
        if impl in ("auto", "naive", "torch") or impl in DEPRECATED_IMPLS:
            continue
        out.append(
            Contender(
                f"fastnpo-{impl}",
                functools.partial(_fastnpo_impl, impl=impl),
                skip=None
                if on_cuda or interpreting or impl != "triton"
                else "needs CUDA (or TRITON_INTERPRET=1, ~1 ms per program iteration: tiny shapes only)",
                note=(
                    f"impl='{impl}', filter_eps='auto' (2^-12 for bf16/fp16, exact for fp32)"
                    + ("" if on_cuda else "; Triton interpreter on CPU" if interpreting else "")
                    if impl == "triton"
                    else f"impl='{impl}': vocabulary-blocked library matmuls, exact, no atomics"
                ),
            )
        )
        if impl == "triton":  # the same kernels without gradient filtering: exact gradients
            out.append(
                Contender(
                    "fastnpo-triton-exact",
                    functools.partial(_fastnpo_impl, impl=impl, filter_eps=None),
                    skip=out[-1].skip,
                    note="impl='triton', filter_eps=None (exact gradients)",
                )
            )

    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger_ce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        out.append(
            Contender(
                "liger-flce",
                lambda h, w, y: -liger_ce(w, h, y).float(),
                skip=None if on_cuda else cuda_only,
                note="LigerFusedLinearCrossEntropyLoss(reduction='none'), defaults (accum_dtype=None)",
            )
        )
    except Exception as error:
        out.append(Contender("liger-flce", None, skip=f"liger-kernel not importable: {error}"))
    try:
        from liger_kernel.chunked_loss.fused_linear_ppo import _SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE as chunk
        from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction as SelLogp

        out.append(
            Contender(
                "liger-selective-logprob",
                lambda h, w, y: SelLogp.apply(h, w, y, None, 1.0, chunk),
                note="liger_kernel.chunked_loss.fused_linear_ppo._ChunkedSelectiveLogProbFunction "
                "(private; chunked PyTorch, its GRPO/PPO per-token log-prob op)",
            )
        )
    except Exception as error:
        out.append(
            Contender(
                "liger-selective-logprob",
                None,
                skip=f"not in this liger-kernel (needs the 0.8.x chunked selective log-prob op): {error}",
            )
        )
    try:
        from cut_cross_entropy import linear_cross_entropy

        out.append(
            Contender(
                "cce",
                lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none").float(),
                skip=None if on_cuda else cuda_only,
                note="cut_cross_entropy.linear_cross_entropy(reduction='none'), filter_eps='high'",
            )
        )
    except Exception as error:
        out.append(Contender("cce", None, skip=f"cut-cross-entropy not importable: {error}"))

    # The fused-epilogue design (Triton only: CUDA, or the interpreter at tiny shapes).
    triton_skip = None if on_cuda or interpreting else "needs CUDA (or TRITON_INTERPRET=1: tiny shapes only)"
    out.append(
        Contender(
            "fastnpo-epilogue-fwd",
            lambda h, w, y: epilogue_token_logprobs(h, w, y),
            skip=triton_skip,
            note="experimental.epilogue.epilogue_token_logprobs: the logits GEMM with per-tile softmax statistics,"
            " no E",
            modes=("fwd",),
            mode_skip={"fwd+bwd": "the forward-only form (reference passes, evaluation): no gradients"},
        )
    )
    fwd_only_reason = "forward-only NPO is token_logprobs + a sum; the designs differ only when gradients are needed"
    # The contender names predate design= (npo-unfused: "two_call", npo-fused: "two_sweep"); they stay so
    # that benchmarks/results/*.md compare across runs.
    for name, impl, design in (
        ("npo-naive", "naive", "two_call"),
        ("npo-unfused", "auto", "two_call"),
        ("npo-fused", "auto", "two_sweep"),
        ("npo-one-pass", "auto", "one_pass"),
        ("npo-epilogue", "auto", "epilogue"),
    ):
        out.append(
            Contender(
                name,
                None,
                kind="npo",
                skip=triton_skip if design == "epilogue" else None,
                note=f"npo_loss(impl='{impl}', design={design!r}), T={NPO_SEQ_LEN}",
                modes=("fwd+bwd",),
                mode_skip={"fwd": fwd_only_reason},
                impl=impl,
                design=design,
            )
        )
    return out


def make_npo_fn(contender: Contender, seq_len: int, ref_logps: torch.Tensor):
    def fn(h, w, y):
        batch = h.shape[0] // seq_len
        return fastnpo.npo_loss(
            h.view(batch, seq_len, -1),
            w,
            y.view(batch, seq_len),
            ref_logps,
            beta=NPO_BETA,
            impl=contender.impl,
            design=contender.design,
        )

    return fn


def npo_labels(labels: torch.Tensor, seq_len: int) -> torch.Tensor:
    """HF-convention labels whose shifted targets are the token-level labels: hidden[b, t] predicts
    labels[b, t] for t < T-1 (the last position of each row predicts nothing)."""
    rows = labels.view(-1, seq_len)
    return torch.cat([rows.new_full((rows.shape[0], 1), -100), rows[:, :-1]], dim=1).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def gemm_calls(n, d, v, dtype, device, fp32out: bool = False, operands: list | None = None) -> dict:
    """{name: (call, FLOPs, (M, N, K), out dtype)} of the three GEMMs every fastnpo design runs at this
    shape, on random operands (never zeros), each into a preallocated output:

      logits   [N, D] x [D, Vc] -> [N, Vc]   H W^T (the forward; Vc = V on CUDA, <= 8192 on CPU)
      dH       [N, Vc] x [Vc, D] -> [N, D]   dlogits W (K = V)
      dW       [Vc, N] x [N, D] -> [Vc, D]   dlogits^T H (K = N)
      logits-fp32out (CUDA, where torch.mm takes out_dtype): the logits GEMM with bf16 / fp16 operands
               and an fp32 result, as one_pass and the split design run it.

    The dlogits operand is the logits GEMM's own output buffer (filled by one call first). operands, if
    given, receives hidden [N, D], weight [Vc, D] and that buffer [N, Vc] (tests)."""
    vc = v if device.type == "cuda" else min(v, 8192)
    a = torch.randn(n, d, device=device).to(dtype)
    b = torch.randn(vc, d, device=device).to(dtype)
    c = torch.empty(n, vc, device=device, dtype=dtype)
    torch.matmul(a, b.T, out=c)
    c.mul_(1.0 / math.sqrt(d))  # dlogits-sized values (|x| ~ 1)
    dh = torch.empty(n, d, device=device, dtype=dtype)
    dw = torch.empty(vc, d, device=device, dtype=dtype)
    if operands is not None:
        operands += [a, b, c]
    flops = 2 * n * d * vc
    name = str(dtype).replace("torch.", "")
    calls = {
        "logits": ((lambda: torch.matmul(a, b.T, out=c)), flops, (n, vc, d), name),
        "dH": ((lambda: torch.matmul(c, b, out=dh)), flops, (n, d, vc), name),
        "dW": ((lambda: torch.matmul(c.T, a, out=dw)), flops, (vc, d, n), name),
    }
    if fp32out and device.type == "cuda" and dtype != torch.float32:
        try:
            c32 = torch.mm(a[:8], b[:8].T, out_dtype=torch.float32)  # probe: does this torch take out_dtype?
            c32 = torch.empty(n, vc, device=device, dtype=torch.float32)

            def logits_fp32():
                return torch.mm(a, b.T, out_dtype=torch.float32, out=c32)

            logits_fp32()
            calls["logits-fp32out"] = (logits_fp32, flops, (n, vc, d), name + "->float32")
        except Exception as error:  # a torch without out_dtype: the row is left out, the run goes on
            print(f"    logits-fp32out left out: {type(error).__name__}: {error}", flush=True)
    return calls


GEMM_FIELDS = ["device", "dtype", "N", "D", "V", "gemm", "M", "N_out", "K", "out", "flops", "samples"]
GEMM_FIELDS += ["median_ms", "best_ms", "median_tflops", "best_tflops"]


def gemm_rates(shapes, dtype, device, args, log) -> list[dict]:
    """--gemm-only: the rate of each GEMM of gemm_calls at each shape (median and best of its samples),
    and of a square 8192^3 (CPU: 512^3) product, the yardstick KINDS.md quotes."""
    rows = []
    square = 8192 if device.type == "cuda" else 512
    targets = [(square, square, square, True)] + [(n, d, v, False) for n, d, v in shapes]
    for n, d, v, is_square in targets:
        calls = gemm_calls(n, d, v, dtype, device, fp32out=not is_square)
        if is_square:
            calls = {"square": calls["logits"]}
        for name, (call, flops, (m, n_out, k), out) in calls.items():
            times = sample_ms(call, device, max(args.repeats, 1), (args.cuda_warmup_ms, args.cuda_rep_ms))
            med, best = statistics.median(times), min(times)
            row = dict(device=device.type, dtype=str(dtype).replace("torch.", ""), N=n, D=d, V=v, gemm=name)
            row.update(M=m, N_out=n_out, K=k, out=out, flops=flops, samples=len(times))
            row.update(median_ms=float(f"{med:.5g}"), best_ms=float(f"{best:.5g}"))
            row.update(median_tflops=float(f"{flops / med / 1e9:.4g}"), best_tflops=float(f"{flops / best / 1e9:.4g}"))
            rows.append(row)
            log(
                f"    {n}x{d}x{v} {name:15s} [{m} x {k}] x [{k} x {n_out}] {out}: median {med:.3f} ms "
                f"({row['median_tflops']} TFLOP/s), best {best:.3f} ms ({row['best_tflops']} TFLOP/s), "
                f"{len(times)} samples"
            )
        del calls
        clean_memory(device)
    return rows


def autotune_choices() -> list[dict]:
    """Every Triton autotuner of fastnpo's kernels loaded in this process: its last config
    (best_config) and its tuning cache (key -> chosen config), as plain data."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return []
    found = []
    for module_name, module in sorted(sys.modules.items()):
        if not module_name.startswith(("fastnpo", "kernels")) or module is None:
            continue
        for attr, value in sorted(vars(module).items()):
            if not isinstance(value, Autotuner) or any(f["kernel"] == attr for f in found):
                continue
            best = getattr(value, "best_config", None)
            found.append(
                {
                    "kernel": attr,
                    "module": module_name,
                    "key": list(getattr(value, "keys", [])),
                    "candidates": len(getattr(value, "configs", [])),
                    "best_config": str(best) if best is not None else None,
                    "cache": {str(k): str(c) for k, c in getattr(value, "cache", {}).items()},
                }
            )
    return found


def mm_flops_scale(n, d, v, mm_flops) -> float:
    """V / Vc: the reference GEMMs run Vc columns (CPU: <= 8192), the op runs V."""
    return 2 * n * d * v / mm_flops


def copy_call(device):
    """(call, bytes moved) of a large tensor copy (read + write), the bandwidth reference."""
    nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * nbytes


class Runner:
    """Runs one contender in one mode on fixed inputs; returns outputs (values, dH, dW)."""

    def __init__(self, hidden, weight, labels, upstream):
        self.hidden, self.weight, self.labels, self.upstream = hidden, weight, labels, upstream
        self.h_leaf = hidden.detach().clone().requires_grad_()
        self.w_leaf = weight.detach().clone().requires_grad_()

    def call(self, fn, mode, kind, labels=None):
        labels = self.labels if labels is None else labels
        if mode == "fwd":
            with torch.no_grad():
                return fn(self.hidden, self.weight, labels), None, None
        self.h_leaf.grad = self.w_leaf.grad = None
        out = fn(self.h_leaf, self.w_leaf, labels)
        if kind == "npo":
            out.backward()
        else:
            out.backward(self.upstream)
        dh, dw = self.h_leaf.grad, self.w_leaf.grad
        self.h_leaf.grad = self.w_leaf.grad = None
        return out.detach(), dh, dw


def reference_hp(hidden, weight, labels, upstream, ref_dtype):
    """Log-probs and dH / dW of sum(upstream * logp) in ref_dtype (float64 for fp32 inputs, float32 for
    bf16 / fp16), in row blocks of <= 256 MiB of logits, without autograd."""
    w = weight.to(ref_dtype)
    n = hidden.shape[0]
    rows = max(1, (256 * MIB) // (w.shape[0] * w.element_size()))
    logps = torch.empty(n, device=hidden.device, dtype=ref_dtype)
    dh = torch.empty(hidden.shape, device=hidden.device, dtype=ref_dtype)
    dw = torch.zeros(w.shape, device=hidden.device, dtype=ref_dtype)
    for r0 in range(0, n, rows):
        h = hidden[r0 : r0 + rows].to(ref_dtype)
        y = labels[r0 : r0 + rows]
        g = upstream[r0 : r0 + rows].to(ref_dtype)
        logp = (h @ w.T).log_softmax(-1)
        logps[r0 : r0 + rows] = logp.gather(1, y[:, None])[:, 0]
        dlogits = logp.exp_().mul_(-g[:, None])
        dlogits[torch.arange(len(y), device=y.device), y] += g
        dh[r0 : r0 + rows] = dlogits @ w
        dw += dlogits.T @ h
    return logps, dh, dw


def rel_maxdiff(x, ref):
    if x is None or ref is None:
        return float("nan")
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def abs_maxdiff(x, ref):
    return float((x.float() - ref.float()).abs().max())


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """--shapes: NxDxV items separated by commas."""
    return [parse_shape(item) for item in text.split(",")]


def tolerance(dtype) -> dict:
    """Allowed error beyond naive's own error vs the high-precision reference (DESIGN.md's test rule)."""
    return {"value": 1e-4, "grad": 1e-4} if dtype == torch.float32 else {"value": 1e-2, "grad": 2e-2}


def fail(row, name, error, device, log):
    if device.type == "cuda":
        torch.cuda.empty_cache()
    message = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    if name == "compile(naive)":
        message = "torch.compile failed on this machine: " + message
    row.update(status="failed", note=message)
    log(f"    {row['mode']:7s} {name:24s} FAILED: {message}")


def time_round_robin(ready, extra, device, args, log) -> dict:
    """{name: [ms, ...]} for the contenders in ready [(row, call)] and the reference calls in extra
    [(name, call)]. CUDA: do_bench per entry. CPU: the timed calls of all entries interleaved
    round-robin (after --warmup untimed rounds), so that load from other processes on a shared machine
    shifts every entry alike, the matmul and copy references included."""
    entries = [(row, row["contender"], call) for row, call in ready] + [(None, name, call) for name, call in extra]
    times = {name: [] for _, name, _ in entries}
    if device.type == "cuda":
        import triton.testing

        for row, name, call in entries:
            try:
                times[name] = list(
                    triton.testing.do_bench(call, warmup=args.cuda_warmup_ms, rep=args.cuda_rep_ms, return_mode="all")
                )
            except Exception as error:
                if row is None:
                    raise
                fail(row, name, error, device, log)
        return times
    for round_index in range(args.warmup + args.repeats):
        for row, name, call in entries:
            if row is not None and row.get("status") == "failed":
                continue
            try:
                t0 = time.perf_counter()
                call()
                elapsed = (time.perf_counter() - t0) * 1e3
            except Exception as error:
                if row is None:
                    raise
                fail(row, name, error, device, log)
                continue
            if round_index >= args.warmup:
                times[name].append(elapsed)
    return times


def run_shape(shape, args, device, dtype, contenders, rows, log):
    n, d, v = shape
    t0 = time.perf_counter()
    hidden, weight, labels = make_inputs(n, d, v, dtype, device, args.hidden, seed=args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    upstream = (torch.rand(n, generator=gen, device=device) + 0.5) * torch.where(
        torch.rand(n, generator=gen, device=device) < 0.5, -1.0, 1.0
    )
    profile = logit_profile(hidden, weight, labels)
    log(
        f"\n=== N={n} D={d} V={v} {str(dtype).replace('torch.', '')} {args.hidden} on {device.type}"
        f" (inputs in {time.perf_counter() - t0:.1f} s)"
    )
    log("    logits: " + ", ".join(f"{k} {val:.3g}" for k, val in profile.items()))
    # The references, timed among the contenders: the designs' three GEMMs at this shape (the logits
    # GEMM is the "matmul" rate of the x_floor column; the best sample of each GEMM gives the
    # x_floor_best column) and the copy bandwidth.
    gemms = gemm_calls(n, d, v, dtype, device)
    mm_call, mm_flops = gemms["logits"][0], gemms["logits"][1]
    cp_call, cp_bytes = copy_call(device)
    cp_call()
    extra = [("matmul", mm_call), ("gemm-dH", gemms["dH"][0]), ("gemm-dW", gemms["dW"][0]), ("copy", cp_call)]
    synchronize(device)
    samples = {name: [] for name, _ in extra}
    runner = Runner(hidden, weight, labels, upstream)
    seq_len = min(NPO_SEQ_LEN, n)
    npo_y = npo_labels(labels, seq_len) if n % seq_len == 0 else None
    tol = tolerance(dtype)
    reference = {}  # mode -> (values, dh, dw) of naive; "npo" -> of npo-naive
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    t_ref = time.perf_counter()
    exact = {"token": reference_hp(hidden, weight, labels, upstream, ref_dtype)}
    log(f"    {str(ref_dtype).replace('torch.', '')} reference in {time.perf_counter() - t_ref:.1f} s")
    shape_info = {"N": n, "D": d, "V": v, "profile": profile}
    compiled = None
    if not args.no_compile:
        torch._dynamo.reset()
        compiled = torch.compile(naive_logprobs, dynamic=False)

    for mode in MODES:
        ready = []  # (row, call, peak) of the contenders that ran and passed their first call
        for c in contenders:
            row = {
                "device": device.type,
                "dtype": str(dtype).replace("torch.", ""),
                "hidden": args.hidden,
                "N": n,
                "D": d,
                "V": v,
                "mode": mode,
                "contender": c.name,
                "note": c.note,
            }
            rows.append(row)
            reason = c.skip or c.mode_skip.get(mode)
            if c.kind == "npo" and npo_y is None and not reason:
                reason = f"N={n} is not a multiple of T={seq_len}"
            if reason:
                row.update(status="skipped", note=reason)
                log(f"    {mode:7s} {c.name:24s} skipped: {reason}")
                continue
            kind, y = c.kind, (npo_y if c.kind == "npo" else labels)
            if c.name == "compile(naive)":
                fn = compiled
            elif kind == "npo":
                if "ref_logps" not in shape_info:
                    base = reference["fwd"][0] if "fwd" in reference else runner.call(naive_logprobs, "fwd", "token")[0]
                    seq = base.view(-1, seq_len)[:, :-1].sum(1)
                    shape_info["ref_logps"] = seq + torch.randn(seq.shape, generator=gen, device=device)
                fn = make_npo_fn(c, seq_len, shape_info["ref_logps"])
            else:
                fn = c.fn
            call = functools.partial(runner.call, fn, mode, kind, y)
            try:
                clean_memory(device)
                if c.name == "compile(naive)":  # the first call compiles: measure memory on the second
                    t_first = time.perf_counter()
                    outputs = call()
                    synchronize(device)
                    row["note"] += f"; first call (compile) {time.perf_counter() - t_first:.1f} s"
                    del outputs
                    clean_memory(device)
                outputs, peak = peak_memory_during(call, device)  # the warm-up call, checked and measured
                if kind == "npo" and "npo" not in exact:
                    exact["npo"] = npo_reference(
                        exact["token"][0], hidden, weight, labels, seq_len, shape_info["ref_logps"], ref_dtype
                    )
                key = "npo" if kind == "npo" else mode
                if (kind == "npo" and c.name == "npo-naive") or (kind == "token" and c.name == "naive"):
                    reference[key] = outputs
                row.update(check_outputs(outputs, reference.get(key), exact[kind], tol))
                del outputs
                gc.collect()
            except Exception as error:
                fail(row, c.name, error, device, log)
                continue
            row["peak_mib"] = round(peak / MIB, 1)
            ready.append((row, call))
            log(
                f"    {mode:7s} {c.name:24s} peak {peak / MIB:8.1f} MiB  "
                f"max|Δ value| {row['value_maxdiff_ref']:.1e}  "
                f"dH {row.get('dh_rel_maxdiff_ref', float('nan')):.1e} "
                f"dW {row.get('dw_rel_maxdiff_ref', float('nan')):.1e}  {row['check']}"
            )
        times = time_round_robin(ready, extra, device, args, log)
        for name, _ in extra:
            samples[name] += times.pop(name)
        for row, _ in ready:
            if row.get("status") == "failed" or not times.get(row["contender"]):
                continue
            values = times[row["contender"]]
            row.update(
                status="ok",
                median_ms=round(statistics.median(values), 3),
                min_ms=round(min(values), 3),
            )
            log(f"    {mode:7s} {row['contender']:24s} {row['median_ms']:10.1f} ms (min {row['min_ms']:.1f})")
    # the references, timed among the contenders: matmul rate, copy bandwidth, floors, fractions
    rate = mm_flops / (statistics.median(samples["matmul"]) * 1e-3) / 1e12
    bandwidth = cp_bytes / (statistics.median(samples["copy"]) * 1e-3) / 1e9
    esize = hidden.element_size()
    # The floor at the best GEMM rates: each GEMM's best sample, scaled from its Vc columns to V.
    best = {name: min(samples[name]) * mm_flops_scale(n, d, v, mm_flops) for name in ("matmul", "gemm-dH", "gemm-dW")}
    best_rate = mm_flops / (min(samples["matmul"]) * 1e-3) / 1e12
    gemm_floor = {"fwd": best["matmul"], "fwd+bwd": best["matmul"] + best["gemm-dH"] + best["gemm-dW"]}
    floors = {}
    for mode, flops, nbytes in (
        ("fwd", 2 * n * d * v, (n * d + v * d) * esize + 12 * n),
        ("fwd+bwd", 6 * n * d * v, 2 * (n * d + v * d) * esize + 16 * n),
    ):
        floors[mode] = {
            "flops": flops,
            "flop_floor_ms": flops / (rate * 1e12) * 1e3,
            "gemm_floor_ms": gemm_floor[mode],
            "byte_floor_ms": nbytes / (bandwidth * 1e9) * 1e3,
            "bytes": nbytes,
        }
    gemm_rates_ = {
        name: {
            "median_tflops": mm_flops / (statistics.median(samples[name]) * 1e-3) / 1e12,
            "best_tflops": mm_flops / (min(samples[name]) * 1e-3) / 1e12,
        }
        for name in ("matmul", "gemm-dH", "gemm-dW")
    }
    shape_info.update(
        matmul_tflops=rate, best_tflops=best_rate, gemm_rates=gemm_rates_, bandwidth_gbs=bandwidth, floors=floors
    )
    log(
        f"    matmul {rate:.3f} TFLOP/s median, {best_rate:.3f} best; dH GEMM "
        f"{gemm_rates_['gemm-dH']['median_tflops']:.3f} / {gemm_rates_['gemm-dH']['best_tflops']:.3f}, dW GEMM "
        f"{gemm_rates_['gemm-dW']['median_tflops']:.3f} / {gemm_rates_['gemm-dW']['best_tflops']:.3f}; "
        f"copy {bandwidth:.1f} GB/s (timed among the contenders); floors: "
        f"fwd {floors['fwd']['flop_floor_ms']:.1f} ms (FLOPs at the median matmul rate) / "
        f"{floors['fwd']['gemm_floor_ms']:.1f} ms (the logits GEMM's best) / "
        f"{floors['fwd']['byte_floor_ms']:.1f} ms (bytes), "
        f"fwd+bwd {floors['fwd+bwd']['flop_floor_ms']:.1f} / {floors['fwd+bwd']['gemm_floor_ms']:.1f} "
        f"(the three GEMMs' best) / {floors['fwd+bwd']['byte_floor_ms']:.1f} ms"
    )
    for row in rows:
        if (row["N"], row["D"], row["V"]) != shape:
            continue
        row["matmul_tflops"] = round(rate, 4)
        if row.get("status") == "ok":
            tflops = floors[row["mode"]]["flops"] / (row["median_ms"] * 1e-3) / 1e12
            row["tflops"] = round(tflops, 4)
            row["frac_matmul"] = round(tflops / rate, 3)
            # time over the FLOP floor (6NDV fwd+bwd, 2NDV fwd, at the matmul rate of this run)
            row["x_floor"] = round(row["median_ms"] / floors[row["mode"]]["flop_floor_ms"], 3)
            # and over the floor at the best GEMM rates (logits GEMM fwd; logits + dH + dW fwd+bwd)
            row["x_floor_best"] = round(row["median_ms"] / floors[row["mode"]]["gemm_floor_ms"], 3)
    # speed ratio vs the naive baseline of the same kind (token: naive; npo: npo-naive)
    for row in rows:
        if (row["N"], row["D"], row["V"]) != shape or row.get("status") != "ok":
            continue
        base_name = "npo-naive" if row["contender"].startswith("npo-") else "naive"
        base = next(
            (
                r
                for r in rows
                if (r["N"], r["D"], r["V"]) == shape
                and r["mode"] == row["mode"]
                and r["contender"] == base_name
                and r.get("status") == "ok"
            ),
            None,
        )
        if base is not None:
            row["speedup_vs_naive"] = round(base["median_ms"] / row["median_ms"], 3)
    del runner, hidden, weight, labels
    clean_memory(device)
    return shape_info


def npo_reference(token_logps, hidden, weight, labels, seq_len, ref_logps, ref_dtype):
    """NPO loss and gradients in ref_dtype, from the token-level reference log-probs (the NPO targets
    are the token labels, the last position of each row excluded, see npo_labels)."""
    batch = hidden.shape[0] // seq_len
    mask = torch.ones(batch, seq_len, device=hidden.device, dtype=ref_dtype)
    mask[:, -1] = 0
    leaf = (token_logps.view(batch, seq_len) * mask).sum(1).requires_grad_()
    loss = npo_from_logprobs(leaf, ref_logps.to(ref_dtype), beta=NPO_BETA)
    (grad_seq,) = torch.autograd.grad(loss, leaf)
    upstream = (grad_seq[:, None] * mask).reshape(-1)
    _, dh, dw = reference_hp(hidden, weight, labels, upstream, ref_dtype)
    return loss.detach(), dh, dw


def check_outputs(outputs, naive, exact, tol) -> dict:
    """Differences from naive and from the high-precision reference; the check passes when the
    contender's error vs the reference is within naive's own error plus tol."""
    values, dh, dw = outputs
    result = {}
    if naive is not None:
        result["value_maxdiff"] = abs_maxdiff(values, naive[0])
        if dh is not None:
            result["dh_rel_maxdiff"] = rel_maxdiff(dh, naive[1])
            result["dw_rel_maxdiff"] = rel_maxdiff(dw, naive[2])
    result["value_maxdiff_ref"] = abs_maxdiff(values, exact[0])
    allowed = (abs_maxdiff(naive[0], exact[0]) if naive else 0.0) + tol["value"]
    ok = result["value_maxdiff_ref"] <= allowed
    if dh is not None:
        for name, mine, theirs, reference in (
            ("dh", dh, naive[1] if naive else None, exact[1]),
            ("dw", dw, naive[2] if naive else None, exact[2]),
        ):
            err = rel_maxdiff(mine, reference)
            result[f"{name}_rel_maxdiff_ref"] = err
            ok = ok and err <= (rel_maxdiff(theirs, reference) if theirs is not None else 0.0) + tol["grad"]
    for key, value in list(result.items()):
        result[key] = float(f"{value:.3g}")
    result["check"] = "pass" if ok else "MISMATCH"
    return result


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

CSV_FIELDS = [
    "device",
    "dtype",
    "hidden",
    "N",
    "D",
    "V",
    "mode",
    "contender",
    "status",
    "median_ms",
    "min_ms",
    "speedup_vs_naive",
    "tflops",
    "frac_matmul",
    "x_floor",
    "x_floor_best",
    "matmul_tflops",
    "peak_mib",
    "value_maxdiff",
    "dh_rel_maxdiff",
    "dw_rel_maxdiff",
    "value_maxdiff_ref",
    "dh_rel_maxdiff_ref",
    "dw_rel_maxdiff_ref",
    "check",
    "note",
]


def markdown_body(rows, shapes_info) -> list[str]:
    """The markdown report under its title and header lines: a table per shape, what was skipped."""
    lines = []
    skipped = {}
    versus = "fp64 reference" if all(row["dtype"] == "float32" for row in rows) else "fp32 reference"
    for info in shapes_info:
        n, d, v = info["N"], info["D"], info["V"]
        fl = info["floors"]
        lines += [
            f"## N={n}, D={d}, V={v}",
            "",
            "Logits (256-row sample): " + ", ".join(f"{k} {x:.3g}" for k, x in info["profile"].items()),
            "",
            f"Matmul (the logits GEMM) {info['matmul_tflops']:.3f} TFLOP/s median, "
            f"{info.get('best_tflops', float('nan')):.3f} best; "
            + "".join(
                f"{name} GEMM {rates['median_tflops']:.3f} / {rates['best_tflops']:.3f}; "
                for name, rates in info.get("gemm_rates", {}).items()
                if name != "matmul"
            )
            + f"copy bandwidth {info['bandwidth_gbs']:.1f} GB/s (all timed among the contenders). "
            f"Floors: fwd {fl['fwd']['flop_floor_ms']:.1f} ms "
            f"(2NDV FLOPs at the median matmul rate; x floor) / {fl['fwd'].get('gemm_floor_ms', float('nan')):.1f} ms "
            f"(the logits GEMM's best sample; x best) / {fl['fwd']['byte_floor_ms']:.1f} ms "
            f"({fl['fwd']['bytes'] / MIB:.0f} MiB at the copy bandwidth); fwd+bwd "
            f"{fl['fwd+bwd']['flop_floor_ms']:.1f} ms (6NDV) / "
            f"{fl['fwd+bwd'].get('gemm_floor_ms', float('nan')):.1f} ms "
            f"(the logits, dH and dW GEMMs' best samples) / {fl['fwd+bwd']['byte_floor_ms']:.1f} ms "
            f"({fl['fwd+bwd']['bytes'] / MIB:.0f} MiB).",
            "",
            "| mode | contender | median ms | min ms | speedup vs naive | TFLOP/s | % of matmul | x floor | x best "
            f"| peak extra MiB | max abs Δ logp/loss vs {versus} | max rel Δ dH | max rel Δ dW | check |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in rows:
            if (row["N"], row["D"], row["V"]) != (n, d, v):
                continue
            if row["status"] != "ok":
                skipped.setdefault((row["contender"], row["status"], row["note"]), []).append(
                    f"{n}x{d}x{v} {row['mode']}"
                )
                continue
            suffix = "_ref"
            lines.append(
                f"| {row['mode']} | {row['contender']} | {fmt(row['median_ms'], '.1f')} | "
                f"{fmt(row['min_ms'], '.1f')} | "
                f"{fmt(row.get('speedup_vs_naive'), '.2f')} | {fmt(row['tflops'], '.3f')} | "
                f"{fmt(100 * row['frac_matmul'], '.0f')} | {fmt(row.get('x_floor'), '.2f')} | "
                f"{fmt(row.get('x_floor_best'), '.2f')} | "
                f"{fmt(row['peak_mib'], '.1f')} | "
                f"{fmt(row.get('value_maxdiff' + suffix), '.1e')} | "
                f"{fmt(row.get('dh_rel_maxdiff' + suffix), '.1e')} | "
                f"{fmt(row.get('dw_rel_maxdiff' + suffix), '.1e')} | {row.get('check', '')} |"
            )
        lines.append("")
    if skipped:
        lines += ["## Skipped or failed", ""]
        for (name, status, note), where in skipped.items():
            lines.append(f"- **{name}** ({status}, {', '.join(where)}): {note}")
        lines.append("")
    lines += [
        "Differences are from a high-precision reference computed in row blocks (fp64 for fp32 inputs, fp32 "
        "for bf16/fp16): value = max abs difference of the log-probs (npo-*: of the loss); dH, dW = max abs "
        "difference over max abs reference gradient. The check passes when a contender's error is within "
        "naive's own error plus 1e-4 (fp32) or 1e-2 / 2e-2 (values / gradients, bf16 and fp16). The CSV "
        "also has the differences from naive (value_maxdiff, dh_rel_maxdiff, dw_rel_maxdiff). Speedup: "
        "naive ms / contender ms (npo-* rows: vs npo-naive).",
        "",
    ]
    return lines


def write_plot(path, rows, title):
    """A grid of horizontal bar charts: one column per shape; rows fwd ms, fwd+bwd ms, and their peak MiB."""
    plt = pyplot()

    ok = [r for r in rows if r["status"] == "ok"]
    shapes = list(dict.fromkeys((r["N"], r["D"], r["V"]) for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in ok))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    panels = [
        ("fwd", "median_ms", "fwd: median ms"),
        ("fwd+bwd", "median_ms", "fwd+bwd: median ms"),
        ("fwd", "peak_mib", "fwd: peak extra MiB"),
        ("fwd+bwd", "peak_mib", "fwd+bwd: peak extra MiB"),
    ]
    fig, axes = plt.subplots(len(panels), len(shapes), figsize=(5.2 * len(shapes), 2.6 * len(panels)), squeeze=False)
    for col, shape in enumerate(shapes):
        for line, (mode, metric, label) in enumerate(panels):
            hits = [r for r in ok if (r["N"], r["D"], r["V"]) == shape and r["mode"] == mode and r.get(metric)]
            bar_panel(
                axes[line][col],
                [r["contender"] for r in hits],
                [r[metric] for r in hits],
                [colors[r["contender"]] for r in hits],
                [
                    f"  ({r['speedup_vs_naive']:.2f}x)" if metric == "median_ms" and r.get("speedup_vs_naive") else ""
                    for r in hits
                ],
                f"N={shape[0]} D={shape[1]} V={shape[2]} - {label}",
                room=1.35,
            )
    title += "\nlabels: ms (speedup vs naive; npo-*: vs npo-naive)"
    save_figure(plt, fig, path, title, top=0.96, fontsize=10)


def plot_from_csv(path: Path) -> Path:
    """The plot of a results CSV written earlier (the GPU suite brings back CSVs, not PNGs)."""
    header, rows = read_results_csv(path)
    for row in rows:
        for key in ("N", "D", "V"):
            row[key] = int(row[key])
        for key in ("median_ms", "peak_mib", "speedup_vs_naive"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
    machine = next((line.split(":", 1)[1].strip() for line in header if line.startswith("machine:")), "")
    out = path.with_suffix(".png")
    write_plot(out, rows, f"fastnpo log-probs, {path.stem} ({machine})")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--shapes", default=None, help="NxDxV[,NxDxV...]; default depends on the device")
    parser.add_argument("--hidden", choices=("realistic", "randn"), default="realistic")
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 warm-up + 1 timed repeat on CPU")
    parser.add_argument("--contenders", default=None, help="comma-separated names to run (default: all)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="extra CPU warm-up calls (the checked first call and the memory call already warm up)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="CPU timed calls (median reported)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(naive)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output stem (default from device etc.)")
    parser.add_argument("--out-dir", default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    parser.add_argument(
        "--cuda-ms",
        default="100,400",
        help="CUDA: do_bench warm-up and timing budget in ms per contender (default 100,400)",
    )
    parser.add_argument(
        "--plot-from", default=None, help="only draw <csv>'s plot beside it (e.g. a GPU suite's logprobs.csv)"
    )
    parser.add_argument(
        "--gemm-only",
        action="store_true",
        help="only the GEMM rates at the shapes' exact GEMMs (logits, dH, dW; median and best) -> <out>.csv",
    )
    parser.add_argument(
        "--autotune-out",
        default=None,
        help="write the Triton autotuners' choices of this process (best_config, cache) as JSON here",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.plot_from:
        plot_from_csv(Path(args.plot_from))
        return
    args.cuda_warmup_ms, args.cuda_rep_ms = (int(x) for x in args.cuda_ms.split(","))

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    elif args.quick:
        shapes = CUDA_QUICK_SHAPES if device.type == "cuda" else CPU_QUICK_SHAPES
    else:
        shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.quick and device.type == "cpu":
        args.warmup, args.repeats = 0, 1
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False

    kind = device_kind(device)
    stem = args.out or "logprobs_" + kind + ("" if dtype == default_dtype else "_" + str(dtype).split(".")[1]) + (
        "_randn" if args.hidden == "randn" else ""
    ) + ("_quick" if args.quick else "")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(message):
        print(message, flush=True)

    if args.gemm_only:
        info = machine_info(device)
        log("fastnpo GEMM rates: " + "; ".join(f"{k} {v}" for k, v in info.items()))
        rows = gemm_rates(shapes, dtype, device, args, log)
        path = out_dir / f"{args.out or 'gemm_' + kind}.csv"
        header = [
            date_line(info),
            machine_line(info),
            versions_line(info, ("python", "torch", "triton")),
            "timing: "
            + (
                f"triton.testing.do_bench, all samples (L2 flushed), warm-up {args.cuda_warmup_ms} ms, "
                f"budget {args.cuda_rep_ms} ms per GEMM"
                if device.type == "cuda"
                else f"{max(args.repeats, 1)} perf_counter calls after one warm-up call"
            )
            + "; random operands; median and best (fastest) sample",
            command_line(__file__, argv),
        ]
        write_csv(path, rows, GEMM_FIELDS, header)
        log(f"wrote {path}")
        return rows

    info = machine_info(device)
    log("fastnpo log-prob benchmark: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    contenders = build_contenders(device, dtype, args.no_compile)
    if args.contenders:
        wanted = set(args.contenders.split(","))
        unknown = wanted - {c.name for c in contenders}
        if unknown:
            raise SystemExit(f"unknown contenders {sorted(unknown)}; known: {[c.name for c in contenders]}")
        contenders = [c for c in contenders if c.name in wanted or c.name in ("naive", "npo-naive")]
    rows, shapes_info = [], []
    start, cpu_start = time.perf_counter(), sum(os.times()[:2])
    for index, shape in enumerate(shapes):
        shapes_info.append(run_shape(shape, args, device, dtype, contenders, rows, log))
        if args.autotune_out:  # after each shape, like the reports
            Path(args.autotune_out).write_text(json.dumps(autotune_choices(), indent=1) + "\n")
        if index + 1 < len(shapes):  # a run stopped by a time limit keeps the shapes done so far
            write_reports(args, argv, device, dtype, info, rows, shapes_info, start, cpu_start, out_dir, stem, kind)
    written = write_reports(args, argv, device, dtype, info, rows, shapes_info, start, cpu_start, out_dir, stem, kind)
    log(f"\ndone in {time.perf_counter() - start:.0f} s; wrote " + ", ".join(str(p) for p in written))
    bad = [r for r in rows if r.get("check") == "MISMATCH"]
    if bad:
        log("MISMATCH: " + ", ".join(f"{r['contender']} {r['mode']} {r['N']}x{r['D']}x{r['V']}" for r in bad))
    return rows


def write_reports(args, argv, device, dtype, info, rows, shapes_info, start, cpu_start, out_dir, stem, kind):
    """CSV, markdown (and PNG unless --no-plot) of the rows so far; returns the paths written."""
    elapsed = time.perf_counter() - start
    cpu_seconds = sum(os.times()[:2]) - cpu_start
    share = f"{cpu_seconds / elapsed:.2f} of {os.cpu_count()} cores"
    load_end = load_average()
    timing = (
        f"median of {args.repeats} timed calls (time.perf_counter), interleaved round-robin across the "
        "contenders and the matmul/copy references, after 1 warm-up call (the first call, which is checked "
        "and memory-measured; compile(naive) also gets its compile call)"
        + (f" and {args.warmup} untimed rounds" if args.warmup else "")
        if device.type == "cpu"
        else f"triton.testing.do_bench median (L2 flushed), warm-up {args.cuda_warmup_ms} ms, "
        f"timing budget {args.cuda_rep_ms} ms per contender"
    )
    header = [
        date_line(info),
        machine_line(info),
        f"load average at start: {info.get('load average at start', '?')}, at end: {load_end}; "
        f"this process used {share} on average (CPU time / wall time; on a shared machine the rest went "
        "to other processes and the timings are inflated)",
        versions_line(info, ("python", "torch", "triton", "fastnpo", "liger_kernel", "cut_cross_entropy")),
        f"device {device.type}, dtype {str(dtype).replace('torch.', '')}, hidden states {args.hidden}"
        + (
            "; Triton kernels through the interpreter (TRITON_INTERPRET=1): their times are CPU interpreter "
            "times, not kernel times"
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1"
            else ""
        ),
        f"timing: {timing}; memory: fastnpo.profiling.peak_memory_during after gc"
        + (
            " + malloc_trim (peak resident set above the start)"
            if device.type == "cpu"
            else " (max_memory_allocated above the start)"
        ),
        "copy bandwidth (read + write bytes of a large copy, timed among the contenders): "
        + ", ".join(f"{i['N']}x{i['D']}x{i['V']}: {i['bandwidth_gbs']:.1f} GB/s" for i in shapes_info)
        + f"; total run time {elapsed:.0f} s",
        command_line(__file__, argv),
    ]
    dtype_name = str(dtype).replace("torch.", "")
    title = f"fastnpo log-probs benchmark: {kind}, {dtype_name}, {args.hidden} hidden states"
    csv_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png"))
    write_csv(csv_path, rows, CSV_FIELDS, header)
    write_markdown(md_path, title, header, markdown_body(rows, shapes_info))
    written = [csv_path, md_path]
    if not args.no_plot:
        write_plot(png_path, rows, title)
        written.append(png_path)
    return written


if __name__ == "__main__":
    main()
