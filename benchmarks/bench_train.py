#!/usr/bin/env python
"""NPO training steps: fastnpo's step against an open-unlearning-style step, side by side.

    .venv/bin/python benchmarks/bench_train.py             # CPU: tiny Llama (V=32000), fp32, ~5 min on 2 shared cores
    .venv/bin/python benchmarks/bench_train.py --quick     # CPU: 1 warm-up + 3 timed steps (~3 min)
    python benchmarks/bench_train.py --device cuda         # GPU: Llama-3.2-1B-shaped, random weights, bf16

Contenders (one NPO step each: forward, NPO loss, backward, gradient clipping, AdamW step):

  baseline         open-unlearning style: every example padded to a fixed length (500 tokens on GPU),
                   Hugging Face forward with full logits -> log_softmax -> gather -> summed answer
                   log-probs, and a LIVE reference model (a frozen copy) forwarded every step;
  strong-baseline  the same with dynamic padding (pad to the longest example of a length-grouped batch)
                   and, on CUDA with liger-kernel installed, Liger's fused linear cross-entropy
                   (reduction="none") for the policy's and the reference's log-probs instead of
                   full logits (the CSV's logprobs column says which ran);
  cached-ref       strong-baseline with reference log-probs from a cache computed once before timing
                   (no reference model in memory), still full logits;
  fastnpo          cached-ref with fastnpo.modeling.SequenceLogprobModel: the fused log-prob op
                   (no [tokens x vocab] logits), as in fastnpo.train.

So the ladder baseline -> strong-baseline -> cached-ref -> fastnpo separates the three sources of
the speed-up: padding, the reference model, the logits. Timing: all contenders in this process,
the same batches, medians after warm-up (CPU: interleaved round-robin, so load from other
processes hits every contender alike; CUDA: one contender at a time). Peak memory: each contender
in a fresh subprocess (CPU with MALLOC_MMAP_THRESHOLD_=65536, so the resident-set peak is exact).

Writes runs/benchmarks/train_<device>[_quick].{csv,md,png} (--out-dir benchmarks/results: the committed
results).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from common import (
    MIB,
    OUT_DIR,
    CpuShare,
    bar_panel,
    clean_memory,
    command_line,
    date_line,
    device_kind,
    fmt,
    llama_1b_config,
    load_average,
    machine_info,
    machine_line,
    pyplot,
    read_results_csv,
    save_figure,
    synchronize,
    versions_line,
    write_csv,
    write_markdown,
)

from fastnpo.data import collate, length_grouped_batches
from fastnpo.distributed import ProcessInfo
from fastnpo.losses import npo_from_logprobs
from fastnpo.modeling import DTYPES, SequenceLogprobModel
from fastnpo.ops import IGNORE_INDEX
from fastnpo.profiling import peak_memory_during
from fastnpo.refcache import sharded_item_logprobs

PAD_ID = 0  # random token ids are drawn from [1, V)
LLAMA_1B = llama_1b_config()
# A tiny Llama for 2 CPU cores, with a real-sized vocabulary so that the logits matter.
TINY_32K = dict(
    vocab_size=32000,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)
# Only used to load every code path before a memory measurement starts (see memory_worker).
MICRO = dict(TINY_32K, vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
MODELS = {"1b": LLAMA_1B, "tiny": TINY_32K, "micro": MICRO}


@dataclass(frozen=True)
class Spec:
    name: str
    padding: str  # "fixed" | "dynamic"
    reference: str  # "live" | "cached"
    logprobs: str  # "full-logits" | "fused" | "liger" (Liger FLCE where it runs, else full logits)


SPECS = (
    Spec("baseline", "fixed", "live", "full-logits"),
    Spec("strong-baseline", "dynamic", "live", "liger"),
    Spec("cached-ref", "dynamic", "cached", "full-logits"),
    Spec("fastnpo", "dynamic", "cached", "fused"),
)
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}


@dataclass
class Settings:
    """Everything a contender needs; sent as JSON to the memory subprocesses."""

    device: str
    dtype: str
    model: str
    seed: int
    pool: int  # forget-set size (TOFU forget10: 400 QA pairs)
    batch_size: int
    length_scale: float  # every length and the fixed padding length are multiplied by it
    pad_to: int
    warmup: int
    steps: int
    lr: float = 1e-5
    weight_decay: float = 0.01
    beta: float = 0.1
    max_grad_norm: float = 1.0
    impl: str = "auto"
    logit_std: float = 1.5
    # CUDA: Triton kernels (fastnpo's autotuned ones, Liger's) compile on a batch shape's first use,
    # which took seconds inside the timed steps of the first H200 run: warm up on every timed shape.
    warm_every_shape: bool = False

    @property
    def config(self) -> dict:
        return MODELS[self.model]


# ---------------------------------------------------------------------------------------------
# Data: TOFU-like lengths, random token ids
# ---------------------------------------------------------------------------------------------

PROMPT_MEAN, PROMPT_SD, PROMPT_MIN, PROMPT_MAX = 25.0, 4.0, 15, 40
ANSWER_MEDIAN, ANSWER_SIGMA, ANSWER_MIN, ANSWER_MAX = 35.0, 0.45, 15, 90


def make_items(s: Settings) -> list[dict]:
    """`pool` examples {index, input_ids, labels}: prompt ~ N(25, 4) tokens clipped to [15, 40]
    ([INST] question [/INST] with a Llama tokenizer), answer ~ log-normal (median 35, sigma 0.45)
    clipped to [15, 90]; every length times length_scale. Token ids uniform in [1, V)."""
    rng = np.random.default_rng(s.seed)
    k, vocab = s.length_scale, s.config["vocab_size"]
    items = []
    for index in range(s.pool):
        prompt = round(k * float(np.clip(rng.normal(PROMPT_MEAN, PROMPT_SD), PROMPT_MIN, PROMPT_MAX)))
        answer = float(np.clip(rng.lognormal(math.log(ANSWER_MEDIAN), ANSWER_SIGMA), ANSWER_MIN, ANSWER_MAX))
        answer = max(2, round(k * answer))
        ids = rng.integers(1, vocab, prompt + answer).tolist()
        items.append({"index": index, "input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    if max(len(item["input_ids"]) for item in items) > s.pad_to:
        raise SystemExit(f"--pad-to {s.pad_to} is shorter than the longest example")
    return items


def used_items(batches: list[list[dict]]) -> list[dict]:
    """The distinct examples the steps use: what the reference cache is built for here."""
    return list({item["index"]: item for batch in batches for item in batch}.values())


def step_batches(s: Settings, items: list[dict]) -> list[list[dict]]:
    """The warm-up + timed steps' batches: fastnpo's length-grouped batches (what its trainer uses),
    the same for every contender."""
    lengths = [len(item["input_ids"]) for item in items]
    order = length_grouped_batches(lengths, s.batch_size, seed=s.seed, epoch=0, drop_last=True)
    needed = s.warmup + s.steps
    return [[items[i] for i in order[step % len(order)]] for step in range(needed)]


def pad_batch(batch: dict, length: int) -> dict:
    extra = length - batch["input_ids"].shape[1]
    pad = torch.nn.functional.pad
    return {
        "input_ids": pad(batch["input_ids"], (0, extra), value=PAD_ID),
        "attention_mask": pad(batch["attention_mask"], (0, extra), value=0),
        "labels": pad(batch["labels"], (0, extra), value=IGNORE_INDEX),
        "index": batch["index"],
    }


# ---------------------------------------------------------------------------------------------
# Model and contenders
# ---------------------------------------------------------------------------------------------


def build_model(s: Settings):
    """A randomly initialised Llama (same seed -> same weights in every contender and process).

    A random model's logits are flat (std 0.02 sqrt(D) ~ 0.9 at D=2048), which would let the bf16
    triton backward's gradient filtering (2^-12) skip almost every vocabulary tile and flatter
    fastnpo; the final RMSNorm weight is set so the logits get std `logit_std` (1.5: ~0.1% of the
    probabilities >= 2^-12 at V=128k, about what benchmarks/bench_logprobs.py's trained-like
    profile has)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**s.config, attn_implementation="sdpa")
    torch.manual_seed(s.seed)
    with torch.device(s.device):
        model = LlamaForCausalLM(config)
    model.to(DTYPES[s.dtype])
    with torch.no_grad():
        model.model.norm.weight.fill_(s.logit_std / (config.initializer_range * math.sqrt(config.hidden_size)))
    return model.train()


def full_logits_logprobs(model, batch: dict) -> torch.Tensor:
    """Summed answer log-probs [B] the open-unlearning way: full logits, log_softmax, gather."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = logits[:, :-1].float().log_softmax(-1)
    targets = batch["labels"][:, 1:]
    token = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * (targets != IGNORE_INDEX)).sum(-1)


def liger_loss_or_none(device: torch.device):
    """Liger's fused linear cross-entropy (per token), where it runs: CUDA with liger-kernel."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="none")


def liger_logprobs(model, batch: dict, loss_fn) -> torch.Tensor:
    """Summed answer log-probs [B] from the last hidden states and the lm_head through Liger's
    fused linear cross-entropy: -CE per token, no [tokens x vocab] logits kept."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    b, t, d = hidden.shape
    ce = loss_fn(model.lm_head.weight, hidden.reshape(b * t, d), targets.reshape(b * t))
    return -(ce.float().view(b, t) * (targets != IGNORE_INDEX)).sum(-1)


class Contender:
    def __init__(self, spec: Spec, s: Settings):
        self.spec, self.s = spec, s
        self.device = torch.device(s.device)
        self.model = build_model(s)
        self.reference = None
        if spec.reference == "live":
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.wrapper = SequenceLogprobModel(self.model, impl=s.impl) if spec.logprobs == "fused" else None
        self.liger = liger_loss_or_none(self.device) if spec.logprobs == "liger" else None
        self.logprobs_used = "liger" if self.liger is not None else "fused" if self.wrapper else "full-logits"
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=s.weight_decay)
        self.cache: torch.Tensor | None = None
        self.cache_seconds = float("nan")

    def build_cache(self, items: list[dict]) -> None:
        """Reference log-probs of every example, once, with the initial model (batches of
        2 x batch_size, as fastnpo.train does); the cost is reported, not timed with the steps."""
        synchronize(self.device)
        started = time.perf_counter()
        if self.wrapper is not None:
            info = ProcessInfo(rank=0, world_size=1, local_rank=0, device=self.device)
            self.cache, _ = sharded_item_logprobs(self.wrapper.eval(), items, PAD_ID, 2 * self.s.batch_size, info)
            self.wrapper.train()
        else:
            self.model.eval()
            cache = torch.zeros(max(item["index"] for item in items) + 1)
            with torch.no_grad():
                for start in range(0, len(items), 2 * self.s.batch_size):
                    batch = self.batch(items[start : start + 2 * self.s.batch_size])
                    cache[batch["index"].cpu()] = full_logits_logprobs(self.model, batch).float().cpu()
            self.model.train()
            self.cache = cache
        synchronize(self.device)
        self.cache_seconds = time.perf_counter() - started

    def batch(self, items: list[dict]) -> dict:
        batch = collate(items, PAD_ID)
        if self.spec.padding == "fixed":
            batch = pad_batch(batch, self.s.pad_to)
        return {k: v.to(self.device) for k, v in batch.items()}

    def step(self, items: list[dict]) -> dict:
        batch = self.batch(items)
        if self.wrapper is not None:
            logps = self.wrapper(batch)[0]
        elif self.liger is not None:
            logps = liger_logprobs(self.model, batch, self.liger)
        else:
            logps = full_logits_logprobs(self.model, batch)
        if self.reference is not None:  # open-unlearning's order: policy forward, then reference
            with torch.no_grad():
                if self.liger is not None:
                    ref_logps = liger_logprobs(self.reference, batch, self.liger)
                else:
                    ref_logps = full_logits_logprobs(self.reference, batch)
        else:
            ref_logps = self.cache[batch["index"].cpu()].to(self.device)
        loss = npo_from_logprobs(logps.float(), ref_logps.float(), beta=self.s.beta)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "logps": logps.detach().float().cpu(),
            "real_tokens": int(batch["attention_mask"].sum()),
            "padded_tokens": batch["input_ids"].numel(),
        }


# ---------------------------------------------------------------------------------------------
# Timing (this process) and memory (one fresh subprocess per contender)
# ---------------------------------------------------------------------------------------------


def time_contenders(specs, s: Settings, batches, schedule: str, log) -> dict:
    """{name: {"times", "tokens", "first", "cache_seconds", ...}}. round-robin: all contenders
    built at once, each round runs every contender once on the round's batch, in a rotating
    order; sequential: one contender at a time (built, warmed up, timed, freed)."""
    groups = [list(specs)] if schedule == "round-robin" else [[spec] for spec in specs]
    results = {}
    device = torch.device(s.device)
    for group in groups:
        contenders = [Contender(spec, s) for spec in group]
        for c in contenders:
            results[c.spec.name] = {"times": [], "tokens": [], "padded": [], "first": None}
            if c.spec.reference == "cached":
                c.build_cache(used_items(batches))
                log(
                    f"  {c.spec.name}: reference pass over {len(used_items(batches))} examples in "
                    f"{c.cache_seconds:.2f} s"
                )
            results[c.spec.name]["cache_seconds"] = c.cache_seconds
            results[c.spec.name]["logprobs_used"] = c.logprobs_used
            results[c.spec.name]["cache_examples"] = len(used_items(batches))
        if s.warm_every_shape:
            for c in contenders:
                shapes = {}
                for round_items in batches[s.warmup :]:
                    shapes.setdefault(tuple(c.batch(round_items)["input_ids"].shape), round_items)
                synchronize(device)
                started = time.perf_counter()
                for round_items in shapes.values():
                    c.step(round_items)
                synchronize(device)
                log(
                    f"  {c.spec.name}: warm-up step on each of the {len(shapes)} timed batch shapes in "
                    f"{time.perf_counter() - started:.2f} s"
                )
        for round_index, round_items in enumerate(batches):
            shift = round_index % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                synchronize(device)
                started = time.perf_counter()
                out = c.step(round_items)
                synchronize(device)
                elapsed = time.perf_counter() - started
                record = results[c.spec.name]
                if round_index == 0:
                    record["first"] = out
                if round_index >= s.warmup:
                    record["times"].append(elapsed)
                    record["tokens"].append(out["real_tokens"])
                    record["padded"].append(out["padded_tokens"])
            phase = "warm-up" if round_index < s.warmup else "timed"
            last = {name: r["times"][-1] * 1e3 for name, r in results.items() if r["times"]}
            shown = ", ".join(f"{name} {ms:.0f} ms" for name, ms in last.items()) if last else ""
            log(f"  round {round_index + 1}/{len(batches)} ({phase}) {shown}")
        del contenders
        clean_memory(device)
    return results


PROFILED_STEPS = 3


def profile_steps(spec: Spec, s: Settings, batches, log, row_limit: int = 25) -> None:
    """Where one step of `spec` spends its time: torch.profiler over PROFILED_STEPS steps (after
    a warm-up step on each batch), the operators / kernels by their own device time, and the
    device-busy share of the wall time (a launch- or host-bound step shows a low share)."""
    device = torch.device(s.device)
    c = Contender(spec, s)
    if spec.reference == "cached":
        c.build_cache(used_items(batches))
    chosen = batches[s.warmup : s.warmup + PROFILED_STEPS]
    for items in chosen:
        c.step(items)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for items in chosen:
            c.step(items)
        synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1e3 / len(chosen)
    events = prof.key_averages()
    own = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy_ms = sum(getattr(e, own, 0.0) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    busy_ms /= 1e3 * len(chosen)
    log(f"\nprofile of {spec.name}: {len(chosen)} steps, {wall_ms:.1f} ms wall per step (profiler on)")
    if device.type == "cuda":
        log(f"  device busy {busy_ms:.1f} ms per step ({busy_ms / wall_ms:.0%} of the wall)")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(events.table(sort_by=sort, row_limit=row_limit, max_name_column_width=70))
    del c
    clean_memory(device)


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1)) * 1024


def memory_worker(name: str, s: Settings) -> dict:
    """Peak memory of one contender, in this (fresh) process: its resident state (weights,
    AdamW state, reference model or cache) after one warm-up step on the longest timed batch, plus
    the peak of a second step on it above that (gradients included). Cached contenders also report the
    peak of their reference pass."""
    device = torch.device(s.device)
    spec = SPEC_BY_NAME[name]
    # The same contender on a micro model first: imports, kernels and thread pools are loaded
    # before the measurement starts, so that the resident state below is the contender's own.
    micro = dataclasses.replace(s, model="micro")
    micro_batches = step_batches(micro, make_items(micro))[:1]
    warm = Contender(spec, micro)
    if spec.reference == "cached":
        warm.build_cache(used_items(micro_batches))
    warm.step(micro_batches[0])
    del warm
    batches = step_batches(s, make_items(s))
    clean_memory(device)
    start = current_bytes(device)
    contender = Contender(spec, s)
    out = {"name": name}
    if spec.reference == "cached":
        before = current_bytes(device)
        _, extra = peak_memory_during(lambda: contender.build_cache(used_items(batches)), device)
        out["cache_pass_bytes"] = before - start + extra
    longest = max(batches[s.warmup :] or batches, key=lambda b: max(len(it["input_ids"]) for it in b))
    # AdamW creates its state on the first step, and kernels compile (and autotune) for this
    # shape: neither belongs in the measured step's peak.
    contender.step(longest)
    clean_memory(device)
    state = current_bytes(device) - start
    _, extra = peak_memory_during(lambda: contender.step(longest), device)
    out.update(state_bytes=state, step_extra_bytes=extra, peak_bytes=state + extra)
    return out


def measure_memory(spec: Spec, s: Settings, log) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", spec.name, "--settings"]
    done = subprocess.run([*command, json.dumps(asdict(s))], env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        log(f"  {spec.name}: memory subprocess failed: {tail[0][:300]}")
        return {"name": spec.name, "error": tail[0][:300]}
    result = json.loads(lines[-1][len("RESULT ") :])
    log(f"  {spec.name}: peak {result['peak_bytes'] / MIB:.1f} MiB (state {result['state_bytes'] / MIB:.1f})")
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

DESCRIPTIONS = {
    "baseline": "open-unlearning style: pad to {pad}, live reference, full logits",
    "strong-baseline": "dynamic padding, live reference, Liger fused linear CE where it runs (CUDA), else full logits",
    "cached-ref": "dynamic padding, cached reference, full logits",
    "fastnpo": "dynamic padding, cached reference, fused log-prob op (SequenceLogprobModel)",
}
CSV_FIELDS = [
    "contender",
    "padding",
    "reference",
    "logprobs",
    "device",
    "dtype",
    "steps",
    "median_step_ms",
    "min_step_ms",
    "tokens_per_s",
    "speedup_vs_baseline",
    "speedup_vs_strong_baseline",
    "real_tokens_per_step",
    "padded_tokens_per_step",
    "peak_mib",
    "peak_vs_baseline",
    "state_mib",
    "step_extra_mib",
    "cache_pass_s",
    "cache_pass_ms_per_example",
    "cache_pass_peak_mib",
    "first_step_loss",
    "first_step_max_abs_dlogp_vs_baseline",
    "first_step_grad_norm_rel_diff_vs_baseline",
    "note",
]


def summarise(specs, s: Settings, timing: dict, memory: dict) -> list[dict]:
    rows = []
    base_first = timing["baseline"]["first"]
    for spec in specs:
        t = timing[spec.name]
        rates = [tokens / seconds for tokens, seconds in zip(t["tokens"], t["times"], strict=True)]
        first = t["first"]
        mem = memory.get(spec.name, {})
        row = {
            "contender": spec.name,
            "padding": f"fixed {s.pad_to}" if spec.padding == "fixed" else "dynamic",
            "reference": spec.reference,
            "logprobs": t.get("logprobs_used", spec.logprobs),
            "device": s.device,
            "dtype": s.dtype,
            "steps": len(t["times"]),
            "median_step_ms": 1e3 * statistics.median(t["times"]),
            "min_step_ms": 1e3 * min(t["times"]),
            "tokens_per_s": statistics.median(rates),
            "real_tokens_per_step": statistics.mean(t["tokens"]),
            "padded_tokens_per_step": statistics.mean(t["padded"]),
            "cache_pass_s": t["cache_seconds"] if spec.reference == "cached" else None,
            "cache_pass_ms_per_example": 1e3 * t["cache_seconds"] / t["cache_examples"]
            if spec.reference == "cached"
            else None,
            "first_step_loss": first["loss"],
            "first_step_max_abs_dlogp_vs_baseline": float((first["logps"] - base_first["logps"]).abs().max()),
            "first_step_grad_norm_rel_diff_vs_baseline": abs(first["grad_norm"] - base_first["grad_norm"])
            / base_first["grad_norm"],
            "note": mem.get("error", ""),
        }
        if "peak_bytes" in mem:
            row.update(
                peak_mib=mem["peak_bytes"] / MIB,
                state_mib=mem["state_bytes"] / MIB,
                step_extra_mib=mem["step_extra_bytes"] / MIB,
            )
        if "cache_pass_bytes" in mem:
            row["cache_pass_peak_mib"] = mem["cache_pass_bytes"] / MIB
        rows.append(row)
    by_name = {row["contender"]: row for row in rows}
    for row in rows:
        row["speedup_vs_baseline"] = row["tokens_per_s"] / by_name["baseline"]["tokens_per_s"]
        if "strong-baseline" in by_name:
            row["speedup_vs_strong_baseline"] = row["tokens_per_s"] / by_name["strong-baseline"]["tokens_per_s"]
        if row.get("peak_mib") and by_name["baseline"].get("peak_mib"):
            row["peak_vs_baseline"] = row["peak_mib"] / by_name["baseline"]["peak_mib"]
    return rows


def target_line(rows: list[dict], device: str) -> str:
    by_name = {row["contender"]: row for row in rows}
    if "fastnpo" not in by_name:
        return "Target not checked (fastnpo was not run)."
    fast = by_name["fastnpo"]
    speed, memory = fast["speedup_vs_baseline"], fast.get("peak_vs_baseline")
    met = speed >= 3 and memory is not None and memory <= 0.5
    where = "" if device == "cuda" else " The target is set for the GPU; on CPU it is for information only."
    return (
        "Target (issue, GPU): fastnpo >= 3x the baseline's tokens/s at <= 0.5x its peak memory. "
        f"Here: {speed:.2f}x tokens/s at {fmt(memory, '.3f')}x peak memory: "
        f"{'met' if met else 'NOT met'}.{where}"
    )


def csv_rows(rows: list[dict]) -> list[dict]:
    """The rows as the CSV holds them: floats to 6 significant digits."""
    return [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows]


def markdown_table(rows: list[dict], pad_to: int) -> list[str]:
    lines = [
        "| contender | what | median step ms | tokens/s (real) | × baseline | × strong-baseline "
        "| peak MiB | peak ÷ baseline | state MiB | step extra MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['contender']} | {DESCRIPTIONS[row['contender']].format(pad=pad_to)} "
            f"| {fmt(row['median_step_ms'], '.0f')} | {fmt(row['tokens_per_s'], '.0f')} "
            f"| {fmt(row['speedup_vs_baseline'], '.2f')} | {fmt(row.get('speedup_vs_strong_baseline'), '.2f')} "
            f"| {fmt(row.get('peak_mib'), '.1f')} | {fmt(row.get('peak_vs_baseline'), '.3f')} "
            f"| {fmt(row.get('state_mib'), '.1f')} | {fmt(row.get('step_extra_mib'), '.1f')} |"
        )
    return lines


def write_report(path: Path, rows, header, title, s: Settings) -> None:
    note = []
    if s.device == "cpu":
        note = [
            "> **GPU numbers are not yet measured.** This file is the CPU run (tiny model, fp32); the GPU "
            "setting (Llama-3.2-1B shape, bf16, padding to 500) runs with `--device cuda` and writes "
            "`train_cuda_<gpu>.md`.",
            "",
        ]
    lines = [*markdown_table(rows, s.pad_to), ""]
    lines += [target_line(rows, s.device), ""]
    lines += [
        "Columns: median step ms over the timed steps (one step = forward, NPO loss, backward, gradient "
        "clipping to 1.0, AdamW step; the live reference's forward included); tokens/s = median over the "
        "timed steps of real (non-pad) tokens / step time, every contender on the same length-grouped "
        "batches (so strong-baseline's dynamic padding profits from fastnpo's length grouping too); × = tokens/s "
        "ratio; peak MiB = resident state (weights, gradients, AdamW state, the live reference model or the "
        "cache) + the peak of one step on the longest timed batch above it, each contender in a fresh "
        "process after warm-up.",
        "",
        "| contender | real / padded tokens per step | first-step loss | first-step max abs Δ logp vs baseline "
        "| first-step grad-norm rel. Δ vs baseline | reference pass s (ms / example) | reference pass peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['contender']} | {row['real_tokens_per_step']:.0f} / {row['padded_tokens_per_step']:.0f} "
            f"| {row['first_step_loss']:.4f} | {row['first_step_max_abs_dlogp_vs_baseline']:.2e} "
            f"| {row['first_step_grad_norm_rel_diff_vs_baseline']:.2e} | {fmt(row.get('cache_pass_s'), '.2f')} "
            f"({fmt(row.get('cache_pass_ms_per_example'), '.0f')}) "
            f"| {fmt(row.get('cache_pass_peak_mib'), '.1f')} |"
        )
    lines += [
        "",
        "Agreement: every contender starts from the same weights and sees the same first batch, so the "
        "first step's summed log-probs and gradient norm must match the baseline's (up to floating-point "
        "error; the first-step NPO loss is 2/beta ln 2 = 13.86 when the reference equals the policy). The "
        "reference pass is the cached contenders' one-off cost before training (here over the examples "
        "the timed run uses, batches of 2 x batch size, no gradient; a real run does every forget example "
        "once, i.e. about one forward per example against the live reference's one forward per example "
        "per epoch), with its peak memory measured like the steps'.",
        "",
    ]
    notes = [row for row in rows if row.get("note")]
    if notes:
        lines += ["Failures:", ""] + [f"- {row['contender']}: {row['note']}" for row in notes] + [""]
    write_markdown(path, title, header, lines, note=note)


def write_plot(path: Path, rows: list[dict], title: str) -> None:
    plt = pyplot()
    names = [row["contender"] for row in rows]
    colors = [plt.cm.tab10(i % 10) for i in range(len(rows))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    panels = [
        ("tokens_per_s", "tokens/s (real tokens, median)", "speedup_vs_baseline", "x"),
        ("peak_mib", "peak memory MiB", "peak_vs_baseline", "x base"),
    ]
    for ax, (key, label, ratio, unit) in zip(axes, panels, strict=True):
        values = [row.get(key) or 0.0 for row in rows]
        suffixes = [f"  ({row[ratio]:.2f}{unit})" if row.get(ratio) is not None else "" for row in rows]
        bar_panel(ax, names, values, colors, suffixes, label, room=1.45)
    save_figure(plt, fig, path, title, top=0.92)


def plot_from_csv(path: Path) -> Path:
    """The plot of a results CSV written earlier (the GPU suite brings back CSVs, not PNGs)."""
    header, rows = read_results_csv(path)
    for row in rows:
        for key in ("tokens_per_s", "speedup_vs_baseline", "peak_mib", "peak_vs_baseline"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
    machine = next((line.split(":", 1)[1].strip() for line in header if line.startswith("machine:")), "")
    out = path.with_suffix(".png")
    write_plot(out, rows, f"fastnpo NPO training step, {path.stem} ({machine})")
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def logit_profile(s: Settings, items: list[dict]) -> str:
    """Logit std and the share of probabilities >= 2^-12 of the initial model on a few examples."""
    model = build_model(s).eval()
    batch = {k: v.to(s.device) for k, v in collate(items[:4], PAD_ID).items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logits = logits[batch["attention_mask"].bool()]
    probs = logits.softmax(-1)
    share = float((probs >= 2**-12).float().mean())
    del model
    return f"logit std {float(logits.std()):.2f}, probabilities >= 2^-12: {share:.2e}, max p {float(probs.max()):.3f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: CPU 5, CUDA 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: CPU 2, CUDA 3)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (CPU: 1 warm-up, 3 timed)")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default: CPU tiny, CUDA 1b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: CPU float32, CUDA bf16")
    parser.add_argument("--length-scale", type=float, default=None, help="default: CPU 0.5, CUDA 1")
    parser.add_argument("--pad-to", type=int, default=None, help="baseline's fixed length (default 500 x scale)")
    parser.add_argument("--pool", type=int, default=400, help="forget examples (TOFU forget10: 400)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--logit-std", type=float, default=1.5)
    parser.add_argument("--contenders", default=None, help="comma-separated subset (baseline always runs)")
    parser.add_argument("--schedule", choices=("round-robin", "sequential"), default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--profile", default=None, help="contender whose steps to profile after the timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output stem")
    parser.add_argument("--out-dir", default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    parser.add_argument(
        "--plot-from", default=None, help="only draw <csv>'s plot beside it (e.g. a GPU suite's train.csv)"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    if args.plot_from:
        plot_from_csv(Path(args.plot_from))
        return None
    if args.worker:
        settings = Settings(**json.loads(args.settings))
        print("RESULT " + json.dumps(memory_worker(args.worker, settings)), flush=True)
        return None

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    scale = args.length_scale if args.length_scale is not None else (1.0 if cuda else 0.5)
    steps = args.steps if args.steps is not None else (20 if cuda else (3 if args.quick else 5))
    warmup = args.warmup if args.warmup is not None else (3 if cuda else (1 if args.quick else 2))
    if args.quick and cuda and args.steps is None:
        steps = 5
    s = Settings(
        device=args.device,
        dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        model=args.model or ("1b" if cuda else "tiny"),
        seed=args.seed,
        pool=args.pool,
        batch_size=args.batch_size,
        length_scale=scale,
        pad_to=args.pad_to or round(500 * scale),
        warmup=warmup,
        warm_every_shape=cuda,
        steps=steps,
        logit_std=args.logit_std,
    )
    specs = list(SPECS)
    if args.contenders:
        wanted = set(args.contenders.split(",")) | {"baseline"}
        unknown = wanted - set(SPEC_BY_NAME)
        if unknown:
            raise SystemExit(f"unknown contenders {sorted(unknown)}; known: {list(SPEC_BY_NAME)}")
        specs = [spec for spec in SPECS if spec.name in wanted]
    if args.profile and args.profile not in SPEC_BY_NAME:
        raise SystemExit(f"--profile {args.profile!r}: not a contender; known: {list(SPEC_BY_NAME)}")
    schedule = args.schedule or ("sequential" if cuda else "round-robin")
    device = torch.device(s.device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False

    def log(message):
        print(message, flush=True)

    info = machine_info(device)
    import transformers

    info["transformers"] = transformers.__version__
    log("fastnpo trainer-step benchmark: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    kind = device_kind(device)
    stem = args.out or f"train_{kind}" + ("_quick" if args.quick else "")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    items = make_items(s)
    batches = step_batches(s, items)
    lengths = [len(item["input_ids"]) for item in items]
    answers = [sum(1 for label in item["labels"][1:] if label != IGNORE_INDEX) for item in items]
    profile = logit_profile(s, items)
    log(f"data: {len(items)} examples, length {min(lengths)}-{max(lengths)} (mean {statistics.mean(lengths):.1f})")
    log(f"initial model: {profile}")

    share = CpuShare()
    log(f"timing ({schedule}, {s.warmup} warm-up + {s.steps} timed steps):")
    timing = time_contenders(specs, s, batches, schedule, log)
    cpu_share = share.cores()
    if args.profile:
        profile_steps(SPEC_BY_NAME[args.profile], s, batches, log)
    memory = {}
    if not args.no_memory:
        log("peak memory (one fresh subprocess per contender):")
        for spec in specs:
            memory[spec.name] = measure_memory(spec, s, log)
    elapsed = share.elapsed()
    rows = summarise(specs, s, timing, memory)
    load_end = load_average()
    config = s.config
    with torch.device("meta"):
        from transformers import LlamaConfig, LlamaForCausalLM

        params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**config)).parameters())
    timing_text = (
        f"median over {s.steps} timed steps after {s.warmup} warm-up steps"
        + (" and one warm-up step on each timed batch shape (kernels compile per shape)" if s.warm_every_shape else "")
        + ", time.perf_counter"
        + (" around torch.cuda.synchronize()" if cuda else "")
        + (
            "; contenders interleaved round-robin (rotating order), same batch per round"
            if schedule == "round-robin"
            else "; one contender at a time (built, warmed up, timed, freed), same batches"
        )
    )
    memory_text = (
        "fastnpo.profiling.peak_memory_during in a fresh subprocess per contender"
        + (
            " with MALLOC_MMAP_THRESHOLD_=65536 (peak resident set, exact)"
            if not cuda
            else " (torch.cuda.max_memory_allocated)"
        )
        + ": resident state after warm-up + one step on the longest timed batch"
    )
    header = [
        date_line(info),
        machine_line(info),
        f"load average at start: {info.get('load average at start', '?')}, at end: {load_end}; the timing "
        f"process used {cpu_share:.2f} of {os.cpu_count()} cores (CPU time / wall time; on a shared machine "
        "the rest went to other processes and every contender's times are inflated)",
        versions_line(info, ("python", "torch", "transformers", "triton", "fastnpo")),
        f"model: Llama ({s.model}: hidden {config['hidden_size']}, intermediate {config['intermediate_size']}, "
        f"{config['num_hidden_layers']} layers, {config['num_attention_heads']} heads, "
        f"{config['num_key_value_heads']} kv heads, vocab {config['vocab_size']}, tied embeddings; "
        f"{params / 1e6:.1f}M parameters), random weights, final-norm weight set for logit std "
        f"{s.logit_std} ({profile}); {s.dtype}, SDPA attention, fastnpo impl={s.impl}",
        f"data: {s.pool} random-token examples with TOFU-like lengths x {s.length_scale:g} (prompt ~N(25, 4) "
        f"clipped to [15, 40], answer log-normal median 35 clipped to [15, 90], loss on answer tokens); "
        f"here {min(lengths)}-{max(lengths)} tokens, mean {statistics.mean(lengths):.1f}, answer mean "
        f"{statistics.mean(answers):.1f}; batch {s.batch_size} forget examples per step from "
        "fastnpo.data.length_grouped_batches (seed 0, epoch 0); the baseline pads every example to "
        f"{s.pad_to} tokens",
        f"step: NPO (beta {s.beta}, summed answer log-probs), AdamW (lr {s.lr}, weight decay "
        f"{s.weight_decay}) on all parameters, gradient clipping {s.max_grad_norm}",
        f"timing: {timing_text}",
        f"memory: {memory_text}",
        f"total run time {elapsed:.0f} s",
        command_line(__file__, argv),
    ]
    title = f"fastnpo NPO training step vs an open-unlearning-style step: {kind}, {s.dtype}"
    csv_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png"))
    write_csv(csv_path, csv_rows(rows), CSV_FIELDS, header)
    write_report(md_path, rows, header, title, s)
    written = [csv_path, md_path]
    if not args.no_plot:
        write_plot(png_path, rows, title)
        written.append(png_path)
    log("\n" + "\n".join(markdown_table(rows, s.pad_to)))
    log(target_line(rows, s.device))
    log(f"\ndone in {elapsed:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return rows


if __name__ == "__main__":
    main()
