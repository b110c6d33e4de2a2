"""The GPU suite's --smoke mode: both device calls' parts and code paths on CPU at tiny shapes, so
that `make gpu-suite PART=1` / `PART=2` cannot rot between GPU windows; and the suite's planning
(files per call, deadlines, part limits, the autotune and pytest readers) without running anything."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What a device run brings back: <= 8 files, < 16 MiB each, names of letters, digits, '.', '_', '-'.
DEVICE_FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def gpu_suite():
    """benchmarks/gpu_suite.py as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite as module
    finally:
        sys.path.pop(0)
    return module


@pytest.mark.torchrun
def test_gpu_suite_smoke_both_calls(tmp_path):
    # The two calls run side by side (two processes, as two device calls would run one after the
    # other): ~20 s and ~40 s of CPU on an idle 2-core machine.
    suite = gpu_suite()
    started = time.perf_counter()
    procs = {
        call: subprocess.Popen(
            [
                *(sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--call", str(call)),
                *("--out", str(tmp_path / f"call{call}"), "--wheels", str(tmp_path / "no-wheels")),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        )
        for call in (1, 2)
    }
    outputs = {}
    for call, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=max(60, 420 - (time.perf_counter() - started)))
        outputs[call] = (proc.returncode, stdout, stderr)
    summaries = {}
    for call, (code, stdout, stderr) in outputs.items():
        out = tmp_path / f"call{call}"
        assert code == 0, f"call {call}: " + stdout[-4000:] + stderr[-2000:]
        files = sorted(p.name for p in out.iterdir())
        assert len(files) <= 8 and files == sorted(suite.CALLS[call]["files"]), files
        assert all(DEVICE_FILE_NAME.match(f) and (out / f).stat().st_size < 16 * 2**20 for f in files)
        summary = (out / "summary.md").read_text()
        assert "SMOKE" in summary and f"call {call}" in summary, summary
        assert "FAILED" not in summary and "TIMEOUT" not in summary, summary
        for part in suite.call_parts(call):  # every part ran (wheels: none in this checkout's tmp)
            expected = "skipped" if part.name == "wheels" else "ok"
            assert f"| {part.name} | {expected} |" in summary, (part.name, summary)
        assert stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last
        summaries[call] = summary
    one = summaries[1]
    for design in ("fastnpo-triton", "fastnpo-triton-exact", "fastnpo-split", "fastnpo-epilogue-fwd"):
        assert f"| fwd | {design} |" in one, design
    for design in ("npo-naive", "npo-one-pass", "npo-epilogue"):
        assert f"| fwd+bwd | {design} |" in one, design
    for gemm in ("square", "logits", "dH", "dW"):
        assert f"| {gemm} |" in one, gemm
    assert "| one_pass |" in one and "| epilogue |" in one  # the profile's rows
    assert "one_pass chunk sweep" in one and "epilogue chunk sweep" in one
    assert "autotuners in the logprobs process" in one
    tuned = json.loads((tmp_path / "call1" / "autotune.json").read_text())
    assert {"epilogue_forward_kernel", "logprobs_forward_kernel"} <= {k["kernel"] for k in tuned["logprobs_process"]}
    header = (tmp_path / "call1" / "logprobs.csv").read_text().splitlines()
    assert "x_floor_best" in next(line for line in header if not line.startswith("#"))
    two = summaries[2]
    assert re.search(r"gpu-tests: \d+ skipped", two), two  # each GPU-marked test collected, skipped on CPU
    assert "micro-in-backward" in two and "- fastnpo:" in two, two


def test_calls_fit_the_device_window():
    # 15 device-minutes in all, a machine start (a minute or more) included; one command <= 10 min.
    suite = gpu_suite()
    assert suite.CALLS[1]["total_s"] < 480 and suite.CALLS[2]["total_s"] < 480
    assert suite.CALLS[1]["total_s"] + suite.CALLS[2]["total_s"] <= 900 - 90
    for call, spec in suite.CALLS.items():
        assert len(spec["files"]) <= 8 and all(DEVICE_FILE_NAME.match(f) for f in spec["files"]), call
        parts = suite.call_parts(call)
        assert [p.name for p in parts[:3]] == ["env", "wheels", "import"]
        # each part's reserve fits under the deadline together with the set-up parts' usual ~20 s
        assert sum(p.reserve_s for p in parts) + 20 < spec["total_s"]


def test_part_limit_keeps_the_later_parts_reserve():
    suite = gpu_suite()
    parts = suite.call_parts(1)
    names = [p.name for p in parts]
    logprobs = names.index("logprobs")
    # plenty of time: the part's own budget
    assert suite.part_limit(parts, logprobs, 1000, smoke=False) == parts[logprobs].budget_s
    # late: what the deadline leaves after one-pass's and autotune's reserves
    later = sum(p.reserve_s for p in parts[logprobs + 1 :])
    assert suite.part_limit(parts, logprobs, 200, smoke=False) == 200 - later
    # a skipped later part keeps no reserve
    skipped = suite.part_limit(parts, logprobs, 200, smoke=False, skip={"one-pass"})
    assert skipped == 200 - later + parts[names.index("one-pass")].reserve_s
    assert suite.part_limit(parts, logprobs, 1000, smoke=True) == parts[logprobs].smoke_budget_s


def test_autotune_report_reads_triton_cache(tmp_path):
    suite = gpu_suite()
    folder = tmp_path / "cache" / "0123abcd"
    folder.mkdir(parents=True)
    config = {"kwargs": {"BLOCK_N": 128}, "num_warps": 8, "num_stages": 3, "pre_hook": None}
    slower = dict(config, kwargs={"BLOCK_N": 64})
    data = {"key": [128256, 4096, 2048], "configs_timings": [[slower, [2.0, 1.9, 2.1]], [config, [1.5, 1.4, 1.6]]]}
    (folder / "one_pass_kernel.autotune.json").write_text(json.dumps(data))
    (tmp_path / "process.json").write_text(json.dumps([{"kernel": "k", "best_config": "BLOCK_N: 16"}]))
    report = suite.autotune_report(tmp_path / "cache", 0.0, tmp_path / "process.json")
    (entry,) = report["autotune_files"]
    assert entry["kernel"] == "one_pass_kernel" and entry["key"] == [128256, 4096, 2048]
    assert entry["best"]["kwargs"] == {"BLOCK_N": 128} and entry["best"]["ms"] == [1.5, 1.4, 1.6]
    assert "pre_hook" not in entry["best"] and entry["written_this_run"]
    assert report["logprobs_process"] == [{"kernel": "k", "best_config": "BLOCK_N: 16"}]
    empty = suite.autotune_report(tmp_path / "nothing", 0.0, tmp_path / "missing.json")
    assert empty["autotune_files"] == [] and empty["logprobs_process"] is None


def test_gpu_test_files_and_outcomes():
    suite = gpu_suite()
    files = suite.gpu_test_files()
    assert files[0] == "tests/ops/test_fused_epilogue.py" and files[-1] == "tests/ops/test_kernels.py", files
    assert "tests/train/test_train.py" in files  # offload on CUDA
    lines = [
        "tests/ops/test_one_pass.py::test_one_pass_on_cuda[dtype0-0.0005] PASSED [ 10%]",
        "tests/ops/test_kernels.py::test_64_bit_offsets FAILED [ 90%]",
        "tests/ops/test_kernels.py::test_compiled_kernels_match_reference[1-64-1031] SKIPPED (needs a CUDA GPU) [ 95%]",
        "collected 30 items",
    ]
    outcomes = suite.pytest_outcomes(lines)
    assert outcomes["PASSED"] == ["tests/ops/test_one_pass.py::test_one_pass_on_cuda[dtype0-0.0005]"]
    assert outcomes["FAILED"] == ["tests/ops/test_kernels.py::test_64_bit_offsets"] and len(outcomes["SKIPPED"]) == 1


@pytest.mark.torchrun
def test_import_hook_stays_in_its_folder_and_chains(tmp_path):
    # The GPU machine has no `pip install -e`: the suite's import hook must work from a folder on
    # PYTHONPATH alone (never written into the machine's site-packages) and still run a
    # sitecustomize the machine already has.
    hook = tmp_path / "hook"
    gpu_suite().write_finder(hook)
    assert sorted(p.name for p in hook.iterdir()) == ["sitecustomize.py"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['SHADOWED_SITECUSTOMIZE_RAN'] = '1'\n")
    code = (
        "import os, sys, fastnpo; "
        "print(any(type(f).__name__ == '_SourceTreeFinder' for f in sys.meta_path), "
        "os.environ.get('SHADOWED_SITECUSTOMIZE_RAN'), fastnpo.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{hook}:{other}"},
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    finder, shadowed, where = done.stdout.split()
    assert finder == "True" and shadowed == "1", done.stdout
    assert where == str(ROOT / "fastnpo" / "__init__.py")


def test_bad_budget_names_the_argument(tmp_path, capsys):
    suite = gpu_suite()
    for bad in ("nonsense=30", "train=soon", "train"):
        try:
            suite.main(["--smoke", "--out", str(tmp_path / "out"), "--budget", bad])
        except SystemExit as stop:
            assert stop.code == 2
        else:
            raise AssertionError(f"--budget {bad} was accepted")
        assert f"--budget '{bad}'" in capsys.readouterr().err


def test_reference_gemms_are_the_designs_products():
    # bench_logprobs' floors time these three GEMMs (and gemm.csv reports them): they must be the
    # products the designs run, at the shapes the designs run them.
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_logprobs
    finally:
        sys.path.pop(0)
    n, d, v = 24, 16, 40
    operands = []
    calls = bench_logprobs.gemm_calls(n, d, v, torch.float32, torch.device("cpu"), operands=operands)
    hidden, weight, dlogits = operands
    assert set(calls) == {"logits", "dH", "dW"}  # logits-fp32out: CUDA only
    shapes = {name: shape for name, (_, _, shape, _) in calls.items()}
    assert shapes == {"logits": (n, v, d), "dH": (n, d, v), "dW": (v, d, n)}  # (M, N, K)
    assert all(flops == 2 * n * d * v for _, flops, _, _ in calls.values())
    torch.testing.assert_close(calls["dH"][0](), dlogits @ weight)
    torch.testing.assert_close(calls["dW"][0](), dlogits.T @ hidden)
    torch.testing.assert_close(calls["logits"][0](), hidden @ weight.T)
