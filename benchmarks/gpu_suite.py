#!/usr/bin/env python
"""Everything a GPU window needs, as one command: tests, kernel benchmark, trainer benchmark.

    make gpu-wheels                      # on a machine with internet: the missing wheels into wheels/
    make gpu-suite OUT=/path/to/out      # on the GPU machine (no internet): everything, < 10 minutes (--total-s 555)
    python benchmarks/gpu_suite.py --smoke --out /tmp/gs   # the same code paths on CPU, tiny shapes

Parts, in order, each in its own subprocess with its own time limit (a part that fails or runs out
of time is recorded and the next one still runs; the whole run also has a deadline, --total-s):

  env          GPU, driver, CUDA, python, torch, triton, transformers and every peer's version -> env.txt
  wheels       pip install --no-index --no-deps --target <tmp> wheels/*.whl (the packages the GPU
               image lacks), then <tmp> goes on PYTHONPATH for the parts below
  import       makes `import fastnpo` / `fastnpo.kernels` work without `pip install -e` (no network
               there): an import hook (a sitecustomize.py in the run's temporary folder, on
               PYTHONPATH) mapping fastnpo.kernels to kernels/; the machine's Python is not touched
  gpu-tests    pytest -m gpu tests
  logprobs     benchmarks/bench_logprobs.py: N=8192, the four (D, V), bf16, fwd and fwd+bwd, every
               fastnpo impl and every installed peer, matmul rate and copy bandwidth in the same run,
               ratio to the FLOP floor -> logprobs.csv, logprobs.md (written after each shape; the
               plot is drawn from the CSV afterwards: a device run brings back 8 files)
  train        benchmarks/bench_train.py at the Llama-3.2-1B shape -> train.csv, train.md
  memory-plan  benchmarks/bench_memory_plan.py: `fastnpo plan` against the measured peak of real
               training steps at the Llama-3.2-1B and 3.1-8B shapes -> memory_plan.csv (+ its table
               in summary.md)
  profile      benchmarks/profile_logprobs.py: torch.profiler's kernel table of one fwd+bwd call per
               design (cublas, triton) at N=8192, D=4096, V=128256 -> log.txt
  kernel-tests pytest of the Triton kernel tests (compiled kernels on a GPU), with what time is left

OUT ends up with at most 8 files: env.txt, log.txt (every part's output), summary.md (the one-screen
summary, also printed last), logprobs.{csv,md}, train.{csv,md}, memory_plan.csv.

--smoke runs the same parts on CPU at tiny shapes (Triton through the interpreter, pytest parts
that only skip or collect there); its numbers are CPU numbers and labelled so.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
MAX_FILE_BYTES = 15 * 2**20  # what comes back from a device run: < 16 MiB a file
# What a run writes into OUT (a device run brings back at most 8 files).
OUT_FILES = (
    "env.txt",
    "log.txt",
    "summary.md",
    "logprobs.csv",
    "logprobs.md",
    "train.csv",
    "train.md",
    "memory_plan.csv",
)

GPU_SHAPES = "8192x4096x128256,8192x3584x152064,8192x2304x256000,8192x2048x128256"
# Tiny analogues for --smoke: a prime V and N = 1 x the NPO sequence length (the interpreter
# takes ~1 ms per program iteration).
SMOKE_SHAPES = "32x16x67,32x24x128"
PEERS = ("liger_kernel", "cut_cross_entropy", "trl", "transformers", "peft", "datasets", "omegaconf", "torchao")

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
    budget_s: float  # GPU run
    smoke_budget_s: float
    status: str = "not run"
    seconds: float = 0.0
    detail: str = ""
    extra_env: dict = field(default_factory=dict)


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


class Log:
    """Everything to stdout and to OUT/log.txt."""

    def __init__(self, path: Path):
        self.handle = open(path, "w", buffering=1)

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.handle.write(text + "\n")


def run_command(argv, *, timeout: float, env: dict, log: Log, cwd=ROOT) -> tuple[int | None, float]:
    """Run argv in its own process group, stream its output to log; on timeout kill the group.
    Returns (exit code or None on timeout, seconds)."""
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
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((x.split(":", 1)[1].strip() for x in handle if x.startswith("model name")), "?")
        lines.append(f"cpu {model}")
    except OSError:
        pass
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
    if not path.exists():
        return []
    with open(path) as handle:
        return list(csv.DictReader(line for line in handle if not line.startswith("#")))


def number(value, spec: str) -> str:
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "–"


def summary_text(parts: list[Part], out: Path, smoke: bool, total_s: float) -> str:
    lines = [
        f"# fastnpo GPU suite{' (SMOKE: CPU, tiny shapes; numbers are CPU numbers)' if smoke else ''}",
        "",
        f"{now()}, {total_s:.0f} s in all; files in {out}",
        "",
        "| part | status | s | detail |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.detail} |" for p in parts]
    rows = [r for r in read_csv(out / "logprobs.csv") if r.get("status") == "ok"]
    if rows:
        lines += [
            "",
            "Kernel benchmark: median ms (x FLOP floor: 2NDV fwd, 6NDV fwd+bwd, at this run's matmul rate)",
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
                        else f"{number(hit['median_ms'], '.2f')} ({number(hit['x_floor'], '.2f')}x)"
                        + ("" if hit.get("check") == "pass" else " " + hit.get("check", "?"))
                    )
                if any(c != "–" for c in cells):
                    lines.append(f"| {mode} | {name} | " + " | ".join(cells) + " |")
        rates = {f"{r['D']}x{r['V']}": r.get("matmul_tflops") for r in rows}
        lines.append("")
        lines.append("matmul TFLOP/s measured: " + ", ".join(f"{k} {number(v, '.3g')}" for k, v in rates.items()))
    plans = read_csv(out / "memory_plan.csv")
    if plans:
        lines += ["", "Memory plan vs measured peak allocated (MiB): case, measured, plan, plan / measured", ""]
        for r in plans:
            lines.append(
                f"- {r['case']} ({r['optimizer']}, checkpointing {r['checkpointing']}, {r['rows']}x{r['length']}): "
                f"{r['status']}, measured {number(r.get('measured_peak_mib'), '.0f')}, "
                f"plan {number(r.get('predicted_mib'), '.0f')} ({number(r.get('predicted_over_measured'), '.3f')}), "
                f"reserved {number(r.get('reserved_peak_mib'), '.0f')}, steps {r.get('step_s') or '–'} s"
            )
    train = read_csv(out / "train.csv")
    if train:
        lines += ["", "NPO step: contender, median step ms, tokens/s, x baseline, peak MiB (x baseline)", ""]
        for r in train:
            lines.append(
                f"- {r['contender']}: {number(r['median_step_ms'], '.1f')} ms, "
                f"{number(r['tokens_per_s'], '.0f')} tok/s, "
                f"{number(r['speedup_vs_baseline'], '.2f')}x, {number(r.get('peak_mib'), '.0f')} MiB "
                f"({number(r.get('peak_vs_baseline'), '.2f')}x)"
            )
    return "\n".join(lines) + "\n"


def cap_files(out: Path) -> list[str]:
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
    return notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created; emptied of the suite's files)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of wheels to install (if present)")
    parser.add_argument("--total-s", type=float, default=None, help="deadline for the whole run (GPU 555, smoke 200)")
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
        default=None,
        help="bench_logprobs --contenders for the logprobs part (default: every contender)",
    )
    args = parser.parse_args(argv)
    smoke = args.smoke
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:
        (out / name).unlink(missing_ok=True)
    log = Log(out / "log.txt")
    started = time.perf_counter()
    deadline = started + (args.total_s or (200 if smoke else 555))
    skip = set(filter(None, args.skip.split(",")))

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if smoke:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="fastnpo-gpu-suite-"))
    wheels = sorted(glob.glob(str(Path(args.wheels) / "*.whl")))

    parts = [
        Part("env", 60, 60),
        Part("wheels", 90, 60),
        Part("import", 60, 60),
        Part("gpu-tests", 200, 60),  # the H200's second window ran 12 of 21 tests in 130 s (compiles included)
        Part("logprobs", 180, 90),
        Part("train", 170, 60),
        Part("memory-plan", 240, 60),  # ~25 s, ~40 s, the 8-bit case (CPU: 78 s to compile its steps)
        Part("profile", 90, 40),
        Part("kernel-tests", 60, 40),
    ]
    names = [part.name for part in parts]
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in names or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(names)}")
        parts[names.index(name)].budget_s = float(seconds)
    device = ["--device", "cpu" if smoke else "cuda"]

    def commands(part: Part) -> list[list[str]] | None:
        pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
        if part.name == "gpu-tests":  # on CPU every test skips: collection and selection are what runs
            return [[*pytest, "-m", "gpu", "tests"]]
        if part.name == "kernel-tests":
            paths = ["tests/ops/test_kernels.py", "tests/ops/test_logprobs.py", "tests/kernels"]
            select = ["-k", "triton or kernels", "-m", "not slow"]
            # CPU CI already runs these through the interpreter: the smoke only collects them.
            return [[*pytest, *paths, *select, *(["--collect-only"] if smoke else [])]]
        if part.name == "train":
            common = [py, BENCH / "bench_train.py", *device, "--out-dir", out, "--out", "train", "--no-plot"]
            common += ["--profile", "fastnpo"]  # where fastnpo's step goes (the table goes to log.txt)
            if smoke:
                return [
                    [
                        *common,
                        "--model",
                        "micro",
                        "--steps",
                        "1",
                        "--warmup",
                        "1",
                        "--pool",
                        "16",
                        "--batch-size",
                        "4",
                        "--length-scale",
                        "0.2",
                        "--no-memory",
                    ]
                ]
            return [[*common, "--model", "1b", "--dtype", "bfloat16", "--steps", "6", "--warmup", "2"]]
        if part.name == "logprobs":
            common = [
                py,
                BENCH / "bench_logprobs.py",
                *device,
                "--dtype",
                "bfloat16",
                "--out-dir",
                out,
                "--out",
                "logprobs",
                "--hidden",
                "realistic",
            ]
            if args.logprobs_contenders:
                common += ["--contenders", args.logprobs_contenders]
            if smoke:
                return [[*common, "--shapes", SMOKE_SHAPES, "--repeats", "1", "--no-compile", "--no-plot"]]
            return [[*common, "--shapes", GPU_SHAPES, "--cuda-ms", "30,150", "--no-plot"]]
        if part.name == "profile":  # its tables go to log.txt
            argv = [py, BENCH / "profile_logprobs.py", *device]
            return [[*argv, "--shape", "16x16x67", "--impls", "torch,cublas", "--rows", "5"]] if smoke else [argv]
        if part.name == "memory-plan":
            common = [py, BENCH / "bench_memory_plan.py", *device, "--out-dir", out, "--out", "memory_plan"]
            common.append("--csv-only")
            # 1B, 8B (plain AdamW and Kahan) agreed within 1% on the H200 (benchmarks/results/
            # memory_plan_cuda_h200*.md): the window re-checks 1B and measures the optimizer step
            # inside the backward, plain and with 8-bit moments (the 8B 40 GB config's optimizer),
            # and the CPU offload (1B first: cheap; 8B last, its step runs on the host's cores).
            cases = "1b-ckpt,1b-ckpt-offload,8b-ckpt-in-backward,8b-ckpt-8bit-in-backward,8b-ckpt-offload"
            gpu = ["--cases", cases, "--timeout", "150"]
            return [[*common, "--smoke"]] if smoke else [[*common, *gpu]]
        return None

    for index, part in enumerate(parts):
        later = len(parts) - index - 1
        limit = min(part.smoke_budget_s if smoke else part.budget_s, deadline - time.perf_counter() - 5 * later)
        log(f"\n===== {part.name} ({now()}; limit {limit:.0f} s) =====")
        if part.name in skip:
            part.status, part.detail = "skipped", "--skip"
            continue
        if limit < 5:
            part.status, part.detail = "skipped", "no time left before the suite's deadline"
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
                    pip = [
                        py,
                        "-m",
                        "pip",
                        "install",
                        "-q",
                        "--no-index",
                        "--no-deps",
                        "--no-compile",
                        "--no-cache-dir",
                        "--upgrade",
                        "--target",
                        target,
                    ]
                    if smoke:  # a CPU machine may run another Python: check the set installs for 3.12
                        pip += [
                            "--python-version",
                            "3.12",
                            "--only-binary=:all:",
                            "--implementation",
                            "cp",
                            "--platform",
                            "manylinux2014_x86_64",
                            "--platform",  # torchao's wheel; the GPU image has glibc 2.39
                            "manylinux_2_28_x86_64",
                        ]
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
            else:
                for argv in commands(part):
                    code, _ = run_command(argv, timeout=limit - (time.perf_counter() - t0), env=env, log=log)
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

    notes = cap_files(out)
    text = summary_text(parts, out, smoke, time.perf_counter() - started)
    if notes:
        text += "\n" + "\n".join(f"note: {n}" for n in notes) + "\n"
    (out / "summary.md").write_text(text)
    log("\n" + text)
    log.handle.close()
    cap_files(out)
    shutil.rmtree(tmp, ignore_errors=True)
    failed = [p.name for p in parts if p.status in ("FAILED", "TIMEOUT")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
