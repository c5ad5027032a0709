"""The paged answer cache's bookkeeping (llm/blocks.py): blocks handed to rows in column order, given
back whole, never shared, never the trash block, none lost however rows come and go."""

from __future__ import annotations

import random

import pytest

from pipeline.llm.blocks import TRASH_BLOCK, BlockManager, OutOfBlocks


def test_a_row_gets_the_blocks_its_columns_need_in_order_and_gives_them_all_back():
    blocks = BlockManager(10, 32)
    assert blocks.usable == 9 and blocks.free == 9
    first = blocks.grow(0, 40)  # 40 columns: two blocks
    assert first == [1, 2] and blocks.held(0) == [1, 2]
    assert blocks.grow(0, 64) == [] and blocks.missing(0, 65) == 1  # 64 fit; the 65th needs a third
    assert blocks.grow(0, 65) == [3] and blocks.held(0) == [1, 2, 3]
    assert blocks.used == 3 and blocks.free == 6
    assert blocks.release(0) == [1, 2, 3] and blocks.free == 9 and blocks.held(0) == []
    assert blocks.release(0) == []  # nothing held: nothing to give


def test_too_few_free_blocks_give_nothing_and_say_so():
    blocks = BlockManager(4, 16)
    blocks.grow(0, 30)  # two of three
    with pytest.raises(OutOfBlocks, match="needs 2 more blocks, 1 are free"):
        blocks.grow(1, 17)
    assert blocks.held(1) == [] and blocks.free == 1  # the one free block is still free


def test_a_growing_pool_keeps_every_row_and_frees_only_the_new_blocks():
    blocks = BlockManager(3, 8)
    blocks.grow(5, 16)
    blocks.extend(6)
    assert blocks.held(5) == [1, 2] and blocks.free == 3 and blocks.usable == 5
    assert blocks.grow(6, 24) == [3, 4, 5]
    with pytest.raises(ValueError):
        blocks.extend(4)


def test_a_row_alone_after_rows_grew_side_by_side_gets_consecutive_blocks():
    blocks = BlockManager(12, 4)
    for columns in range(4, 21, 4):  # two rows growing in turn hold interleaved blocks
        blocks.grow(0, columns)
        blocks.grow(1, columns)
    assert blocks.held(0) == [1, 3, 5, 7, 9]
    blocks.release(0)
    assert blocks.grow(2, 12) == [1, 3, 5]  # a row beside another takes what the stack holds
    blocks.release(2)
    blocks.release(1)  # the pool is empty again: the next row alone gets blocks in order
    assert blocks.grow(3, 16) == [1, 2, 3, 4]


def test_ten_thousand_random_joins_growths_and_leaves_share_no_block_and_lose_none():
    rng = random.Random(3)
    blocks = BlockManager(200, 32)
    columns: dict[int, int] = {}
    refused = 0
    for _ in range(10_000):
        move = rng.random()
        if move < 0.35 or not columns:
            row = rng.randrange(1000)
            want = columns.get(row, 0) + rng.randrange(1, 700)
        elif move < 0.7:
            row = rng.choice(list(columns))
            want = columns[row] + rng.randrange(1, 100)
        else:
            row = rng.choice(list(columns))
            given = blocks.release(row)
            assert len(given) == blocks.blocks_for(columns.pop(row))
            continue
        try:
            blocks.grow(row, want)
            columns[row] = want
        except OutOfBlocks:
            refused += 1
        held = [block for r in blocks.rows() for block in blocks.held(r)]
        assert len(held) == len(set(held)), "a block held by two rows"
        assert TRASH_BLOCK not in held
        assert len(held) == blocks.used == blocks.usable - blocks.free
        assert all(len(blocks.held(r)) == blocks.blocks_for(c) for r, c in columns.items())
    assert refused > 0  # the pool did run short
    for row in list(columns):
        blocks.release(row)
    assert blocks.free == blocks.usable and blocks.used == 0 and blocks.rows() == []
