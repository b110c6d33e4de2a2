"""The GPU suite's --smoke mode: the same parts and code paths on CPU at tiny shapes (~1 minute),
so that `make gpu-suite` cannot rot between GPU windows."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    for name in (
        "env.txt",
        "log.txt",
        "summary.md",
        "logprobs.csv",
        "logprobs.md",
        "train.csv",
        "train.md",
        "memory_plan.csv",
    ):
        assert name in files, files
    summary = (out / "summary.md").read_text()
    assert "SMOKE" in summary and "fastnpo-triton" in summary and "fastnpo-triton-exact" in summary, summary
    assert "micro-ckpt" in summary, summary  # the memory-plan part's table
    assert "FAILED" not in summary and "TIMEOUT" not in summary, summary
    assert done.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last
