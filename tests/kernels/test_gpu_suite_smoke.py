"""The GPU suite's --smoke mode: the same parts and code paths on CPU at tiny shapes (~1 minute),
so that `make gpu-suite` cannot rot between GPU windows."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gpu_suite():
    """benchmarks/gpu_suite.py as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite as module
    finally:
        sys.path.pop(0)
    return module


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
    assert files == sorted(gpu_suite().OUT_FILES), files
    summary = (out / "summary.md").read_text()
    assert "SMOKE" in summary and "fastnpo-triton" in summary and "fastnpo-triton-exact" in summary, summary
    assert "micro-ckpt" in summary, summary  # the memory-plan part's table
    assert "FAILED" not in summary and "TIMEOUT" not in summary, summary
    assert done.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last


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
