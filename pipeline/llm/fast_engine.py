"""FastPhiEngine: phi-2 generation on a paged answer cache with one CUDA graph per batch size.

The engine contract is `engine.py`'s. What makes it fast:
- the cache (answer_cache.py) is a pool of blocks allocated once and handed to rows as their tokens
  grow, so a decode step allocates nothing and reads fixed addresses;
- the decode step (phi_model.decode_step) is captured as a CUDA graph per batch-size bucket, when a
  call first needs that bucket, and replayed for every token: one launch instead of ~300 kernels;
- the host reads each step's tokens one step late (fast_batch.py), so the GPU never waits for it.

`generate` and `stream` run on the continuous batch (fast_batch.py), the server's own loop: a row
that ends leaves at once and the next prompt takes its place. Without graphs (use_graphs=False) the
same code runs op by op, also on the CPU, which is how CI checks it against transformers.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import replace
from typing import Iterator

import torch

from pipeline.errors import InputTooLongError, ModelLoadError
from pipeline.llm.answer_cache import AnswerCache
from pipeline.llm.decode_config import DEFAULT_DECODE, DecodeConfig
from pipeline.llm.engine import Generated, StopCheck, finish_row, generate_shrinking, shifted
from pipeline.llm.memory import usable_memory
from pipeline.llm.phi_model import DecodeState, decode_step, unsupported_config
from pipeline.llm.phi_weights import phi_weights, rope_tables
from pipeline.kernels.phi_attention import triton
from pipeline.spec import GenerationSettings

# What a serving pool leaves of --gpu-memory beside the models: the prefill's and the step's
# activations, the graphs' memory, the sampler's and the translators' working memory.
SERVING_HEADROOM = 2 << 30


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


class FastPhiEngine:
    """Greedy or seeded top-p generation for phi-2-family models; see the module docstring."""

    name = "fast"

    @staticmethod
    def unsupported_reason(model, device, *, use_graphs: bool | None = None) -> str | None:
        """None when this engine can serve `model` on `device`, else why not (one line)."""
        config = getattr(model, "config", None) if hasattr(model, "lm_head") else None  # None: no causal LM
        reason = unsupported_config(config, type(model).__name__)
        if reason is not None:
            return reason
        device = torch.device(device)
        if _model_device(model).type != device.type:
            return f"the model's weights are on {_model_device(model)}, not {device}"
        if device.type == "cuda" or (device.type == "cpu" and use_graphs is False):
            return None
        return f"the fast engine needs a CUDA device, not {device.type}"

    def __init__(self, model, eos_token_id: int, *, max_batch_size: int = 128, max_seq_len: int = 2048,
                 use_graphs: bool | None = None, use_triton: bool | None = None, check_every: int = 16,
                 config: DecodeConfig = DEFAULT_DECODE):
        self.device = _model_device(model)
        self.config = config
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda if use_graphs is None else use_graphs
        reason = self.unsupported_reason(model, self.device, use_graphs=self.use_graphs)
        if reason is not None:
            raise ModelLoadError(reason)
        self.use_triton = (cuda and triton is not None) if use_triton is None else use_triton
        self.eos_token_id = eos_token_id
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.check_every = check_every  # generate runs its stop check on a row every this many tokens
        self.weights = phi_weights(model)
        self.cos, self.sin = rope_tables(self.weights, self.max_seq_len)
        self.cache = AnswerCache(self.weights, self.device, rows=max_batch_size, max_seq_len=self.max_seq_len,
                                 eos_token_id=eos_token_id, use_graphs=self.use_graphs)
        self._adapters: list = []  # multi_lora.AdapterFactors, index + 1 in the rows' adapters

    # ---- public API ------------------------------------------------------------------------------

    def add_adapter(self, adapter, model) -> int:
        """Load the LoRA adapter `adapter` (an AdapterSource of `model`, this engine's model) to be
        applied unmerged by the rows that ask for it; returns its index for `generate(adapters=...)`.
        Its factors join the stacked ones (multi_lora.py), so the graphs are captured again."""
        from pipeline.llm.multi_lora import MultiLora, read_factors

        self._adapters.append(read_factors(model, adapter))
        w = self.weights
        self.weights.lora = MultiLora(self._adapters, len(w.layers), w.layers[0].hidden,
                                      w.layers[0].fc1_w.shape[0], w.dtype, self.device)
        self.cache.drop_graphs()
        return len(self._adapters)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], settings: GenerationSettings,
                 stop_check: StopCheck | None = None, adapters: list[int] | None = None) -> list[Generated]:
        """`adapters[i]`: the LoRA adapter prompt i applies (add_adapter's index; 0 or None: the base)."""
        def run(group: list[list[int]], first: int) -> list[Generated]:
            check = shifted(stop_check, first)  # rows are numbered in the whole call, as the check knows them
            chosen = None if adapters is None else adapters[first:first + len(group)]
            rows: list[list[int]] = [[] for _ in group]
            for index, token in self._decode(group, settings, check, chosen, self.check_every):
                rows[index].append(token)
            return [finish_row(row, self.eos_token_id, settings.max_new_tokens, check, index)
                    for index, row in enumerate(rows)]

        if not prompts:
            return []
        return generate_shrinking(prompts, run, min(len(prompts), self.max_batch_size), self.cache.release)

    def stream(self, prompt: list[int], settings: GenerationSettings,
               stop_check: StopCheck | None = None, adapter: int = 0) -> Iterator[int]:
        """Yield generated ids as they come; ends at end-of-text, a stop sequence or the length.

        Tokens reach the host one step late (the GPU runs the next step meanwhile). The stop check
        runs on each token here: they are on the host anyway, so it costs no extra sync.
        """
        with torch.inference_mode():
            for _, token in self._decode([prompt], settings, stop_check, [adapter], 1):
                if token == self.eos_token_id:
                    return
                yield token

    def decode_batch(self, max_rows: int = 64, gpu_memory: float | None = None):
        """Continuous batching on this engine's cache and graphs (llm/fast_batch.py); `gpu_memory`:
        the bytes the serving process may take, which sizes the block pool once."""
        from pipeline.llm.fast_batch import FastDecodeBatch

        return FastDecodeBatch(self, max_rows, gpu_memory=gpu_memory)

    # ---- what the batch runs ---------------------------------------------------------------------

    def bucket(self, count: int) -> int:
        """Graphs exist per power-of-two batch size; a batch runs in the smallest that holds it."""
        if count > self.max_batch_size:
            raise ValueError(f"batch of {count} exceeds max_batch_size {self.max_batch_size}")
        size = 1
        while size < count:
            size *= 2
        return min(size, self.max_batch_size)

    def decode(self, state: DecodeState, rows: int, kv_len: int | None = None) -> torch.Tensor:
        """One decode step, then move each live row to its next column (inside the graph when captured).

        The clamps keep a row that stepped past its end (the batch learns of an end one step late)
        inside its table and the rotary tables; such a row's tokens are discarded."""
        logits = decode_step(self.weights, state, self.cos, self.sin, use_triton=self.use_triton,
                             kv_len=kv_len, attention=self.config.attention(rows), config=self.config)
        advance = self.cache.advance[:rows]
        state.col.add_(advance).clamp_(max=self.max_seq_len - 1)
        state.positions.add_(advance).clamp_(max=self.max_seq_len - 1)
        return logits

    def serving_blocks(self, gpu_memory: float, prefill_tokens: int) -> int:
        """Blocks of a server's pool: what `gpu_memory` bytes hold beside what this process has
        allocated (the models) and SERVING_HEADROOM, no more than every row at the full context."""
        cache = self.cache
        most = cache.rows * cache.blocks_per_row + 1
        if self.device.type != "cuda":
            return most
        room = min(gpu_memory - torch.cuda.memory_allocated(self.device), usable_memory(self.device))
        blocks = cache.blocks_within(room - SERVING_HEADROOM)
        if blocks < cache.blocks_per_row + 1:
            raise ModelLoadError(
                f"--gpu-memory leaves {max(room, 0) / 2**30:.1f} GiB beside the models, too little for the"
                f" answer cache of one {self.max_seq_len}-token row and {SERVING_HEADROOM / 2**30:.0f} GiB"
                " of working memory; give it more")
        return min(blocks, most)

    # ---- generate and stream on the batch ----------------------------------------------------------

    def _decode(self, prompts: list[list[int]], settings: GenerationSettings, stop_check: StopCheck | None,
                adapters: list[int] | None, every: int) -> Iterator[tuple[int, int]]:
        """(prompt index, token) as the rows decode, end-of-text included; each row ends at end-of-text,
        its length, or where stop_check (run every `every` tokens) finds its answer ended."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        if width >= self.max_seq_len:
            raise InputTooLongError(
                f"the prompt has {width} tokens; the answer model reads at most {self.max_seq_len - 1}")
        rows = [replace(settings, max_new_tokens=min(settings.max_new_tokens, self.max_seq_len - len(p)))
                for p in prompts]
        batch = self.decode_batch(self.bucket(len(prompts)))
        size = self.cache.block_size
        batch.reserve(1 + sum(-(-(len(p) + s.max_new_tokens) // size) for p, s in zip(prompts, rows)))
        adapters = adapters or [0] * len(prompts)
        waiting, live, ids = deque(range(len(prompts))), {}, [[] for _ in prompts]

        def ended(index: int, token: int) -> bool:
            count = len(ids[index])
            if token == self.eos_token_id or count >= rows[index].max_new_tokens:
                return True
            return stop_check is not None and count % every == 0 and stop_check(index, ids[index])

        def settle(events: list[tuple[int, int, int | BaseException]]) -> Iterator[tuple[int, int]]:
            for key, index, token in events:
                if isinstance(token, BaseException):
                    raise token
                ids[index].append(token)
                yield index, token
                if ended(index, token):
                    batch.drop(key)
                    del live[key]

        try:
            while waiting or live:
                heads = [len(prompts[i]) for i in itertools.islice(waiting, batch.room())]
                joining = [waiting.popleft() for _ in range(batch.joinable(heads))]
                if joining:
                    added = batch.add([(prompts[i], rows[i], adapters[i]) for i in joining])
                    events = [(key, index, first) for index, (key, first) in zip(joining, added)]
                    live.update((key, index) for key, index, _ in events)
                    yield from settle(events)
                if live:  # none left when every row ended on its first token: no step is run for nobody
                    yield from settle([(key, live[key], token) for key, token in batch.step().items()])
        finally:
            for key in live:
                batch.drop(key)
