"""Which decode attention kernel reads the cache how, by batch size: the tuner's choices for
phi_attention.py's kernels (plain data, importable without Triton)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionConfig:
    """How the decode attention kernel reads the cache.

    kernel: "dot" multiplies on tensor cores (the one query padded to 16 rows: arithmetic is free here,
    and the loads feeding tl.dot are pipelined through shared memory), "sum" on CUDA cores.
    block_n, warps, stages: columns per tile, warps per program, tiles in flight.
    splits: programs per (row, head) along the sequence (flash-decoding), merged by a second kernel.
    split_dims: read an 80-wide head as 64 + 16 columns instead of one tile padded to 128.
    table_once: read the row's whole block table before the loop, each tile taking its block from
    registers, instead of a load from the table per tile on which the tile's loads wait.
    consecutive (with table_once): where the row's blocks are consecutive (a row alone gets them so
    from the pool's stack), address every tile from the first block, with no table in the loop.
    """

    kernel: str = "dot"
    block_n: int = 32
    warps: int = 2
    stages: int = 1
    splits: int = 1
    split_dims: bool = True
    table_once: bool = False
    consecutive: bool = False


# Per batch-size bucket (the smallest key >= the batch serves it): the fastest variants timed on an
# H100 at phi-2's shape (benchmarks/llm_decode.py --tune-attention, then decode_step_study.py for
# the one-kernel form; figures in docs/benchmarks.md). One split per (row, head) wins everywhere.
# Batch 1 reads the row's block table once: its kernels 9.5 -> 6.4 us a layer at 160 columns, batch
# 128 unchanged (benchmarks/block_table_study.py on an H100, 2026-12-07).
ATTENTION_TILES: tuple[tuple[int, AttentionConfig], ...] = (
    (1, AttentionConfig("dot", block_n=32, warps=2, stages=4, splits=1, table_once=True)),
    (8, AttentionConfig("dot", block_n=32, warps=2, stages=3, splits=1)),
    (32, AttentionConfig("dot", block_n=16, warps=1, stages=2, splits=1)),
    (128, AttentionConfig("dot", block_n=16, warps=1, stages=3, splits=1)),
)


def attention_config(rows: int, tiles: tuple[tuple[int, AttentionConfig], ...] = ATTENTION_TILES) -> AttentionConfig:
    """The table's entry for a batch of `rows` rows: the smallest bucket that holds it, else the largest."""
    ordered = sorted(tiles, key=lambda entry: entry[0])
    return next((config for bucket, config in ordered if rows <= bucket), ordered[-1][1])


def head_split(head_dim: int, split_dims: bool = True) -> tuple[int, int]:
    """(D0, D1): a head read as D0 + D1 columns, both powers of two, D1 >= 16 or 0.

    80 -> (64, 16). Where no such split exists (or split_dims is off), (next power of two, 0): one
    padded, masked tile.
    """
    padded = 1 << (head_dim - 1).bit_length()
    if not split_dims or padded == head_dim:
        return padded, 0
    low = padded // 2
    rest = head_dim - low
    if rest >= 16 and rest & (rest - 1) == 0:
        return low, rest
    return padded, 0
