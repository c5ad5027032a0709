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

BLOCK_SIZE = 32  # columns per block: a multiple of every attention tile (kernels/phi_attention.py)
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
        self.table.fill_(TRASH_BLOCK)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def place(self, row: int, first: int, blocks: list[int]) -> None:
        """Write `blocks` into row `row`'s table from its block number `first` on (without waiting for
        the GPU: the host list is copied from pinned memory that nothing writes again)."""
        if blocks:
            self.table[row, first:first + len(blocks)].copy_(_staged(blocks), non_blocking=True)

    def write_rows(self, rows: list[int], **values: list) -> None:
        """Set several rows of the step's tensors by name (tokens, col, positions, advance, adapters,
        temperature, top_p, seed, step), one copy each, without waiting for the GPU."""
        index = _staged(rows).to(self.device, non_blocking=True)
        for name, column in values.items():
            target = getattr(self.sampling, name) if hasattr(self.sampling, name) else getattr(self, name)
            target.index_copy_(0, index, _staged(column, target.dtype).to(self.device, non_blocking=True))

    def free_row(self, row: int) -> None:
        """Row `row` leaves: from the next step it writes to the trash block and attends to itself.
        (Fills on the device: write_rows would pin and copy five one-element lists for every row that ends.)"""
        for tensor in (self.advance, self.col, self.positions, self.adapters, self.sampling.temperature):
            tensor[row] = 0
        self.table[row].fill_(TRASH_BLOCK)

    def keeper(self, rows: list[int], lengths: list[int], skip: list[int], keys: torch.Tensor,
               values: torch.Tensor) -> Callable[[int], None]:
        """`keep(layer)` for a prefill (phi_model.prefill) into one layer's scratch keys and values
        ([n, heads, width, head_dim], left-padded: group row i's columns begin at skip[i]): copies
        them into the blocks of rows[i], its columns 0..lengths[i]-1 (the rows hold those blocks)."""
        device = self.device
        counts = _staged(lengths).to(device, non_blocking=True)
        group = torch.repeat_interleave(torch.arange(len(rows), device=device), counts)  # each token's group row
        before = torch.cumsum(counts, 0) - counts  # tokens of the group rows before each
        column = torch.arange(int(sum(lengths)), device=device) - before[group]  # each token's column
        source = _staged(skip).to(device, non_blocking=True)[group] + column
        block = self.table[_staged(rows).to(device, non_blocking=True)[group], column // self.block_size]
        offset = column % self.block_size

        def keep(layer: int) -> None:
            self.k[layer, block, :, offset] = keys[group, :, source]
            self.v[layer, block, :, offset] = values[group, :, source]
        return keep

    def save(self, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """These blocks' keys and values, copied to the host (pinned, without waiting: the copy runs
        after the steps that wrote them and before anything that writes the blocks again)."""
        index = _staged(blocks).to(self.device, non_blocking=True)
        pinned = self.device.type == "cuda"
        saved = []
        for pool in (self.k, self.v):
            picked = pool.index_select(1, index)
            saved.append(torch.empty(picked.shape, dtype=picked.dtype, pin_memory=pinned).copy_(picked,
                                                                                               non_blocking=True))
        return saved[0], saved[1]

    def restore(self, saved: tuple[torch.Tensor, torch.Tensor], blocks: list[int]) -> None:
        """`save`'s copy back, into the first of these blocks (a row's, in column order)."""
        index = _staged(blocks[:saved[0].shape[1]]).to(self.device, non_blocking=True)
        for pool, host in zip((self.k, self.v), saved):
            pool.index_copy_(1, index, host.to(self.device, non_blocking=True))

    # ---- the step ----------------------------------------------------------------------------------

    def state(self, rows: int) -> DecodeState:
        """The decode step's inputs for the first `rows` rows."""
        return DecodeState(self.tokens[:rows], self.positions[:rows], self.col[:rows], self.starts[:rows],
                           self.k, self.v, self.table[:rows], self.block_size, self.adapters[:rows])

    def sampling_rows(self, rows: int, nucleus: bool) -> SamplingRows:
        s = self.sampling
        return SamplingRows(s.temperature[:rows], s.top_p[:rows], s.seed[:rows], s.step[:rows], nucleus)

    def reset_rows(self) -> None:
        """Every row free (a batch starts)."""
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


def _staged(values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host tensor of `values` that a non-blocking copy may read later (pinned where CUDA is)."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.pin_memory() if torch.cuda.is_available() else tensor
