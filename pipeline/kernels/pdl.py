"""Programmatic dependent launch (PDL) for the decode kernels (compute capability 9.0 and up).

A kernel launched with PDL is placed on the GPU while the kernel before it (a cuBLAS product) still
drains, and waits for that kernel's results inside (`wait_for_inputs`) instead of being launched
after it. Whether to ask for it is the caller's decision (DecodeConfig.pdl); `pdl_options` only
drops the request where this Triton cannot do it.
"""

from __future__ import annotations

import os

try:  # absent on CPU-only installs, where no kernel here runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Triton 3.4 and later have the wait; its interpreter (TRITON_INTERPRET=1, the tests' way to run
# kernels on the CPU) cannot run the wait's inline PTX.
HAS_GRID_WAIT = (triton is not None and hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
                 and os.environ.get("TRITON_INTERPRET") != "1")


def pdl_options(on: bool) -> dict:
    """Launch options and the kernels' PDL flag: PDL where asked for and this Triton has it."""
    return {"launch_pdl": True, "PDL": True} if on and HAS_GRID_WAIT else {"PDL": False}


if triton is not None:
    if HAS_GRID_WAIT:
        @triton.jit
        def wait_for_inputs():
            """Block until the kernel launched before this one has finished and its writes are visible."""
            tl.extra.cuda.gdc_wait()
    else:  # pragma: no cover - Triton before 3.4, or its interpreter; pdl_options never asks for the wait
        @triton.jit
        def wait_for_inputs():
            pass
