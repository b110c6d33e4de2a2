"""The epilogue design (design="epilogue", EXPERIMENTAL: never measured on a GPU; ops/DESIGNS.md):
QuACK's scaled-exp idea for per-sequence losses.

Like ops/one_pass.py, chunks of WHOLE SEQUENCES run forward and backward in one call (the loss must be
separable: a sum of per-sequence terms, which the caller vouches for; see one_pass.py). Unlike it,
no fp32 logits buffer exists: the logits GEMM's epilogue keeps what the rest needs.

    forward  kernels/epilogue_forward.py, one GEMM (2 n D V): per (row, TILE_V tile) the tile max m and
             the fp32 sum of exp(z - m); E = exp(z - m) in the operand dtype [n, V]; the exact fp32
             target logit per row.
    glue     torch on the [n, T] partials (T = V / TILE_V, ~1000 at V = 128256): lse = M + log sum_t
             s exp(m - M), token log-prob = target - lse (exact fp32), per-sequence sums, the loss
             gradient g per row (the closure, as one_pass takes it), then the per-(row, tile) scales
             scale = -g exp(m - lse) and label_grad = g (1 - p_y) from the exact target.
    backward kernels/epilogue_backward.py, two GEMMs (2 n D V each) that build dlogits = scale * E
             (label_grad at the label) tile by tile while loading E: dH's rows written once in
             hidden's dtype; dW written by the first chunk, read-modify-written (fp32 sum, one
             rounding) by each later one. No fp32 dlogits buffer, no atomics.

6NDV FLOPs; per logit 2 bytes written (E) and 4 read (dH, dW GEMMs) in bf16, against one_pass's 18.

Chunk rule: E of at most chunk_bytes (default CHUNK_BYTES = 128 MiB, i.e. 523 rows at V = 128256 in
bf16) per chunk, whole sequences packed greedily (one_pass.chunk_rows); a longer sequence goes alone,
one whose E exceeds max(chunk_bytes, MAX_CHUNK_BYTES = 2 GiB) is refused before any work. The small
default keeps the whole op's extra memory near the gradients' own size (benchmarks/README.md,
"Fused-epilogue design: budget and prediction"); larger chunks take fewer dW read-modify-writes.

The forward-only form (epilogue_token_logprobs, and this design's call when no gradient is wanted)
stores no E: the GEMM and its statistics only, for reference passes and evaluation, in row blocks
whose fp32 partials fit STATS_BYTES (4185 rows at V = 128256: whole sequences not needed).

Triton runs where matmuls.triton_runs_on says (CUDA tensors, or any device under TRITON_INTERPRET=1);
elsewhere this design raises a clear error (design="one_pass" is the CPU's single-sweep design).
"""

import itertools
from collections.abc import Callable

import torch

from ..checks import check_hidden_and_weight, check_labels
from ..matmuls import triton_runs_on
from ..one_pass import _chunk_gradient, _gradient_buffers, chunk_rows

CHUNK_BYTES = 128 * 2**20  # E (operand dtype) per chunk: the memory goal's side of the trade
MAX_CHUNK_BYTES = 2 * 2**30  # E of a lone over-budget sequence: refused above this
STATS_BYTES = 32 * 2**20  # the forward-only form's two fp32 [rows, T] partials per launch


def _kernels():
    """(epilogue_forward, epilogue_backward) modules; imported here so the package works without triton."""
    from ...kernels import epilogue_backward, epilogue_forward

    return epilogue_forward, epilogue_backward


def check_device(device: torch.device) -> None:
    if not triton_runs_on(device):
        raise ValueError(
            f"design='epilogue' runs Triton kernels: hidden must be a CUDA tensor (or TRITON_INTERPRET=1 "
            f"for the interpreter), got a tensor on {device}; use design='one_pass' on this device"
        )


def fold_partials(tile_max: torch.Tensor, tile_sum: torch.Tensor) -> torch.Tensor:
    """lse fp32 [n] from the per-(row, tile) maxima and sums of exp: M + log sum_t s_t exp(m_t - M)."""
    row_max = tile_max.amax(dim=1, keepdim=True)
    return row_max[:, 0] + (tile_sum * (tile_max - row_max).exp_()).sum(dim=1).log_()


def backward_scales(
    tile_max: torch.Tensor, lse: torch.Tensor, token_logps: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp32 [n, T] = -g exp(m - lse), label_grad fp32 [n] = g (1 - p_y)) for grad g = d loss / d logp
    per row; 1 - p_y as -expm1(logp) from the exact target (no cancellation when p_y ~ 1)."""
    scale = (tile_max - lse[:, None]).exp_().mul_(-grad[:, None])
    return scale, grad * torch.expm1(token_logps).neg_()


def stats_rows(num_tiles: int) -> int:
    """Rows per launch of the forward-only form: its two fp32 [rows, T] partials within STATS_BYTES."""
    return max(1, STATS_BYTES // (8 * num_tiles))


def _check_chunk_bytes(chunk_bytes):
    if chunk_bytes is not None and (
        isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0
    ):
        raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")


def epilogue_chunks(
    sequence_ids: torch.Tensor, num_sequences: int, vocab_size: int, element_bytes: int, chunk_bytes: int | None
) -> list[int]:
    """Boundaries in the kept rows of chunks of whole sequences whose E (element_bytes per logit) fits
    chunk_bytes (default CHUNK_BYTES), one over-budget sequence alone; ValueError naming a sequence
    whose E alone exceeds max(chunk_bytes, MAX_CHUNK_BYTES)."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = max(1, budget // (element_bytes * vocab_size))
    cap_rows = max(1, max(budget, MAX_CHUNK_BYTES) // (element_bytes * vocab_size))
    try:  # one_pass.chunk_rows counts in fp32 logits: hand it the same row counts in its units
        return chunk_rows(sequence_ids, num_sequences, vocab_size, 4 * vocab_size * rows, 4 * vocab_size * cap_rows)
    except ValueError as error:
        raise ValueError(
            f"labels: design='epilogue' keeps a whole sequence's E ({element_bytes} B per logit) in one chunk, "
            f"capped at {cap_rows} target tokens at V={vocab_size} (max(chunk_bytes, epilogue."
            f"MAX_CHUNK_BYTES)); {error}"
        ) from error


@torch.no_grad()
def epilogue_sequence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    sequence_ids: torch.Tensor,
    num_sequences: int,
    loss_from_logprobs: Callable[[torch.Tensor], torch.Tensor],
    *,
    compute_dh: bool,
    compute_dw: bool,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, dH [N, D] in hidden's dtype or None, dW [V, D] in weight's dtype or None): the
    FusedSequenceLossFunction design contract (autograd.py), as one_pass.one_pass_sequence_loss.

    hidden [N, D], weight [V, D]; row_ids the kept rows (ascending), labels their targets in [0, V),
    sequence_ids their sequences (< num_sequences, nondecreasing); the loss must be separable.
    """
    check_device(hidden.device)
    _check_chunk_bytes(chunk_bytes)
    fwd, bwd = _kernels()
    vocab_size = weight.shape[0]
    want_grads = compute_dh or compute_dw
    if want_grads:
        bounds = epilogue_chunks(sequence_ids, num_sequences, vocab_size, hidden.element_size(), chunk_bytes)
    else:  # no E: the forward-only form's row blocks (any rows; the sums are index_add_ed)
        n, block = row_ids.numel(), stats_rows(fwd.num_tiles(vocab_size))
        bounds = [*range(0, n, block), n]
    # float64 sums, as one_pass's: fp32 token log-probs added one by one drift by ulps of the sum
    sequence_sums = torch.zeros(num_sequences, dtype=torch.float64, device=hidden.device)
    dh, dw = _gradient_buffers(hidden, weight, row_ids, compute_dh, compute_dw)
    for r0, r1 in itertools.pairwise(bounds):
        ids, targets, sequences = row_ids[r0:r1], labels[r0:r1], sequence_ids[r0:r1]
        e, tile_max, tile_sum, target = fwd.epilogue_forward(hidden, weight, ids, targets, store_e=want_grads)
        lse = fold_partials(tile_max, tile_sum)
        token_logps = target - lse
        sequence_sums.index_add_(0, sequences, token_logps.double())
        if not want_grads:
            continue
        grad, _ = _chunk_gradient(loss_from_logprobs, sequence_sums.float(), sequences)
        scale, label_grad = backward_scales(tile_max, lse, token_logps, grad)
        del tile_sum, target, lse
        if dh is not None:
            bwd.epilogue_dh(e, scale, targets, label_grad, weight, ids, dh)
        if dw is not None:
            # the chunk's rows gathered once (n x D: 4 MiB at 512 rows, D = 4096 in bf16): direct
            # loads pipeline fully in the dW kernel's loop (epilogue_backward.py)
            rows = hidden.index_select(0, ids)
            bwd.epilogue_dw(e, scale, targets, label_grad, rows, dw, accumulate=r0 > 0)
            del rows
        del e, scale
    return loss_from_logprobs(sequence_sums.float()), dh, dw


@torch.no_grad()
def epilogue_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """The forward-only form: fp32 [N] log softmax(hidden @ weight.T)[labels], exactly 0 where
    labels == ignore_index, without gradients and without writing anything of size N x V.

    hidden [N, D] (fp32 / bf16 / fp16, CUDA or under TRITON_INTERPRET=1), weight [V, D] of the same
    dtype and device, labels int64 [N] in [0, V) or ignore_index. Bad inputs raise naming the argument.
    """
    check_hidden_and_weight(hidden, weight, exact_dim=2)
    check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    check_device(hidden.device)
    fwd, _ = _kernels()
    out = torch.zeros(labels.shape[0], device=hidden.device, dtype=torch.float32)
    row_ids = (labels != ignore_index).nonzero()[:, 0]
    if row_ids.numel() == 0:
        return out
    kept_labels = labels[row_ids].to(torch.int64).contiguous()
    block = stats_rows(fwd.num_tiles(weight.shape[0]))
    for r0 in range(0, row_ids.numel(), block):
        ids, targets = row_ids[r0 : r0 + block], kept_labels[r0 : r0 + block]
        _, tile_max, tile_sum, target = fwd.epilogue_forward(hidden, weight, ids, targets, store_e=False)
        out.index_copy_(0, ids, target - fold_partials(tile_max, tile_sum))
    return out
