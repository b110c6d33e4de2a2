#!/usr/bin/env python
"""Where one fused log-prob call spends its time: torch.profiler's kernel table per fastnpo impl.

    python benchmarks/profile_logprobs.py --device cuda                       # N=8192, D=4096, V=128256, bf16
    .venv/bin/python benchmarks/profile_logprobs.py --device cpu --shape 64x32x1031 --impls torch
    python benchmarks/profile_logprobs.py --device cuda --impls "" --npo one_pass,epilogue \
        --sweep-rows 512,1024,2048,4096,8192 --sweep-epilogue-mib 128,512 --out one_pass.md

bench_logprobs.py says how fast each design is; this says why: for each impl, a few warm-up
forward + backward calls, then PROFILED_CALLS profiled ones, and the operators / kernels sorted by
their own device time (per call), with the wall time of one call beside them.

--npo DESIGNS profiles npo_loss(design=DESIGN) fwd+bwd calls (sequences of --seq-len tokens) the same
way and counts, per call: device launches (kernels, copies and fills the profiler saw on the GPU),
the device-busy share (the union of those intervals over the span from the first to the last),
host syncs (cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize / blocking
cudaMemcpy calls) and scalar reads (aten::_local_scalar_dense: .item(), bool(tensor), .tolist()).
--sweep-rows times the one_pass design at several chunk sizes (rows of fp32 logits per chunk: the
rule's floor MIN_CHUNK_ROWS set to each, CHUNK_BYTES out of the way) and --sweep-epilogue-mib the
epilogue design at several E budgets (experimental.epilogue.CHUNK_BYTES), each with its chunk count, median
and best time and peak extra memory. The GPU suite's first call runs it as its `one-pass` part
(--out: a markdown file beside the tables in log.txt).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import SCALAR_READS, SYNC_EVENTS, parse_shape, sample_ms, synchronize
from common import trace_counts as common_trace_counts

import fastnpo
from fastnpo.ops import matmuls, one_pass
from fastnpo.ops.experimental import epilogue as fused_epilogue
from fastnpo.ops.experimental import split
from fastnpo.profiling import peak_memory_during

PROFILED_CALLS = 3
# Host calls that wait for the device (CPU-side runtime events in the profiler's trace; exact names:
# cudaMemcpyAsync does not wait by itself, a .item() shows as cudaMemcpyAsync + cudaStreamSynchronize).
NPO_BETA = 0.1


def profile_impl(impl: str, hidden, weight, labels, *, row_limit: int) -> None:
    device = hidden.device

    def call():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        fastnpo.token_logprobs(h, w, labels, impl=impl).sum().backward()

    for _ in range(2):  # compile, autotune, allocator warm-up
        call()
    wall_ms, prof = wall_and_profile(call, device, PROFILED_CALLS)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- impl={impl}: one fwd+bwd call {wall_ms:.1f} ms wall; profile of {PROFILED_CALLS} calls ---")
    print(prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=70))


def wall_and_profile(call, device, calls: int):
    """(ms of one call, a torch.profiler profile of `calls` more calls), the device synchronised around each."""
    synchronize(device)
    started = time.perf_counter()
    call()
    synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        synchronize(device)
    return wall_ms, prof


def trace_counts(prof, calls: int) -> dict:
    """common.trace_counts (launches, device-busy share, host syncs less the closing synchronize,
    scalar reads per call) and the torch ops issued from Python per call."""
    counts = common_trace_counts(prof, calls)
    # torch ops issued from Python (outermost aten:: ops): what each launch costs the host
    counts["python_ops"] = (
        sum(
            1
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CPU
            and e.name.startswith("aten::")
            and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
        )
        / calls
    )
    return counts


def npo_inputs(n: int, d: int, v: int, seq_len: int, hidden, weight, generator):
    """HF-convention labels [B, T] (npo_loss shifts them) and reference log-probs [B]."""
    if n % seq_len:
        raise SystemExit(f"N={n} is not a multiple of --seq-len {seq_len}")
    batch = n // seq_len
    labels = torch.randint(0, v, (batch, seq_len), generator=generator).to(hidden.device)
    ref = (torch.randn(batch, generator=generator) - 8.0 * seq_len).to(hidden.device)
    return labels, ref


def npo_call(design: str, hidden, weight, labels, ref):
    batch, seq_len = labels.shape

    def call():
        h = hidden.detach().view(batch, seq_len, -1).requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        fastnpo.npo_loss(h, w, labels, ref, beta=NPO_BETA, design=design).backward()

    return call


def kept_sequences(labels):
    """sequence ids of the kept rows (shifted targets that are not -100), as npo_loss keeps them."""
    batch, seq_len = labels.shape
    shifted = torch.cat([labels[:, 1:], labels.new_full((batch, 1), -100)], dim=1).reshape(-1)
    rows = torch.nonzero(shifted != -100)[:, 0]
    return rows // seq_len, batch


def profile_npo(designs, hidden, weight, labels, ref, *, row_limit: int, report: list, calls: int) -> None:
    device = hidden.device
    warmup = 2 if calls > 1 else 1
    report += [
        "## One call per design: launches, device-busy share, host syncs",
        "",
        f"npo_loss(design=DESIGN) forward + backward, beta {NPO_BETA}, {labels.shape[0]} sequences of "
        f"{labels.shape[1]} tokens; {calls} profiled call(s) after {warmup} warm-up call(s) (compile, autotune); "
        "counts per call. Launches: kernels, copies and fills on the device (none on a CPU); busy share: "
        "the union of their intervals over the span from the first to the last; syncs: blocking CUDA "
        f"runtime calls ({', '.join(SYNC_EVENTS)}; the synchronize closing the profiled calls not counted); "
        f"scalar reads: {SCALAR_READS} (.item(), bool(), .tolist()).",
        "",
        "| design | wall ms (one call, unprofiled) | device-busy ms | launches | busy share | host syncs "
        "| scalar reads | torch ops |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for design in designs:
        call = npo_call(design, hidden, weight, labels, ref)
        try:
            for _ in range(warmup):
                call()
            wall_ms, prof = wall_and_profile(call, device, calls)
        except Exception as error:  # a design that cannot run here is reported, the rest still run
            report.append(f"| {design} | failed: {type(error).__name__}: {str(error)[:160]} | | | | | | |")
            print(f"\n--- npo design={design!r}: FAILED {type(error).__name__}: {error}")
            continue
        counts = trace_counts(prof, calls)

        def cell(value, spec):
            return "–" if value is None else format(value, spec)

        report.append(
            f"| {design} | {wall_ms:.2f} | {cell(counts['device_busy_ms'], '.2f')} | {cell(counts['launches'], '.0f')} "
            f"| {cell(counts['busy_share'], '.2f')} | {counts['syncs']:.0f} | {counts['scalar_reads']:.0f} "
            f"| {counts['python_ops']:.0f} |"
        )
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n--- npo design={design!r}: one fwd+bwd call {wall_ms:.1f} ms wall; per call: {counts} ---")
        print(prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=70))
    report.append("")


def sweep(label: str, design: str, settings, hidden, weight, labels, ref, *, repeats: int, report: list) -> None:
    """Time npo_loss(design=design) under each setting (a context that sets the chunk rule)."""
    device = hidden.device
    report += [
        f"## {label}",
        "",
        "| setting | chunks | median ms | best ms | samples | peak extra MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, apply, chunks in settings:
        restore = apply()
        try:
            call = npo_call(design, hidden, weight, labels, ref)
            call()  # compile / autotune the new row bucket
            synchronize(device)
            _, peak = peak_memory_during(call, device)
            times = sample_ms(call, device, repeats, (25, 100), warm_up=False)
            line = (
                f"| {name} | {chunks} | {statistics.median(times):.2f} | {min(times):.2f} | {len(times)} "
                f"| {peak / 2**20:.1f} |"
            )
        except Exception as error:
            line = f"| {name} | {chunks} | failed: {type(error).__name__}: {str(error)[:160]} | | | |"
        finally:
            restore()
        report.append(line)
        print(f"{label}: {line}", flush=True)
    report.append("")


def one_pass_rows(rows: int):
    """A setting of one_pass's chunk rule: R = rows per chunk (CHUNK_BYTES below every 4 V R)."""

    def apply():
        saved = one_pass.CHUNK_BYTES, one_pass.MIN_CHUNK_ROWS
        one_pass.CHUNK_BYTES, one_pass.MIN_CHUNK_ROWS = 1, rows

        def restore():
            one_pass.CHUNK_BYTES, one_pass.MIN_CHUNK_ROWS = saved

        return restore

    return apply


def epilogue_bytes(nbytes: int):
    def apply():
        saved = fused_epilogue.CHUNK_BYTES
        fused_epilogue.CHUNK_BYTES = nbytes

        def restore():
            fused_epilogue.CHUNK_BYTES = saved

        return restore

    return apply


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="8192x4096x128256", help="NxDxV")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--impls", default="split,triton", help="comma-separated fastnpo impls (token op)")
    parser.add_argument("--rows", type=int, default=15, help="table rows per impl")
    parser.add_argument("--npo", default="", help="comma-separated npo_loss designs to profile (one_pass,...)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence of the npo calls")
    parser.add_argument("--sweep-rows", default="", help="one_pass chunk sizes in rows, e.g. 512,1024,2048,4096")
    parser.add_argument("--sweep-epilogue-mib", default="", help="epilogue E budgets per chunk in MiB, e.g. 128,512")
    parser.add_argument("--repeats", type=int, default=3, help="CPU timed calls per sweep setting (CUDA: do_bench)")
    parser.add_argument("--calls", type=int, default=PROFILED_CALLS, help="profiled npo calls per design")
    parser.add_argument("--out", default=None, help="also write the npo profile and sweep tables here (markdown)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, d, v = parse_shape(args.shape)
    generator = torch.Generator(device="cpu").manual_seed(0)
    # logits of std ~1.5 (hidden and weight entries N(0, 1) and N(0, (1.5 / sqrt(d))^2))
    hidden = torch.randn(n, d, generator=generator).to(device, dtype)
    weight = (torch.randn(v, d, generator=generator) * (1.5 / d**0.5)).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=generator).to(device)
    mode = matmuls.matmul_mode(device.type, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    kernels = split.split_kernels(device)  # where Triton runs, impl='split' runs the split kernels
    layout = (
        f"split kernels, dlogits blocks (rows, vocab) {split.split_blocks(n, v, hidden.element_size(), kernels[2])}"
        if kernels is not None
        else f"torch blocks (rows, vocab) {split.blocks(n, v)}"
    )
    print(
        f"profile: N={n} D={d} V={v} {args.dtype} on {device} ({name}); "
        f"torch {torch.__version__}; split: {layout}, matmul_mode {mode}; "
        f"allow_tf32 {torch.backends.cuda.matmul.allow_tf32}"
    )
    for impl in filter(None, args.impls.split(",")):
        profile_impl(impl, hidden, weight, labels, row_limit=args.rows)
    designs = [x for x in args.npo.split(",") if x]
    rows = [int(x) for x in args.sweep_rows.split(",") if x]
    budgets = [int(x) for x in args.sweep_epilogue_mib.split(",") if x]
    if not (designs or rows or budgets):
        return
    npo_labels, ref = npo_inputs(n, d, v, args.seq_len, hidden, weight, generator)
    report = [
        f"# npo_loss designs at N={n} ({n // args.seq_len} x {args.seq_len}), D={d}, V={v}, {args.dtype}, {name}",
        "",
        f"torch {torch.__version__}; one_pass rule: max(CHUNK_BYTES = {one_pass.CHUNK_BYTES}, 4 V MIN_CHUNK_ROWS = "
        f"{4 * v * one_pass.MIN_CHUNK_ROWS}) B of fp32 logits per chunk; epilogue rule: "
        f"{fused_epilogue.CHUNK_BYTES // 2**20} MiB of E per chunk. Timing: "
        + (
            "triton.testing.do_bench (25 ms warm-up, 100 ms budget)"
            if device.type == "cuda"
            else f"{args.repeats} perf_counter calls"
        )
        + "; peak: max allocated above the start (CPU: resident set).",
        "",
    ]
    if designs:
        profile_npo(designs, hidden, weight, npo_labels, ref, row_limit=args.rows, report=report, calls=args.calls)
    sequence_ids, batch = kept_sequences(npo_labels)
    if rows:
        rule = one_pass.chunk_budget(v, None) // (4 * v)
        settings = []
        for r in rows:
            budget = 4 * v * r
            count = len(one_pass.chunk_rows(sequence_ids, batch, v, budget)) - 1
            settings.append(
                (f"{r} rows" + (" (the rule's floor)" if r == one_pass.MIN_CHUNK_ROWS else ""), one_pass_rows(r), count)
            )
        label = f"one_pass chunk sweep (the rule gives R = {rule} rows here; N = {n})"
        sweep(label, "one_pass", settings, hidden, weight, npo_labels, ref, repeats=args.repeats, report=report)
    if budgets:
        settings = []
        for mib in budgets:
            nbytes = mib * 2**20
            count = len(fused_epilogue.epilogue_chunks(sequence_ids, batch, v, hidden.element_size(), nbytes)) - 1
            default = nbytes == fused_epilogue.CHUNK_BYTES
            settings.append((f"{mib} MiB of E" + (" (the default)" if default else ""), epilogue_bytes(nbytes), count))
        sweep(
            "epilogue chunk sweep",
            "epilogue",
            settings,
            hidden,
            weight,
            npo_labels,
            ref,
            repeats=args.repeats,
            report=report,
        )
    text = "\n".join(report) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
