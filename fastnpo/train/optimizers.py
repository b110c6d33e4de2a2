"""Lean optimizer modes (optim.name): "adamw" is torch.optim.AdamW; "adamw_kahan" is KahanAdamW;
"adamw_8bit" is torchao's AdamW8bit (adamw_8bit below).

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
halve their bytes); all arithmetic is done in fp32, one parameter at a time and within it one
flat piece of at most CHUNK_ELEMENTS at a time, so the step's fp32 temporaries are
STEP_TEMPORARIES x 4 x min(largest tensor, CHUNK_ELEMENTS) bytes: 192 MiB at any model size.
Before the pieces, six fp32 copies of the largest tensor were alive at once: 12 GB for
Llama-3.1-8B's 525 M-element embedding (an H200 measured 119304 MiB for an 8B NPO+RT step with
float32 moments: 14 B/parameter plus those six copies, within 0.1%). The pieces give results
bit-identical to the whole-tensor formula (tests/train/test_optimizers.py, on CPU).

Memory per parameter: the parameter (2 B), its gradient (2 B) and the state, 2 x 4 + 2 = 10 B
(float32 moments) or 2 x 2 + 2 = 6 B (bfloat16): 14 or 10 B in all, against torch AdamW's 8 B
plus, on CUDA, its foreach step's copy of v (2 B).

FSDP2: a parameter (and its state, made with zeros_like) may be a DTensor; the step works on
each one's local shard (`to_local()`), which is elementwise-correct for any sharding. Tested
on plain tensors and on two FSDP2 ranks against one process (tests/train/test_train.py).
"""

import math

import torch
from torch.distributed.tensor import DTensor

__all__ = [
    "CHUNK_ELEMENTS",
    "OPTIMIZERS",
    "STATE_DTYPES",
    "STEP_TEMPORARIES",
    "KahanAdamW",
    "StepInBackward",
    "adamw_8bit",
]

OPTIMIZERS = ("adamw", "adamw_kahan", "adamw_8bit")
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# KahanAdamW updates a parameter in flat pieces of at most this many elements, so the step's fp32
# temporaries are a few times 64 MiB whatever the largest tensor (an 8B model's embedding is
# 525 M elements: six fp32 copies of it were 12 GB). A multiple of VECTOR_ELEMENTS keeps each
# element on the same (vectorised or scalar) code path as an unsplit update: identical results.
CHUNK_ELEMENTS = 2**24
VECTOR_ELEMENTS = 2**10
STEP_TEMPORARIES = 3  # fp32 copies of one piece alive at once during the step (_kahan_update)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _replicas(tensor: torch.Tensor) -> int:
    """How many ranks hold the same shard of `tensor`: the replicated dimensions of a DTensor's
    mesh (hybrid sharding replicates each shard across nodes), 1 otherwise."""
    if not isinstance(tensor, DTensor):
        return 1
    return math.prod(tensor.device_mesh.size(dim) for dim, p in enumerate(tensor.placements) if p.is_replicate())


def _pieces(tensors: list[torch.Tensor], chunk: int):
    """Aligned flat pieces of at most `chunk` elements of same-shaped tensors (parameter,
    gradient, state); the whole tensors when one of them is not contiguous."""
    if tensors[0].numel() <= chunk or not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    yield from zip(*(t.view(-1).split(chunk) for t in tensors), strict=True)


def _kahan_update(param, grad, m_store, v_store, c_store, lr, beta1, beta2, eps, wd, bias1, bias2_sqrt):
    """One piece of the step, in place. All arithmetic in fp32, operation for operation the
    formula of the module docstring. Its temporaries are fp32 copies of the piece, at most
    STEP_TEMPORARIES at once: the gradient's upcast, m, v (bf16 state only; fp32 moments are
    updated where they are), then the update, the old and the new parameter. A bf16 operand of
    a mixed-dtype op is upcast exactly (on CUDA in registers, on CPU into a temporary)."""
    g = grad.float()  # an alias when the gradient is fp32: only read
    if m_store.dtype == torch.float32:  # the moments updated where they are
        m = m_store.lerp_(g, 1 - beta1)
        v = v_store.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt()
    else:  # in fp32, then stored; the update uses the fp32 values (not their bf16 rounding)
        m = m_store.float().lerp_(g, 1 - beta1)
        v = v_store.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_store.copy_(m)
        v_store.copy_(v)
        denom = v.sqrt_()
    del g, v
    denom.div_(bias2_sqrt).add_(eps)
    # The AdamW update (weight decay from the old parameter), plus what earlier roundings lost.
    total = torch.div(m, denom, out=denom).mul_(-lr / bias1).sub_(param, alpha=lr * wd).add_(c_store)
    del m
    old = param.to(torch.float32, copy=True)
    new = torch.add(old, total)
    param.copy_(new)
    dropped = total.sub_(new.copy_(param).sub_(old))  # total - (p_new - p); p_new - p is exact in fp32
    c_store.copy_(dropped)


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected, the same formula as torch.optim.AdamW)
    with a Kahan-compensated parameter update; state: step, exp_avg, exp_avg_sq (state_dtype)
    and comp (the parameter's dtype). state_dtype: "float32" or "bfloat16"."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
        state_dtype="float32",
        chunk_elements=CHUNK_ELEMENTS,
    ):
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {list(STATE_DTYPES)}, got {state_dtype!r}")
        if not (isinstance(chunk_elements, int) and chunk_elements > 0 and chunk_elements % VECTOR_ELEMENTS == 0):
            raise ValueError(f"chunk_elements must be a positive multiple of {VECTOR_ELEMENTS}, got {chunk_elements!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_dtype=state_dtype)
        super().__init__(params, defaults)
        # Not a group default: checkpoints' param_groups stay as they were.
        self.chunk_elements = chunk_elements

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
                scalars = (lr, beta1, beta2, eps, wd, 1 - beta1**t, (1 - beta2**t) ** 0.5)
                tensors = [_local(x) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["comp"])]
                for piece in _pieces(tensors, self.chunk_elements):
                    _kahan_update(*piece, *scalars)
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


def adamw_8bit(params, *, lr, betas, eps, weight_decay, stochastic_rounding: bool):
    """torchao's AdamW8bit (pip install 'fastnpo[lean]'): m and v as 8-bit codes with one fp32
    scale per block of 256 values (tensors of >= 4096 values that split into such blocks; smaller
    ones keep their state in the parameter's dtype), i.e. ~2.03 B per parameter for both moments
    instead of 2 x 2 (bf16) or 2 x 4 (fp32). stochastic_rounding: bf16 parameters are rounded
    up or down at random in proportion to the distance (torchao's bf16_stochastic_round), so an
    update below half a bf16 gap lands with the right probability and is right on average,
    without KahanAdamW's 2 B per parameter of compensation (tests/train/test_optimizers.py checks
    both against the fp32-master run).

    Why torchao and not bitsandbytes: torchao's optimizers are plain PyTorch tensor subclasses,
    so they run on CPU too (this project's tests) and on FSDP2's DTensor shards, and need no
    CUDA-specific build. Its step is torch.compile'd per parameter shape (a C++ compiler on CPU;
    the first steps of a run compile)."""
    try:
        from torchao.optim import AdamW8bit
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError as error:
        raise ImportError(f"optim.name=adamw_8bit needs torchao: pip install 'fastnpo[lean]' ({error})") from None

    class AdamW8bitFloat32States(AdamW8bit):
        """The 8-bit states present themselves as float32 whatever the parameter's dtype.

        torchao 0.18 gives them the parameter's dtype (bf16) as their outward dtype, but its
        `view` and `detach` rebuild them as float32; DTensor.from_local goes through `view`, so
        on FSDP2 shards a bf16 run's state is a DTensor whose spec says bf16 around a float32
        tensor, `exp_avg.float()` is then a no-op and the first step fails with "expected dtype
        torch.bfloat16 for `end`" (pytorch/ao#3314). The outward dtype changes no number: the
        codes are 8-bit and every read dequantizes to float32."""

        @staticmethod
        def _subclass_zeros(p, signed, block_size):
            return OptimState8bit.zeros(p.shape, signed, block_size, p.device, dtype=torch.float32)

    return AdamW8bitFloat32States(
        params,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        bf16_stochastic_round=stochastic_rounding,
    )


class StepInBackward:
    """optim.in_backward: each parameter's optimizer step runs in its post-accumulate-grad hook,
    and its gradient is freed right after, so a step never holds the whole set of gradients
    (2 bytes per parameter in bf16: 16 GB at 8B) -- only the parameters whose gradients are
    still being accumulated, e.g. a tied embedding from the lm_head's gradient to the end.

    The optimizer is the run's ordinary one (AdamW or KahanAdamW over every parameter): when a
    hook fires, the parameter's param group is narrowed to that parameter for one
    optimizer.step(), so the step touches exactly that parameter, with its own state and the
    group's current learning rate (the schedule still steps once per step), without walking
    every other parameter. That walk, once per hook, made the host time grow as P^2: measured on
    the 2-core CPU machine with tiny tensors (one thread, medians of 7), the hooks added 70 ms to a
    backward + step at 291 tensors (Llama-3.1-8B has 291) and 238 ms at 723 (70B); narrowed, 51
    and 127 ms, the rest being each optimizer.step() call's fixed cost.
    Checkpoints and resumes see the same optimizer as without in_backward.

    Gradient clipping and accumulation cannot work here (the config refuses them). The norm of
    the step's gradients is still summed for the log. A non-finite gradient is not applied;
    the step then reports a non-finite norm and the run stops (TrainingDiverged), but the
    parameters whose gradients came earlier in the backward have already stepped: the last
    checkpoint, not the model in memory, is the state to go back to.

    FSDP2 runs these hooks itself on the sharded parameters after the reduce-scatter (torch >=
    2.5), so each rank steps its own shards; the norm is summed across ranks in finish(), a shard
    that hybrid sharding replicates on several ranks counted once.
    """

    def __init__(self, parameters, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._squares: list[torch.Tensor] = []
        self._group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in parameters if p.requires_grad]

    @torch.no_grad()
    def _step(self, param: torch.Tensor) -> None:
        norm = torch.linalg.vector_norm(_local(param.grad)).float()  # fp32 accumulation, no fp32 copy
        if torch.isfinite(norm):
            self._squares.append(norm.square() / _replicas(param))
            group = self._group_of[param]
            everyone, group["params"] = group["params"], [param]
            try:
                self.optimizer.step()
            finally:
                group["params"] = everyone
        else:  # not applied; the step's norm becomes non-finite and the run stops
            self._squares.append(norm)
        param.grad = None

    def finish(self, process_group=None) -> torch.Tensor:
        """The step's gradient norm (over every rank's shards), and a reset for the next step."""
        total = torch.stack(self._squares).sum() if self._squares else torch.zeros(())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total, group=process_group)
        self._squares = []
        return total.sqrt()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
