"""What the benchmark scripts share, written once: where results go, the machine they ran on, the
header lines a results file starts with, CSV / markdown writers, timing and memory helpers, the
plot set-up and the inputs several scripts measure on.

The scripts import it as a sibling module (`from common import ...`: benchmarks/ is on sys.path when a
script runs, and the tests put it there); no script imports another script. Nothing here imports torch
or fastnpo at import time, so that gpu_suite.py and bench_memory_plan.py's parent process stay light:
the functions that need them import them when called.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

OUT_DIR = "runs/benchmarks"  # every script's default --out-dir; benchmarks/results holds the committed results
MIB = 2**20
PEERS = ("triton", "liger_kernel", "cut_cross_entropy")  # versions machine_info reports besides torch's

# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return cpu


def load_average(default: str = "?") -> str:
    """The 1, 5 and 15 minute load averages, "0.12 0.34 0.56" (default where the OS has none)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return default


def version_of(module: str) -> str:
    """module's version, from the module or its distribution; "not installed" when neither answers."""
    try:
        return __import__(module).__version__
    except Exception:
        try:
            from importlib.metadata import version

            return version(module.replace("_", "-"))
        except Exception:
            return "not installed"


def machine_info(device) -> dict:
    """date, versions (python, torch, fastnpo, PEERS), cpu, gpu (CUDA devices) and the load average at
    start: what the header lines below read."""
    import torch

    import fastnpo

    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastnpo": fastnpo.__version__,
    }
    info.update((module, version_of(module)) for module in PEERS)
    info["cpu"] = f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    load = load_average(default="")
    if load:
        info["load average at start"] = load
    return info


def machine_record() -> dict:
    """The machine as a JSON record (bench_u2a_compare's result, bench_u2a_scores' header)."""
    import torch
    import transformers

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def device_kind(device) -> str:
    """The device for file names and titles: cpu, or cuda_ and the GPU's name in lower case with dashes."""
    if device.type != "cuda":
        return "cpu"
    import re

    import torch

    return ("cuda_" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower())).strip("-")


# ---------------------------------------------------------------------------------------------
# Header lines (a results CSV's "# " lines, a markdown file's "- " list)
# ---------------------------------------------------------------------------------------------


def date_line(info: dict) -> str:
    return f"date: {info['date']}"


def machine_line(info: dict) -> str:
    """The machine: the GPU's and the CPU's (CUDA), or the CPU's."""
    return f"machine: {info.get('gpu', '')}{'; ' if 'gpu' in info else ''}{info['cpu']}"


def versions_line(info: dict, names: Iterable[str]) -> str:
    return "versions: " + ", ".join(f"{name} {info[name]}" for name in names)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command: the script's file name and its arguments (argv None: this process's own)."""
    return "command: " + " ".join([Path(script).name, *(argv if argv is not None else sys.argv[1:])])


class CpuShare:
    """Started at construction: the process's CPU time over the wall time since (how much of the
    machine it had; on a shared machine the rest went to other processes)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), sum(os.times()[:2])

    def elapsed(self) -> float:
        return time.perf_counter() - self.wall

    def cores(self) -> float:
        return (sum(os.times()[:2]) - self.cpu) / self.elapsed()


# ---------------------------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------------------------


def write_csv(path, rows: Iterable[dict], fields: Sequence[str], header: Iterable[str] = ()) -> None:
    """path: a "# <line>" per header line, then the rows under the fields (keys not in fields are left out)."""
    with open(path, "w", newline="") as handle:
        handle.writelines(f"# {line}\n" for line in header)
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_results_csv(path: Path) -> tuple[list[str], list[dict]]:
    """(its "# " header lines, its rows as strings) of a results CSV this folder's scripts wrote."""
    with open(path) as handle:
        lines = handle.read().splitlines()
    header = [line[2:].strip() for line in lines if line.startswith("# ")]
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    return header, rows


def fmt(value, spec: str) -> str:
    """value formatted by spec; "–" for None, NaN and text that is not a number (a CSV's empty cell)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return "–"
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def markdown_table(rows: Iterable[dict], fields: Sequence[str]) -> list[str]:
    """A plain table: the field names as the head, str() of each row's values."""
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    return lines + ["| " + " | ".join(str(row[f]) for f in fields) + " |" for row in rows]


def write_markdown(path: Path, title: str, header: Sequence[str], body: Iterable[str], note: Iterable[str] = ()):
    """path: "# title", the note's lines, the header lines as a list, then body, joined by newlines (a body
    that ends with "" ends the file with one)."""
    lines = [f"# {title}", "", *note]
    if header:
        lines += [*(f"- {line}" for line in header), ""]
    Path(path).write_text("\n".join([*lines, *body]))


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def clean_memory(device) -> None:
    """gc, then give cached memory back (CUDA: the allocator's cache; CPU: freed heap pages to the OS,
    so that a resident-set peak starts clean)."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def median_ms(call, device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median, min) ms of call() after warm-up (CUDA: triton.testing.do_bench where triton imports,
    else CUDA events)."""
    if device.type == "cuda":
        try:
            import triton.testing

            times = triton.testing.do_bench(call, warmup=100, rep=400, return_mode="all")
            return float(statistics.median(times)), float(min(times))
        except ImportError:
            pass
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def sample_ms(call, device, repeats: int, cuda_ms: tuple[int, int], *, warm_up: bool = True) -> list[float]:
    """ms of each timed call: CUDA triton.testing.do_bench (warm-up and budget cuda_ms, L2 flushed, all
    samples), CPU `repeats` perf_counter calls (after one untimed call if warm_up)."""
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(call, warmup=cuda_ms[0], rep=cuda_ms[1], return_mode="all"))
    if warm_up:
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_panel(ax, names, values, colors, suffixes, title: str, room: float) -> None:
    """One horizontal bar chart: a bar per name (top to bottom), each labelled with its value
    (no decimals from 10 up, else two) and its suffix; the x axis runs to room x the largest value."""
    bars = ax.barh(range(len(names)), values, color=colors)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    top = max(values, default=1.0) or 1.0
    for bar, value, suffix in zip(bars, values, suffixes, strict=True):
        text = (f"{value:.0f}" if value >= 10 else f"{value:.2f}") + suffix
        ax.text(value + 0.01 * top, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=7)
    ax.set_xlim(0, top * room)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def save_figure(plt, fig, path, title: str, *, top: float, fontsize: int = 9) -> None:
    """The figure's title, a tight layout under it (the panels up to top of the height), path at 100 dpi."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Inputs and shapes
# ---------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int]:
    """(N, D, V) of "NxDxV" (or N*D*V)."""
    try:
        n, d, v = (int(x) for x in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise SystemExit(f"{text!r}: expected a shape NxDxV, e.g. 8192x4096x128256") from None
    return n, d, v


def llama_1b_config() -> dict:
    """Llama-3.2-1B's shape, as the memory planner knows it (random weights: nothing is downloaded)."""
    from fastnpo.train.memory_plan import KNOWN_MODELS

    return {
        **{k: v for k, v in KNOWN_MODELS["meta-llama/Llama-3.2-1B"].items() if k != "model_type"},
        "max_position_embeddings": 1024,
    }


# Spread of the logits' random part: 0.02 (the usual lm_head init std) x sqrt(4096) for RMS-1 rows.
LOGIT_STD = 0.02 * math.sqrt(4096)


def make_inputs(n: int, d: int, v: int, dtype, device, kind: str, seed: int = 0):
    """hidden [n, d], weight [v, d] (dtype) and labels [n] int64 on device.

    kind="randn": hidden ~ N(0, 1), weight ~ N(0, 0.02^2), uniform labels: flat logits, the usual
    micro-benchmark input and an unrealistic one (every probability is ~1/V).

    kind="realistic" (default), built to have the properties that matter for these kernels:
    - labels drawn from a Zipf(1.07) unigram over the vocabulary, low ids most frequent (as BPE
      merge order makes them);
    - weight = N(0, (1.28/sqrt(d))^2) (std 0.02 at d=4096, the lm_head init) plus a shared
      "frequency" direction u whose coefficient is the token's log unigram frequency, so every row
      gets the unigram prior in its logits (frequent tokens are likely everywhere, as in a trained LM);
    - hidden rows = gamma * RMS-normalised(r): RMS 1 like a final RMSNorm output, gamma a learned-like
      per-channel scale (log-normal, sigma 0.2), r a mix of the frequency direction, a few outlier
      channels shared by all rows (+-4 before normalisation: the "massive activations" of real
      LLMs), noise, and a component along the target token's own weight row whose size sets the
      target's logit margin over the rest of the vocabulary: 45% of rows confident (margin 2..7 nats),
      35% medium (-2..2), 20% wrong (-7..-2).
    The result (printed by bench_logprobs.logit_profile): mean target probability ~0.55, top-1 accuracy
    ~0.8, NLL ~1.5 nats, entropy ~3.5 nats, ~0.1% of the probabilities above 2^-12 (what gradient
    filtering cannot skip). A random-init transformers model would not do: its final norm has unit scale
    and its logits are flat like randn's.
    """
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    if kind == "randn":
        hidden = randn(n, d)
        weight = randn(v, d) * 0.02
        labels = torch.randint(0, v, (n,), generator=gen, device=device)
        return hidden.to(dtype), weight.to(dtype), labels
    if kind != "realistic":
        raise ValueError(f"unknown hidden kind {kind!r}")
    log_freq = -1.07 * torch.log(torch.arange(v, device=device, dtype=torch.float32) + 10)
    log_freq -= torch.logsumexp(log_freq, 0)
    labels = torch.multinomial(log_freq.exp(), n, replacement=True, generator=gen)
    base = randn(v, d) * (LOGIT_STD / math.sqrt(d))
    u = randn(d)
    u /= u.norm()
    prior = log_freq - log_freq.mean()
    beta = 0.25 * math.sqrt(d)  # the rows' component along u
    target_rows = base[labels]
    weight = base.addr_(prior / beta, u)  # in place: base is weight from here on
    k = max(2, d // 1024)
    outliers = torch.zeros(d, device=device)
    magnitude = 4.0 * min(1.0, math.sqrt(d / 256))  # keep the outliers a fixed share of tiny rows
    outliers[torch.randperm(d, generator=gen, device=device)[:k]] = magnitude * torch.sign(randn(k))
    gamma = torch.exp(0.2 * randn(d))
    # Target margin over the log-sum-exp of the rest of the vocabulary.
    lse_rest = torch.logsumexp(prior, 0) + 0.5 * LOGIT_STD**2
    pick, uniform = rand(n), rand(n)
    margin = torch.where(pick < 0.45, 2 + 5 * uniform, torch.where(pick < 0.8, -2 + 4 * uniform, -7 + 5 * uniform))
    target_norm = target_rows.norm(dim=1)
    budget = max(float(d - outliers.square().sum() - beta**2), 0.5 * d)
    alpha = ((lse_rest - prior[labels] + margin) / target_norm).clamp(0, math.sqrt(0.9 * budget))
    noise = randn(n, d)
    noise_norm = torch.sqrt((budget - alpha**2).clamp(min=0.05 * d))
    r = (outliers + beta * u) + alpha[:, None] * target_rows / target_norm[:, None]
    r += noise * (noise_norm / noise.norm(dim=1))[:, None]
    hidden = gamma * (r * (math.sqrt(d) / r.norm(dim=1, keepdim=True)))
    del base, target_rows, noise, r
    return hidden.to(dtype), weight.to(dtype), labels


# ---------------------------------------------------------------------------------------------
# Profiles (torch.profiler traces)
# ---------------------------------------------------------------------------------------------

# Host calls that wait for the device (CPU-side runtime events in the profiler's trace; exact names:
# cudaMemcpyAsync does not wait by itself, a .item() shows as cudaMemcpyAsync + cudaStreamSynchronize).
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
SCALAR_READS = "aten::_local_scalar_dense"


def trace_counts(prof, calls: int, closing_syncs: int = 1) -> dict:
    """Per call, from a torch.profiler profile of `calls` calls (as profile_logprobs.py counts them):
    device launches (kernels, copies, fills), device_busy_ms (the union of their intervals),
    busy_share (that union over the span from the first to the last), host syncs (SYNC_EVENTS, less
    the closing_syncs that close the profiled calls where the device ran anything) and scalar reads."""
    from collections import Counter

    import torch

    events = list(prof.events())
    device_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    names = Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    intervals = sorted((e.time_range.start, e.time_range.end) for e in device_events)
    busy, end_so_far = 0.0, None
    for start, end in intervals:
        if end_so_far is None or start > end_so_far:
            busy += end - start
            end_so_far = end
        elif end > end_so_far:
            busy += end - end_so_far
            end_so_far = end
    span = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
    syncs = sum(names.get(name, 0) for name in SYNC_EVENTS) - (closing_syncs if device_events else 0)
    return {
        "launches": len(device_events) / calls if device_events else None,
        "busy_share": busy / span if span else None,
        "device_busy_ms": busy / 1e3 / calls if device_events else None,
        "syncs": max(0, syncs) / calls,
        "scalar_reads": names.get(SCALAR_READS, 0) / calls,
    }


def llama_8b_config(layers: int | None = None) -> dict:
    """Llama-3.1-8B's shape (random weights), with `layers` decoder layers instead of its 32 if given."""
    from fastnpo.train.memory_plan import KNOWN_MODELS

    config = {k: v for k, v in KNOWN_MODELS["meta-llama/Llama-3.1-8B"].items() if k != "model_type"}
    return {**config, "max_position_embeddings": 1024, **({"num_hidden_layers": layers} if layers else {})}


def matmul_params(config: dict) -> int:
    """The weights of a Llama-shaped config's matmuls per token (attention and MLP projections of every
    layer, the lm_head; not the embedding lookup): the P of the 6 x P x tokens FLOPs of a step."""
    d, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or d // heads
    per_layer = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * inter
    return layers * per_layer + config["vocab_size"] * d
