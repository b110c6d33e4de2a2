"""fp32-result library matmuls (cuBLAS on CUDA) for the designs built on them (one_pass.py and the
experimental split design), and the one rule for where Triton kernels run.

Low-precision operands with an fp32 result need torch.mm(..., out_dtype=torch.float32) (CUDA);
where the running torch lacks it (and on CPU) the matmuls take fp32 copies of their operands:
the same function, slower. `matmul_mode` says which one a device gets.
"""

import os
from functools import cache

import torch


@cache
def matmul_mode(device_type: str, dtype: torch.dtype) -> str:
    """How fp32 results come from this device's matmuls, probed once on small tensors:
    "out_dtype_inplace": low-precision operands, fp32 output, accumulated in place (out=);
    "out_dtype": the same, but the accumulation makes a new tensor (one copy per block);
    "upcast": fp32 operands (CPU, fp32 inputs, or a torch without out_dtype)."""
    if dtype not in (torch.bfloat16, torch.float16) or device_type != "cuda":
        return "upcast"
    a = torch.randn(8, 16, device=device_type).to(dtype)
    b = torch.randn(16, 8, device=device_type).to(dtype)
    want = a.float() @ b.float() + 1
    for mode in ("out_dtype_inplace", "out_dtype"):
        acc = torch.ones(8, 8, device=device_type)
        try:
            if mode == "out_dtype_inplace":
                out = torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                out = torch.addmm(acc, a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            continue
        if out.dtype == torch.float32 and torch.allclose(out, want, atol=1e-3, rtol=1e-3):
            return mode
    return "upcast"


class Matmuls:
    """fp32-result matmuls for one call, in the mode the device supports."""

    def __init__(self, like: torch.Tensor):
        self.mode = matmul_mode(like.device.type, like.dtype)
        self.dtype = like.dtype if self.mode != "upcast" else torch.float32

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b in fp32."""
        return torch.mm(a, b) if self.mode == "upcast" else torch.mm(a, b, out_dtype=torch.float32)

    def addmm(self, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """bias + a @ b in fp32, a new tensor (bias broadcasts)."""
        if self.mode == "upcast":
            return torch.addmm(bias, a, b)
        return torch.addmm(bias, a, b, out_dtype=torch.float32)

    def accumulate(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """acc += a @ b, acc fp32."""
        if self.mode == "upcast":
            acc.addmm_(a, b)
        elif self.mode == "out_dtype_inplace":
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            acc.copy_(torch.addmm(acc, a, b, out_dtype=torch.float32))

    def mm_into(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """out = a @ b, written once in out's dtype (fp32 accumulation inside the matmul)."""
        if out.dtype == self.dtype and out.is_contiguous():
            torch.mm(a, b, out=out)
        else:
            out.copy_(self.mm(a, b))


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels run on `device`'s tensors: CUDA, or any device under the interpreter
    (TRITON_INTERPRET=1, read at call time). The one rule for impl="triton", the split design's kernels
    (experimental/split.py), the one-pass epilogue (one_pass.py) and the epilogue design."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"
