"""Compile the fused backward kernel's every autotune config for each variant the two-call path launches
(exact / filtered, dH and dW / dW only / dH only), for a CUDA target on CPU; one JSON line per compile.

    python tests/kernels/backward_variants.py --arch 90 --dtype bfloat16

aot_compile.py compiles the filtered launch only; FILTER / COMPUTE_DH / COMPUTE_DW change the kernel
(and are in its autotune key), so each variant's registers and spills are its own. Runs in its own
process with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {  # name: (filter_eps, compute_dh, compute_dw)
    "exact": (0.0, True, True),
    "filtered": (2.0**-12, True, True),
    "exact_dw": (0.0, False, True),
    "exact_dh": (0.0, True, False),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the kernels must be defined as real JIT functions")
    import aot_compile as aot
    import torch

    from fastnpo.kernels import logprobs_backward as bwd
    from fastnpo.kernels.tiles import select_configs

    dtype = getattr(torch, args.dtype)
    n, d, v = aot.SHAPE["n"], aot.SHAPE["d"], aot.SHAPE["v"]
    hidden = torch.empty(n, d, dtype=dtype, device="meta")
    weight = torch.empty(v, d, dtype=dtype, device="meta")
    row_ids = torch.empty(n, dtype=torch.int64, device="meta")
    labels = torch.empty(n, dtype=torch.int64, device="meta")
    lse = torch.empty(n, dtype=torch.float32, device="meta")
    grad = torch.empty(n, dtype=torch.float32, device="meta")
    kernel = bwd.logprobs_backward_kernel
    limit = aot.SHARED_LIMIT.get(args.arch)
    kept = select_configs(kernel.configs, bwd.backward_shared_bytes, limit, dtype.itemsize) if limit else kernel.configs
    for name in args.variant or list(VARIANTS):
        filter_eps, compute_dh, compute_dw = VARIANTS[name]
        recorder = aot.Recorder(kernel)
        bwd.logprobs_backward_kernel = recorder
        try:
            bwd.logprobs_backward(
                hidden,
                weight,
                row_ids,
                labels,
                lse,
                grad,
                filter_eps=filter_eps,
                compute_dh=compute_dh,
                compute_dw=compute_dw,
            )
        finally:
            bwd.logprobs_backward_kernel = kernel
        ((call_args, call_kwargs),) = recorder.calls
        for config in kernel.configs:
            label = ",".join(f"{k}={x}" for k, x in config.all_kwargs().items() if x is not None)
            row = {"variant": name, "arch": args.arch, "dtype": args.dtype, "config": label}
            try:
                kwargs = dict(call_kwargs, **config.all_kwargs())
                compiled, log = aot.compile_one(kernel.fn, call_args, kwargs, args.arch)
                row.update(aot.inspect(compiled, log), ok=True)
            except Exception as error:  # reported, and failed by the test
                row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:500]}")
            row["shared_limit"] = limit
            row["kept"] = any(config is k for k in kept)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
