#!/usr/bin/env python
"""`fastnpo plan` against the measured peak of real fastnpo training steps on a GPU.

    python benchmarks/bench_memory_plan.py --device cuda               # Llama-3.2-1B and 3.1-8B shapes
    python benchmarks/bench_memory_plan.py --device cpu --smoke        # the same code path, a micro Llama

Each case runs in a fresh subprocess: a randomly initialised Llama of the named shape (nothing is
downloaded) built directly on the device in bf16, fastnpo's own Trainer.around_model (wrap_model /
build_optimizer) and Trainer.step (NPO+RT, the fused log-prob op, AdamW), two steps on full-length
rows (no padding), and torch.cuda.max_memory_allocated over the whole run (weights, gradients,
optimizer state, the step) against the plan's "peak allocated" (fastnpo.train.memory_estimate.estimate)
for the same settings.
The CUDA context and allocator reserve are reported beside it, not compared (the plan adds a
fixed 1 GiB + 5% for them).

The first H200 run (benchmarks/results/memory_plan_cuda_h200.md) predates the planner's model of
optim.name=adamw_kahan: its Kahan row shows the plain-AdamW plan and no ratio.

Writes <out-dir>/<out>.csv and <out>.md (--out-dir: runs/benchmarks unless given; benchmarks/results holds
the committed results).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import MIB, OUT_DIR, fmt, read_results_csv, write_csv, write_markdown

MICRO = dict(
    model_type="llama",
    vocab_size=4099,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)

# (name, model, optimizer, activation checkpointing, rows per set, length, optim.in_backward,
# optim.offload)
GPU_CASES = [
    ("1b-ckpt", "meta-llama/Llama-3.2-1B", "adamw", True, 4, 512, False, False),
    ("1b-no-ckpt", "meta-llama/Llama-3.2-1B", "adamw", False, 4, 512, False, False),
    ("8b-ckpt", "meta-llama/Llama-3.1-8B", "adamw", True, 4, 512, False, False),
    ("8b-ckpt-kahan", "meta-llama/Llama-3.1-8B", "adamw_kahan", True, 4, 512, False, False),
    ("8b-ckpt-in-backward", "meta-llama/Llama-3.1-8B", "adamw", True, 4, 512, True, False),
    # configs/llama31_8b_npo_1gpu_40gb.yaml's optimizer (torchao compiles its step per tensor shape)
    ("8b-ckpt-8bit-in-backward", "meta-llama/Llama-3.1-8B", "adamw_8bit", True, 4, 512, True, False),
    # FSDP2 CPU offload over one GPU: the step runs in host memory (fused CPU AdamW)
    ("1b-ckpt-offload", "meta-llama/Llama-3.2-1B", "adamw", True, 4, 512, False, True),
    ("8b-ckpt-offload", "meta-llama/Llama-3.1-8B", "adamw", True, 4, 512, False, True),
]
SMOKE_CASES = [
    ("micro-ckpt", "micro", "adamw", True, 2, 64, False, False),
    ("micro-no-ckpt", "micro", "adamw", False, 2, 64, False, False),
    ("micro-in-backward", "micro", "adamw", True, 2, 64, True, False),
    ("micro-offload", "micro", "adamw", True, 2, 64, False, True),
]


def model_source(model: str):
    """What fastnpo.train.memory_plan reads: the micro config, or a KNOWN_MODELS name (offline)."""
    return dict(MICRO) if model == "micro" else model


def worker(case: list, device_name: str) -> dict:
    """In this (fresh) process: build, two steps, peaks. Returns bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastnpo import distributed
    from fastnpo.config import load_structured
    from fastnpo.train.config import Config
    from fastnpo.train.memory_plan import hf_config
    from fastnpo.train.trainer import Trainer

    _name, model, optim, checkpointing, rows, length, in_backward, offload = case
    info = distributed.setup(device_name, offload=offload)  # offload: FSDP2 over a group of one
    device = info.device
    dtype = "bfloat16"
    config = load_structured(
        Config,
        None,
        [
            "method.name=npo_rt",
            f"model.dtype={dtype}",
            f"optim.name={optim}",
            f"distributed.activation_checkpointing={checkpointing}",
            f"data.batch_size={rows}",
            f"data.retain_batch_size={rows}",
            f"data.max_length={length}",
            *(["optim.in_backward=true", "optim.max_grad_norm=0"] if in_backward else []),
            *(["optim.offload=true"] if offload else []),
        ],
    )
    hf = hf_config(model_source(model))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            net = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
        finally:
            torch.set_default_dtype(previous)
    build_s = time.perf_counter() - t0

    class Ref:  # cached reference log-probs: a constant is all the memory picture needs
        def lookup(self, set_name, index):
            return torch.full((len(index),), -50.0), None

    from types import SimpleNamespace

    tokenizer = SimpleNamespace(pad_token_id=0)
    trainer = Trainer.around_model(config, info, net, tokenizer, ref=Ref(), steps_per_epoch=10)
    generator = torch.Generator().manual_seed(1)

    def batch():
        items = []
        for index in range(2 * rows):
            ids = torch.randint(1, hf.vocab_size, (length,), generator=generator).tolist()
            items.append({"index": index, "input_ids": ids, "labels": [-100, *ids[1:]]})
        return {"forget": items[:rows], "retain": items[rows:]}

    step_s = []
    grad_norms = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    for _ in range(2):
        t0 = time.perf_counter()
        out = trainer.step(batch())
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t0)
        grad_norms.append(float(out.grad_norm))
    # the process's peak resident set (model build included): what offload asks of host memory
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"build_s": build_s, "step_s": step_s, "grad_norms": grad_norms, "host_peak": host_peak}
    if device.type == "cuda":
        result.update(
            peak_allocated=torch.cuda.max_memory_allocated(device),
            peak_reserved=torch.cuda.max_memory_reserved(device),
            device_used=torch.cuda.mem_get_info(device)[1] - torch.cuda.mem_get_info(device)[0],
        )
    else:
        from fastnpo.profiling import peak_memory_bytes

        result.update(peak_allocated=peak_memory_bytes(device), peak_reserved=0, device_used=0)
    return result


def predicted(case: list, device_name: str) -> dict:
    from fastnpo.train.memory_estimate import Settings, estimate
    from fastnpo.train.memory_plan import model_shape

    _name, model, optim, checkpointing, rows, length, in_backward, offload = case
    shape = model_shape(model_source(model))
    settings = Settings(
        dtype="bfloat16",
        activation_checkpointing=checkpointing,
        rows=2 * rows,
        seq_len=length,
        padded=False,
        device="cuda" if device_name.startswith("cuda") else "cpu",
        optimizer=optim,  # optim.state_dtype stays at its default (float32), as in the worker
        in_backward=in_backward,
        offload=offload,
        sharded=offload,
    )
    e = estimate(shape, settings)
    return {"allocated": e.allocated, "total": e.total, "phase": e.peak_phase, "params": shape.params, "host": e.host}


def run_case(case, device_name: str, timeout: float, log) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_memory_plan as b; "
        f"print('RESULT', json.dumps(b.worker(json.loads(sys.argv[1]), {device_name!r})))"
    )
    argv = [sys.executable, "-c", code, json.dumps(case)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        log(done.stderr[-3000:])
        return {"status": f"failed: {tail[:200]}"}
    return {"status": "ok", **json.loads(lines[-1][len("RESULT ") :])}


FIELDS = [
    "case",
    "model",
    "params",
    "optimizer",
    "in_backward",
    "offload",
    "checkpointing",
    "rows",
    "length",
    "status",
    "measured_peak_mib",
    "predicted_mib",
    "predicted_over_measured",
    "predicted_phase",
    "predicted_total_gib",
    "predicted_host_gib",
    "host_peak_gib",
    "reserved_peak_mib",
    "device_used_mib",
    "step_s",
    "build_s",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a micro Llama (any device)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per case")
    parser.add_argument("--out", default=None, help="output stem (default memory_plan_<device>)")
    parser.add_argument("--out-dir", default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    parser.add_argument("--csv-only", action="store_true", help="no markdown table (the GPU suite's file limit)")
    parser.add_argument("--markdown-from", default=None, help="only write <csv>'s markdown table beside it")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.markdown_from:
        markdown_from_csv(Path(args.markdown_from))
        return 0
    cases = SMOKE_CASES if args.smoke else GPU_CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c[0] in wanted]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out or f"memory_plan_{args.device.split(':')[0]}{'_smoke' if args.smoke else ''}"

    def log(text):
        print(text, flush=True)

    import torch

    machine = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else "CPU"
    rows = []
    for case in cases:
        name, model, optim, checkpointing, per_set, length, in_backward, offload = case
        plan = predicted(list(case), args.device)
        shape = f"{2 * per_set}x{length}"
        log(f"{name}: {model} {optim} in_backward={in_backward} checkpointing={checkpointing} {shape} ...")
        got = run_case(list(case), args.device, args.timeout, log)
        row = dict(
            case=name,
            model=model,
            params=plan["params"],
            optimizer=optim,
            in_backward=in_backward,
            offload=offload,
            checkpointing=checkpointing,
            rows=2 * per_set,
            length=length,
            status=got["status"],
            predicted_mib=plan["allocated"] / MIB,
            predicted_phase=plan["phase"],
            predicted_total_gib=plan["total"] / 2**30,
            predicted_host_gib=plan["host"] / 2**30,
        )
        if got["status"] == "ok":
            row.update(
                measured_peak_mib=got["peak_allocated"] / MIB,
                reserved_peak_mib=got["peak_reserved"] / MIB,
                device_used_mib=got["device_used"] / MIB,
                step_s=";".join(f"{s:.2f}" for s in got["step_s"]),
                build_s=got["build_s"],
                host_peak_gib=got["host_peak"] / 2**30,
            )
            if args.device.startswith("cuda"):  # CPU: a whole-process RSS, not comparable
                row["predicted_over_measured"] = plan["allocated"] / got["peak_allocated"]
        rows.append(row)
        log("  " + json.dumps({k: v for k, v in row.items() if k not in ("model",)}, default=str))
        write_csv(out_dir / f"{stem}.csv", rows, FIELDS, [machine_text(machine, torch.__version__)])
        if not args.csv_only:
            write_table(out_dir / f"{stem}.md", rows, machine, torch.__version__)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def markdown_from_csv(path: Path) -> Path:
    """The markdown table of a CSV written earlier (the GPU suite brings back the CSV only)."""
    header, rows = read_results_csv(path)
    machine, _, version = (header or [""])[0].partition(", torch ")
    out = path.with_suffix(".md")
    write_table(out, rows, machine, version)
    return out


def machine_text(machine: str, torch_version: str) -> str:
    """The CSV's one header line, which the markdown's title repeats."""
    return f"{machine}, torch {torch_version}"


def write_table(md_path: Path, rows: list[dict], machine: str, torch_version: str) -> None:
    lines = [
        "NPO+RT, bf16 parameters / gradients / optimizer state, fused log-prob op, full-length rows, "
        "two steps; measured = torch.cuda.max_memory_allocated over the run (CPU: peak resident set).",
        "",
        "| case | model | optimizer | ckpt | rows x len | measured MiB | plan MiB | plan / measured "
        "| plan's peak moment | reserved MiB | step s |",
        "|---|---|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        optimizer = r["optimizer"] + (", in backward" if str(r.get("in_backward")) == "True" else "")
        optimizer += ", offload" if str(r.get("offload")) == "True" else ""
        lines.append(
            f"| {r['case']} | {r['model']} | {optimizer} | {r['checkpointing']} | {r['rows']}x{r['length']} "
            f"| {fmt(r.get('measured_peak_mib'), '.0f')} | {fmt(r['predicted_mib'], '.0f')} "
            f"| {fmt(r.get('predicted_over_measured'), '.3f')} | {r['predicted_phase']} "
            f"| {fmt(r.get('reserved_peak_mib'), '.0f')} | {r.get('step_s', r['status'])} |"
        )
    title = f"Memory plan vs measured peak ({machine_text(machine, torch_version)})"
    write_markdown(md_path, title, [], [*lines, ""])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
