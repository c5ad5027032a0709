"""The part of a cold process's first GPU translation that waits on the disk and the GPU, paid in a
thread while the main thread loads the translators (it was measured beside transformers' import,
which a lean process no longer pays: model_files.py).

A cold process's first translation on CUDA took ~1.2 s more than the same translation of another
shape later in the process (benchmarks/first_translation.py). cProfile of that first use (H200,
Triton's cache warm, docs/benchmarks.md): Triton computes the key of its kernel cache once per
process by reading and hashing its own library (0.43 s, libtriton.so: ~400 MB through sha256);
cuBLAS and SDPA load their kernels at their first calls (~0.25 s); the rest is Python (Triton's
path from its cache to a loaded kernel, its imports, the eager launches). Reading, hashing and
the libraries' loading mostly run outside Python's interpreter lock, so a thread can take them
off the main thread; the Python part would only contend for the lock (a whole made-up
translation run in a thread made the process slower), so it stays where it is. Measured in cold
`ask` processes on one H200 (docs/benchmarks.md): the question's translation 1.32-1.41 s before,
0.72-0.86 s with this, the loading before it no slower within the machine's spread.

Priming only saves time; it never changes a result (it touches no model), and a failure here is
logged, not raised: the translation then pays its own first use, as without it.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

import torch
import torch.nn.functional as F

from pipeline.gpu_gate import GATE

log = logging.getLogger(__name__)


def triton_cache_key() -> bool:
    """Have Triton compute (and keep: it is cached for the process) its kernel cache's key; False
    where Triton, or this internal function of it, is not there (nothing to pay then)."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        return False
    triton_key()
    return True


def first_products(device: torch.device, dtype: torch.dtype, width: int = 512, heads: int = 8) -> None:
    """One of each product the fast translator's first batch runs through a GPU library: matrix
    products with and without a bias (cuBLAS, cuBLASLt's epilogue) and a masked attention (SDPA),
    at the published models' width, so each library loads its kernels now."""
    x = torch.zeros(16, width, device=device, dtype=dtype)
    weight = torch.zeros(4 * width, width, device=device, dtype=dtype)
    F.linear(x, weight)
    F.linear(x, weight, torch.zeros(4 * width, device=device, dtype=dtype))
    q = x.view(1, 16, heads, -1).transpose(1, 2)
    F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(1, 1, 1, 16, dtype=torch.bool, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prime_in_background(device: torch.device, dtype: torch.dtype) -> Future:
    """triton_cache_key and first_products in a thread of their own, as GPU work beside the
    process's others (a capture elsewhere waits for it). The future is True when both ran."""

    def prime() -> bool:
        try:
            keyed = triton_cache_key()
            first_products(device, dtype)
            return keyed
        except Exception as error:  # priming must never be why a translation fails
            log.warning("priming the GPU for translation failed: %s", error)
            return False

    return GATE.in_background(prime, "prime-gpu")
