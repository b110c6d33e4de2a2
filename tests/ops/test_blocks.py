"""ops/blocks.py: every vocabulary-chunked loop takes exactly the blocks its own arithmetic took before
the rule was shared (so every result keeps its bits), and the rule's documented invariants hold."""

import itertools

import pytest

from fastnpo.ops import blocks, chunked, soft_target, statistics
from fastnpo.ops.experimental import split

# The formulas each loop used before ops/blocks.py, verbatim but for their constants, which are
# arguments here so the grid can move them.


def old_chunked(num_rows, vocab_size, chunk_elements=1 << 22, min_vocab_chunk=256):
    # chunked._blocks, and statistics._blocks with chunk_elements = 1 << 21
    row_block = max(1, min(num_rows, chunk_elements // min_vocab_chunk))
    vocab_chunk = max(min_vocab_chunk, chunk_elements // row_block)
    return row_block, min(vocab_chunk, vocab_size)


def old_soft_target(num_rows, vocab_size, chunk_size, chunk_elements=1 << 22):
    if chunk_size is not None:
        return max(1, min(int(chunk_size), vocab_size))
    return max(1, min(vocab_size, max(256, chunk_elements // max(1, num_rows))))


def old_split_blocks_l2(num_rows, vocab_size, block_bytes=32 * 2**20, min_vocab_block=256):
    elements = max(block_bytes // 4, min_vocab_block)
    vocab_block = min(vocab_size, max(min_vocab_block, elements // max(num_rows, 1)))
    row_block = max(1, min(num_rows, elements // vocab_block))
    return row_block, vocab_block


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


def old_split_buffer(num_rows, vocab_size, element_bytes, multiple, budget=None, min_split_columns=2048):
    elements = max((256 * 2**20 if budget is None else budget) // element_bytes, multiple)
    min_columns = min(_round_up(vocab_size, multiple), max(min_split_columns, multiple))
    row_block = max(1, min(num_rows, elements // min_columns))
    widest = max(multiple, elements // row_block // multiple * multiple)
    num_blocks = -(-vocab_size // widest)
    return row_block, min(vocab_size, _round_up(-(-vocab_size // num_blocks), multiple))


ROWS = [0, 1, 2, 3, 5, 7, 23, 255, 256, 257, 1000, 4097, 8192, 16383, 16384, 16385, 32768, 32769, 65536, 200_000]
VOCABS = [1, 2, 5, 17, 47, 101, 255, 256, 257, 300, 1031, 2047, 2048, 2049, 32000, 128256, 256000]
# Budgets in elements: the defaults, the ones tests shrink the loops to, powers of two, and odd ones
# (not a whole number of 256-column rows, or under one such row).
ELEMENTS = [1, 35, 100, 255, 256, 512, 1000, 1024, 4095, 4096, 10_000, 99_999, 1 << 20, 1 << 21, 1 << 22, 1 << 23]


def test_the_budgets_are_the_ones_the_loops_had():
    assert chunked.CHUNK_ELEMENTS == 1 << 22 and chunked.MIN_VOCAB_CHUNK == 256
    assert statistics.CHUNK_ELEMENTS == 1 << 21
    assert split.BLOCK_BYTES == 32 * 2**20 and split.MIN_VOCAB_BLOCK == 256
    assert split.SPLIT_BUFFER_BYTES == 256 * 2**20 and split.MIN_SPLIT_COLUMNS == 2048
    assert blocks.JVP_COLUMNS == 8192


@pytest.mark.parametrize("num_rows", ROWS)
def test_chunked_and_statistics_blocks_are_unchanged(num_rows, monkeypatch):
    for v in VOCABS:
        assert chunked.blocks(num_rows, v) == old_chunked(num_rows, v), v
    for elements, min_columns in itertools.product(ELEMENTS, [5, 64, 256, 300]):
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(chunked, "MIN_VOCAB_CHUNK", min_columns)
        for v in VOCABS:
            assert chunked.blocks(num_rows, v) == old_chunked(num_rows, v, elements, min_columns), (elements, v)
    # statistics: the chunk_elements argument (None: CHUNK_ELEMENTS), the same rule at 8 MiB
    for elements, v in itertools.product([None, *ELEMENTS], VOCABS):
        new = blocks.vocab_blocks(num_rows, v, budget_bytes=4 * (elements or statistics.CHUNK_ELEMENTS))
        assert new == old_chunked(num_rows, v, elements or 1 << 21), (elements, v)


@pytest.mark.parametrize("num_rows", [n for n in ROWS if n >= 1])  # soft_target runs on kept rows only
def test_soft_target_width_is_unchanged(num_rows):
    for v, chunk_size in itertools.product(VOCABS, [None, 1, 2, 7, 256, 1000, 8192, 10**6]):
        assert soft_target.vocab_chunk(num_rows, v, chunk_size) == old_soft_target(num_rows, v, chunk_size)


@pytest.mark.parametrize("num_rows", ROWS)
def test_split_l2_blocks_are_unchanged(num_rows, monkeypatch):
    for v in VOCABS:
        assert split.blocks(num_rows, v) == old_split_blocks_l2(num_rows, v), v
    for elements, min_columns in itertools.product(ELEMENTS, [5, 64, 256, 300]):
        monkeypatch.setattr(split, "MIN_VOCAB_BLOCK", min_columns)
        for block_bytes in (4 * elements, 4 * elements + 3):
            for v in VOCABS:
                want = old_split_blocks_l2(num_rows, v, block_bytes, min_columns)
                assert split.blocks(num_rows, v, block_bytes) == want, (block_bytes, min_columns, v)


@pytest.mark.parametrize("num_rows", ROWS)
def test_split_buffer_blocks_are_unchanged(num_rows, monkeypatch):
    grid = itertools.product(VOCABS, [1, 2, 3, 4, 8], [1, 16, 64, 100, 256, 4096], [None, 1, 999, 2**16, 2**20 + 7])
    for v, element_bytes, multiple, budget in grid:
        want = old_split_buffer(num_rows, v, element_bytes, multiple, budget)
        assert split.split_blocks(num_rows, v, element_bytes, multiple, budget) == want, (v, element_bytes, multiple)
    # The knob tests/ops/test_split_backward.py turns: a split width of one column tile.
    monkeypatch.setattr(split, "MIN_SPLIT_COLUMNS", 64)
    for v, budget in itertools.product(VOCABS, [40 * 64 * 2, 3 * 64 * 4, 10**6]):
        want = old_split_buffer(num_rows, v, 2, 64, budget, min_split_columns=64)
        assert split.split_blocks(num_rows, v, 2, 64, budget) == want, (v, budget)


def check_invariants(num_rows, vocab_size, got, budget_bytes, element_bytes, min_columns, multiple, even, split_at):
    """split_at: the width below which the use splits rows."""
    row_block, vocab_block = got
    assert 1 <= row_block <= max(num_rows, 1)
    assert 1 <= vocab_block <= vocab_size
    assert len(range(0, vocab_size, vocab_block)) * vocab_block >= vocab_size  # the blocks cover V
    assert vocab_block >= min(vocab_size, multiple if even else min_columns)
    assert vocab_block == vocab_size or vocab_block % multiple == 0
    assert row_block * vocab_block * element_bytes <= max(budget_bytes, min_columns * element_bytes)
    if row_block < num_rows:  # rows are split only when every row would leave a block too narrow
        assert max(budget_bytes // element_bytes, min_columns) // num_rows < split_at


@pytest.mark.parametrize("num_rows", ROWS)
def test_invariants_of_every_use(num_rows):
    for v, budget_bytes in itertools.product(VOCABS, [4 * e for e in ELEMENTS] + [4 * e + 1 for e in ELEMENTS]):
        for min_columns, fill in itertools.product([5, 256, 300], [False, True]):
            kw = dict(budget_bytes=budget_bytes, min_columns=min_columns, rows_fill_narrow_vocab=fill)
            got = blocks.vocab_blocks(num_rows, v, **kw)
            split_at = min(v, min_columns) if fill else min_columns
            check_invariants(num_rows, v, got, budget_bytes, 4, min_columns, 1, False, split_at)
        kw = dict(budget_bytes=budget_bytes, rows_fill_narrow_vocab=True, widen_split_blocks=False)
        got = blocks.vocab_blocks(num_rows, v, **kw)
        check_invariants(num_rows, v, got, budget_bytes, 4, 256, 1, False, min(v, 256))
        for element_bytes, multiple in itertools.product([2, 4], [1, 64, 256]):
            got = split.split_blocks(num_rows, v, element_bytes, multiple, budget_bytes)
            split_at = min(_round_up(v, multiple), max(2048, multiple))
            check_invariants(num_rows, v, got, budget_bytes, element_bytes, multiple, multiple, True, split_at)


def test_rows_fill_a_narrow_vocabulary_only_where_asked():
    # 101 columns < 256: the CPU rule still splits rows as if blocks were 256 wide (its bits), the
    # split design lets rows fill the budget at the vocabulary's width.
    assert blocks.vocab_blocks(19, 101, budget_bytes=4 * 512) == (2, 101)
    assert blocks.vocab_blocks(19, 101, budget_bytes=4 * 512, rows_fill_narrow_vocab=True) == (5, 101)


def test_defaults_at_the_yardstick_shape():
    n, v = 8192, 128256  # DESIGN.md's yardstick
    assert chunked.blocks(n, v) == (8192, 512)
    assert statistics.CHUNK_ELEMENTS * 4 == blocks.STATISTICS_BYTES
    assert split.blocks(n, v) == (8192, 1024)
    assert split.split_blocks(n, v, 2, 256) == (8192, 16128)
