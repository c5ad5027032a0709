"""Several LoRA adapters on one copy of phi-2's weights: each row of a batch applies its own, unmerged.

A merged adapter (adapters.py) changes the base weights, so a base and its fine-tunes cannot decode
together. Unmerged, as vLLM's multi-LoRA, S-LoRA and punica do, the base product runs once for every
row and each row adds its adapter's low-rank update: y = x W^T + s (x A^T) B^T.

With the few adapters one server holds, the factors of one layer are stacked side by side, all
adapters' ranks in a row: `x @ A_all^T` gives every row the r columns of every adapter, a mask keeps
the row's own adapter's columns (none for a base row: its update is exactly zero), and one product
with `B_all` adds the update. Each factor is read once per step whatever the batch (a gather per
row would read it once per row), every shape is fixed, and the tensors keep their addresses, so
the fast engine's CUDA graphs capture the LoRA work with the rest of the step. The layouts follow
the fast engine's fused products: [q k v fc1] read the same input (factors `in_a`, `in_b`, block
diagonal in the outputs), [dense fc2] add to the same output (`out_a` block diagonal in the inputs,
`out_b`). The single projections' factors are views of those.

`read_factors` gets an adapter's factors and scalings from peft itself (rank and alpha patterns,
rsLoRA), then takes peft's wrappers out again: the model keeps its plain modules and weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pipeline.llm.adapters import AdapterError, AdapterSource, undo_wrappers, inject_lora

TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(TARGETS) + r")$")
_PEFT_NAME = "multi_lora_read"


@dataclass
class AdapterFactors:
    """One adapter's LoRA factors: (layer, target) -> (A [r, in], B scaled by its scaling [out, r])."""

    name: str
    rank: int  # the largest rank over its modules; smaller ones are padded with zeros
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def unshareable_reason(adapter: AdapterSource) -> str | None:
    """Why `adapter` cannot be applied unmerged beside its base (None: it can)."""
    whole = sorted(key for key in adapter.shapes if ".lora_" not in key)
    if whole:
        return f"it replaces whole tensors ({whole[0].removeprefix('base_model.model.')}...)"
    for key in adapter.shapes:
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        if not _MODULE.search(module):
            return f"it adapts {module}; shared serving applies LoRA to {', '.join(TARGETS)} only"
    return None


@torch.no_grad()
def read_factors(model: torch.nn.Module, adapter: AdapterSource) -> AdapterFactors:
    """The adapter's factors as peft loads them onto `model` (float32, on the model's device)."""
    from peft.tuners.lora import LoraLayer

    reason = unshareable_reason(adapter)
    if reason is not None:
        raise AdapterError(f"adapter '{adapter.name}' cannot share its base's weights unmerged: {reason}")
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        inject_lora(model, adapter, _PEFT_NAME)
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and _PEFT_NAME in module.lora_A:
                layer, target = _MODULE.search(name).groups()
                a = module.lora_A[_PEFT_NAME].weight.float()
                b = module.lora_B[_PEFT_NAME].weight.float() * module.scaling[_PEFT_NAME]
                factors[(int(layer), target)] = (a.clone(), b.clone())
    except (RuntimeError, ValueError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterError(f"cannot load adapter '{adapter.name}': {message}") from None
    finally:
        undo_wrappers(model)
    rank = max((a.shape[0] for a, _ in factors.values()), default=0)
    return AdapterFactors(adapter.name, rank, factors)


@dataclass
class _LayerFactors:
    in_a: torch.Tensor  # [4R, hidden]: q, k, v, fc1 blocks of R rows
    in_b: torch.Tensor  # [4R, 3 hidden + inner], block diagonal
    out_a: torch.Tensor  # [2R, hidden + inner], block diagonal: dense reads attention, fc2 the GELU
    out_b: torch.Tensor  # [2R, hidden]


class MultiLora:
    """Every loaded adapter's factors, stacked per layer (see the module docstring); index 0 is the base."""

    def __init__(self, adapters: list[AdapterFactors], layers: int, hidden: int, inner: int,
                 dtype: torch.dtype, device: torch.device):
        self.names = [a.name for a in adapters]
        self.hidden, self.inner = hidden, inner
        ranks = [a.rank for a in adapters]
        self.rank = total = sum(ranks)
        # owner[j]: the adapter (1-based) whose update column j is
        self.owner = torch.repeat_interleave(torch.arange(1, len(adapters) + 1), torch.tensor(ranks)).to(device)
        offsets = [sum(ranks[:i]) for i in range(len(adapters))]
        out_cols = {"q_proj": (0, hidden), "k_proj": (hidden, 2 * hidden), "v_proj": (2 * hidden, 3 * hidden),
                    "fc1": (3 * hidden, 3 * hidden + inner)}
        self.layers = []
        for index in range(layers):
            zeros = dict(dtype=torch.float32)
            in_a, in_b = torch.zeros(4 * total, hidden, **zeros), torch.zeros(4 * total, 3 * hidden + inner, **zeros)
            out_a, out_b = torch.zeros(2 * total, hidden + inner, **zeros), torch.zeros(2 * total, hidden, **zeros)
            for adapter, offset in zip(adapters, offsets):
                for block, target in enumerate(("q_proj", "k_proj", "v_proj", "fc1")):
                    if (index, target) in adapter.factors:
                        a, b = adapter.factors[(index, target)]
                        rows = slice(block * total + offset, block * total + offset + a.shape[0])
                        in_a[rows] = a.cpu()
                        in_b[rows, slice(*out_cols[target])] = b.t().cpu()
                for block, (target, cols) in enumerate((("dense", slice(0, hidden)),
                                                        ("fc2", slice(hidden, hidden + inner)))):
                    if (index, target) in adapter.factors:
                        a, b = adapter.factors[(index, target)]
                        rows = slice(block * total + offset, block * total + offset + a.shape[0])
                        out_a[rows, cols] = a.cpu()
                        out_b[rows] = b.t().cpu()
            self.layers.append(_LayerFactors(*(t.to(device, dtype) for t in (in_a, in_b, out_a, out_b))))
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers for t in vars(layer).values())

    def select(self, adapters: torch.Tensor, per_row: int = 1) -> "Selection":
        """The LoRA of one forward: row i (its `per_row` tokens, consecutive) applies adapters[i]."""
        return Selection(self, adapters, per_row)


def selection(lora: MultiLora | None, adapters: torch.Tensor | None, per_row: int = 1) -> "Selection | None":
    """None (no LoRA work at all) unless adapters are loaded and the rows' indices are given."""
    return None if lora is None or adapters is None else lora.select(adapters, per_row)


class Selection:
    """Masks for one forward's rows, computed once and shared by every layer (`layer(i)`)."""

    def __init__(self, lora: MultiLora, adapters: torch.Tensor, per_row: int):
        self.lora = lora
        rows = adapters if per_row == 1 else adapters.repeat_interleave(per_row)
        self.masks = {1: (lora.owner[None, :] == rows[:, None]).to(lora.dtype)}  # [tokens, R]; tiled on use

    def mask(self, tiles: int) -> torch.Tensor:
        if tiles not in self.masks:
            self.masks[tiles] = self.masks[1].repeat(1, tiles)
        return self.masks[tiles]

    def layer(self, index: int) -> "LayerLora":
        return LayerLora(self, self.lora.layers[index])


class LayerLora:
    """One layer's LoRA updates for the selected rows, by the product they belong to."""

    def __init__(self, selection: Selection, factors: _LayerFactors):
        self.selection = selection
        self.factors = factors
        self.rank, self.hidden = selection.lora.rank, selection.lora.hidden

    def _group(self, group: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        f, r, h = self.factors, self.rank, self.hidden
        if group == "in":
            return f.in_a, f.in_b, 4
        if group == "qkv":
            return f.in_a[:3 * r], f.in_b[:3 * r, :3 * h], 3
        if group == "fc1":
            return f.in_a[3 * r:], f.in_b[3 * r:, 3 * h:], 1
        if group == "out":
            return f.out_a, f.out_b, 2
        if group == "dense":
            return f.out_a[:r, :h], f.out_b[:r], 1
        if group == "fc2":
            return f.out_a[r:, h:], f.out_b[r:], 1
        raise ValueError(group)

    def add(self, group: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += each row's update of the product `group` of x (in place; returns out)."""
        a, b, tiles = self._group(group)
        return out.addmm_((x @ a.t()).mul_(self.selection.mask(tiles)), b)  # x, out: [tokens, features]

    def begin(self, group: str, x: torch.Tensor):
        """Start the update of `group` before its base product: on CUDA the masked low-rank product of x
        runs on a stream of its own beside the base product (it is a few small kernels, which the wide
        product hides); `finish` adds it. The tensors the side stream reads (x, the masks) are made
        before its wait, and what it makes is read after the join: any reuse of memory is ordered."""
        a, b, tiles = self._group(group)
        if not x.is_cuda:
            return (x @ a.t()).mul_(self.selection.mask(tiles)), b, None
        mask = self.selection.mask(tiles)
        side = _lora_stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            low = (x @ a.t()).mul_(mask)
        return low, b, side

    @staticmethod
    def finish(started, out: torch.Tensor) -> torch.Tensor:
        low, b, side = started
        if side is not None:
            torch.cuda.current_stream(out.device).wait_stream(side)
        return out.addmm_(low, b)


_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _lora_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]
