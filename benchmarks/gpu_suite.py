#!/usr/bin/env python
"""Everything a GPU window needs, as two device calls of < 8 minutes each (issue 23, issue 24 item 8).

    make gpu-wheels                                   # on a machine with internet: the missing wheels into wheels/
    make gpu-suite PART=1 OUT=$OUT                    # device call 1: the kernels (--call 1, deadline 390 s)
    make gpu-suite PART=2 OUT=$OUT                    # device call 2: tests, trainer, memory plan (--call 2, 390 s)
    make gpu-suite SMOKE=1 OUT=/tmp/gs                # CPU: both calls' code paths at tiny shapes (--smoke --call all)

Each call runs its parts in order, each in its own subprocess with its own time limit (a part that
fails or runs out of time is recorded and the next one still runs). The call has a deadline
(--total-s); a part's limit is the smaller of its own budget and what the deadline leaves after the
time reserved for the parts after it, so the last parts (and the summary) always get their turn.

Call 1, the kernels (most valuable first):
  env          GPU, driver, CUDA, python, torch, triton, transformers and every peer's version -> env.txt
  wheels       pip install --no-index --no-deps --target <tmp> wheels/*.whl (the packages the GPU
               image lacks), then <tmp> goes on PYTHONPATH for the parts below
  import       makes `import fastnpo` / `fastnpo.kernels` work without `pip install -e` (no network
               there): an import hook (a sitecustomize.py in the run's temporary folder, on
               PYTHONPATH) mapping fastnpo.kernels to kernels/; the machine's Python is not touched
  gemm         bench_logprobs.py --gemm-only: the rate of the designs' exact GEMMs at the 4 head shapes
               (logits [8192 x D] x [D x V], dH, dW; bf16; median and best) and of a square 8192^3 -> gemm.csv
  logprobs     bench_logprobs.py: N=8192, the four (D, V), bf16, fwd and fwd+bwd, peak memory and error
               against fp32 of naive, torch.compile(naive), fastnpo triton / triton-exact / split /
               epilogue-fwd, npo one_pass / epilogue (against npo-naive), Liger, CCE; the floor at the
               run's median matmul rate (x_floor) and at its best GEMM rates (x_floor_best)
               -> logprobs.csv, logprobs.md (rewritten after each shape)
  one-pass     profile_logprobs.py --npo one_pass,epilogue: launches, device-busy share, host syncs of
               one call; the one_pass chunk sweep (rows per chunk around the rule) and the epilogue's
               (E per chunk) -> one_pass.md
  kernel-tests pytest of the Triton kernel tests (compiled kernels on a GPU), with what time is left
               (moved here from the tests' call: call 1 has time to spare, call 2 none) -> log.txt
  autotune     the Triton autotuners' choices: every *.autotune.json of Triton's cache (the configs'
               timings, the best) and the logprobs process's best_config / cache -> autotune.json
Call 2, tests and the trainer:
  env, wheels, import   as above
  gpu-tests    pytest -m gpu on the files that hold GPU-marked tests (the newest designs first) -> log.txt
  train        bench_train.py at the Llama-3.2-1B shape, with its profile of fastnpo's step -> train.csv, .md
  trainer      bench_trainer.py: fastnpo's real trainer step (fastnpo.train.train) on the batch of
               configs/tofu_llama32_1b_npo_rt.yaml, model.loss_design one_pass against two_call, at the
               Llama-3.2-1B shape, then (if the part's time allows) a 16-layer Llama-3.1-8B slice: step ms,
               tokens/s, peak, x the FLOP floor, device-busy share, host syncs per step -> trainer.md
  memory-plan  bench_memory_plan.py: the plan against the measured peak of real steps: 8B in-backward
               plain and 8-bit, offload at 1B and 8B -> memory_plan.csv (+ its table in summary.md)
  statistics   bench_statistics.py at an 8B evaluation's head (8192 x 4096 x 128256, bf16): the privacy
               metrics' per-token statistics, fastnpo's Triton and torch paths against open-unlearning's
               full-logits computation (time, peak memory, error) -> statistics.md (its CSV is dropped:
               the md carries the same table, and call 2 brings back 8 files)

OUT gets at most 8 files per call (a device run brings back 8, < 16 MiB each): log.txt (every part's
output), summary.md (the one-screen summary, also printed last), env.txt, and the call's own files
(CALLS below). --call all runs call 1 into OUT/call1 and call 2 into OUT/call2.

--smoke runs the same parts on CPU at tiny shapes: one shape, one repeat, Triton through the
interpreter, the same contender list (Liger and CCE skip on a CPU, torch.compile is left out), one
memory-plan case, a 2-sequence one_pass profile and sweep, pytest parts that only skip or collect
there; its numbers are CPU numbers and labelled so. tests/kernels/test_gpu_suite_smoke.py runs both
calls side by side (50-95 s on this project's shared 2-core machine).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import cpu_name, fmt, read_results_csv

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
MAX_FILE_BYTES = 15 * 2**20  # what comes back from a device run: < 16 MiB a file

GPU_SHAPES = "8192x4096x128256,8192x3584x152064,8192x2304x256000,8192x2048x128256"
# Tiny analogues for --smoke: a prime V and N = 2 x the smoke NPO sequence length (the interpreter
# takes ~1 ms per program iteration). One shape: the code path is the same for every shape.
SMOKE_SHAPES = "32x16x67"
PEERS = ("liger_kernel", "cut_cross_entropy", "trl", "transformers", "peft", "datasets", "omegaconf", "torchao")
# The kernel benchmark's contenders in a GPU window (issue 24 item 8): every design and peer. Left out:
# fastnpo-torch (the CPU path, 15-22x the floor on the H200), liger-selective-logprob (3-13x) and
# npo-unfused / npo-fused (the two-call path the trainer benchmark compares): seconds each per shape.
# naive and npo-naive always run (the references of the speed-up and error columns).
LOGPROBS_CONTENDERS = (
    "naive,compile(naive),fastnpo-triton,fastnpo-triton-exact,fastnpo-split,fastnpo-epilogue-fwd,"
    "liger-flce,cce,npo-naive,npo-one-pass,npo-epilogue"
)
# The memory-plan cases of call 2, in order: the 8B optimizer step in the backward (plain AdamW, then
# the 40 GB config's 8-bit moments), then FSDP2 CPU offload at 1B (cheap) and 8B (its step runs on
# the host's cores). 1B and 8B plain / Kahan agreed within 1% in both H200 windows.
MEMORY_CASES = "8b-ckpt-in-backward,8b-ckpt-8bit-in-backward,1b-ckpt-offload,8b-ckpt-offload"
SMOKE_MEMORY_CASES = "micro-in-backward"
# one_pass chunk sizes (rows of fp32 logits per chunk) around the rule's 2048 (4 sequences of 512),
# and the epilogue design's E budgets (its default 128 MiB: 1 sequence at V = 128256; 512 MiB: 4).
SWEEP_ROWS, SWEEP_EPILOGUE_MIB = "512,1024,2048,4096,8192", "128,512"

# What each call writes into OUT (a device run brings back at most 8 files).
CALLS = {
    1: {
        "what": "kernels: GEMM rates, every design and peer at the 4 head shapes, the one_pass profile and "
        "sweeps, the kernel tests, the autotuners' choices",
        "files": (
            "env.txt",
            "log.txt",
            "summary.md",
            "gemm.csv",
            "logprobs.csv",
            "logprobs.md",
            "one_pass.md",
            "autotune.json",
        ),
        "total_s": 390,
    },
    2: {
        "what": "tests and the trainer: GPU-marked tests, trainer benchmark, memory plan, evaluation statistics",
        "files": (
            "env.txt",
            "log.txt",
            "summary.md",
            "train.csv",
            "train.md",
            "memory_plan.csv",
            "statistics.md",
            "trainer.md",
        ),
        "total_s": 390,
    },
}
# Written by a call's parts but not brought back (the call's 8 files): removed before the summary.
DROPPED = {1: (), 2: ("statistics.csv", "trainer.csv")}
SMOKE_TOTAL_S = 240  # per call; a smoke call takes ~20-40 s on an idle 2-core machine

# The import hook written by the `import` part (see ensure_importable).
FINDER = '''"""fastnpo from a source tree without pip install -e (written by benchmarks/gpu_suite.py)."""
import importlib.abc
import importlib.machinery
import importlib.util
import sys

ROOT = {root!r}
PACKAGES = {{"fastnpo": ROOT + "/fastnpo", "fastnpo.kernels": ROOT + "/kernels"}}


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in PACKAGES:
            return None
        where = PACKAGES[name]
        if name == "fastnpo.kernels":
            # kernels/ has no __init__.py (kernels/README.md): a namespace package, found here
            # even where the fastnpo/kernels link did not survive the copy to the machine.
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [where]
            return spec
        return importlib.util.spec_from_file_location(
            name, where + "/__init__.py", submodule_search_locations=[where]
        )


def install():
    if not any(type(f).__name__ == "_SourceTreeFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceTreeFinder())
'''
CHAIN = """

install()


def _run_shadowed_sitecustomize():
    import importlib.machinery
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_run_shadowed_sitecustomize()
"""


@dataclass
class Part:
    name: str
    budget_s: float  # its own limit in a GPU window
    smoke_budget_s: float  # and in --smoke (generous: the CPU CI machine may be loaded)
    reserve_s: float = 0.0  # kept for this part while the parts before it run (GPU; smoke: 5 s)
    status: str = "not run"
    seconds: float = 0.0
    detail: str = ""
    lines: list = field(default_factory=list)  # its output (pytest parts: parsed for the summary)
    limit_s: float = 0.0  # the limit it runs under (set by run_call before its commands are built)


def call_parts(call: int) -> list[Part]:
    """The parts of one device call, in order: the set-up, then the most valuable numbers first.
    Budgets and reserves from the two H200 windows' logs (benchmarks/README.md, "Next GPU window")."""
    setup = [Part("env", 60, 60, 5), Part("wheels", 90, 60, 5), Part("import", 60, 60, 5)]  # ~20 s in all
    if call == 1:
        return [
            *setup,
            Part("gemm", 60, 60, 20),  # ~15 s: 4 shapes x 4 GEMMs + 8192^3, do_bench 25 / 100 ms
            # 118 s in the H200's second window (8 contenders), 204 s in the first (11, two of them
            # 0.2-0.8 s a call); now 11 and the epilogue design's first autotuning: ~200-250 s
            Part("logprobs", 270, 120, 60),
            Part("one-pass", 80, 90, 45),  # ~30-40 s: 2 profiles + 7 sweep points, kernels tuned above
            # what time is left (CPU CI runs these tests through the interpreter); before autotune,
            # so that its tuning runs are collected too
            Part("kernel-tests", 90, 90, 0),
            Part("autotune", 20, 30, 5),
        ]
    return [
        *setup,
        # 30 GPU-marked tests, the newest designs' first; the H200's second window ran 12 of 21 in
        # 130 s, 10 compiled-kernel tests took 90 s in the first (autotuning included)
        Part("gpu-tests", 140, 90, 40),
        Part("train", 120, 90, 100),  # 104 s in the H200's second window (memory subprocesses included)
        # predicted ~40-60 s for the 1B (two train() runs: random init on the GPU, the reference pass,
        # 3 + 6 + 1 steps each, the one_pass kernels' first autotuning); the 8B slice runs only if the
        # time left is >= 1.2x what the 1B took
        Part("trainer", 90, 90, 60),
        Part("memory-plan", 150, 90, 60),  # ~25-60 s a case (the 8-bit case compiles its step), 80 s at most
        # predicted ~10-20 s: three forward-only contenders, the Triton kernel's first autotuning
        Part("statistics", 40, 90, 20),
    ]


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


class Log:
    """Everything to stdout and to OUT/log.txt."""

    def __init__(self, path: Path):
        self.handle = open(path, "w", buffering=1)

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.handle.write(text + "\n")


def run_command(argv, *, timeout: float, env: dict, log: Log, cwd=ROOT, lines=None) -> tuple[int | None, float]:
    """Run argv in its own process group, stream its output to log (and append it to lines, if
    given); on timeout kill the group. Returns (exit code or None on timeout, seconds)."""
    log("$ " + " ".join(str(a) for a in argv))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def pump():
        for line in proc.stdout:
            log(line.rstrip("\n"))
            if lines is not None:
                lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        code = None
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    return code, time.perf_counter() - t0


def environment_text(smoke: bool, env: dict, log: Log) -> str:
    """The machine and versions, gathered in a subprocess with the suite's PYTHONPATH."""
    probe = r"""
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "SMs", p.multi_processor_count,
          "capability", f"{p.major}.{p.minor}", "L2", getattr(p, "L2_cache_size", "?"))
for name in ["triton", "fastnpo", *sys.argv[1:]]:
    try:
        print(name, md.version(name.replace("_", "-")))
    except Exception:
        try:
            print(name, __import__(name).__version__)
        except Exception as error:
            print(name, "not installed:", type(error).__name__)
"""
    lines = [f"date {now()}", f"mode {'smoke (CPU, tiny shapes)' if smoke else 'gpu'}"]
    lines.append(f"host {platform.node()} {platform.platform()}; {os.cpu_count()} CPU cores")
    lines.append(f"cpu {cpu_name()}")
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit"
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        lines.append(f"nvidia-smi ({query}): {out.stdout.strip() or out.stderr.strip()}")
    else:
        lines.append("nvidia-smi: not found")
    out = subprocess.run(
        [sys.executable, "-c", probe, *PEERS], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )
    lines += out.stdout.strip().splitlines()
    if out.returncode:
        lines.append("version probe failed: " + (out.stderr.strip().splitlines() or ["?"])[-1])
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    lines.append("git " + (git.stdout.strip() or "unknown (no .git here)"))
    lines.append("PYTHONPATH " + env.get("PYTHONPATH", ""))
    return "\n".join(lines) + "\n"


def ensure_importable(hook_dir: Path, env: dict, log: Log) -> str:
    """Make `import fastnpo.kernels` work in the subprocesses: nothing to do when it already works
    (pip install -e), else an import hook in hook_dir (a sitecustomize.py), put on env's PYTHONPATH.
    Nothing is written outside hook_dir: the machine's Python stays as it was."""
    check = [sys.executable, "-c", "import fastnpo.kernels.tiles, fastnpo; print(fastnpo.__file__)"]
    done = subprocess.run(check, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=300)
    if done.returncode == 0:
        return "already importable: " + done.stdout.strip()
    write_finder(hook_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), env.get("PYTHONPATH")]))
    done = subprocess.run(check, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=300)
    if done.returncode:
        raise RuntimeError("fastnpo still not importable: " + (done.stderr.strip().splitlines() or ["?"])[-1])
    return f"import hook in {hook_dir} (PYTHONPATH): " + done.stdout.strip()


def write_finder(hook_dir: Path) -> None:
    """hook_dir/sitecustomize.py: installs the finder at interpreter start, then runs the
    sitecustomize it shadows, if the machine has one."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(FINDER.format(root=str(ROOT)) + CHAIN)


def read_csv(path: Path) -> list[dict]:
    """The rows of a results CSV a part wrote; none where the part wrote none."""
    return read_results_csv(path)[1] if path.exists() else []


def gpu_test_files() -> list[str]:
    """The test files that hold GPU-marked tests (a plain-text search for the marker), the newest
    designs' first and tests/ops/test_kernels.py (21 compiled-kernel cases, the longest) last."""
    first = ("test_fused_epilogue.py", "test_one_pass.py", "test_split_backward.py")
    found = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("test_*.py")
        if "mark.gpu" in path.read_text(errors="replace")
    )

    def rank(path: str) -> tuple:
        name = Path(path).name
        return (0, first.index(name)) if name in first else (2, path) if name == "test_kernels.py" else (1, path)

    return sorted(found, key=rank)


PYTEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def pytest_outcomes(lines: list[str]) -> dict:
    """{outcome: [test ids]} from pytest -v output (what ran before a timeout, too)."""
    outcomes: dict = {}
    for line in lines:
        hit = PYTEST_LINE.match(line)
        if hit:
            outcomes.setdefault(hit.group(2), []).append(hit.group(1))
    return outcomes


def triton_cache_dir() -> Path:
    """Where triton keeps its cache (and, with cache_results, its autotune.json files)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    return Path(os.environ.get("TRITON_HOME") or Path.home()) / ".triton" / "cache"


def autotune_report(cache_dir: Path, since: float, in_process: Path) -> dict:
    """The autotuners' choices after the run: every *.autotune.json in triton's cache (kernel, key,
    each config's timings [median, 20%, 80%] ms, the best: the lowest median, as triton picks it) and
    the choices of the logprobs process (bench_logprobs --autotune-out: best_config and cache of each
    of fastnpo's autotuners, which also covers the interpreter's single config in --smoke)."""
    entries = []
    for path in sorted(cache_dir.glob("*/*.autotune.json")):
        try:
            data = json.loads(path.read_text())
            timings = [(config, times) for config, times in data.get("configs_timings", [])]
        except (OSError, ValueError) as error:
            entries.append({"file": str(path), "error": f"{type(error).__name__}: {error}"})
            continue

        def first(times):
            return times[0] if isinstance(times, list) and times else times if isinstance(times, float) else 1e30

        configs = [
            {k: v for k, v in config.items() if k != "pre_hook"} | {"ms": times}
            for config, times in sorted(timings, key=lambda item: first(item[1]))
        ]
        entries.append(
            {
                "kernel": path.name.removesuffix(".autotune.json"),
                "key": data.get("key"),
                "written_this_run": path.stat().st_mtime >= since,
                "best": configs[0] if configs else None,
                "configs": configs,
            }
        )
    process = None
    if in_process.exists():
        try:
            process = json.loads(in_process.read_text())
        except ValueError as error:
            process = f"unreadable: {error}"
    return {"triton_cache_dir": str(cache_dir), "autotune_files": entries, "logprobs_process": process}


def summary_text(call: int, parts: list[Part], out: Path, smoke: bool, total_s: float) -> str:
    lines = [
        f"# fastnpo GPU suite, call {call}: {CALLS[call]['what']}"
        + (" (SMOKE: CPU, tiny shapes; numbers are CPU numbers)" if smoke else ""),
        "",
        f"{now()}, {total_s:.0f} s in all; files in {out}",
        "",
        "| part | status | s | detail |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.detail} |" for p in parts]
    gemms = read_csv(out / "gemm.csv")
    if gemms:
        lines += ["", "GEMM rates (TFLOP/s, median / best sample; random operands):", ""]
        lines += ["| N x D x V | GEMM | [M x K] x [K x N] | out | median | best |", "|---|---|---|---|---:|---:|"]
        for r in gemms:
            lines.append(
                f"| {r['N']}x{r['D']}x{r['V']} | {r['gemm']} | [{r['M']} x {r['K']}] x [{r['K']} x {r['N_out']}] "
                f"| {r['out']} | {fmt(r['median_tflops'], '.4g')} | {fmt(r['best_tflops'], '.4g')} |"
            )
    rows = [r for r in read_csv(out / "logprobs.csv") if r.get("status") == "ok"]
    if rows:
        lines += [
            "",
            "Kernel benchmark: median ms (x the FLOP floor at this run's median matmul rate / x the floor at its "
            "best GEMM rates: 2NDV or the logits GEMM fwd, 6NDV or logits + dH + dW GEMMs fwd+bwd)",
            "",
        ]
        shapes = list(dict.fromkeys(f"{r['D']}x{r['V']}" for r in rows))
        names = list(dict.fromkeys(r["contender"] for r in rows))
        lines.append("| mode | contender | " + " | ".join(f"D x V {s}" for s in shapes) + " |")
        lines.append("|---|---|" + "---:|" * len(shapes))
        for mode in ("fwd", "fwd+bwd"):
            for name in names:
                cells = []
                for shape in shapes:
                    hit = next(
                        (
                            r
                            for r in rows
                            if r["mode"] == mode and r["contender"] == name and f"{r['D']}x{r['V']}" == shape
                        ),
                        None,
                    )
                    cells.append(
                        "–"
                        if hit is None
                        else f"{fmt(hit['median_ms'], '.2f')} ({fmt(hit['x_floor'], '.2f')}x / "
                        f"{fmt(hit.get('x_floor_best'), '.2f')}x), {fmt(hit.get('peak_mib'), '.0f')} MiB"
                        + ("" if hit.get("check") == "pass" else " " + hit.get("check", "?"))
                    )
                if any(c != "–" for c in cells):
                    lines.append(f"| {mode} | {name} | " + " | ".join(cells) + " |")
        rates = {f"{r['D']}x{r['V']}": r.get("matmul_tflops") for r in rows}
        lines.append("")
        floors = []  # floor = median / x, from any row of the shape and mode
        for shape in shapes:
            cells = []
            for mode in ("fwd", "fwd+bwd"):
                hit = next((r for r in rows if f"{r['D']}x{r['V']}" == shape and r["mode"] == mode), None)
                try:
                    median = float(hit["median_ms"])
                    cells.append(
                        f"{mode} {median / float(hit['x_floor']):.2f} / {median / float(hit['x_floor_best']):.2f}"
                    )
                except (TypeError, ValueError, KeyError, ZeroDivisionError):
                    cells.append(f"{mode} –")
            floors.append(f"{shape}: " + ", ".join(cells))
        lines.append("Floors, ms (at the median matmul rate / at the best GEMM rates): " + "; ".join(floors))
        lines.append("matmul TFLOP/s (median) measured: " + ", ".join(f"{k} {fmt(v, '.3g')}" for k, v in rates.items()))
    one_pass = out / "one_pass.md"
    if one_pass.exists():
        lines += ["", one_pass.read_text().strip()]
    tuned = out / "autotune.json"
    if tuned.exists():
        try:
            data = json.loads(tuned.read_text())
            files = data["autotune_files"]
            process = data["logprobs_process"] or []
            lines += [
                "",
                f"Autotune: {len(files)} autotune.json files in {data['triton_cache_dir']} "
                f"({sum(bool(f.get('written_this_run')) for f in files)} written by this run); "
                f"{len(process)} of fastnpo's autotuners in the logprobs process (autotune.json has each choice)",
            ]
        except (ValueError, KeyError, TypeError) as error:
            lines += ["", f"autotune.json unreadable: {error}"]
    for part in parts:
        if part.name in ("gpu-tests", "kernel-tests") and part.lines:
            outcomes = pytest_outcomes(part.lines)
            counts = ", ".join(f"{len(v)} {k.lower()}" for k, v in outcomes.items()) or "no test outcome lines"
            lines += ["", f"{part.name}: {counts}"]
            for bad in outcomes.get("FAILED", []) + outcomes.get("ERROR", []):
                lines.append(f"- FAILED/ERROR {bad}")
    plans = read_csv(out / "memory_plan.csv")
    if plans:
        lines += ["", "Memory plan vs measured peak allocated (MiB): case, measured, plan, plan / measured", ""]
        for r in plans:
            lines.append(
                f"- {r['case']} ({r['optimizer']}, in_backward {r.get('in_backward', '?')}, offload "
                f"{r.get('offload', '?')}, checkpointing {r['checkpointing']}, {r['rows']}x{r['length']}): "
                f"{r['status']}, measured {fmt(r.get('measured_peak_mib'), '.0f')}, "
                f"plan {fmt(r.get('predicted_mib'), '.0f')} ({fmt(r.get('predicted_over_measured'), '.3f')}), "
                f"reserved {fmt(r.get('reserved_peak_mib'), '.0f')}, host plan "
                f"{fmt(r.get('predicted_host_gib'), '.1f')} GiB / peak {fmt(r.get('host_peak_gib'), '.1f')} GiB, "
                f"steps {r.get('step_s') or '–'} s"
            )
    statistics = out / "statistics.md"
    if statistics.exists():
        lines += ["", statistics.read_text().strip()]
    trainer = out / "trainer.md"
    if trainer.exists():  # the table and the lines under it, not the header list
        text = trainer.read_text().splitlines()
        table = [line for line in text if line.startswith("|")]
        notes = [line for line in text if line.startswith("- ") and ("skipped" in line or "floor:" in line)]
        lines += ["", "Trainer step (bench_trainer.py, NPO+RT TOFU batch): one_pass vs two_call", "", *table, *notes]
    train = read_csv(out / "train.csv")
    if train:
        lines += ["", "NPO step: contender, median step ms, tokens/s, x baseline, peak MiB (x baseline)", ""]
        for r in train:
            lines.append(
                f"- {r['contender']}: {fmt(r['median_step_ms'], '.1f')} ms, "
                f"{fmt(r['tokens_per_s'], '.0f')} tok/s, "
                f"{fmt(r['speedup_vs_baseline'], '.2f')}x, {fmt(r.get('peak_mib'), '.0f')} MiB "
                f"({fmt(r.get('peak_vs_baseline'), '.2f')}x)"
            )
    return "\n".join(lines) + "\n"


def cap_files(out: Path, allowed: tuple) -> list[str]:
    """Keep OUT within what a device run brings back: <= 8 files, each < 16 MiB (log.txt keeps its end)."""
    notes = []
    for path in sorted(out.iterdir()):
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            data = path.read_bytes()[-MAX_FILE_BYTES + 4096 :]
            path.write_bytes(b"[... start cut to stay under 16 MiB ...]\n" + data)
            notes.append(f"{path.name} cut to its last 15 MiB")
    files = sorted(p.name for p in out.iterdir())
    if len(files) > 8:
        notes.append(f"{len(files)} entries in OUT (a device run brings back 8): {files}")
    unexpected = sorted(set(files) - set(allowed))
    if unexpected:
        notes.append(f"files this call does not list: {unexpected}")
    return notes


def commands(part: Part, *, smoke: bool, out: Path, tmp: Path, args) -> list[list]:
    """The subprocess command lines of one part."""
    py = sys.executable
    device = ["--device", "cpu" if smoke else "cuda"]
    pytest = [py, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    if part.name == "gpu-tests":  # on CPU every test skips: collection, selection and the -v parse run
        return [[*pytest, "-v", "--durations=15", "-m", "gpu", *gpu_test_files()]]
    if part.name == "kernel-tests":
        paths = ["tests/ops/test_kernels.py", "tests/ops/test_logprobs.py", "tests/kernels"]
        # not this suite's own smoke test (it would run the whole smoke on the GPU machine's CPU), not
        # the GPU-marked tests (the gpu-tests part ran them)
        select = ["-k", "triton or kernels", "-m", "not slow and not gpu"]
        select += ["--ignore", "tests/kernels/test_gpu_suite_smoke.py"]
        # CPU CI already runs these through the interpreter: the smoke only collects them.
        return [[*pytest, "-v", *paths, *select, *(["--collect-only"] if smoke else [])]]
    if part.name == "train":
        common = [py, BENCH / "bench_train.py", *device, "--out-dir", out, "--out", "train", "--no-plot"]
        common += ["--profile", "fastnpo"]  # where fastnpo's step goes (the table goes to log.txt)
        if smoke:
            tiny = ["--model", "micro", "--steps", "1", "--warmup", "1", "--pool", "16", "--batch-size", "4"]
            return [[*common, *tiny, "--length-scale", "0.2", "--no-memory", "--contenders", "fastnpo"]]
        return [[*common, "--model", "1b", "--dtype", "bfloat16", "--steps", "6", "--warmup", "2"]]
    if part.name == "trainer":
        argv = [py, BENCH / "bench_trainer.py", *device, "--out-dir", out, "--out", "trainer"]
        if smoke:
            return [[*argv, "--smoke"]]
        # the script starts a model only while the part's limit leaves time for it (files rewritten after each)
        deadline = max(30.0, (part.limit_s or part.budget_s) - 10)
        return [[*argv, "--model", "1b,8b-slice", "--deadline-s", f"{deadline:.0f}"]]
    if part.name in ("gemm", "logprobs"):
        common = [py, BENCH / "bench_logprobs.py", *device, "--dtype", "bfloat16", "--out-dir", out]
        shapes = ["--shapes", SMOKE_SHAPES if smoke else GPU_SHAPES]
        timing = ["--repeats", "1"] if smoke else ["--cuda-ms", "25,100" if part.name == "gemm" else "30,150"]
        if part.name == "gemm":
            return [[*common, "--out", "gemm", "--gemm-only", *shapes, *timing]]
        common += ["--out", "logprobs", "--hidden", "realistic", "--no-plot", *shapes, *timing]
        common += ["--contenders", args.logprobs_contenders, "--autotune-out", tmp / "autotune_logprobs.json"]
        return [[*common, "--no-compile"]] if smoke else [common]
    if part.name == "one-pass":
        argv = [py, BENCH / "profile_logprobs.py", *device, "--impls", "", "--npo", "one_pass,epilogue"]
        argv += ["--out", out / "one_pass.md"]
        if smoke:
            tiny = ["--shape", "32x16x67", "--seq-len", "16", "--sweep-rows", "16,32", "--sweep-epilogue-mib", "1"]
            return [[*argv, *tiny, "--repeats", "1", "--calls", "1", "--rows", "5"]]
        sweep = ["--sweep-rows", SWEEP_ROWS, "--sweep-epilogue-mib", SWEEP_EPILOGUE_MIB]
        return [[*argv, "--shape", "8192x4096x128256", "--seq-len", "512", *sweep, "--rows", "12"]]
    if part.name == "memory-plan":
        common = [py, BENCH / "bench_memory_plan.py", *device, "--out-dir", out, "--out", "memory_plan"]
        common.append("--csv-only")
        if smoke:
            return [[*common, "--smoke", "--cases", SMOKE_MEMORY_CASES, "--timeout", "90"]]
        return [[*common, "--cases", args.memory_cases, "--timeout", "80"]]
    if part.name == "statistics":
        argv = [py, BENCH / "bench_statistics.py", *device, "--out-dir", out, "--out", "statistics"]
        if smoke:
            return [[*argv, "--smoke"]]
        return [[*argv, "--dtype", "bfloat16", "--shape", "8192x4096x128256", "--repeats", "5", "--warmup", "2"]]
    raise ValueError(f"no command for part {part.name!r}")


def part_limit(parts: list[Part], index: int, left_s: float, *, smoke: bool, skip=()) -> float:
    """Seconds part `index` may run: its own budget, or less where the call's deadline (left_s away)
    must still leave the reserve of every later part that is not skipped (smoke: 5 s each)."""
    part = parts[index]
    reserve = sum(5 if smoke else later.reserve_s for later in parts[index + 1 :] if later.name not in skip)
    return min(part.smoke_budget_s if smoke else part.budget_s, left_s - reserve)


def run_call(call: int, out: Path, args) -> int:
    """One device call: its parts into out; returns 1 if a part failed or ran out of time."""
    smoke = args.smoke
    out.mkdir(parents=True, exist_ok=True)
    for name in {*CALLS[1]["files"], *CALLS[2]["files"], *DROPPED[1], *DROPPED[2]}:
        (out / name).unlink(missing_ok=True)
    log = Log(out / "log.txt")
    started, started_epoch = time.perf_counter(), time.time()
    total_s = args.total_s or (SMOKE_TOTAL_S if smoke else CALLS[call]["total_s"])
    deadline = started + total_s
    skip = set(filter(None, args.skip.split(",")))

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if smoke:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    tmp = Path(tempfile.mkdtemp(prefix=f"fastnpo-gpu-suite-{call}-"))
    wheels = sorted(glob.glob(str(Path(args.wheels) / "*.whl")))

    parts = call_parts(call)
    names = [part.name for part in parts]
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name in names:
            parts[names.index(name)].budget_s = float(seconds)
    log(f"fastnpo GPU suite, call {call} ({CALLS[call]['what']}); deadline {total_s:.0f} s; {now()}")

    for index, part in enumerate(parts):
        limit = part_limit(parts, index, deadline - time.perf_counter(), smoke=smoke, skip=skip)
        part.limit_s = limit
        log(f"\n===== {part.name} ({now()}; limit {limit:.0f} s) =====")
        if part.name in skip:
            part.status, part.detail = "skipped", "--skip"
            continue
        if limit < 5:
            part.status, part.detail = "skipped", "no time left before the call's deadline"
            continue
        t0 = time.perf_counter()
        try:
            if part.name == "env":
                text = environment_text(smoke, env, log)
                (out / "env.txt").write_text(text)
                log(text)
                part.status, part.detail = "ok", "env.txt"
            elif part.name == "wheels":
                if not wheels:
                    part.status, part.detail = "skipped", f"no wheels in {args.wheels} (make gpu-wheels)"
                else:
                    target = tmp / "site"
                    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
                    pip += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", target]
                    if smoke:  # a CPU machine may run another Python: check the set installs for 3.12
                        pip += ["--python-version", "3.12", "--only-binary=:all:", "--implementation", "cp"]
                        pip += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64"]
                    code, _ = run_command([*pip, *wheels], timeout=limit, env=env, log=log)
                    if code != 0:
                        raise RuntimeError(f"pip install exited {code}")
                    if not smoke:
                        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
                        # versions again, now with the wheels on the path
                        (out / "env.txt").write_text(environment_text(smoke, env, log))
                    part.status = "ok"
                    part.detail = f"{len(wheels)} wheels" + (
                        " (checked for 3.12, not put on the path)" if smoke else ""
                    )
            elif part.name == "import":
                part.detail = ensure_importable(tmp / "import-hook", env, log)
                log(part.detail)
                part.status = "ok"
            elif part.name == "autotune":
                report = autotune_report(triton_cache_dir(), started_epoch, tmp / "autotune_logprobs.json")
                (out / "autotune.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
                files = report["autotune_files"]
                part.status = "ok"
                part.detail = (
                    f"{len(files)} autotune.json files, {len(report['logprobs_process'] or [])} autotuners "
                    "in the logprobs process"
                )
                for entry in files:
                    log(f"{entry.get('kernel')} key {entry.get('key')}: best {entry.get('best')}")
            else:
                for argv in commands(part, smoke=smoke, out=out, tmp=tmp, args=args):
                    remaining = limit - (time.perf_counter() - t0)
                    code, _ = run_command(argv, timeout=remaining, env=env, log=log, lines=part.lines)
                    if code is None:
                        part.status, part.detail = "TIMEOUT", f"killed after {limit:.0f} s (partial output kept)"
                        break
                    if code != 0:
                        part.status, part.detail = "FAILED", f"exit code {code} (see log.txt)"
                        break
                else:
                    part.status = "ok"
        except Exception as error:
            part.status, part.detail = "FAILED", f"{type(error).__name__}: {str(error)[:200]}"
            log(part.detail)
        part.seconds = time.perf_counter() - t0
        log(f"----- {part.name}: {part.status} in {part.seconds:.0f} s {part.detail}")

    for name in DROPPED[call]:
        (out / name).unlink(missing_ok=True)
    notes = cap_files(out, CALLS[call]["files"])
    text = summary_text(call, parts, out, smoke, time.perf_counter() - started)
    if notes:
        text += "\n" + "\n".join(f"note: {n}" for n in notes) + "\n"
    (out / "summary.md").write_text(text)
    log("\n" + text)
    log.handle.close()
    cap_files(out, CALLS[call]["files"])
    shutil.rmtree(tmp, ignore_errors=True)
    failed = [p.name for p in parts if p.status in ("FAILED", "TIMEOUT")]
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created; emptied of the suite's files)")
    parser.add_argument(
        "--call",
        default="all",
        choices=("1", "2", "all"),
        help="which device call: 1 the kernels, 2 tests and the trainer, all both (into OUT/call1, OUT/call2)",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of wheels to install (if present)")
    parser.add_argument(
        "--total-s",
        type=float,
        default=None,
        help=f"deadline of each call (GPU: call 1 {CALLS[1]['total_s']}, call 2 {CALLS[2]['total_s']}; "
        f"smoke {SMOKE_TOTAL_S}); pass what the device time left allows",
    )
    parser.add_argument("--skip", default="", help="comma-separated parts to skip")
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="a part's own time limit on the GPU, e.g. --budget train=200 (repeatable)",
    )
    parser.add_argument(
        "--logprobs-contenders",
        default=LOGPROBS_CONTENDERS,
        help="bench_logprobs --contenders for the logprobs part (default: every design and peer)",
    )
    parser.add_argument("--memory-cases", default=MEMORY_CASES, help="bench_memory_plan --cases (GPU)")
    args = parser.parse_args(argv)
    names = {part.name for call in CALLS for part in call_parts(call)}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in names or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(sorted(names))}")
    out = Path(args.out).resolve()
    if args.call == "all":
        codes = [run_call(call, out / f"call{call}", args) for call in (1, 2)]
        return max(codes)
    return run_call(int(args.call), out, args)


if __name__ == "__main__":
    sys.exit(main())
