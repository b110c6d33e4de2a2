#!/usr/bin/env python
"""fastnpo's REAL trainer step (fastnpo.train.train -> Trainer.step) on the batch of
configs/tofu_llama32_1b_npo_rt.yaml, model.loss_design=one_pass against two_call (issue 24 item 7).

    .venv/bin/python benchmarks/bench_trainer.py --smoke            # CPU: micro model, 1 + 2 steps (~20 s)
    python benchmarks/bench_trainer.py --device cuda --model 1b     # GPU: Llama-3.2-1B shape, bf16, random weights
    python benchmarks/bench_trainer.py --device cuda --model 1b,8b-slice

Contenders: one `fastnpo.train.train(config)` each, in this process, one after the other, on the same
data, model shape and seed; only model.loss_design differs:

  two_call   the fused token log-probs, then autograd through NPO+RT's loss (the general path);
  one_pass   ONE call computes the logits, the loss and both gradients chunk by chunk (ops.example_loss).

The config is tofu_llama32_1b_npo_rt.yaml's: NPO+RT (beta 0.1, retain_coeff 1), data.batch_size 16 forget +
retain_batch_size 16 retain, optim.grad_accum 2 (a step = 32 + 32 examples in two micro-batches), max_length
512, the chat template, answer_prefix "", AdamW lr 1e-5; model.random_init=true at the chosen shape:

  1b         Llama-3.2-1B (benchmarks/common.llama_1b_config: D 2048, 16 layers, V 128256, tied head);
  8b-slice   Llama-3.1-8B's D 4096, I 14336, 32 heads / 8 KV heads, V 128256 (untied), with 16 of its 32
             layers: 4.54e9 parameters x 8 bytes (bf16 weights, gradients and both AdamW moments:
             torch.optim.AdamW keeps the parameters' dtype) = 36 GB, plus ~10 GB of activations at this
             batch (no activation checkpointing, as in the config): ~46 GB fits an 80 GB H100 with room;
             24 layers would be ~63 GB before the allocator's slack and the logits chunks. The head is a
             larger share of the work than in the full 8B (1.05e9 of 4.54e9 parameters, against 8.0e9);
  micro      a 2-layer D=64 Llama on the tokenizer's vocabulary (the CPU smoke).

Data: synthetic TOFU-schema forget and retain sets written by this script (questions of 15-30 tokens,
answers of 30-60, as TOFU's; the words are made up: lengths matter here, not content), one epoch of
exactly the steps run. Tokenizer: no Llama tokenizer is available offline, so the tiny byte-level BPE of
fastnpo.tiny (1024 ids) with a Llama-3-style chat template this script writes (`<|start_header_id|>user
<|end_header_id|>question<|eot_id|>...`, the markers single tokens); the output header says so. The token
ids stay below 1024, the model's vocabulary is the shape's (128256), so the head's cost is Llama's.

Per contender, from a wrapper around fastnpo.train.trainer.Trainer.step (the device synchronised around each
step): median / min / max step ms over the timed steps (after the warm-up steps), input tokens per step
(padding excluded) and tokens/s, the peak memory the trainer logs (metrics.jsonl's peak_memory_mib: CUDA
max_memory_allocated of the step, model and optimizer included; CPU the process's peak resident set, as
fastnpo.profiling measures it), the first step's loss (both designs train the same model), the floor:
6 x P x tokens FLOPs (P: the matmul weights, head included; attention's own FLOPs left out) at the matmul
rate this run measures (CUDA: bf16 8192^3; CPU: fp32 512^3), x_floor = median / floor. On CUDA one more
step runs under torch.profiler: per step, device launches, device-busy ms (the union of the kernels',
copies' and fills' intervals), busy_share = device-busy ms / the median unprofiled step, host syncs
(cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize, cudaMemcpy) and scalar reads; on a
CPU those are n/a. The steps run in length-grouped batches, so shapes change from step to step: a Triton
kernel tuned on a new shape inside a timed step shows in max_step_ms, not in the median.

Writes runs/benchmarks/trainer_<device>[_smoke].{csv,md} (rewritten after each model); --out-dir, --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    OUT_DIR,
    CpuShare,
    clean_memory,
    command_line,
    date_line,
    device_kind,
    fmt,
    llama_1b_config,
    llama_8b_config,
    load_average,
    machine_info,
    machine_line,
    markdown_table,
    matmul_params,
    median_ms,
    synchronize,
    trace_counts,
    versions_line,
    write_csv,
    write_markdown,
)

STARTED = time.perf_counter()  # --deadline-s counts from here (after the imports)
CONTENDERS = ("two_call", "one_pass")
SLICE_LAYERS = 16  # of Llama-3.1-8B's 32: see the docstring
MICRO = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
)
# configs/tofu_llama32_1b_npo_rt.yaml's data, method and optimizer settings
RECIPE = {
    "data.template": "chat",
    "data.answer_prefix": "''",  # "" (an empty override would be null)
    "data.max_length": 512,
    "data.batch_size": 16,
    "data.retain_batch_size": 16,
    "method.name": "npo_rt",
    "method.beta": 0.1,
    "method.retain_coeff": 1.0,
    "optim.lr": 1.0e-5,
    "optim.warmup_epochs": 1,
    "optim.grad_accum": 2,
}
# Llama-3-style markers, each one token of the tiny tokenizer (the prompt ends on one, so the answer's
# tokens are the same with or without it: the data code checks that the prompt is a prefix).
MARKERS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHAT_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>' }}{% endif %}"
)
QUESTION_TOKENS, ANSWER_TOKENS = (15, 30), (30, 60)  # TOFU-like: questions ~15-30 tokens, answers ~30-60
FIELDS = (
    "model",
    "method",
    "contender",
    "steps_timed",
    "median_step_ms",
    "min_step_ms",
    "max_step_ms",
    "tokens_per_step",
    "tokens_per_s",
    "speedup_vs_two_call",
    "peak_mib",
    "floor_ms",
    "x_floor",
    "device_busy_ms",
    "busy_share",
    "launches_per_step",
    "host_syncs_per_step",
    "scalar_reads_per_step",
    "first_loss",
    "setup_s",
)


def model_shape(name: str, vocab: int) -> dict:
    if name == "1b":
        return llama_1b_config()
    if name == "8b-slice":
        return llama_8b_config(SLICE_LAYERS)
    if name == "micro":
        return {**MICRO, "vocab_size": vocab}
    raise SystemExit(f"--model {name!r}: expected 1b, 8b-slice or micro")


# ---------------------------------------------------------------------------------------------
# Data, tokenizer, model folder
# ---------------------------------------------------------------------------------------------


def made_up_words(rng: random.Random, count: int) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def build_tokenizer(seed: int):
    """The tiny BPE (fastnpo.tiny) trained on made-up words, with the chat template above."""
    from fastnpo.tiny import build_tokenizer as tiny_tokenizer

    rng = random.Random(seed)
    words = made_up_words(rng, 600)
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(300)]
    tokenizer = tiny_tokenizer(texts, vocab_size=1024, extra_tokens=MARKERS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, words


def sentence(rng, words, counts, low: int, high: int, end: str) -> str:
    """Words until the token count reaches a target drawn from [low, high] (the pre-tokenizer splits
    before each space, so counts add up word by word)."""
    target, total, chosen = rng.randint(low, high), 0, []
    while total < target - 1:
        word = rng.choice(words)
        chosen.append(word)
        total += counts[word]
    return " ".join(chosen) + end


def write_data(folder: Path, tokenizer, words, examples: int, seed: int) -> dict:
    """forget.jsonl and retain.jsonl of `examples` TOFU-schema rows each; their token statistics."""
    counts = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    stats = {}
    for name, offset in (("forget", 1), ("retain", 2)):
        rng = random.Random(seed * 10 + offset)
        rows = [
            {
                "question": sentence(rng, words, counts, *QUESTION_TOKENS, "?"),
                "answer": sentence(rng, words, counts, *ANSWER_TOKENS, "."),
            }
            for _ in range(examples)
        ]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        q = [len(tokenizer(r["question"], add_special_tokens=False)["input_ids"]) for r in rows]
        a = [len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows]
        stats[name] = (statistics.mean(q), statistics.mean(a))
    return stats


def write_model_folder(folder: Path, tokenizer, shape: dict, dtype: str) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        **{k: v for k, v in shape.items() if k != "dtype"},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# One contender: fastnpo.train.train with its steps timed
# ---------------------------------------------------------------------------------------------


def run_contender(design: str, args, folder: Path, device: torch.device, dtype: str, log) -> dict:
    from fastnpo.train import load_config, train
    from fastnpo.train import setup as train_setup
    from fastnpo.train import trainer as train_trainer

    probe = 1 if device.type == "cuda" else 0
    steps = args.warmup + args.steps + probe
    out = folder / "runs" / design
    overrides = {
        **RECIPE,
        "method.name": args.method,
        "model.name_or_path": str(folder / "model"),
        "model.random_init": True,
        "model.dtype": dtype,
        "model.loss_design": design,
        "data.forget": str(folder / "data" / "forget.jsonl"),
        "data.retain": str(folder / "data" / "retain.jsonl"),
        "optim.max_steps": steps,
        "run.output_dir": str(out),
        "run.cache_dir": str(folder / "ref-cache"),
        "run.device": device.type,
        "run.seed": args.seed,
        "run.overwrite": True,
        "run.export": False,
        "run.progress": False,
        "run.log_every": 0,
    }
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    records, profile = [], {}
    original_step, original_load = train_trainer.Trainer.step, train_trainer.load_model

    def load_model(config, device):
        # Random weights drawn on the GPU (seconds, not a minute of CPU init for 4.5e9 parameters);
        # nothing about the step changes.
        if device.type != "cuda" or not config.model.random_init:
            return original_load(config, device)
        with torch.device(device):
            return train_setup.load_causal_lm(
                config.model.name_or_path,
                dtype=config.model.dtype,
                attn_implementation=config.model.attn_implementation,
                random_init=True,
            )

    def timed_step(trainer, batch):
        index = len(records)
        tokens = sum(len(item["input_ids"]) for name in trainer.method.sets for item in batch.get(name) or ())
        synchronize(device)
        if index < args.warmup + args.steps:
            started = time.perf_counter()
            result = original_step(trainer, batch)
            synchronize(device)
            records.append({"ms": (time.perf_counter() - started) * 1e3, "tokens": tokens})
            return result
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            result = original_step(trainer, batch)
            synchronize(device)
        profile.update(trace_counts(prof, 1))
        records.append({"ms": None, "tokens": tokens})
        return result

    clean_memory(device)
    train_trainer.Trainer.step, train_trainer.load_model = timed_step, load_model
    started = time.perf_counter()
    try:
        train(config)
    finally:
        train_trainer.Trainer.step, train_trainer.load_model = original_step, original_load
    total_s = time.perf_counter() - started
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[args.warmup : args.warmup + args.steps]
    times = [r["ms"] for r in timed]
    clean_memory(device)
    shown = ", ".join(f"{r['ms']:.0f}" for r in records if r["ms"] is not None)
    log(f"  {design}: steps {shown} ms")
    return {
        "times": times,
        "tokens": statistics.mean(r["tokens"] for r in timed),
        "peak_mib": max(m["peak_memory_mib"] for m in metrics[args.warmup : args.warmup + args.steps]),
        "first_loss": metrics[0]["loss"],
        "setup_s": total_s - sum(r["ms"] or 0 for r in records) / 1e3,
        "profile": profile,
    }


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """FLOP/s of a square matmul measured here (CUDA: bf16 8192^3; CPU: fp32 512^3)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    pair = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
    ms, _ = median_ms(lambda: pair[0] @ pair[1], device, warmup=2, repeats=5)
    rate = 2 * n**3 / (ms / 1e3)
    pair.clear()
    clean_memory(device)
    return rate, f"{str(dtype).removeprefix('torch.')} {n}^3 matmul, median"


def summarise(model: str, method: str, results: dict, shape: dict, rate: float) -> list[dict]:
    rows = []
    base = results.get("two_call")
    p = matmul_params(shape)
    for design, r in results.items():
        median = statistics.median(r["times"])
        floor_ms = 6 * p * r["tokens"] / rate * 1e3
        prof = r["profile"]
        busy = prof.get("device_busy_ms")
        rows.append(
            {
                "model": model,
                "method": method,
                "contender": design,
                "steps_timed": len(r["times"]),
                "median_step_ms": round(median, 2),
                "min_step_ms": round(min(r["times"]), 2),
                "max_step_ms": round(max(r["times"]), 2),
                "tokens_per_step": round(r["tokens"]),
                "tokens_per_s": round(r["tokens"] / median * 1e3),
                "speedup_vs_two_call": round(statistics.median(base["times"]) / median, 3) if base else None,
                "peak_mib": round(r["peak_mib"], 1),
                "floor_ms": round(floor_ms, 3),
                "x_floor": round(median / floor_ms, 2),
                "device_busy_ms": round(busy, 2) if busy is not None else "n/a",
                "busy_share": round(busy / median, 3) if busy is not None else "n/a",
                "launches_per_step": round(prof["launches"]) if prof.get("launches") is not None else "n/a",
                "host_syncs_per_step": round(prof["syncs"]) if "syncs" in prof else "n/a",
                "scalar_reads_per_step": round(prof["scalar_reads"]) if "scalar_reads" in prof else "n/a",
                "first_loss": f"{r['first_loss']:.6g}",
                "setup_s": round(r["setup_s"], 1),
            }
        )
    return rows


def write_outputs(out_dir: Path, stem: str, rows: list[dict], header: list[str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    write_csv(csv_path, rows, FIELDS, header)
    shown = (
        "model",
        "method",
        "contender",
        "median_step_ms",
        "max_step_ms",
        "tokens_per_step",
        "tokens_per_s",
        "speedup_vs_two_call",
        "peak_mib",
        "x_floor",
        "busy_share",
        "launches_per_step",
        "host_syncs_per_step",
        "first_loss",
    )
    body = markdown_table(({f: fmt_cell(row[f]) for f in shown} for row in rows), shown)
    title = f"fastnpo trainer step: one_pass vs two_call ({rows[0]['method'] if rows else '?'}, TOFU batch)"
    write_markdown(md_path, title, header, [*body, ""])
    return csv_path, md_path


def fmt_cell(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return fmt(value, ".4g") if abs(value) < 1e5 else fmt(value, ".0f")
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model", default=None, help="comma-separated: 1b, 8b-slice, micro (default 1b; --smoke micro)"
    )
    parser.add_argument("--dtype", default=None, help="model.dtype (default bfloat16 on CUDA, float32 on a CPU)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="loss designs, in the order they run")
    parser.add_argument(
        "--method",
        default=RECIPE["method.name"],
        help="method.name: the recipe's npo_rt, or another method the one-pass design computes (e.g. wga, the "
        "token-level route)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, autotune, allocator)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--smoke", action="store_true", help="micro model, 1 warm-up + 2 timed steps, CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="seconds from the start: a model after the first starts only if the time left is >= 1.2x what the "
        "previous model took (the GPU suite's limit)",
    )
    parser.add_argument("--out-dir", default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    parser.add_argument("--out", default=None, help="file stem (default trainer_<device>[_smoke])")
    parser.add_argument(
        "--work-dir", default=None, help="where the data, model folder and runs go (default: a temp dir)"
    )
    return parser


def main(argv=None) -> tuple[Path, Path]:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.device, args.warmup, args.steps = "cpu", 1, 2
        args.model = args.model or "micro"
    models = (args.model or "1b").split(",")
    contenders = [c for c in args.contenders.split(",") if c]
    if not set(contenders) <= set(CONTENDERS):
        raise SystemExit(f"--contenders {args.contenders!r}: expected some of {', '.join(CONTENDERS)}")
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    info, share = machine_info(device), CpuShare()
    log = lambda text: print(text, flush=True)
    rate, rate_what = matmul_rate(device)
    log(f"matmul rate: {rate / 1e12:.2f} TFLOP/s ({rate_what})")
    stem = args.out or f"trainer_{device_kind(device)}" + ("_smoke" if args.smoke else "")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fastnpo-bench-trainer-"))
    tokenizer, words = build_tokenizer(args.seed)
    examples = RECIPE["data.batch_size"] * RECIPE["optim.grad_accum"] * (args.warmup + args.steps + 1)
    rows, shapes, paths, skipped = [], [], None, []
    model_started, header = None, []
    for model in models:
        if model_started is not None and args.deadline_s is not None:
            took, left = time.perf_counter() - model_started, args.deadline_s - (time.perf_counter() - STARTED)
            if left < 1.2 * took:
                skipped.append(
                    f"{model} skipped: {left:.0f} s left of --deadline-s {args.deadline_s:.0f}, the model "
                    f"before took {took:.0f} s"
                )
                log(skipped[-1])
                header[-1:-1] = skipped[-1:]
                paths = write_outputs(Path(args.out_dir), stem, rows, header)
                continue
        model_started = time.perf_counter()
        folder = work / model
        (folder / "data").mkdir(parents=True, exist_ok=True)
        lengths = write_data(folder / "data", tokenizer, words, examples, args.seed)
        shape = model_shape(model, len(tokenizer))
        write_model_folder(folder / "model", tokenizer, shape, dtype)
        shapes.append(
            f"{model}: D {shape['hidden_size']}, {shape['num_hidden_layers']} layers, I {shape['intermediate_size']}, "
            f"{shape['num_attention_heads']}/{shape.get('num_key_value_heads')} heads, V {shape['vocab_size']}, "
            f"tied head {shape.get('tie_word_embeddings', False)}, matmul weights {matmul_params(shape) / 1e9:.3g}e9"
        )
        log(f"--- {shapes[-1]}; forget / retain prompt+answer tokens {lengths}")
        results = {}
        for design in contenders:
            results[design] = run_contender(design, args, folder, device, dtype, log)
            gc.collect()
        rows += summarise(model, args.method, results, shape, rate)
        for row in rows[-len(contenders) :]:
            log(str(row))
        header = [
            date_line(info),
            machine_line(info),
            versions_line(info, ("python", "torch", "triton", "fastnpo")),
            f"load average at start {info.get('load average at start', '?')}, at end {load_average()}; "
            f"CPU share {share.cores():.2f} cores",
            "tokenizer: NO Llama tokenizer offline: fastnpo.tiny's byte-level BPE (1024 ids) with a Llama-3-style "
            "chat template written by this script (data.template=chat); token counts, not text, are what matter",
            f"data: synthetic TOFU-schema rows, questions {QUESTION_TOKENS[0]}-{QUESTION_TOKENS[1]} tokens, answers "
            f"{ANSWER_TOKENS[0]}-{ANSWER_TOKENS[1]} (mean question/answer tokens of the last model's sets: "
            + ", ".join(f"{k} {q:.1f}/{a:.1f}" for k, (q, a) in lengths.items())
            + ")",
            f"recipe: configs/tofu_llama32_1b_npo_rt.yaml's (method.name {args.method}): batch 16 forget + 16 retain, "
            "grad_accum 2, "
            f"max_length 512, AdamW; model.random_init, model.dtype {dtype}",
            *(f"model {s}" for s in shapes),
            f"timing: median of {args.steps} steps after {args.warmup} warm-up, one train() per contender in this "
            "process, the device synchronised around each step (wrapper of fastnpo.train.trainer.Trainer.step)",
            f"floor: 6 x matmul weights x input tokens at {rate / 1e12:.2f} TFLOP/s ({rate_what}, this run)",
            "peak_mib: the trainer's metrics.jsonl peak_memory_mib, max over the timed steps ("
            + (
                "CUDA max_memory_allocated"
                if device.type == "cuda"
                else "the process's peak resident set, whole process"
            )
            + ")",
            "busy_share, launches, host syncs: "
            + (
                "one more step under torch.profiler; busy share = device-busy ms (union of kernel/copy/fill "
                "intervals) / median unprofiled step ms; syncs: cudaStreamSynchronize, cudaDeviceSynchronize, "
                "cudaEventSynchronize, cudaMemcpy (less the closing synchronize)"
                if device.type == "cuda"
                else "n/a on a CPU"
            ),
            *skipped,
            command_line(__file__, argv),
        ]
        if args.smoke:
            header.insert(0, "SMOKE: micro model on a CPU, numbers are not a benchmark")
        paths = write_outputs(Path(args.out_dir), stem, rows, header)
        log(f"wrote {paths[0]} and {paths[1]}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
