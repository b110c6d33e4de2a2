"""Lean optimizer modes (optim.name): "adamw" is torch.optim.AdamW; "adamw_kahan" is KahanAdamW.

Why bf16 parameters without an fp32 master copy need a guard
------------------------------------------------------------
bfloat16 keeps 8 significant bits (7 stored + the implicit one): two neighbouring bf16 numbers
near a weight w are w * 2^-7 apart, so adding anything smaller than half that gap,
|delta| < |w| * 2^-8 ~ 0.0039 |w|, rounds back to w exactly. An Adam step moves every
weight by about lr (the update m / sqrt(v) is of order 1), i.e. by lr / |w| relative to it.
With lr = 1e-5 and typical weights |w| ~ 1e-2 that is ~1e-3 relative -- below 2^-8, so
`p.add_(update)` on a bf16 tensor leaves p unchanged: the step is computed and silently
thrown away, every step, and the model does not train (tests/train/test_optimizers.py shows
it). An fp32 master copy fixes this at 4 extra bytes per parameter.

KahanAdamW fixes it at 2 bytes per parameter with compensated (Kahan) summation (W. Kahan,
"Further remarks on reducing truncation errors", CACM 8(1), 1965; applied to bf16 training in
Zamirai et al., "Revisiting BFloat16 Training", 2020): a bf16 buffer `comp` per parameter
holds what the rounding of the last update lost, and is added to the next one:

    total = comp + update          # in fp32
    p_new = bf16(p + total)        # the parameter as stored
    comp  = bf16(total - (p_new - p))   # what the rounding dropped (p_new - p is exact in fp32)

so small updates accumulate in comp until they cross a bf16 gap and land in p; the stored
parameter differs from the fp32-master trajectory by about one bf16 rounding, not by the sum
of every lost step. The moments m and v are kept in `state_dtype` (float32, or bfloat16 to
halve their bytes); all arithmetic is done in fp32, one parameter at a time (the fp32
temporaries are one parameter's size).

FSDP2: a parameter (and its state, made with zeros_like) may be a DTensor; the step works on
each one's local shard (`to_local()`), which is elementwise-correct for any sharding. Tested
single-process only (plain tensors and a one-rank trainer run); multi-rank is untested.
"""

import torch
from torch.distributed.tensor import DTensor

__all__ = ["OPTIMIZERS", "STATE_DTYPES", "KahanAdamW"]

OPTIMIZERS = ("adamw", "adamw_kahan")
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected, the same formula as torch.optim.AdamW)
    with a Kahan-compensated parameter update; state: step, exp_avg, exp_avg_sq (state_dtype)
    and comp (the parameter's dtype). state_dtype: "float32" or "bfloat16"."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, state_dtype="float32"):
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {list(STATE_DTYPES)}, got {state_dtype!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_dtype=state_dtype)
        super().__init__(params, defaults)

    def _state_for(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            dtype = STATE_DTYPES[group["state_dtype"]]
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_for(p, group)
                state["step"] += 1
                t = state["step"].item()
                param, grad = _local(p), _local(p.grad).float()
                m_store, v_store, c_store = (_local(state[k]) for k in ("exp_avg", "exp_avg_sq", "comp"))
                # Fresh fp32 tensors (.float() of an fp32 tensor would alias the state).
                m = m_store.float().lerp(grad, 1 - beta1)
                v = v_store.float().mul(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_store.copy_(m)
                v_store.copy_(v)
                denom = v.sqrt_().div_((1 - beta2**t) ** 0.5).add_(eps)
                old = param.to(torch.float32, copy=True)
                # The AdamW update, plus what earlier roundings lost.
                total = m.div_(denom).mul_(-lr / (1 - beta1**t)).sub_(old, alpha=lr * wd).add_(c_store.float())
                param.copy_(old + total)
                c_store.copy_(total.sub_(param.float() - old))
        return loss

    def load_state_dict(self, state_dict):
        """torch's loader casts floating state to the parameter's dtype (bf16 here); put the
        saved moments back in state_dtype, at their saved precision."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for key, p in zip(saved_group["params"], group["params"], strict=True):
                if key not in saved:
                    continue
                for name in ("exp_avg", "exp_avg_sq"):
                    if name in saved[key]:
                        self.state[p][name] = saved[key][name].to(
                            device=p.device, dtype=STATE_DTYPES[group["state_dtype"]]
                        )
