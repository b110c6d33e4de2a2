#!/usr/bin/env python
"""Per-token statistics (log p(label), mean and second moment of log p, argmax) for the privacy metrics:
fastnpo's token_statistics against the full-logits computation open-unlearning does.

    .venv/bin/python benchmarks/bench_statistics.py           # CPU: N=2048, D=256, V=131072, fp32 (~2 min)
    .venv/bin/python benchmarks/bench_statistics.py --smoke   # a tiny shape, one timed call (seconds)

Contenders:
  full-logits       what open-unlearning's Min-K%++ / exact memorization / extraction strength do:
                    logits = hidden @ weight.T, log_softmax over the vocabulary, then
                    sum(exp(lp) * lp), sum(exp(lp) * lp^2), gather(label), argmax == label
  fastnpo-torch     token_statistics(impl="torch"): vocabulary blocks, online rescaling (the CPU path)
  fastnpo-triton    token_statistics(impl="triton") (CUDA only)

Timing: median of --repeats calls after --warmup untimed calls (time.perf_counter; CUDA: events), all
under torch.no_grad. Memory: the peak resident set above the start of each call (CPU; CUDA: the
allocator's peak), measured with glibc's mmap threshold fixed at 64 KiB (the script re-executes itself
with MALLOC_MMAP_THRESHOLD_ set) so that every large tensor is its own mapping and the peak is the live
high-water mark. Accuracy: max abs difference from a float64 full-logits reference on 256 rows.

Writes runs/benchmarks/statistics_<device>[_smoke].{csv,md} (--out-dir benchmarks/results: the committed
results). Done-when of issue 27: fastnpo-torch's peak extra memory below 5% of the full fp32 logits
([N, V] x 4 bytes) at N=2048, D=256, V=131072.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from common import (
    MIB,
    OUT_DIR,
    clean_memory,
    command_line,
    date_line,
    machine_info,
    make_inputs,
    markdown_table,
    median_ms,
    parse_shape,
    versions_line,
    write_csv,
    write_markdown,
)

from fastnpo.ops import token_statistics
from fastnpo.profiling import peak_memory_during

DEFAULT_SHAPE = (2048, 256, 131072)
SMOKE_SHAPE = (64, 32, 4099)
MMAP_THRESHOLD = "65536"
CHECK_ROWS = 256
FIELDS = [
    "contender",
    "N",
    "D",
    "V",
    "dtype",
    "median_ms",
    "min_ms",
    "peak_extra_mib",
    "full_logits_mib",
    "pct_of_full_logits",
    "max_abs_diff_logprob",
    "max_abs_diff_mean",
    "max_abs_diff_second_moment",
    "argmax_agreement",
]


def full_logits(hidden, weight, labels):
    """open-unlearning's computation: full log-probs over the vocabulary, then the reductions."""
    logits = (hidden @ weight.T).float()
    logp = torch.nn.functional.log_softmax(logits, dim=-1)
    mean = (torch.exp(logp) * logp).sum(-1)
    second = (torch.exp(logp) * torch.square(logp)).sum(-1)
    target = logp.gather(1, labels[:, None])[:, 0]
    return target, mean, second, logp.argmax(-1) == labels


def fastnpo(impl):
    def run(hidden, weight, labels):
        stats = token_statistics(hidden, weight, labels, impl=impl)
        return stats.logprob, stats.mean, stats.second_moment, stats.is_argmax

    return run


def reference64(hidden, weight, labels):
    logits = hidden.double() @ weight.double().T
    logp = logits.log_softmax(-1)
    p = logp.exp()
    return logp.gather(1, labels[:, None])[:, 0], (p * logp).sum(-1), (p * logp.square()).sum(-1), logits.argmax(-1)


def measure(name, fn, hidden, weight, labels, device, args) -> dict:
    n, d = hidden.shape
    v = weight.shape[0]
    with torch.no_grad():
        fn(hidden[:8], weight, labels[:8])  # one-time allocations (thread pools) are not the op's
        clean_memory(device)
        outputs, peak = peak_memory_during(lambda: fn(hidden, weight, labels), device)
        median, low = median_ms(lambda: fn(hidden, weight, labels), device, args.warmup, args.repeats)
    rows = min(CHECK_ROWS, n)
    ref = reference64(hidden[:rows].cpu(), weight.cpu(), labels[:rows].cpu())
    diffs = [(o[:rows].double().cpu() - r).abs().max().item() for o, r in zip(outputs[:3], ref[:3], strict=True)]
    agree = (outputs[3][:rows].cpu() == (ref[3] == labels[:rows].cpu())).double().mean().item()
    full = n * v * 4
    return {
        "contender": name,
        "N": n,
        "D": d,
        "V": v,
        "dtype": str(hidden.dtype).removeprefix("torch."),
        "median_ms": round(median, 1),
        "min_ms": round(low, 1),
        "peak_extra_mib": round(peak / MIB, 1),
        "full_logits_mib": round(full / MIB, 1),
        "pct_of_full_logits": round(100 * peak / full, 2),
        "max_abs_diff_logprob": f"{diffs[0]:.1e}",
        "max_abs_diff_mean": f"{diffs[1]:.1e}",
        "max_abs_diff_second_moment": f"{diffs[2]:.1e}",
        "argmax_agreement": round(agree, 4),
    }


def write(out_dir: Path, stem: str, rows: list[dict], header: list[str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    write_csv(csv_path, rows, FIELDS, header)
    lines = markdown_table(rows, FIELDS)
    ours = [r for r in rows if r["contender"] != "full-logits"]
    base = next(r for r in rows if r["contender"] == "full-logits")
    lines.append("")
    for row in ours:
        verdict = "yes" if row["pct_of_full_logits"] < 5 else "NO"
        lines.append(
            f"- {row['contender']}: peak extra {row['peak_extra_mib']} MiB = {row['pct_of_full_logits']}% of the "
            f"full fp32 logits ({row['full_logits_mib']} MiB; below 5%: {verdict}), "
            f"{row['peak_extra_mib'] / max(base['peak_extra_mib'], 1e-9):.3f}x the full-logits computation's peak; "
            f"time {row['median_ms'] / base['median_ms']:.2f}x the full-logits computation's"
        )
    write_markdown(md_path, "fastnpo token statistics vs full logits", header, [*lines, ""])
    return csv_path, md_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--shape", default=None, help="NxDxV (default 2048x256x131072; --smoke: 64x32x4099)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, no warm-up, one timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    parser.add_argument("--out", default=None, help="file stem (default statistics_<device>[_smoke])")
    return parser


def main(argv=None) -> tuple[Path, Path]:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.repeats, args.warmup = 1, 0
    shape = parse_shape(args.shape) if args.shape else (SMOKE_SHAPE if args.smoke else DEFAULT_SHAPE)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    hidden, weight, labels = make_inputs(*shape, dtype, device, "realistic", seed=args.seed)
    contenders = [("full-logits", full_logits), ("fastnpo-torch", fastnpo("torch"))]
    if device.type == "cuda":
        contenders.append(("fastnpo-triton", fastnpo("triton")))
    info = machine_info(device)
    rows = []
    for name, fn in contenders:
        rows.append(measure(name, fn, hidden, weight, labels, device, args))
        print(rows[-1], flush=True)
    header = [
        date_line(info),
        f"machine: {info.get('gpu', info['cpu'])}",
        versions_line(info, ("python", "torch", "triton", "fastnpo")),
        f"load average at start: {info.get('load average at start', 'n/a')}",
        f"inputs: realistic hidden states (bench_logprobs.make_inputs), {args.dtype}, seed {args.seed}",
        f"timing: median of {args.repeats} calls after {args.warmup} warm-up; memory: peak above the start of one "
        f"call (MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')})",
        command_line(__file__, argv),
    ]
    stem = args.out or f"statistics_{device.type}" + ("_smoke" if args.smoke else "")
    paths = write(Path(args.out_dir), stem, rows, header)
    print("wrote", *paths)
    return paths


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        # Fixed mmap threshold, set before the process starts (glibc reads it once): re-execute.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
