"""The arithmetic of `fastnpo plan`: per-GPU peak memory of one training step, by component.

A ModelShape is counted once from a config (the model built on the meta device: no weights);
`estimate(shape, settings)` is then pure arithmetic, cheap enough to try many settings.

What fastnpo does, and so what is modelled (setup.py, sharding.py, step.py, ops/):
- Parameters are stored in model.dtype. There is no separate fp32 master copy: with
  model.dtype=bfloat16 the parameters, gradients and AdamW state are all bf16; with float32
  they are all fp32 and distributed.mixed_precision=bf16 computes in bf16 (FSDP2
  MixedPrecisionPolicy when sharded: bf16 all-gathers, fp32 gradient reduce-scatter;
  autocast when not sharded, which keeps a bf16 copy of every weight during the step).
- optim.name=adamw: torch.optim.AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype;
  on CUDA its foreach step allocates one more state-sized list (sqrt(exp_avg_sq)), on CPU the
  per-tensor step two temporaries of the largest tensor. optim.name=adamw_kahan (KahanAdamW,
  bf16 parameters): exp_avg and exp_avg_sq in optim.state_dtype plus a compensation buffer in
  the parameter's dtype; its step works on flat pieces of at most CHUNK_ELEMENTS and keeps
  STEP_TEMPORARIES fp32 copies of one piece (optimizers.py). Gradients exist from the backward
  to the end of the optimizer step (zero_grad(set_to_none=True)). With optim.in_backward each
  parameter steps in its post-accumulate-grad hook and its gradient is freed: what exists at
  once is the tensor stepping (and its step's temporaries, one tensor at a time also for
  AdamW's foreach on CUDA) plus, with tied embeddings, the lm_head's gradient, which autograd
  holds from the fused op's backward until the embedding's, at the very end.
- FSDP2 (one unit per decoder layer + the root): each GPU holds 1/world of parameters,
  gradients and state; the root unit (embeddings, final norm, lm_head) stays unsharded through
  the step (FSDP2 never reshards the root after forward), and up to two decoder layers are
  unsharded at a time (the current one and the prefetched next one).
- Activations, per token of a micro-batch (all sets the method reads, rows x data.max_length,
  every token counted as a target: an upper bound), are the tensors autograd saves in a Hugging
  Face Llama-style decoder layer with SDPA attention (no [T, T] scores are kept):
      norms x (4 + p' + c) D          RMSNorm: the fp32 upcast input, the normalised x, its output
    + c (H hd + 2 Hkv' hd) + c H hd   q, k, v after RoPE (k, v repeated to H heads when a padding
                                      mask stops SDPA's native GQA) and the attention output
    + 4 H                             the attention's fp32 log-sum-exp
    + 4 c I                           gate, act(gate), up, act(gate) * up
  with c the compute dtype's bytes, p' = 4 under autocast or fp32, else c. With activation
  checkpointing each layer keeps only its input (D per token in the residual dtype) and one
  layer's activations are recomputed at a time during the backward.
- optim.offload (FSDP2's CPUOffloadPolicy, also over one GPU): the parameter shards, their
  gradients, the optimizer state and its step (torch's fused CPU AdamW: no temporaries; KahanAdamW
  as above) are in CPU memory, reported apart as host memory; the GPU keeps what FSDP2 unshards
  (the root and two layers), a layer's gradients until they are reduced and the root's at the end
  of the backward, the activations and the fused op. The shards' short-lived GPU copies made for
  each all-gather (1/world of a unit) are not counted.
- The fused log-prob op never builds [tokens x vocab] logits. It keeps row ids, labels and the
  log-sum-exp (20 B per target token) from forward to backward; its backward makes fp32 dW
  [V, D] and fp32 dH [n, D] (atomic accumulation buffers on GPU), casts them to the compute
  dtype and scatters dH back to [N, D]. The CPU path (ops/chunked.py) adds an fp32 copy of
  the rows and one [rows, chunk] logits block of CHUNK_ELEMENTS.
"""

from dataclasses import dataclass, field, replace

from ..ops.chunked import CHUNK_ELEMENTS
from . import optimizers

GIB = 2**30
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context, cuBLAS / cuDNN workspaces, kernels (not in torch's allocator)
NCCL_BYTES = GIB // 2  # NCCL communicators and buffers, when more than one GPU
FRAGMENTATION = 0.05  # caching-allocator fragmentation margin on what torch allocates (GPU only)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of an architecture (from its config; counts from a meta model)."""

    name: str
    model_type: str
    params: int  # distinct parameters (tied embeddings counted once)
    layer_params: int  # one decoder layer (the largest)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    norms_per_layer: int = 2
    largest_tensor: int = 0  # elements of the largest parameter tensor
    linear_params: int = 0  # parameters of nn.Linear weights (autocast copies them)
    lora_params: int = 0  # trainable parameters when LoRA is on
    method_trainable: int = 0  # the parameters a method trains when it trains a subset (Method.memory); 0: all
    method_frozen_copy: int = 0  # the method's frozen copies of decoder layers
    method_backward_layers: int = 0  # the decoder layers the method's backward runs through; 0: all
    config_dtype: str = ""  # the dtype the model's config names (dtype / torch_dtype); "": none or unusable
    notes: tuple[str, ...] = ()

    @property
    def root_params(self) -> int:
        return self.params - self.layers * self.layer_params


@dataclass(frozen=True)
class Settings:
    """The run settings the estimate depends on (from the run config and the command line)."""

    dtype: str = "float32"  # model.dtype
    mixed_precision: str = "none"  # distributed.mixed_precision
    activation_checkpointing: bool = False
    gpus: int = 1
    sharded: bool = False  # FSDP2 on
    rows: int = 8  # examples in one micro-batch forward, all sets together
    seq_len: int = 256  # data.max_length (or the packed row length)
    padded: bool = True  # batches carry a padding mask (SDPA then repeats K/V heads)
    lora: bool = False
    live_reference_rows: int = 0  # a live_reference method (KL term): retain rows whose full logits are built
    reference_head: bool = False  # the method keeps a copy of the initial lm_head weight on the device
    device: str = "cuda"  # "cuda" or "cpu" (the CPU path of the fused op, per-tensor AdamW)
    optimizer: str = "adamw"  # optim.name: "adamw" or "adamw_kahan"
    state_dtype: str = "float32"  # optim.state_dtype (adamw_kahan's moments; adamw: the parameters')
    in_backward: bool = False  # optim.in_backward: each parameter steps (and frees its gradient) in the backward
    offload: bool = False  # optim.offload: shards, gradients and optimizer state in CPU memory (FSDP2)

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


@dataclass
class Estimate:
    components: dict[str, int]  # each component's own high-water mark, bytes per GPU
    phases: dict[str, int]  # bytes allocated at each candidate peak moment
    overhead: int  # CUDA context, NCCL, fragmentation (0 on CPU)
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    notes: list[str] = field(default_factory=list)
    host: int = 0  # optim.offload on a GPU: CPU memory per process (shards, gradients, state, step)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def allocated(self) -> int:
        """Peak of what torch allocates (what torch.cuda.max_memory_allocated reports)."""
        return self.phases[self.peak_phase]

    @property
    def total(self) -> int:
        return self.allocated + self.overhead


def layer_activation_bytes(shape: ModelShape, s: Settings) -> int:
    """Bytes autograd saves per token in one decoder layer (see the module docstring)."""
    c = compute_bytes(s)
    pre = 4 if (s.dtype == "float32" or autocast(s)) else c
    d, hd = shape.hidden, shape.head_dim
    kv_heads = shape.heads if (s.padded and shape.kv_heads != shape.heads) else shape.kv_heads
    norms = shape.norms_per_layer * (4 + pre + c) * d
    attention = c * (shape.heads * hd + 2 * kv_heads * hd) + c * shape.heads * hd + 4 * shape.heads
    mlp = 4 * c * shape.intermediate
    return norms + attention + mlp


def compute_bytes(s: Settings) -> int:
    return 2 if (s.mixed_precision == "bf16" or DTYPE_BYTES[s.dtype] == 2) else 4


def autocast(s: Settings) -> bool:
    return s.mixed_precision == "bf16" and not s.sharded and s.dtype == "float32"


def _activations(shape: ModelShape, s: Settings, c: int, residual: int) -> tuple[int, int, int, int]:
    """(one layer's saved activations, all layers' without checkpointing, with checkpointing,
    one layer's gradient temporaries), in bytes."""
    n, d = s.tokens, shape.hidden
    per_layer = layer_activation_bytes(shape, s) * n
    final_norm = (4 + (4 if residual == 4 else c) + c) * d * n
    shared = 2 * n * shape.head_dim * c + 40 * n  # RoPE cos / sin; ids, masks, labels (int64)
    if s.padded:
        shared += s.rows * s.seq_len * s.seq_len  # the bool [B, 1, T, T] attention mask
    act_full = shape.layers * per_layer + final_norm + shared
    act_ckpt = shape.layers * n * d * residual + final_norm + shared + per_layer
    layer_backward = n * (2 * d + 2 * shape.intermediate) * c
    return per_layer, act_full, act_ckpt, layer_backward


def _fused_op(shape: ModelShape, s: Settings, c: int) -> tuple[int, int]:
    """(bytes the fused op keeps for its backward, bytes its backward allocates)."""
    n, d, v = s.tokens, shape.hidden, shape.vocab
    keep = 20 * n  # per target token: row index, label, LSE, ...
    dw = v * d * (4 + (c if c != 4 else 0)) if not s.lora else 0
    dh = n * d * (4 + (c if c != 4 else 0) + c)
    cpu_path = n * d * 4 + 4 * CHUNK_ELEMENTS + d * 4 * min(v, max(256, CHUNK_ELEMENTS // max(1, n)))
    backward = dw + dh + (cpu_path if s.device == "cpu" else 0)
    if autocast(s):
        keep += v * d * c  # weight.to(bf16), saved for the backward
    return keep, backward


def trainable_params(shape: ModelShape, s: Settings) -> int:
    """LoRA's adapters, the weights a method chose (Method.memory), or every parameter."""
    return shape.lora_params if s.lora else (shape.method_trainable or shape.params)


ADAMW_8BIT_BLOCK = 256  # torchao AdamW8bit: one fp32 scale per 256 8-bit codes, for m and for v


def state_bytes_per_parameter(s: Settings) -> float:
    """Optimizer state per trainable parameter: m and v (+ KahanAdamW's compensation buffer)."""
    p = DTYPE_BYTES[s.dtype]
    if s.optimizer == "adamw_kahan":
        return 2 * DTYPE_BYTES[s.state_dtype] + p
    if s.optimizer == "adamw_8bit":  # tensors under 4096 values keep 2 x p: negligible in an LLM
        return 2 * (1 + 4 / ADAMW_8BIT_BLOCK)
    return 2 * p


def _step_temporaries(s: Settings, elements: int, all_elements: int) -> int:
    """The optimizer step's temporaries when its largest tensor (shard) has `elements` and all
    the tensors it steps at once have `all_elements`."""
    p = DTYPE_BYTES[s.dtype]
    if s.optimizer == "adamw_kahan":  # flat pieces of one tensor at a time, all arithmetic in fp32
        return optimizers.STEP_TEMPORARIES * 4 * min(elements, optimizers.CHUNK_ELEMENTS)
    if s.optimizer == "adamw_8bit":  # one tensor at a time, torch.compile'd: assumed one fp32 copy
        return 4 * elements
    if s.offload:  # torch's fused CPU AdamW: one pass over each tensor, no temporaries
        return 0
    if s.device == "cuda":
        return all_elements * p  # foreach: sqrt(exp_avg_sq) of every tensor it steps at once
    return 2 * elements * p  # per tensor: sqrt, then / bias correction


def _shard(elements: int, trainable: int, world: int) -> int:
    """Elements of one rank's shard of a trainable tensor of `elements` (at most all trainable)."""
    return -(-min(elements, trainable) // world)


def _optimizer(shape: ModelShape, s: Settings, trainable: int, world: int) -> tuple[int, int]:
    """(optimizer state, the step's temporaries), bytes per GPU."""
    state = int(trainable * state_bytes_per_parameter(s)) // world
    largest = _shard(shape.largest_tensor, trainable, world)
    # in the backward (optim.in_backward) every step is of one tensor
    return state, _step_temporaries(s, largest, largest if s.in_backward else trainable // world)


@dataclass
class _Amounts:
    """Bytes per GPU of each thing a training step holds, before estimate() sums them into the
    candidate peak moments (phases) and the components of the table."""

    params: int
    grads: int  # what exists at once (optim.in_backward: one tensor's, not all)
    state: int
    step_temp: int
    autocast_copies: int
    root_unsharded: int  # FSDP2's root unit, unsharded through the step
    gather_fwd: int  # the root + two decoder layers unsharded
    gather_bwd: int  # end of the backward: the root's gradients and their reduce-dtype copy
    layer_grad_bufs: int  # a layer's unsharded gradients until they are reduced
    per_layer: int  # one layer's saved activations
    act_full: int  # all layers' activations without checkpointing
    act_ckpt: int  # ... with checkpointing
    layer_backward: int  # one layer's gradient temporaries
    saved: int  # the activations saved for the backward, as configured
    fused_keep: int
    fused_bwd: int
    mid_backward: int  # gradients held while the backward goes through the last layer
    end_of_backward: int  # gradients (and step) at the end of the backward
    reference: int  # frozen reference copies on the GPU
    reference_model: int  # of which a live reference model
    host: int = 0  # optim.offload: CPU memory per process


def estimate(shape: ModelShape, s: Settings) -> Estimate:
    p, c = DTYPE_BYTES[s.dtype], compute_bytes(s)
    world = s.gpus if s.sharded else 1
    trainable = trainable_params(shape, s)
    subset = s.lora or bool(shape.method_trainable)  # LoRA / a method's subset: the lm_head and the root do not train
    amounts = _amounts(shape, s, trainable, subset)
    if s.offload and s.device == "cuda":
        _offload_to_host(amounts, shape, c, subset)
    phases = _phases(amounts, s, shape, c)
    components = _components(amounts, s)
    notes = _notes(shape, s, trainable * p // world, amounts.host)
    with_ckpt = amounts.act_ckpt + amounts.layer_backward
    without = amounts.act_full + amounts.layer_backward
    return Estimate(components, phases, _overhead(s, phases), without, with_ckpt, notes, amounts.host)


def _amounts(shape: ModelShape, s: Settings, trainable: int, subset: bool) -> _Amounts:
    """Every amount of a step on the GPU, before any offload to the CPU."""
    p, c = DTYPE_BYTES[s.dtype], compute_bytes(s)
    world = s.gpus if s.sharded else 1
    residual = 4 if s.dtype == "float32" and (c == 4 or not s.sharded) else c  # the residual stream
    grads = trainable * p // world
    state, step_temp = _optimizer(shape, s, trainable, world)
    root_unsharded, gather_fwd, gather_bwd, layer_grad_bufs = _fsdp_buffers(shape, s, c, subset)

    # A loss on a middle layer's output (method_backward_layers): autograd saves only the layers
    # from the first updated one to that layer, and nothing flows back through the lm_head and the fused op.
    backward_layers = shape.method_backward_layers or shape.layers
    per_layer, act_full, act_ckpt, layer_backward = _activations(replace(shape, layers=backward_layers), s, c, residual)
    fused_keep, fused_bwd = _fused_op(shape, s, c)
    if shape.method_backward_layers:
        fused_keep = fused_bwd = 0
    head_grad = shape.vocab * shape.hidden * p // world if not subset else 0
    mid_backward, end_of_backward = head_grad, grads
    if s.in_backward:  # each tensor steps, and its gradient goes, as soon as it is ready
        mid_backward, end_of_backward, grads = _in_backward_gradients(shape, s, trainable, head_grad)
    reference, reference_model = _reference_copies(shape, s)
    return _Amounts(
        params=shape.params * p // world,
        grads=grads,
        state=state,
        step_temp=step_temp,
        autocast_copies=2 * shape.linear_params if autocast(s) else 0,
        root_unsharded=root_unsharded,
        gather_fwd=gather_fwd,
        gather_bwd=gather_bwd,
        layer_grad_bufs=layer_grad_bufs,
        per_layer=per_layer,
        act_full=act_full,
        act_ckpt=act_ckpt,
        layer_backward=layer_backward,
        saved=act_ckpt - per_layer if s.activation_checkpointing else act_full,
        fused_keep=fused_keep,
        fused_bwd=fused_bwd,
        mid_backward=mid_backward,
        end_of_backward=end_of_backward,
        reference=reference,
        reference_model=reference_model,
    )


def _fsdp_buffers(shape: ModelShape, s: Settings, c: int, subset: bool) -> tuple[int, int, int, int]:
    """(the unsharded root, the forward's unsharded units, the end of the backward's root
    gradients, one layer's gradient buffers), bytes per GPU; all 0 unless FSDP2 shards."""
    # FSDP2: the root unit stays unsharded through the step; two layers unsharded at a time.
    root_unsharded = shape.root_params * c if s.sharded else 0
    gather_fwd = root_unsharded + (2 * shape.layer_params * c if s.sharded else 0)
    # End of the backward: the root's unsharded gradients and their reduce-dtype copy.
    reduce_bytes = (4 if s.mixed_precision == "bf16" else c) if c != 4 else 0
    root_trainable = 0 if subset else shape.root_params
    gather_bwd = root_trainable * (c + reduce_bytes) if s.sharded else 0
    layer_grad_bufs = (0 if subset else shape.layer_params) * (c + reduce_bytes) if s.sharded else 0
    return root_unsharded, gather_fwd, gather_bwd, layer_grad_bufs


def _in_backward_gradients(shape: ModelShape, s: Settings, trainable: int, head_grad: int) -> tuple[int, int, int]:
    """optim.in_backward: (gradients and step mid-backward, at its end, most gradients at once)."""
    p = DTYPE_BYTES[s.dtype]
    world = s.gpus if s.sharded else 1
    # During the backward: with tied embeddings the lm_head's gradient waits for the
    # embedding's (the very end), while a layer's largest tensor steps; untied, the lm_head
    # steps as soon as the fused op's backward has made its gradient. At the end the last
    # tensor steps (tied: the embedding), bounded by the largest.
    held = head_grad if shape.tied else 0
    mid = _shard(shape.intermediate * shape.hidden if shape.tied else shape.vocab * shape.hidden, trainable, world)
    last = _shard(shape.largest_tensor, trainable, world)
    mid_backward = held + mid * p + _step_temporaries(s, mid, mid)
    end_of_backward = last * p + _step_temporaries(s, last, last)
    return mid_backward, end_of_backward, max(held + mid * p, last * p)


def _reference_copies(shape: ModelShape, s: Settings) -> tuple[int, int]:
    """(all frozen reference copies on the GPU, of which a live reference model), bytes per GPU."""
    p = DTYPE_BYTES[s.dtype]
    world = s.gpus if s.sharded else 1
    v, d = shape.vocab, shape.hidden
    reference = reference_model = 0
    if s.live_reference_rows:  # a frozen copy of the model and two sets of full logits
        reference_model = shape.params * p // world
        reference = reference_model + 4 * s.live_reference_rows * s.seq_len * v * 4
    reference += shape.method_frozen_copy * p  # a method's frozen layers, copied before sharding
    if s.reference_head:  # the initial lm_head, copied before sharding (its hidden states stay on the CPU)
        reference += v * d * p
    return reference, reference_model


def _offload_to_host(a: _Amounts, shape: ModelShape, c: int, subset: bool) -> None:
    """optim.offload on a GPU: move what CPUOffloadPolicy keeps in CPU memory into a.host."""
    # Shards, their gradients, the state and the step live in CPU memory; the GPU keeps the
    # unsharded units in use (gather_fwd), a layer's gradients until they are reduced
    # (layer_grad_bufs) and the root's at the end of the backward (gather_bwd). (On a CPU
    # "device" the two memories are one: nothing moves.)
    a.host = a.params + a.grads + a.state + a.step_temp + a.reference_model  # the live reference copy is offloaded too
    a.params = a.grads = a.state = a.step_temp = a.end_of_backward = 0
    a.reference -= a.reference_model
    # the root's unsharded lm_head gradient, reduced at the end
    a.mid_backward = shape.vocab * shape.hidden * c if not subset else 0


def _phases(a: _Amounts, s: Settings, shape: ModelShape, c: int) -> dict[str, int]:
    """Bytes allocated at each candidate peak moment of the step (c: the compute dtype's bytes)."""
    n, d = s.tokens, shape.hidden
    persistent = a.params + a.state + a.autocast_copies + a.reference
    return {
        "backward start (fused op backward)": persistent + a.gather_fwd + a.saved + a.fused_keep + a.fused_bwd,
        "backward through the last layer": persistent
        + a.gather_fwd
        + a.saved
        + (a.per_layer if s.activation_checkpointing else 0)
        + a.layer_backward
        + a.layer_grad_bufs
        + a.mid_backward,
        "end of backward": persistent + a.end_of_backward + a.gather_bwd + a.root_unsharded + n * d * c * 2,
        "optimizer step": a.params + a.grads + a.state + a.step_temp + a.reference,
    }


def _components(a: _Amounts, s: Settings) -> dict[str, int]:
    """Each component's own high-water mark, bytes per GPU (the rows of the table)."""
    return {
        "parameters": a.params,
        "gradients": a.grads,
        "optimizer state": a.state,
        "optimizer step temporaries": a.step_temp,
        "activations": a.saved + (a.per_layer if s.activation_checkpointing else 0) + a.layer_backward,
        "fused log-prob op": a.fused_keep + a.fused_bwd,
        "FSDP all-gather buffers": a.gather_fwd + max(a.gather_bwd, a.layer_grad_bufs),
        "autocast bf16 weight copies": a.autocast_copies,
        "frozen reference copies": a.reference,  # a live reference model, a method's frozen layers or lm_head
    }


def _overhead(s: Settings, phases: dict[str, int]) -> int:
    """What the GPU holds outside torch's allocations: CUDA context, NCCL, fragmentation (0 on CPU)."""
    if s.device != "cuda":
        return 0
    overhead = CUDA_CONTEXT_BYTES + (NCCL_BYTES if s.gpus > 1 else 0)
    return overhead + int(FRAGMENTATION * max(phases.values()))


def _notes(shape: ModelShape, s: Settings, all_grads: int, host: int) -> list[str]:
    """The shape's notes, then what the settings change that the table does not show
    (all_grads: the gradients' bytes per GPU were they all to exist at once)."""
    p = DTYPE_BYTES[s.dtype]
    notes = list(shape.notes)
    if s.in_backward:
        notes.append(
            "optim.in_backward: each parameter steps as its gradient is ready and the gradient is freed, "
            f"so {_gib(all_grads)} of gradients never exist at once (no gradient clipping, "
            "no gradient accumulation)"
        )
    if s.optimizer == "adamw_8bit":
        notes.append(
            "optim.name=adamw_8bit: torchao AdamW8bit, m and v as 8-bit codes + an fp32 scale per 256 "
            f"({state_bytes_per_parameter(s):.2f} bytes per parameter), bf16 parameters stochastically "
            "rounded; its step's temporaries (one fp32 copy of the tensor stepping) are an assumption, "
            "not yet measured on a GPU"
        )
    if s.optimizer == "adamw_kahan":
        notes.append(
            f"optim.name=adamw_kahan: {s.dtype} parameters with a compensated (Kahan) update, moments in "
            f"{s.state_dtype}: {p} + {p} + {state_bytes_per_parameter(s)} bytes per parameter (parameter, "
            "gradient, m + v + compensation)"
        )
    elif p == 2 and s.device == "cuda" and s.optimizer == "adamw":
        notes.append(
            f"model.dtype={s.dtype}: parameters, gradients and AdamW state are all {s.dtype} (fastnpo "
            "keeps no fp32 master copy); at lr ~1e-5 many updates fall below bf16's resolution and are "
            "lost unless optim.name=adamw_kahan (a compensated update)"
        )
    if s.offload:
        notes.append(
            "optim.offload: FSDP2's CPUOffloadPolicy keeps the parameter shards, gradients and optimizer state "
            f"in CPU memory ({_gib(host)} per process, pinned) and runs the optimizer step there; each step "
            "copies every unit's parameters to the GPU and its gradients back (PCIe time, not GPU memory)"
        )
    return notes


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def with_settings(s: Settings, **changes) -> Settings:
    return replace(s, **changes)
