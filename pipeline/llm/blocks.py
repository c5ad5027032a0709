"""Which blocks of the answer cache each row holds and which are free: the bookkeeping of a paged
cache (vLLM's idea), with no tensors in it, so CI tests it on its own.

A row's keys and values live in fixed-size blocks of `block_size` columns, handed to the row as its
tokens grow, in the order of its columns: column c of a row is at offset c % block_size of its
block c // block_size. Block 0 is never handed out: free rows of a captured decode step point at it
and write their (discarded) keys there, so no live row's block is ever touched by them.
"""

from __future__ import annotations

TRASH_BLOCK = 0  # where rows without blocks write; never held by a row


class OutOfBlocks(Exception):
    """Fewer blocks are free than a row needs now (its caller waits, or preempts another row)."""


class BlockManager:
    def __init__(self, blocks: int, block_size: int):
        if blocks < 2:
            raise ValueError("a block manager needs the trash block and at least one more")
        self.block_size = block_size
        self.total = blocks
        self._free = list(range(blocks - 1, TRASH_BLOCK, -1))  # a stack: the lowest block first
        self._held: dict[int, list[int]] = {}

    def blocks_for(self, columns: int) -> int:
        """Blocks that hold `columns` columns."""
        return -(-columns // self.block_size)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def usable(self) -> int:
        """Blocks rows can hold at all (all but the trash block)."""
        return self.total - 1

    @property
    def used(self) -> int:
        return self.usable - self.free

    def held(self, row: int) -> list[int]:
        return self._held.get(row, [])

    def rows(self) -> list[int]:
        return list(self._held)

    def missing(self, row: int, columns: int) -> int:
        """Blocks `row` lacks to hold `columns` columns."""
        return max(self.blocks_for(columns) - len(self.held(row)), 0)

    def grow(self, row: int, columns: int) -> list[int]:
        """Give `row` the blocks it lacks for `columns` columns; the new ones, in column order. Raises
        OutOfBlocks (and gives nothing) when fewer are free."""
        need = self.missing(row, columns)
        if need > len(self._free):
            raise OutOfBlocks(f"row {row} needs {need} more blocks, {len(self._free)} are free")
        new = [self._free.pop() for _ in range(need)]
        if new or row not in self._held:
            self._held.setdefault(row, []).extend(new)
        return new

    def release(self, row: int) -> list[int]:
        """Free every block of `row` (none held: nothing); the blocks it held."""
        blocks = self._held.pop(row, [])
        self._free.extend(reversed(blocks))
        if not self._held:  # rows that grew side by side left their blocks interleaved on the stack;
            # in order again, the next row alone gets consecutive ones (the attention kernels' fast loop)
            self._free.sort(reverse=True)
        return blocks

    def extend(self, blocks: int) -> None:
        """The pool grew to `blocks` in all: the new ones are free (rows keep theirs)."""
        if blocks < self.total:
            raise ValueError("a block pool only grows")
        self._free[:0] = range(blocks - 1, self.total - 1, -1)  # under the stack: old blocks go first
        self.total = blocks
