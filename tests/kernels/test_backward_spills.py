"""The fused backward's exact variants compile without register spills on sm_90 in bf16.

Measured with tests/kernels/backward_variants.py (triton 3.9, N=8192, D=4096, V=128256): every
config of the exact launch (FILTER=False) fits in registers (84-255, 0 spill bytes), dW-only too;
the filtered launch spills in 64x128x64 (336 B) and 128x128x64 (424 B), whose tile-skip test keeps
the probabilities live across the branch. FILTER is in the autotune key, so the exact run is timed
on its own configs, never the filtered run's. Slow: ~10 bf16 compiles (~5 s each on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def compile_variants(*variants: str, arch: int = 90, dtype: str = "bfloat16") -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="fastnpo-aot-") as cache:
        env["TRITON_CACHE_DIR"] = cache  # fresh: a cached kernel skips ptxas and its spill report
        command = [sys.executable, str(HERE / "backward_variants.py"), "--arch", str(arch), "--dtype", dtype]
        for variant in variants:
            command += ["--variant", variant]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_sm90_bf16_exact_backward_configs_do_not_spill():
    rows = compile_variants("exact", "exact_dw")
    assert rows and all(r["ok"] for r in rows), rows
    assert all(r["registers"] is not None for r in rows), "no ptxas report (a cached compile?)"
    kept = [r for r in rows if r["kept"]]
    assert kept and all(r["shared"] <= r["shared_limit"] for r in kept), kept
    spilling = [(r["variant"], r["config"], r["spill_bytes"]) for r in kept if r["spill_bytes"]]
    assert not spilling, spilling
