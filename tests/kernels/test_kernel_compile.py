"""Ahead-of-time compile checks of every kernel the project launches, for sm_90 (and sm_80), on CPU.

The triton wheel ships ptxas, so a CPU machine can compile for a CUDA target: the kernels are
compiled at a real shape (N=8192, D=4096, V=128256) with the launch arguments the project's own
launchers pass (tests/kernels/aot_compile.py), for every autotune config: the fused forward and
backward, the softmax-gradient kernel of the split design's backward, and the one-pass design's
epilogue kernels (kernels/sequence_epilogue.py's row_statistics and in-place logits_gradient_, each
plain and CE-U's without_label=True, on a 2048-row chunk of fp32 logits; bf16 / fp16 operands only,
as one_pass runs them); the fused-epilogue
design's three GEMM kernels (kernels/epilogue_forward.py, kernels/epilogue_backward.py: sm_90 bf16, at the
end of this file, in their own subprocess, ~30-50 s). Default run:
sm_90 bf16 (one subprocess, ~35 s on 2 cores); every arch and dtype under the `slow` marker (fp32
compiles take 20-80 s each).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Kernels with a tl.dot: each config must use the tensor cores (wgmma on sm_90, mma on sm_80) in bf16 / fp16.
DOT_KERNELS = ("logprobs_forward_kernel", "logprobs_backward_kernel", "softmax_gradient_kernel")
# The one-pass epilogue: elementwise and row reductions over fp32 logits, no dot; launched only with
# bf16 / fp16 operands (fp32 keeps one_pass's torch ops), so not compiled for fp32.
EPILOGUE_KERNELS = ("row_statistics_kernel", "logits_gradient_inplace_kernel")
KERNELS = DOT_KERNELS + EPILOGUE_KERNELS


def expected_kernels(dtype: str) -> tuple[str, ...]:
    return DOT_KERNELS if dtype == "float32" else KERNELS


@functools.cache
def compile_results(arch: int, dtype: str) -> tuple[dict, ...]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache: a cached kernel skips ptxas, whose log is where registers and spills come from.
    with tempfile.TemporaryDirectory(prefix="fastnpo-aot-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        done = subprocess.run(
            [sys.executable, str(HERE / "aot_compile.py"), "--arch", str(arch), "--dtype", dtype],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = tuple(json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
    assert rows, "nothing compiled:\n" + done.stdout[-2000:] + done.stderr[-2000:]
    return rows


def check_compiles(arch: int, dtype: str) -> None:
    rows = compile_results(arch, dtype)
    failed = [f"{r['kernel']} [{r['config']}]: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    no_log = [f"{r['kernel']} [{r['config']}]" for r in rows if r["registers"] is None]
    assert not no_log, "no ptxas register / spill report (a cached compile?): " + ", ".join(no_log)
    assert {r["kernel"] for r in rows} == set(expected_kernels(dtype))
    for kernel in expected_kernels(dtype):
        mine = [r for r in rows if r["kernel"] == kernel]
        # at least one config the pruner keeps that fits the target's shared memory (and, in bf16, does not spill)
        usable = [
            r
            for r in mine
            if r["kept"] and r["shared"] <= r["shared_limit"] and (dtype != "bfloat16" or not r["spill_bytes"])
        ]
        assert usable, f"{kernel}: no config fits sm_{arch}'s shared memory (spill-free in bf16): {mine}"
        if dtype in ("bfloat16", "float16") and kernel in DOT_KERNELS:
            tensor_cores = "wgmma" if arch >= 90 else "mma"
            assert all(r[tensor_cores] for r in mine), f"{kernel}: a config without {tensor_cores}: {mine}"
        if kernel in EPILOGUE_KERNELS:
            assert all(not r["atomics"] for r in mine), f"{kernel}: atomics in an atomic-free kernel: {mine}"
    check_shared_memory(rows)
    for r in rows:
        # relaxed atomics: acq_rel ones become MEMBAR + cache invalidation per vector atomic on sm_90
        assert all(".relaxed." in a or ".relaxed" in a for a in r["atomics"]), r
        assert not any(f.startswith(("membar", "fence.acq_rel", "fence.sc")) for f in r["fences"]), r


@pytest.mark.torchrun
def test_sm90_bf16_kernels_compile_use_wgmma_and_relaxed_atomics():
    check_compiles(90, "bfloat16")


def check_shared_memory(rows) -> None:
    """The kernels' shared-memory estimates bound what ptxas allocates, so their autotune pruners keep
    only configs that fit the target: no config left for the autotuner to fail silently."""
    # a kernel with no pruner has no estimate (aot_compile keeps its every config: "over" checks them)
    under = [r for r in rows if r["estimate"] is not None and r["estimate"] < r["shared"]]
    assert not under, f"estimate below the compiled shared memory: {under}"
    over = [r for r in rows if r["kept"] and r["shared"] > r["shared_limit"]]
    assert not over, f"a config the pruner keeps does not fit: {over}"


@pytest.mark.torchrun  # reads compile_results: the compile subprocess
def test_sm90_bf16_every_kept_autotune_config_fits_shared_memory():
    rows = compile_results(90, "bfloat16")
    check_shared_memory(rows)
    # the config the compile showed over sm_90's limit (253,952 B > 232,448 B) is pruned, the rest kept
    dropped = [(r["kernel"], r["config"]) for r in rows if not r["kept"]]
    assert dropped == [
        ("logprobs_backward_kernel", "BLOCK_N=64,BLOCK_V=256,BLOCK_D=64,num_warps=8,num_ctas=1,num_stages=3")
    ]


@pytest.mark.torchrun  # reads compile_results: the compile subprocess
def test_sm90_bf16_softmax_gradient_kernel_every_config_fits_and_one_is_spill_free():
    # The split backward's kernel: every config within sm_90's shared memory (none left to the pruner),
    # wgmma in each, no atomics, and at least one config that ptxas fits without spilling.
    from fastnpo.kernels.softmax_gradient import SOFTMAX_GRADIENT_CANDIDATES

    rows = [r for r in compile_results(90, "bfloat16") if r["kernel"] == "softmax_gradient_kernel"]
    # launched once per vocabulary block, all blocks with one specialisation: one compile per config
    assert len(rows) == len(SOFTMAX_GRADIENT_CANDIDATES), rows
    assert all(r["ok"] and r["shared"] <= r["shared_limit"] and r["kept"] for r in rows), rows
    assert all(r["wgmma"] and not r["atomics"] for r in rows), rows
    assert any(r["spill_bytes"] == 0 for r in rows), rows


@pytest.mark.torchrun  # reads compile_results: the compile subprocess
def test_sm90_bf16_epilogue_kernels_every_config_fits_without_spills_or_atomics():
    # The one-pass epilogue: one compile per config (one launch each at the chunk's shape), every
    # config kept and within sm_90's shared memory, none spilling, no atomics (a row's reduction
    # stays in one program), no tensor-core instructions (there is no dot).
    from fastnpo.kernels.sequence_epilogue import INPLACE_CANDIDATES, STATISTICS_CANDIDATES

    rows = compile_results(90, "bfloat16")
    # each kernel twice: the plain one and CE-U's without_label variant (WITHOUT_LABEL)
    for kernel, candidates in zip(EPILOGUE_KERNELS, (STATISTICS_CANDIDATES, INPLACE_CANDIDATES), strict=True):
        mine = [r for r in rows if r["kernel"] == kernel]
        assert sorted(r["variant"] for r in mine) == sorted(["default", "without_label"] * len(candidates)), mine
        assert all(r["ok"] and r["kept"] and r["shared"] <= r["shared_limit"] for r in mine), mine
        assert all(r["spill_bytes"] == 0 and not r["atomics"] for r in mine), mine
        assert not any(r["wgmma"] or r["mma"] for r in mine), mine
    # The in-place kernel: elementwise, so no shared memory, and the block barrier that orders each
    # block's loads before its stores over them (without it a warp could overwrite fp32 logits a
    # lagging warp has yet to read) survives compilation in every config.
    inplace = [r for r in rows if r["kernel"] == "logits_gradient_inplace_kernel"]
    assert all(r["shared"] == 0 and r["barriers"] >= 1 for r in inplace), inplace


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_every_arch_and_dtype_compiles(arch, dtype):
    if (arch, dtype) == (90, "bfloat16"):
        pytest.skip("the default test")
    check_compiles(arch, dtype)


@pytest.mark.torchrun
def test_broken_kernel_is_caught(tmp_path):
    """The checker sees a compile failure: a tl.dot with K=8 (below the 16 it needs) must not pass."""
    script = tmp_path / "broken.py"
    script.write_text(
        "import sys, json\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import triton, triton.language as tl, torch\n"
        "import aot_compile\n"
        "@triton.jit\n"
        "def broken(A, B, C, BLOCK: tl.constexpr):\n"
        "    r = tl.arange(0, 16)\n"
        "    k = tl.arange(0, 8)\n"
        "    a = tl.load(A + r[:, None] * 8 + k[None, :])\n"
        "    b = tl.load(B + k[:, None] * 16 + r[None, :])\n"
        "    tl.store(C + r[:, None] * 16 + r[None, :], tl.dot(a, b))\n"
        "x = torch.empty(16, 8, dtype=torch.bfloat16, device='meta')\n"
        "y = torch.empty(8, 16, dtype=torch.bfloat16, device='meta')\n"
        "z = torch.empty(16, 16, dtype=torch.float32, device='meta')\n"
        "try:\n"
        "    aot_compile.compile_one(broken, (x, y, z), {'BLOCK': 16}, 90)\n"
        "    print('COMPILED')\n"
        "except Exception as error:\n"
        "    print('FAILED', type(error).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert "FAILED" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


# ------------------------------------------------------------------ the fused-epilogue design's kernels
# kernels/epilogue_forward.py and kernels/epilogue_backward.py (design="epilogue"), launched by their own
# launchers at N=8192, D=4096, V=128256 on meta tensors: a 512-row chunk (experimental.epilogue.CHUNK_BYTES of
# bf16 E at this V holds one 512-token sequence) with E stored (the design) and without (the
# forward-only form), dH, and dW both written (first chunk) and accumulated (later chunks). Each
# (kernel, specialisation) is compiled for every autotune config, with aot_compile's binder,
# compile_one and inspect. One JSON line per compile, printed by a subprocess (TRITON_INTERPRET unset).
EPILOGUE_DESIGN_SCRIPT = """
import json, sys
sys.path.insert(0, {here!r})
import aot_compile as aot
import torch
from fastnpo.kernels import epilogue_backward as eb
from fastnpo.kernels import epilogue_forward as ef
from fastnpo.kernels.tiles import select_configs

arch, dtype = {arch}, getattr(torch, {dtype!r})
n, d, v = 512, aot.SHAPE["d"], aot.SHAPE["v"]
meta = dict(device="meta")
hidden = torch.empty(aot.SHAPE["n"], d, dtype=dtype, **meta)
weight = torch.empty(v, d, dtype=dtype, **meta)
row_ids = torch.empty(n, dtype=torch.int64, **meta)
labels = torch.empty(n, dtype=torch.int64, **meta)
e = torch.empty(n, v, dtype=dtype, **meta)
scale = torch.empty(n, ef.num_tiles(v), dtype=torch.float32, **meta)
label_grad = torch.empty(n, dtype=torch.float32, **meta)
dh = torch.empty_like(hidden)
rows = torch.empty(n, d, dtype=dtype, **meta)  # hidden[row_ids], gathered by the caller
dw = torch.empty_like(weight)
launches = [
    (ef, "epilogue_forward_kernel", "store_e", ef.epilogue_forward_shared_bytes,
     lambda: ef.epilogue_forward(hidden, weight, row_ids, labels, store_e=True)),
    (ef, "epilogue_forward_kernel", "stats_only", ef.epilogue_forward_shared_bytes,
     lambda: ef.epilogue_forward(hidden, weight, row_ids, labels, store_e=False)),
    (eb, "epilogue_dh_kernel", "dh", eb.dh_shared_bytes,
     lambda: eb.epilogue_dh(e, scale, labels, label_grad, weight, row_ids, dh)),
    (eb, "epilogue_dw_kernel", "dw_write", eb.dw_shared_bytes,
     lambda: eb.epilogue_dw(e, scale, labels, label_grad, rows, dw, accumulate=False)),
    (eb, "epilogue_dw_kernel", "dw_accumulate", eb.dw_shared_bytes,
     lambda: eb.epilogue_dw(e, scale, labels, label_grad, rows, dw, accumulate=True)),
]
limit = aot.SHARED_LIMIT.get(arch)
for module, attr, variant, estimator, call in launches:
    kernel = getattr(module, attr)
    recorder = aot.Recorder(kernel)
    setattr(module, attr, recorder)
    try:
        call()
    finally:
        setattr(module, attr, kernel)
    assert len(recorder.calls) == 1, (attr, variant, len(recorder.calls))
    (args, kwargs), = recorder.calls
    kept = select_configs(kernel.configs, estimator, limit, dtype.itemsize)
    for config in kernel.configs:
        label = ",".join(f"{{k}}={{x}}" for k, x in config.all_kwargs().items() if x is not None)
        row = dict(kernel=attr, variant=variant, arch=arch, dtype={dtype!r}, config=label)
        try:
            compiled, log = aot.compile_one(kernel.fn, args, dict(kwargs, **config.all_kwargs()), arch)
            row.update(aot.inspect(compiled, log), ok=True)
        except Exception as error:
            row.update(ok=False, error=f"{{type(error).__name__}}: {{str(error)[:500]}}")
        row.update(shared_limit=limit, estimate=estimator(config, dtype.itemsize), kept=any(config is k for k in kept))
        print(json.dumps(row), flush=True)
"""
EPILOGUE_DESIGN_VARIANTS = ("store_e", "stats_only", "dh", "dw_write", "dw_accumulate")


@functools.cache
def epilogue_design_results(arch: int, dtype: str) -> tuple[dict, ...]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = EPILOGUE_DESIGN_SCRIPT.format(here=str(HERE), arch=arch, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="fastnpo-aot-") as cache:
        env["TRITON_CACHE_DIR"] = cache  # fresh: a cached kernel skips ptxas and its spill report
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = tuple(json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
    assert rows, "nothing compiled:\n" + done.stdout[-2000:] + done.stderr[-2000:]
    return rows


@pytest.mark.torchrun
def test_sm90_bf16_epilogue_design_kernels_compile_use_wgmma_without_spills_or_atomics():
    # Every config compiles with wgmma, no atomics (each output element has one writer), within
    # sm_90's shared memory and the kernel's own estimate, is kept by its pruner and fits in
    # registers without spilling (the configs that spilled were dropped from the candidate lists).
    # Registers per config: benchmarks/README.md ("Fused-epilogue design: budget and prediction").
    rows = epilogue_design_results(90, "bfloat16")
    failed = [f"{r['kernel']}/{r['variant']} [{r['config']}]: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert {r["variant"] for r in rows} == set(EPILOGUE_DESIGN_VARIANTS)
    assert all(r["registers"] is not None for r in rows), "no ptxas report (a cached compile?)"
    assert all(r["wgmma"] and not r["atomics"] for r in rows), rows
    check_shared_memory(rows)
    assert all(r["kept"] and r["shared"] <= r["shared_limit"] for r in rows), rows
    spilling = [(r["kernel"], r["variant"], r["config"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilling, spilling
    from fastnpo.kernels.epilogue_backward import DH_CANDIDATES, DW_CANDIDATES
    from fastnpo.kernels.epilogue_forward import EPILOGUE_FORWARD_CANDIDATES

    counts = {
        v: len(c)
        for v, c in zip(
            EPILOGUE_DESIGN_VARIANTS,
            (EPILOGUE_FORWARD_CANDIDATES, EPILOGUE_FORWARD_CANDIDATES, DH_CANDIDATES, DW_CANDIDATES, DW_CANDIDATES),
            strict=True,
        )
    }
    assert {v: sum(r["variant"] == v for r in rows) for v in counts} == counts, rows
