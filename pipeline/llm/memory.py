"""How much GPU memory the answer stage may use, and how many rows fit in it (pure where it can be)."""

from __future__ import annotations

import torch

CACHE_FIT_SHARE = 0.7  # share of usable GPU memory a batch's KV cache may take (the rest: activations, graphs)


def cuda_index(device: torch.device | str) -> int:
    """The card's number: "cuda" alone means the current one. torch's per-process cap takes only a
    numbered device (set_per_process_memory_fraction(f, torch.device("cuda")) raises ValueError)."""
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def usable_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`: free on the card plus what torch's caching
    allocator holds unused, within the per-process cap (torch.cuda.set_per_process_memory_fraction)."""
    device = cuda_index(device)
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    usable = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        usable = min(usable, int(fraction(device) * total) - allocated)
    return max(usable, 0)


def rows_that_fit(wanted: int, bytes_per_row: int, budget: float) -> int:
    """The most rows, up to `wanted`, whose cache fits in `budget` bytes: `wanted` itself when it
    fits, else the largest power of two that does (graph buckets are powers of two); at least 1."""
    if wanted * bytes_per_row <= budget:
        return wanted
    rows = 1
    while rows * 2 < wanted and rows * 2 * bytes_per_row <= budget:
        rows *= 2
    return rows


DEFAULT_GPU_MEMORY = 0.9  # a server's share of the card (as vLLM's --gpu-memory-utilization)


def limit_process(amount: float, device: torch.device) -> int | None:
    """Hold this process to `amount` of `device`'s memory (a fraction of the card up to 1, or bytes
    above 1) through torch's per-process cap, so the models, the answer cache and the translators'
    work all count; returns the bytes it may take (None off CUDA, where nothing is capped)."""
    if torch.device(device).type != "cuda":
        return None
    device = cuda_index(device)
    total = torch.cuda.get_device_properties(device).total_memory
    limit = int(amount * total) if amount <= 1 else int(amount)
    if limit > total:
        from pipeline.errors import SettingsError

        raise SettingsError(f"--gpu-memory asks for {limit / 2**30:.1f} GiB; the card has {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
    return limit
