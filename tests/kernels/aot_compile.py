"""Compile every kernel the project launches ahead of time for a CUDA target, on a machine without a GPU.

    python tests/kernels/aot_compile.py --arch 90 --dtype bfloat16   # prints one JSON line per compile

The launch arguments come from the project's own launchers (logprobs_forward / logprobs_backward, the
split design's backward, which launches softmax_gradient once per vocabulary block, and the
one-pass design's epilogue, sequence_epilogue's row_statistics / logits_gradient_ (each plain and
without_label=True, CE-U's variant, each row marked with its "variant") on one chunk of fp32 logits, the
latter writing the bf16 / fp16 dlogits in place over them, called as
one_pass_sequence_loss calls them where one_pass.epilogue_kernels takes them: bf16 / fp16
operands on CUDA) called at a real shape on meta tensors, with the kernels swapped for a
recorder; the JIT's own binder then specialises them as a real launch would (ints == 1 become
constexpr, multiples of 16 get tt.divisibility), so the kernel compiled is the one that runs. Every
autotune config is compiled; each result reports shared memory (and the kernel's own estimate of
it, and whether its autotune pruner keeps the config for this arch's limit; a kernel with no
pruner, which needs no shared memory, keeps every config and has no estimate), registers, spills
(from ptxas's log) and the instructions that matter (wgmma / mma, atomics and their memory
ordering, fences, block barriers).

Runs in its own process: TRITON_INTERPRET must be unset when the kernels are defined.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys

SHARED_LIMIT = {90: 232_448, 80: 166_912}  # per-block shared memory (opt-in maximum)
SHAPE = dict(n=8192, d=4096, v=128256)
CHUNK_ROWS = 2048  # one_pass's chunk at SHAPE: CHUNK_BYTES (1 GiB) of fp32 logits is 2093 rows, whole sequences of 512


class Recorder:
    """Stands in for an autotuned kernel: kernel[grid](*args, **kwargs) records the call."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))

        return launch


def captured_launches(dtype_name: str):
    """[(name, autotuner, args, kwargs)] from the launchers at SHAPE (meta tensors: no memory).

    A launcher that launches its kernel several times (one per vocabulary block) contributes each
    distinct specialisation once (spec_key)."""
    import torch

    from fastnpo.kernels import logprobs_backward as bwd
    from fastnpo.kernels import logprobs_forward as fwd
    from fastnpo.kernels import softmax_gradient as sg
    from fastnpo.ops import one_pass
    from fastnpo.ops.experimental import split

    dtype = getattr(torch, dtype_name)
    n, d, v = SHAPE["n"], SHAPE["d"], SHAPE["v"]
    hidden = torch.empty(n, d, dtype=dtype, device="meta")
    weight = torch.empty(v, d, dtype=dtype, device="meta")
    row_ids = torch.empty(n, dtype=torch.int64, device="meta")
    labels = torch.empty(n, dtype=torch.int64, device="meta")
    lse = torch.empty(n, dtype=torch.float32, device="meta")
    grad = torch.empty(n, dtype=torch.float32, device="meta")
    launches = [
        (fwd, "logprobs_forward_kernel", lambda: fwd.logprobs_forward(hidden, weight, row_ids, labels)),
        (
            bwd,
            "logprobs_backward_kernel",
            lambda: bwd.logprobs_backward(
                hidden, weight, row_ids, labels, lse, grad, filter_eps=2.0**-12, compute_dh=True, compute_dw=True
            ),
        ),
        (
            sg,
            "softmax_gradient_kernel",
            # what split_backward runs on CUDA (the matmuls run on meta tensors too: shapes only)
            lambda: split.kernel_backward(
                hidden,
                weight,
                row_ids,
                labels,
                lse,
                grad,
                compute_dh=True,
                compute_dw=True,
                kernel=sg.softmax_gradient,
                multiple=sg.COLUMN_MULTIPLE,
            ),
        ),
    ]
    # The one-pass epilogue on one chunk, as one_pass_sequence_loss runs it on CUDA: none for fp32.
    # The dlogits' dtype is the matmuls' operand dtype (Matmuls(hidden).dtype: hidden's on CUDA).
    ep = one_pass.epilogue_kernels(torch.device("cuda"), dtype)
    if ep is not None:
        logits = torch.empty(CHUNK_ROWS, v, dtype=torch.float32, device="meta")
        chunk_labels, chunk_lse, chunk_grad = labels[:CHUNK_ROWS], lse[:CHUNK_ROWS], grad[:CHUNK_ROWS]
        launches += [
            (ep, "row_statistics_kernel", lambda: ep.row_statistics(logits, chunk_labels)),
            # CE-U's variant (WITHOUT_LABEL: the label-excluded lse and mean as well): its own compile
            (ep, "row_statistics_kernel", lambda: ep.row_statistics(logits, chunk_labels, without_label=True)),
            (
                ep,
                "logits_gradient_inplace_kernel",
                lambda: ep.logits_gradient_(logits, chunk_labels, chunk_lse, chunk_grad, dtype),
            ),
            # CE-U's variant (WITHOUT_LABEL: the label-excluded softmax, the label's column grad)
            (
                ep,
                "logits_gradient_inplace_kernel",
                lambda: ep.logits_gradient_(logits, chunk_labels, chunk_lse, chunk_grad, dtype, without_label=True),
            ),
        ]
    out = []
    for module, attr, call in launches:
        kernel = getattr(module, attr)
        recorder = Recorder(kernel)
        setattr(module, attr, recorder)
        try:
            call()
        finally:
            setattr(module, attr, kernel)
        seen = set()
        for args, kwargs in recorder.calls:
            key = spec_key(kernel.fn, args, kwargs)
            if key not in seen:
                seen.add(key)
                out.append((attr, kernel, args, kwargs))
    return out


def spec_key(jit, args, kwargs) -> tuple:
    """What the JIT specialises a launch on (tensor dtypes and 16-byte alignment; ints == 1 or divisible
    by 16 unless do_not_specialize; anything else by value): equal keys compile the same kernel."""
    import torch

    bound = {**dict(zip(jit.arg_names, args, strict=False)), **kwargs}
    key = []
    for param in jit.params:
        value = bound.get(param.name)
        if isinstance(value, torch.Tensor):
            key.append((param.name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, int) and not isinstance(value, bool):
            key.append((param.name, None if param.do_not_specialize else (value == 1, value % 16 == 0)))
        else:
            key.append((param.name, repr(value)))
    return tuple(key)


def compile_one(jit, args, kwargs, arch: int):
    """Compile like JITFunction.run does, for GPUTarget('cuda', arch, 32); returns (compiled, ptxas log)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    source = ASTSource(jit, signature, constexprs, attrs)
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    # ptxas's log goes to the process's stdout / stderr (fd 1 / 2): capture both around the compile.
    with capture_fd(1) as out, capture_fd(2) as err, contextlib.redirect_stderr(log):
        compiled = triton.compile(source, target=target, options=options.__dict__)
    return compiled, out.getvalue() + err.getvalue() + log.getvalue()


@contextlib.contextmanager
def capture_fd(fd: int):
    import tempfile

    buffer = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield buffer
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            buffer.write(tmp.read())


def inspect(compiled, ptxas_log: str) -> dict:
    ptx = compiled.asm.get("ptx", "")
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", ptxas_log)]
    registers = [int(x) for x in re.findall(r"Used (\d+) registers", ptxas_log)]
    atomics = re.findall(r"\b(?:atom|red)\.[\w.]+", ptx)
    return {
        "shared": int(compiled.metadata.shared),
        "registers": max(registers) if registers else None,
        "spill_bytes": max(spills) if spills else None,
        "wgmma": "wgmma.mma_async" in ptx,
        "mma": bool(re.search(r"\bmma\.sync", ptx)),
        "atomics": sorted(set(atomics)),
        "fences": sorted(set(re.findall(r"\b(?:membar|fence)\.[\w.]+", ptx))),
        "barriers": len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kernel", action="append", help="compile only these kernels (repeatable; default all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the kernels must be defined as real JIT functions")
    import torch

    from fastnpo.kernels import logprobs_backward as bwd
    from fastnpo.kernels import logprobs_forward as fwd
    from fastnpo.kernels import sequence_epilogue as ep
    from fastnpo.kernels import softmax_gradient as sg
    from fastnpo.kernels.tiles import select_configs

    estimators = {
        "logprobs_forward_kernel": fwd.forward_shared_bytes,
        "logprobs_backward_kernel": bwd.backward_shared_bytes,
        "softmax_gradient_kernel": sg.softmax_gradient_shared_bytes,
        "row_statistics_kernel": ep.statistics_shared_bytes,
        "logits_gradient_inplace_kernel": None,  # no pruner: elementwise, no shared memory needed
    }
    dtype_bytes = getattr(torch, args.dtype).itemsize
    limit = SHARED_LIMIT.get(args.arch)
    for name, autotuner, call_args, call_kwargs in captured_launches(args.dtype):
        if args.kernel and name not in args.kernel:
            continue
        # what the autotuner's early_config_prune keeps on a device with this arch's limit (all
        # configs where there is no pruner, hence no estimator)
        estimator = estimators[name]
        assert (estimator is None) == (autotuner.early_config_prune is None), name
        kept = (
            select_configs(autotuner.configs, estimator, limit, dtype_bytes)
            if limit and estimator
            else autotuner.configs
        )
        for config in autotuner.configs:
            kwargs = dict(call_kwargs, **config.all_kwargs())
            label = ",".join(f"{k}={v}" for k, v in config.all_kwargs().items() if v is not None)
            row = {"kernel": name, "arch": args.arch, "dtype": args.dtype, "config": label}
            if "WITHOUT_LABEL" in call_kwargs:  # the epilogue kernels: the plain and CE-U variants
                row["variant"] = "without_label" if call_kwargs["WITHOUT_LABEL"] else "default"
            try:
                compiled, log = compile_one(autotuner.fn, call_args, kwargs, args.arch)
                row.update(inspect(compiled, log), ok=True)
            except Exception as error:
                row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:500]}")
            row["shared_limit"] = limit
            row["estimate"] = estimator(config, dtype_bytes) if estimator else None
            row["kept"] = any(config is k for k in kept)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
