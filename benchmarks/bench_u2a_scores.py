#!/usr/bin/env python
"""U2A scores s_i = <grad J, grad l_i> for every candidate: all at once vs one backward each.

    .venv/bin/python benchmarks/bench_u2a_scores.py                       # CPU: tiny model, 512 candidates
    python benchmarks/bench_u2a_scores.py --device cuda --model-size 1b   # ~1.2B Llama (random init), GPU

Methods (fastnpo.u2a.compute_scores; each includes the one backward of J):
  central      two batched no-grad forward passes at theta +- h grad J / |grad J| (fused log-prob op),
               h calibrated on J first (a few extra forward passes over the small J set);
  jvp          one forward-mode pass (dual parameters, eager attention, vocabulary-chunked log-softmax);
  per_example  one batch-1 backward per candidate (what the U2A authors do): the reference.
  central_fixed_h  central with the step h that "central" calibrated, given: the cost without calibration.
Agreement with per_example: Spearman rank correlation, max |s - s_ref| / max |s_ref|, median
elementwise relative error. Writes runs/benchmarks/u2a_scores_<device>[_1b].{csv,md} (--out-dir
benchmarks/results: the committed results).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from common import OUT_DIR, command_line, llama_1b_config, machine_record, versions_line, write_csv, write_markdown
from scipy.stats import spearmanr

from fastnpo import u2a
from fastnpo.u2a.preference import synthetic_candidates


def tiny_problem(args):
    config = u2a.load_u2a_config(None, [f"model.sft_epochs={args.sft_epochs}", f"run.seed={args.seed}"])
    task = u2a.prepare_task(config, log=lambda message: print(message, file=sys.stderr))
    task.split.candidates = synthetic_candidates(args.candidates, seed=args.seed)
    task.split.j = task.split.j[: args.j_pairs]
    return u2a.PreferenceUnlearningProblem.from_split(
        task.model.to(args.device),
        task.tokenizer,
        task.split,
        u2a.ObjectiveConfig(unlearn=args.unlearn),
        template=config.data.template,
        max_length=config.data.max_length,
        batch_size=args.batch_size,
    ), f"tiny Llama ({sum(p.numel() for p in task.model.parameters()) / 1e6:.2f}M params), synthetic task"


def llama_1b_problem(args):
    """A Llama-3.2-1B-shaped model with random weights and random-token sequences: the scores'
    cost and agreement do not need trained weights (no download on the GPU machines)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**llama_1b_config())  # the shape the trainer benchmark uses
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=u2a.DTYPES[args.dtype])
    generator = torch.Generator().manual_seed(args.seed)

    def items(n):
        out = []
        for i in range(n):
            prompt = torch.randint(0, config.vocab_size, (32,), generator=generator).tolist()
            length = int(torch.randint(16, 65, (1,), generator=generator))
            answer = torch.randint(0, config.vocab_size, (length,), generator=generator).tolist()
            out.append({"index": i, "input_ids": prompt + answer, "labels": [-100] * 32 + answer})
        return out

    sets = {
        "j_chosen": items(args.j_pairs),
        "j_rejected": items(args.j_pairs),
        "candidates": items(args.candidates),
    }
    problem = u2a.PreferenceUnlearningProblem(
        model, sets, u2a.ObjectiveConfig(unlearn=args.unlearn), pad_id=0, batch_size=args.batch_size
    )
    params = sum(p.numel() for p in model.parameters()) / 1e9
    return problem, f"Llama-3.2-1B-shaped ({params:.2f}B params, random init, {args.dtype}), random tokens"


def timed(problem, method, repeats, device, fd_step=0.0):
    results, seconds, peak = [], [], 0
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        results.append(u2a.compute_scores(problem, method, fd_step=fd_step))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        seconds.append(time.perf_counter() - start)
    return results[-1], statistics.median(seconds), peak


def write_results(args, argv, rows: list[dict], what: str) -> None:
    """<stem>.csv (the rows under a header of the run's settings and machine) and <stem>.md."""
    info = machine_record()
    device = "cpu" if args.device == "cpu" else "cuda"
    name = args.out or f"u2a_scores_{device}{'_1b' if args.model_size == '1b' else ''}"
    stem = str(Path(args.out_dir) / name)
    header = [
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"model: {what}",
        f"candidates: {args.candidates}, J pairs: {args.j_pairs}, unlearning loss: {args.unlearn}, "
        f"forward batch: {args.batch_size}, timed repeats (central/jvp): {args.repeats}",
        f"machine: {info['cpu']} ({info['cores']} cores, torch threads {info['torch_threads']}), "
        f"GPU: {info['gpu']}, load average at end: {info['load_average']}",
        versions_line(info, ("python", "torch", "transformers")),
        command_line(__file__, argv),
    ]
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    write_csv(f"{stem}.csv", rows, list(rows[0]), header)
    table = [
        "| method | seconds | speed-up vs per-example | Spearman | max rel. error | median rel. error | h (fd_step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['method']} | {r['seconds']:.3f} | {r['speedup_vs_per_example']:.1f}x "
            f"| {r['spearman']:.5f} | {r['max_rel_error']:.2e} | {r['median_elementwise_rel_error']:.2e} "
            f"| {r['fd_step']:.0e} |"
        )
    title = "U2A scores: all candidates at once vs one backward per candidate"
    write_markdown(f"{stem}.md", title, header, [*table, ""])
    print(Path(f"{stem}.md").read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-size", choices=("tiny", "1b"), default="tiny")
    parser.add_argument("--dtype", default="float32", choices=sorted(u2a.DTYPES))
    parser.add_argument("--candidates", type=int, default=512)
    parser.add_argument("--j-pairs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=0, help="forward batch (0: 64 tiny, 16 1b)")
    parser.add_argument("--unlearn", default="npo", choices=u2a.UNLEARN_LOSSES)
    parser.add_argument("--methods", nargs="+", default=["central", "jvp", "per_example"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of central / jvp (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--sft-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="output stem (default u2a_scores_<device>[_1b])")
    parser.add_argument("--out-dir", default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (64 if args.model_size == "tiny" else 16)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")

    problem, what = (tiny_problem if args.model_size == "tiny" else llama_1b_problem)(args)
    methods = ["per_example", *[m for m in args.methods if m != "per_example"]]  # the reference first
    if "central" in methods:  # the same, with the step found by "central" given: no calibration passes
        methods.insert(methods.index("central") + 1, "central_fixed_h")
    rows, reference, step = [], None, 0.0
    for method in methods:
        repeats = 1 if method == "per_example" else args.repeats
        name = "central" if method == "central_fixed_h" else method
        result, seconds, peak = timed(problem, name, repeats, args.device, step if name != method else 0.0)
        step = result.fd_step if method == "central" else step
        if reference is None:
            reference = result.scores.double()
        scores = result.scores.double()
        elementwise = ((scores - reference).abs() / reference.abs().clamp(min=1e-12)).median()
        rows.append(
            {
                "method": method,
                "seconds": seconds,
                "speedup_vs_per_example": None,
                "spearman": float(spearmanr(scores, reference).statistic),
                "max_rel_error": float((scores - reference).abs().max() / reference.abs().max()),
                "median_elementwise_rel_error": float(elementwise),
                "fd_step": result.fd_step,
                "fd_check_on_j": result.fd_check,
                "peak_gpu_gib": peak / 2**30 if peak else None,
            }
        )
        print(
            f"{method:>12}: {seconds:8.3f}s  spearman {rows[-1]['spearman']:.5f}  "
            f"max rel err {rows[-1]['max_rel_error']:.2e}",
            file=sys.stderr,
        )
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_per_example"] = base / row["seconds"]

    write_results(args, argv, rows, what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
