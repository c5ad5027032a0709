"""The fast engine's answer cache: phi-2's keys and values in fixed-size blocks, the block table, the
decode step's input tensors and the CUDA graphs that read them, owned by this one object.

Everything a captured decode step reads lives here at a fixed address (gpt-fast's static cache, with
vLLM's paging): the blocks `k`/`v` [layers, blocks, heads, block_size, head_dim], the table
[rows, blocks per row] that says which blocks hold each row's columns (blocks.py keeps the books), each
row's token, position, column and LoRA adapter, and each row's sampling settings (sampler.py). The
continuous batch (fast_batch.py) and so `generate` change them only through the methods below, and a
graph captured here is dropped whenever the tensors it reads are replaced (`reserve`, `release`).

Rows are the slots of the step's tensors; a row without blocks (free) has a table row of the trash
block, column 0 and advance 0, so a captured bucket may run it alongside live rows harmlessly.
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.gpu_gate import GATE
from pipeline.llm.blocks import TRASH_BLOCK, BlockManager
from pipeline.llm.memory import usable_memory
from pipeline.llm.phi_model import DecodeState
from pipeline.llm.sampler import SamplingRows

BLOCK_SIZE = 32  # columns per block: a multiple of every attention tile (kernels/attention_tiles.py)
GROWTH = 1.5  # a pool that must grow takes at least this many times its blocks (few recaptures)


class AnswerCache:
    def __init__(self, weights, device: torch.device, *, rows: int, max_seq_len: int, eos_token_id: int,
                 use_graphs: bool, block_size: int = BLOCK_SIZE):
        self.weights, self.device, self.rows = weights, device, rows
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.blocks_per_row = -(-max_seq_len // block_size)
        self.use_graphs = use_graphs
        self.eos_token_id = eos_token_id
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.blocks: BlockManager | None = None
        long = dict(dtype=torch.long, device=device)
        self.table = torch.full((rows, self.blocks_per_row), TRASH_BLOCK, **long)
        self.tokens = torch.full((rows,), eos_token_id, **long)
        self.positions = torch.zeros(rows, **long)
        self.col = torch.zeros(rows, **long)
        self.starts = torch.zeros(rows, **long)  # rows begin at column 0; the kernels read from here
        self.advance = torch.zeros(rows, **long)  # 1 for a live row: a step moves its column on
        self.adapters = torch.zeros(rows, **long)  # each row's LoRA adapter (multi_lora.py; 0: the base)
        floats = dict(dtype=torch.float32, device=device)
        self.sampling = SamplingRows(torch.zeros(rows, **floats), torch.ones(rows, **floats),
                                     torch.zeros(rows, **long), torch.zeros(rows, **long))
        self._freed: list[int] = []  # rows freed and (row, block number, block) placed, not yet settled
        self._placed: list[tuple[int, int, int]] = []
        self.graphs: dict = {}
        self._pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.busy = False

    # ---- the blocks ------------------------------------------------------------------------------

    @property
    def bytes_per_block(self) -> int:
        w = self.weights
        return 2 * len(w.layers) * w.heads * w.head_dim * self.block_size * w.embed.element_size()

    def blocks_within(self, budget: float) -> int:
        """Blocks (the trash block included) whose keys and values fit `budget` bytes, held ones counted."""
        return int(budget // self.bytes_per_block)

    def budget(self, share: float) -> float:
        """`share` of what this process can still allocate, the blocks it holds counted as free."""
        if self.device.type != "cuda":
            return float("inf")
        held = 0 if self.k is None else 2 * self.k.nbytes
        return (usable_memory(self.device) + held) * share

    def reserve(self, blocks: int) -> None:
        """Hold at least `blocks` blocks (trash included). A pool that grows takes GROWTH times its size
        at least; its rows keep their blocks and contents, and the graphs (which read the old pool)
        are captured again when next needed."""
        held = 0 if self.k is None else self.k.shape[1]
        if blocks <= held:
            return
        blocks = max(blocks, int(held * GROWTH), 2)
        w = self.weights
        shape = (len(w.layers), blocks, w.heads, self.block_size, w.head_dim)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no step of the old graphs may still be running
        old = (self.k, self.v)
        self.drop_graphs()
        # zeros, not empty: masked-out columns still enter the torch path's products, and 0 * NaN = NaN
        self.k = torch.zeros(shape, dtype=w.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=w.dtype, device=self.device)
        if old[0] is not None:
            self.k[:, :held] = old[0]
            self.v[:, :held] = old[1]
        if self.blocks is None:
            self.blocks = BlockManager(blocks, self.block_size)
        else:
            self.blocks.extend(blocks)

    def release(self) -> None:
        """Drop the blocks and graphs (after running out of memory); the next reserve allocates again."""
        self.drop_graphs()
        self.k = self.v = None
        self.blocks = None
        self._freed, self._placed = [], []
        self.table.fill_(TRASH_BLOCK)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def place(self, row: int, first: int, blocks: list[int]) -> None:
        """Row `row`'s table holds `blocks` from its block number `first` on, once the table is next
        read (`_settle`: one copy for every row placed meanwhile, without waiting for the GPU)."""
        self._placed.extend((row, first + i, block) for i, block in enumerate(blocks))

    def write_rows(self, rows: list[int], **values: list) -> None:
        """Set several rows of the step's tensors by name (tokens, col, positions, advance, adapters,
        temperature, top_p, seed, step), one copy each, without waiting for the GPU."""
        self._settle()
        index = _sent(rows, self.device)
        for name, column in values.items():
            target = getattr(self.sampling, name) if hasattr(self.sampling, name) else getattr(self, name)
            target.index_copy_(0, index, _sent(column, self.device, target.dtype))

    def free_row(self, row: int) -> None:
        """Row `row` leaves: from the next step it writes to the trash block and attends to itself.
        Settled with every other row freed before the table is next read: a batch of 128 rows ending
        together takes six fills, not six per row. Blocks placed for the row and not yet settled are
        void (a row placed after this keeps its own)."""
        if any(placed[0] == row for placed in self._placed):
            self._placed = [placed for placed in self._placed if placed[0] != row]
        self._freed.append(row)

    def _settle(self) -> None:
        """Apply the rows freed and the blocks placed since last time, in that order (a slot freed and
        taken again keeps its new blocks): before anything reads the table or writes a row."""
        if self._freed:
            index = _sent(self._freed, self.device)
            for tensor in (self.advance, self.col, self.positions, self.adapters, self.sampling.temperature):
                tensor.index_fill_(0, index, 0)
            self.table.index_fill_(0, index, TRASH_BLOCK)
            self._freed = []
        if self._placed:
            rows, columns, blocks = _sent(list(zip(*self._placed)), self.device)
            self.table.index_put_((rows, columns), blocks)
            self._placed = []

    def keeper(self, rows: list[int], lengths: list[int], skip: list[int], keys: torch.Tensor,
               values: torch.Tensor) -> Callable[[int], None]:
        """`keep(layer)` for a prefill (phi_model.prefill) into one layer's scratch keys and values
        ([n, heads, width, head_dim], left-padded: group row i's columns begin at skip[i]): copies
        them into the blocks of rows[i], its columns 0..lengths[i]-1 (the rows hold those blocks).
        Each token's indices are worked out on the host and copied over at once (on the device,
        repeat_interleave would wait for the GPU to learn its output's size)."""
        self._settle()
        counts = torch.tensor(lengths)
        group = torch.repeat_interleave(torch.arange(len(rows)), counts)  # each token's group row
        column = torch.arange(len(group)) - (torch.cumsum(counts, 0) - counts)[group]  # its column
        source = torch.tensor(skip)[group] + column
        slot = torch.tensor(rows)[group]
        group, column, source, slot = _sent(torch.stack((group, column, source, slot)), self.device)
        block = self.table[slot, column // self.block_size]
        offset = column % self.block_size

        def keep(layer: int) -> None:
            self.k[layer, block, :, offset] = keys[group, :, source]
            self.v[layer, block, :, offset] = values[group, :, source]
        return keep

    def save(self, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """These blocks' keys and values, copied to the host (pinned, without waiting: the copy runs
        after the steps that wrote them and before anything that writes the blocks again)."""
        index = _sent(blocks, self.device)
        pinned = self.device.type == "cuda"
        saved = []
        for pool in (self.k, self.v):
            picked = pool.index_select(1, index)
            saved.append(torch.empty(picked.shape, dtype=picked.dtype, pin_memory=pinned).copy_(picked,
                                                                                               non_blocking=True))
        return saved[0], saved[1]

    def restore(self, saved: tuple[torch.Tensor, torch.Tensor], blocks: list[int]) -> None:
        """`save`'s copy back, into the first of these blocks (a row's, in column order)."""
        index = _sent(blocks[:saved[0].shape[1]], self.device)
        for pool, host in zip((self.k, self.v), saved):
            pool.index_copy_(1, index, host.to(self.device, non_blocking=True))

    # ---- the step ----------------------------------------------------------------------------------

    def state(self, rows: int) -> DecodeState:
        """The decode step's inputs for the first `rows` rows (rows freed or placed so far applied)."""
        self._settle()
        return DecodeState(self.tokens[:rows], self.positions[:rows], self.col[:rows], self.starts[:rows],
                           self.k, self.v, self.table[:rows], self.block_size, self.adapters[:rows])

    def sampling_rows(self, rows: int, nucleus: bool) -> SamplingRows:
        s = self.sampling
        return SamplingRows(s.temperature[:rows], s.top_p[:rows], s.seed[:rows], s.step[:rows], nucleus)

    def reset_rows(self) -> None:
        """Every row free (a batch starts)."""
        self._freed, self._placed = [], []
        for tensor in (self.col, self.positions, self.advance, self.adapters, self.sampling.step):
            tensor.zero_()
        self.sampling.temperature.zero_()
        self.tokens.fill_(self.eos_token_id)
        self.table.fill_(TRASH_BLOCK)

    def graph(self, key, step: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The captured `step` for `key` (captured once per key and pool); its output tensor. The capture's
        warm-up runs write through a table of trash blocks, so no row's keys are touched."""
        if key not in self.graphs:
            with GATE.capture():  # no other thread's GPU work (a server's translators) meanwhile
                self.graphs[key] = self._capture(step)
        return self.graphs[key]

    def drop_graphs(self) -> None:
        # A pool whose graphs are all gone cannot take a new capture: a new pool goes with them.
        self.graphs.clear()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def _capture(self, step: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inputs = (self.table, self.col, self.positions, self.tokens, self.advance)
        saved = [tensor.clone() for tensor in inputs]
        self.table.fill_(TRASH_BLOCK)
        for tensor in (self.col, self.positions):  # in-range values for the warm-up
            tensor.zero_()
        # Warm-up runs (Triton compilation, cuBLAS workspaces) on a side stream, as capture needs.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        for tensor, value in zip(inputs, saved):
            tensor.copy_(value)
        return graph, logits


def _sent(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` (a list, or a host tensor) on `device`, copied without waiting for the GPU: from
    pinned memory where CUDA is, which a non-blocking copy may read after this returns."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return (host.pin_memory() if torch.cuda.is_available() else host).to(device, non_blocking=True)
