"""design="one_pass" (production): a per-sequence loss's logits, loss gradient and weight gradients
in one sweep.

design="two_sweep" (autograd.FusedSequenceLossFunction over a backend) already computes the gradients in
the forward call, but sweeps the vocabulary twice: the log-sum-exp must be complete before any
probability is known, so the backward recomputes the logits (8NDV FLOPs). When the loss is a SUM
OF PER-SEQUENCE TERMS, the gradient of a sequence's log-prob needs only that sequence, so chunks of
WHOLE SEQUENCES can run everything at once. For each chunk (its kept rows only: prompt and padding
rows were dropped, as autograd.kept_rows does):

    logits   = rows @ W^T               one matmul, fp32 result              2 n D V
    epilogue log-sum-exp and target logit per row -> token log-probs, per-sequence sums
    g        = d loss / d logp of the chunk's sequences (see "separable" below)
    dlogits  = g * (onehot - softmax)   written once in the operand dtype, in place over the logits
    dH_chunk = dlogits @ W              one matmul, written into dH's rows     2 n D V
    dW      += dlogits^T @ rows         one matmul, accumulated into dW         2 n D V

6NDV FLOPs in all, the floor: no recompute, no atomics, every FLOP in a library matmul (cuBLAS on
CUDA with low-precision operands and out_dtype=torch.float32 results, matmuls.matmul_mode's contract;
fp32 operands elsewhere, e.g. the CPU).

The epilogue, one code path per situation (epilogue_kernels):
  bf16 / fp16 operands where Triton runs (CUDA; any device under TRITON_INTERPRET=1): the two kernels
    of kernels/sequence_epilogue.py. row_statistics reads the logits once (online max and sum of exp
    over vocabulary blocks) for lse and the target logit; logits_gradient_ reads them once more and
    writes g * (onehot - exp(logit - lse)) once, rounded from fp32 into the operand dtype IN PLACE
    over the first half of each fp32 row (the label's column g * (1 - p_y) formed in fp32 before
    that rounding): a view with twice the row stride, which the gradient matmuls take as it is.
    10 bytes per logit in bf16; the fp32 logits and the dlogits never coexist (one buffer).
  fp32 operands (fp32 inputs; the CPU, whose matmuls take fp32 operands even under the interpreter;
    a torch without out_dtype), or no triton installed: torch ops in place in the logits
    (_target_logprobs_, _softmax_gradient): row max, subtract, exp, row sums, scale, ~30 bytes per
    logit in five passes; with fp32 operands the scaled logits are the dlogits, no second buffer.

Chunk size (the rule): a budget of fp32 logits per chunk, by default max(CHUNK_BYTES, 4 V
MIN_CHUNK_ROWS) bytes, i.e. R = max(CHUNK_BYTES / 4V, MIN_CHUNK_ROWS) rows: 2093 rows (1 GiB) at
V = 128256, 2048 rows (2 GiB) at V = 262144. Chunks are whole sequences packed greedily up to R rows,
so two neighbouring chunks together exceed R: chunks < 2 N / R + 1 <= 2 N / MIN_CHUNK_ROWS + 1, and
dW takes chunks - 1 read-modify-writes (the first chunk writes it), a bound independent of V (the
v1 rule, CHUNK_BYTES / 4V rows alone, shrank the chunks as 1/V: dW traffic grew as V^2). An explicit
chunk_bytes is taken as given (tests, benchmarks). A sequence over the budget goes alone; one whose
fp32 logits exceed max(budget, MAX_CHUNK_BYTES = 4 GiB) is refused before any work (ValueError
naming the sequence and its length): splitting it would need its gradient before its log-prob is
complete. The boundaries come from ONE device-to-host copy before the loop; the loop has no sync
of its own (tests/ops/test_one_pass_budget.py counts them, the launches, fills and FLOPs). What
remains per chunk is the caller's closure: npo_loss's re-validates ref_logps / weights on every call
(losses.py -> checks.check_per_sequence: one or two syncs per chunk).

Memory beyond inputs: dH [N, D] and dW [V, D] in the inputs' dtype (the gradients themselves,
(N + V) D 2 bytes in bf16), never zero-filled: the first chunk writes dW with one matmul (out=), each
chunk writes its rows of dH once in dH's dtype (index_copy_ of a matmul in that dtype where the
operands are: no fp32 [n, D] intermediate), and only the dropped rows of dH are zeroed; plus one
chunk of fp32 logits (the dlogits live in it: in place, in the operand dtype on the kernel
path, fp32 on the torch-op path), the chunk's gathered rows (and fp32
lse / target [n] on the kernel path). dW accumulates IN THE WEIGHT'S DTYPE: each
chunk adds its fp32-accumulated product with one rounding (cuBLAS addmm with fp32 compute into a
bf16 / fp16 C; where the operands are fp32, an fp32 product added with one rounding), so dW costs no
fp32 [V, D] accumulator (2 GiB at V = 128256, D = 4096) and carries one rounding of the running sum
per chunk: at most `chunks` half-ulps of the partial sums, ~sqrt(chunks) of them for random signs
(4 chunks at the size below); a one-chunk call rounds once, as a plain matmul does. fp32 inputs
accumulate in fp32. Where bf16 / fp16 inputs get fp32 operands (the CPU, or a torch without
out_dtype), W also has an fp32 copy and each chunk's dW / dH product is an fp32 temporary:
the slow path's price.

Separable losses only. A chunk's gradient must be known before the later chunks are seen, which is
exact only when loss = sum_b f_b(logp_b) (any per-sequence scale included): NPO's mean over the
batch, GA's token sum / count and the Hugging Face patch's -sum / denominator all are. The loss
closure of autograd.fused_sequence_loss (logps [S] -> scalar) is kept: each chunk evaluates it on the
full-length vector of the log-probs known so far, the sequences not yet seen holding 0 as a
placeholder, and takes the gradient of the chunk's entries; the loss returned is the closure on the
complete vector. A non-separable closure (a batch softmax, a normalisation by the batch's log-probs)
would get gradients that depend on the placeholders, silently wrong: only callers that know their
loss is separable select this design (design="one_pass").

CE-U (token_values="ce_u"): CE-U's per-token loss c = LSE(l) - sum_{v != y} q_v l_v, q the softmax
over v != y (detached), is a per-token term the same chunks can compute: two more row statistics,
the label-excluded log-sum-exp LSE' and mean logit sum q_v l_v, taken with the label's column masked
out of the sums (never as all columns minus the label's, which cancels where p_y ~ 1, memorised
data's regime), give c = LSE - mean. Its gradient, d c / d l = p - q off the label and p_y on it,
and a sequence term's, g (onehot - p), are both multiples of (onehot - q): with p_v = (1 - p_y) q_v,
dlogits = s (onehot - q), s = g_seq (1 - p_y) + g_tok p_y, 1 - p_y = exp(LSE' - LSE). Bounded
whatever p_y, unlike the textbook p_y / (1 - p_y) (onehot - p). The kernels' without_label variants
(the torch ops: _label_excluded_statistics_, _label_excluded_gradient) do this at the same bytes per
logit, one more exp per element.

Floors and predicted times at N = 8192, D = 4096, V = 128256 (bf16, T = 512, v1 and v2 of this
design): benchmarks/README.md, "The one-pass design: floors and predictions".
"""

import itertools
from bisect import bisect_right
from collections.abc import Callable

import torch

from .blocks import CHUNKED_BYTES, vocab_blocks
from .ce_u import check_ce_u_vocabulary
from .matmuls import Matmuls, triton_runs_on

CHUNK_BYTES = 2**30  # fp32 logits of one chunk: large matmuls (K = rows of the dW update), few dW roundings
MIN_CHUNK_ROWS = 2048  # the default budget's floor in rows, whatever V: bounds the dW read-modify-writes
MAX_CHUNK_BYTES = 4 * 2**30  # hard cap on one chunk's fp32 logits (a lone over-budget sequence included)
TOKEN_VALUES = ("logprob", "ce_u")  # what a token-level loss's per-token values are (one_pass_sequence_loss)


def chunk_budget(vocab_size: int, chunk_bytes: int | None) -> int:
    """fp32 logits bytes per chunk: chunk_bytes as given, or by default max(CHUNK_BYTES,
    4 V MIN_CHUNK_ROWS), i.e. at least MIN_CHUNK_ROWS rows per chunk at any V (module docstring)."""
    if chunk_bytes is None:
        return max(CHUNK_BYTES, 4 * vocab_size * MIN_CHUNK_ROWS)
    return chunk_bytes


def chunk_rows(
    sequence_ids: torch.Tensor,
    num_sequences: int,
    vocab_size: int,
    chunk_bytes: int,
    max_bytes: int | None = None,
    unit: str = "sequence",
) -> list[int]:
    """Boundaries [0, r1, ..., n] in the kept rows of chunks of whole sequences whose fp32 logits fit
    chunk_bytes, or one sequence alone where it does not. sequence_ids: the kept rows' sequences,
    nondecreasing (rows are kept in order); or their groups of sequences (autograd.example_loss's
    groups, unit="example group": whole groups per chunk), as the refusal then names them.

    A sequence whose fp32 logits alone exceed max(chunk_bytes, max_bytes) (default MAX_CHUNK_BYTES,
    read at call time) is refused with a ValueError naming it and its length: one pass cannot split
    a sequence (its gradient needs the whole sequence's log-prob). One device-to-host copy (the
    sequences' ends, .tolist()), no other sync: nothing here waits inside the chunk loop."""
    n = sequence_ids.numel()
    max_rows = max(1, chunk_bytes // (4 * vocab_size))
    cap = max(chunk_bytes, MAX_CHUNK_BYTES if max_bytes is None else max_bytes)
    max_alone = max(1, cap // (4 * vocab_size))
    if n == 0:
        return [0]
    # Where each sequence's kept rows end (sequences without kept rows repeat the previous end):
    # searchsorted, not bincount (which syncs on CUDA to size its output).
    starts = torch.arange(num_sequences, device=sequence_ids.device, dtype=sequence_ids.dtype)
    ends = torch.searchsorted(sequence_ids, starts, right=True).tolist()
    bounds = [0]
    while bounds[-1] < n:
        start = bounds[-1]
        within = bisect_right(ends, start + max_rows)  # the sequences that end within the budget
        end = ends[within - 1] if within else 0
        if end <= start:  # the next sequence alone is over the budget
            sequence = bisect_right(ends, start)
            end = ends[sequence]
            if end - start > max_alone:
                raise ValueError(
                    f"labels: {unit} {sequence} has {end - start} target tokens; their fp32 logits "
                    f"({end - start} x {vocab_size} x 4 B = {(end - start) * vocab_size * 4 / 2**30:.2f} GiB) "
                    f"exceed the one-pass cap of {cap} B (max(chunk_bytes, one_pass.MAX_CHUNK_BYTES)) and one "
                    f"pass cannot split one {unit}: use design='two_sweep', shorter sequences or a larger "
                    "MAX_CHUNK_BYTES"
                )
        bounds.append(end)
    return bounds


def _target_logprobs_(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax at the labels, row sums of exp(logits - row max)), fp32 [n]; leaves
    exp(logits - row max) in `logits` for the gradient (in place: no second [n, V] buffer)."""
    logits.sub_(logits.amax(dim=1, keepdim=True))
    shifted_target = logits.gather(1, labels[:, None])[:, 0]
    sum_exp = logits.exp_().sum(dim=1)
    return shifted_target - sum_exp.log(), sum_exp


def _softmax_gradient(
    exps: torch.Tensor, sum_exp: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """grad * (onehot(labels) - softmax) from exps = exp(logits - row max), in `dtype`: in place in
    exps when dtype is fp32, else written once into a new tensor (the gradient matmuls' operand)."""
    # The label's column becomes e_y - sum (fp32, before any rounding), so the one scale below gives
    # grad * (1 - p_y) there: the onehot is not added after the cast, where p_y ~ 1 would cancel.
    exps.scatter_add_(1, labels[:, None], -sum_exp[:, None])
    scale = (-grad / sum_exp)[:, None]
    if dtype == exps.dtype:
        return exps.mul_(scale)
    return torch.mul(exps, scale, out=torch.empty(exps.shape, dtype=dtype, device=exps.device))


def epilogue_kernels(device: torch.device, operand_dtype: torch.dtype):
    """kernels/sequence_epilogue.py where the chunk epilogue takes it, else None (the torch ops):
    bf16 / fp16 operands (the dlogits are then a new buffer, written once by the kernel) where
    Triton runs (matmuls.triton_runs_on: CUDA, or any device under TRITON_INTERPRET=1), with triton
    installed. fp32 operands (the CPU, fp32 inputs) keep the torch ops, in place."""
    if operand_dtype not in (torch.bfloat16, torch.float16) or not triton_runs_on(device):
        return None
    try:  # imported here: the package (and the CPU path) works without triton
        from ..kernels import sequence_epilogue
    except ImportError:
        return None
    return sequence_epilogue


def _chunk_gradient(loss_from_logprobs: Callable, sequence_logps, sequences, token_values=None, rows=None):
    """(d loss / d each chunk row's sequence log-prob, d loss / d each chunk row's own token value or
    None), with the sequences and tokens not yet seen at their placeholder 0 (exact for the seen ones
    when the loss is separable). token_values: a token-level loss's per-row values so far (the kept
    rows'), `rows` the chunk's slice of them."""
    with torch.enable_grad():
        leaf = sequence_logps.detach().requires_grad_()
        if token_values is None:
            (grad,) = torch.autograd.grad(loss_from_logprobs(leaf), leaf)
            return grad[sequences], None
        tokens = token_values.detach().requires_grad_()
        # materialize_grads: a loss of the token values alone (CE-U without a retain term) leaves
        # the sequence log-probs unused, with a zero gradient
        loss = loss_from_logprobs(leaf, tokens)
        grad, token_grad = torch.autograd.grad(loss, (leaf, tokens), materialize_grads=True)
    return grad[sequences], token_grad[rows]


def _label_excluded_statistics_(logits: torch.Tensor, labels: torch.Tensor):
    """CE-U's row statistics with torch ops, in place: (target logit, lse, lse without the label,
    mean logit under the label-excluded distribution q, row sums of exps), fp32 [n] each; leaves
    exps = exp(logits - m') in `logits` (m' the label-excluded row max; the label's column 0) for
    the gradient. The label's column is masked out BEFORE the sums: computing them as (all columns)
    - (the label's) would cancel where p_y ~ 1, memorised data's regime. Needs V >= 2 (the callers
    check). One temporary, a column block of the exps (xlogy), at a time."""
    target = logits.gather(1, labels[:, None])[:, 0]
    logits.scatter_(1, labels[:, None], float("-inf"))
    top = logits.amax(dim=1)
    logits.sub_(top[:, None]).exp_()
    sums = logits.sum(dim=1)
    # sum_v e_v (logit_v - m') = sum_v e_v log e_v: xlogy is 0 at the label's e = 0, not 0 * -inf
    width = vocab_blocks(logits.shape[0], logits.shape[1], budget_bytes=CHUNKED_BYTES)[1]
    spread = sum(torch.special.xlogy(block, block).sum(dim=1) for block in logits.split(width, dim=1))
    lse_without = top + sums.log()
    return target, torch.logaddexp(lse_without, target), lse_without, top + spread / sums, sums


def _label_excluded_gradient(exps: torch.Tensor, sums: torch.Tensor, scale: torch.Tensor, labels, dtype):
    """scale * (onehot(labels) - q), q = exps / sums (the label's exp 0), in `dtype`: in place in
    exps when dtype is fp32, else written once into a new tensor."""
    factor = (-scale / sums)[:, None]
    if dtype == exps.dtype:
        out = exps.mul_(factor)
    else:
        out = torch.mul(exps, factor, out=torch.empty(exps.shape, dtype=dtype, device=exps.device))
    return out.scatter_(1, labels[:, None], scale[:, None].to(dtype))


def _write_(ops: Matmuls, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b with fp32 accumulation and one rounding into out's dtype (the first chunk's dW:
    no zero fill, no read of out)."""
    if ops.dtype == out.dtype and out.is_contiguous():
        torch.mm(a, b, out=out)
    else:  # fp32 operands for a low-precision out: an fp32 product, rounded once
        out.copy_(ops.mm(a, b))


def _accumulate_(ops: Matmuls, dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dw += a @ b with fp32 accumulation and one rounding into dw's dtype."""
    if ops.dtype == dw.dtype:
        dw.addmm_(a, b)  # operands in dw's dtype: cuBLAS computes in fp32 and rounds the sum once
    else:  # fp32 operands for a low-precision dW: an fp32 product, added with one rounding
        dw.add_(ops.mm(a, b))


def _rows_product(ops: Matmuls, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype`: straight from the matmul when its operands are in that dtype (fp32
    accumulation inside, one rounding), else an fp32 product rounded once."""
    if ops.dtype == dtype:
        return torch.mm(a, b)
    return ops.mm(a, b).to(dtype)


def _gradient_buffers(hidden, weight, row_ids, compute_dh, compute_dw):
    """dH [N, D] and dW [V, D], uninitialised where the chunks write them: dW entirely (the first
    chunk writes it), dH's kept rows (each written once by its chunk); only the dropped rows of dH
    are zeroed (index_fill_), and dW when no row is kept. No sync: the dropped rows are found by a
    stable sort of the kept-row mask, their count N - n known on the host."""
    n, num_rows = row_ids.numel(), hidden.shape[0]
    dh = dw = None
    if compute_dh:
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        if n < num_rows:
            kept = torch.zeros(num_rows, dtype=torch.uint8, device=hidden.device).index_fill_(0, row_ids, 1)
            dropped = torch.argsort(kept, stable=True)[: num_rows - n]
            dh.index_fill_(0, dropped, 0)
    if compute_dw:
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if n else torch.zeros_like(weight)
    return dh, dw


@torch.no_grad()
def one_pass_sequence_loss(
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
    bounds: list[int] | None = None,
    token_level: bool = False,
    token_values: str = "logprob",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, dH [N, D] in hidden's dtype or None, dW [V, D] in weight's dtype or None) of
    loss_from_logprobs(per-sequence summed log-probs), in one sweep of chunks of whole sequences.

    hidden [N, D], weight [V, D]; row_ids: the kept rows (ascending, or in whatever order `bounds`
    chunks them: example_loss's groups), labels their targets, sequence_ids their sequences
    (< num_sequences); the loss must be separable over the chunks (module docstring).
    chunk_bytes: fp32 logits per chunk (default: chunk_budget's rule, read at call time).
    bounds: chunk_rows's boundaries when the caller found them on the host (then no sync at all).
    token_level: the loss is loss_from_logprobs(sequence log-probs, per-token values of the kept rows
    [n]), separable per sequence AND per token (a sum of per-token terms, e.g. a token-weighted mean
    with detached weights); each chunk's tokens then add their own gradient to their sequences'.
    token_values: what those per-token values are (TOKEN_VALUES): "logprob", the token log-probs;
    "ce_u", CE-U's per-token loss LSE(l) - sum_{v != y} q_v l_v (q: softmax over v != y, detached),
    whose gradient with the sequence term's is s (onehot - q), s = g_seq (1 - p_y) + g_tok p_y
    (module docstring, "CE-U"); it needs a vocabulary of 2 or more.
    Everything is validated and sized before the loop (one .tolist() in chunk_rows); the loop itself
    makes no host sync of its own (the closure's, if any, are the caller's).
    """
    if chunk_bytes is not None and (
        isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0
    ):
        raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    if token_values not in TOKEN_VALUES:
        raise ValueError(f"token_values must be one of {TOKEN_VALUES}, got {token_values!r}")
    ce_u = token_level and token_values == "ce_u"
    if ce_u:
        check_ce_u_vocabulary(weight)
    if bounds is None:
        bounds = chunk_rows(sequence_ids, num_sequences, weight.shape[0], chunk_budget(weight.shape[0], chunk_bytes))
    ops = Matmuls(hidden)
    kernels = epilogue_kernels(hidden.device, ops.dtype)
    w = ops.operand(weight)
    # Summed in float64: one sequence's hundreds of token log-probs added one by one in fp32 (index_add_
    # is sequential) drift by several ulps of the sum; pairwise fp32 sums (the two-call path) do not.
    sequence_sums = torch.zeros(num_sequences, dtype=torch.float64, device=hidden.device)
    dh, dw = _gradient_buffers(hidden, weight, row_ids, compute_dh, compute_dw)
    per_token = torch.zeros(row_ids.numel(), dtype=torch.float32, device=hidden.device) if token_level else None

    def run_chunk(chunk: slice, first: bool) -> None:
        # A function so that the chunk's buffers are freed on return, before the next chunk's exist.
        ids, targets, sequences = row_ids[chunk], labels[chunk], sequence_ids[chunk]
        rows = ops.operand(hidden.index_select(0, ids))
        logits = ops.mm(rows, w.T)
        if ce_u:  # the label-excluded statistics too: CE-U's value and its gradient's form
            if kernels is None:
                target, lse, lse_without, mean_without, sums = _label_excluded_statistics_(logits, targets)
            else:
                lse, target, lse_without, mean_without = kernels.row_statistics(logits, targets, without_label=True)
        elif kernels is None:
            token_logps, sum_exp = _target_logprobs_(logits, targets)
        else:  # one read of the logits, which stay as they are
            lse, target = kernels.row_statistics(logits, targets)
        if ce_u or kernels is not None:
            token_logps = target - lse
        sequence_sums.index_add_(0, sequences, token_logps.double())
        if per_token is not None:
            per_token[chunk] = lse - mean_without if ce_u else token_logps
        if dh is None and dw is None:
            return
        grad, token_grad = _chunk_gradient(loss_from_logprobs, sequence_sums.float(), sequences, per_token, chunk)
        if ce_u:  # both parts as a multiple of (onehot - q): bounded, whatever p_y (no p_y / (1 - p_y))
            scale = grad * torch.exp(lse_without - lse) + token_grad * torch.exp(token_logps)
            if kernels is None:
                dlogits = _label_excluded_gradient(logits, sums, scale, targets, ops.dtype)
            else:
                dlogits = kernels.logits_gradient_(logits, targets, lse_without, scale, ops.dtype, without_label=True)
        else:
            if token_grad is not None:
                grad = grad + token_grad
            if kernels is None:
                dlogits = _softmax_gradient(logits, sum_exp, grad, targets, ops.dtype)
            else:  # one more read of the logits, the dlogits written in place over them (a view)
                dlogits = kernels.logits_gradient_(logits, targets, lse, grad, ops.dtype)
        del logits  # the fp32 values are spent: dlogits is the buffer's only live use
        if dh is not None:  # the chunk's rows of dH, written once in dH's dtype
            dh.index_copy_(0, ids, _rows_product(ops, dlogits, w, dh.dtype))
        if dw is not None:
            (_write_ if first else _accumulate_)(ops, dw, dlogits.T, rows)

    for r0, r1 in itertools.pairwise(bounds):
        run_chunk(slice(r0, r1), r0 == 0)
    if per_token is not None:
        return loss_from_logprobs(sequence_sums.float(), per_token), dh, dw
    return loss_from_logprobs(sequence_sums.float()), dh, dw
