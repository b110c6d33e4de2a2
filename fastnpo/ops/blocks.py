"""How big a [rows, columns] block of logits every vocabulary-chunked loop takes: one rule, named budgets.

The loops that never hold the [tokens x vocab] logits (chunked.py, statistics.py, soft_target.py for
CE-U and UNDIAL, experimental/split.py) compute them one block of rows x vocabulary columns at a
time. vocab_blocks chooses that block:

1. A budget in bytes bounds one block (rows x columns x element_bytes; fp32 logits, 4 bytes, unless
   the block is a dlogits buffer in the compute dtype). Memory, not FLOPs, is what a block costs:
   the block and the temporaries shaped like it (its exp, its dlogits) are the loop's only
   [rows, vocab]-shaped memory, so a fixed budget bounds the extra memory whatever N and V are.
2. Every row goes in one block (fewer passes over the weight, dW written once) unless that leaves
   fewer than `split_columns` columns (default `min_columns`, 256): narrower blocks make the matmuls
   inefficient (a thin K or N dimension), so rows are split instead, to budget // that width.
3. The width is then what the budget leaves per row (at least `min_columns`, rounded down to
   `multiple`, at most the vocabulary); the last block is what is left (`even`: near-equal blocks).

The budgets differ by use, for the reasons next to each below; the other knobs keep the blocks
each loop has always taken (and so its results' bits): see vocab_blocks's arguments.
design="one_pass" (one_pass.py) chunks the other axis, rows in whole sequences, under its own
budget (chunk_budget).
"""

MIN_COLUMNS = 256  # rule 2: below this a block's matmul is too thin to run efficiently

# impl="torch" (chunked.py) and CE-U / UNDIAL (soft_target.py), the CPU path: large enough for
# efficient matmuls, small enough that a block (and its exp) never dominates memory.
CHUNKED_BYTES = 16 * 2**20
# statistics.py keeps two blocks alive (the logits and their exp, reused buffers): 16 MiB in all.
STATISTICS_BYTES = 8 * 2**20
# experimental/split.py's torch block loop: one fp32 block fits the H100 / H200 L2 (50 / 60 MB).
SPLIT_BLOCK_BYTES = 32 * 2**20
# experimental/split.py's dlogits buffer (compute dtype): large, because every block costs three
# launches and a pass of the matmuls over its weight rows, and 256 MiB is small next to dW itself.
SPLIT_BUFFER_BYTES = 256 * 2**20
MIN_SPLIT_COLUMNS = 2048  # the split design's dH matmul's K: narrower blocks split rows instead
# u2a's forward-mode (jvp) log-probs: a fixed width, not a budget. That loop keeps every row (one
# plain-torch expression that forward-mode AD runs through) and its width sets its results' bits.
JVP_COLUMNS = 8192


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def vocab_blocks(
    num_rows: int,
    vocab_size: int,
    *,
    budget_bytes: int,
    element_bytes: int = 4,
    min_columns: int = MIN_COLUMNS,
    split_columns: int | None = None,
    multiple: int = 1,
    rows_fill_narrow_vocab: bool = False,
    widen_split_blocks: bool = True,
    even: bool = False,
) -> tuple[int, int]:
    """(row block, vocabulary block) of num_rows x vocab_size (>= 1) logits, by the module's rule.

    Invariants, for the arguments every caller passes (min_columns a multiple of `multiple`,
    split_columns >= min_columns): 1 <= row block <= max(num_rows, 1); 1 <= vocabulary block <=
    vocab_size; the blocks cover the vocabulary; the vocabulary block is at least
    min(vocab_size, min_columns) (with `even`: min(vocab_size, multiple)) and, unless it is the whole
    vocabulary, a multiple of `multiple`; row block x vocabulary block x element_bytes <= the budget,
    raised to one row of min_columns when it holds less.

    split_columns: the width below which rows are split (default min_columns; the split design's
    dlogits buffer splits rows below MIN_SPLIT_COLUMNS while its floor is one column tile).
    multiple: widths are rounded down to it (up, for the floor): the kernel's widest column tile.
    rows_fill_narrow_vocab: when the whole vocabulary is narrower than split_columns, rows fill the
    budget at the vocabulary's width (the split design) instead of splitting as if it were
    split_columns wide (the CPU paths, kept: a different row block changes their dW's bits).
    widen_split_blocks: once rows are split, the block widens to budget // rows (False: it stays
    split_columns wide, the split design's L2 block; the two differ only for budgets that are not a
    whole number of split_columns-wide rows).
    even: the vocabulary in near-equal blocks, so no ragged column tile but the vocabulary's last.
    """
    floor = _round_up(min_columns, multiple)
    elements = max(budget_bytes // element_bytes, floor)
    split_at = max(min_columns if split_columns is None else split_columns, multiple)
    if rows_fill_narrow_vocab:
        split_at = min(split_at, _round_up(vocab_size, multiple))
    row_block = max(1, min(num_rows, elements // split_at))
    if row_block < num_rows and not widen_split_blocks:
        widest = split_at
    else:
        widest = max(floor, elements // row_block // multiple * multiple)
    if even:
        widest = _round_up(-(-vocab_size // -(-vocab_size // widest)), multiple)
    return row_block, min(vocab_size, widest)
