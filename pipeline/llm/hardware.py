"""What runs where: the answer stage's choices (dtype, engine, Triton kernels, CUDA graphs, PDL) from
what the machine has, as one pure function of a `Hardware` description, so each row of the README's
hardware table is a test on any machine.

- dtype `auto`: bfloat16 from compute capability 8.0 (native there), float16 below (a T4 says yes to
  `torch.cuda.is_bf16_supported()` through emulation, so the capability decides), float32 on the
  CPU. In float16, attention scores are summed in fp32 on every path: phi-2 overflows in float16
  attention otherwise (transformers PR #28163).
- Triton kernels from 8.0 (Triton's supported GPUs) with Triton 3.0 or later; below that the fast
  engine keeps its CUDA graphs and static cache and attends with SDPA.
- Programmatic dependent launch from 9.0 (Hopper), with the Triton kernels, on Triton 3.4 or later.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pipeline.errors import DeviceError
from pipeline.llm.decode_config import DEFAULT_DECODE, DecodeConfig
from pipeline.llm.memory import cuda_index
from pipeline.loading import DTYPES, auto_dtype

TRITON_MIN = (3, 0)  # tl.range(num_stages=...) and tl.dot(input_precision=...)
PDL_TRITON_MIN = (3, 4)  # tl.extra.cuda.gdc_wait
TRITON_CAPABILITY = (8, 0)
PDL_CAPABILITY = (9, 0)


@dataclass(frozen=True)
class Hardware:
    """What the decisions depend on. Memory in bytes; None where there is no GPU."""

    device: str  # "cpu", "cuda", "cuda:1"
    name: str = "CPU"
    capability: tuple[int, int] | None = None
    total_memory: int | None = None
    free_memory: int | None = None
    triton: str | None = None  # Triton's version, None when not installed
    torch: str = torch.__version__

    @property
    def cuda(self) -> bool:
        return self.capability is not None


@dataclass(frozen=True)
class Plan:
    """The answer stage's choices here, each with its reason."""

    dtype: str  # "float32", "float16", "bfloat16"
    engine: str  # "fast" or "transformers"
    triton_kernels: bool
    cuda_graphs: bool
    pdl: bool
    fp32_attention_scores: bool
    reasons: tuple[tuple[str, str], ...]  # (choice, why), in the order above
    fallbacks: tuple[str, ...]  # what `auto` did not take here, and why

    def decode_config(self, base: DecodeConfig = DEFAULT_DECODE) -> DecodeConfig:
        return replace(base, pdl=self.pdl, fp32_attention_scores=self.fp32_attention_scores)

    def summary(self) -> str:
        """One line: what runs, and what it fell back from (empty when nothing)."""
        parts = [self.dtype, f"{self.engine} engine"]
        if self.engine == "fast":
            parts.append("Triton kernels" if self.triton_kernels else "SDPA attention")
            parts.append("CUDA graphs" if self.cuda_graphs else "no CUDA graphs")
            if self.pdl:
                parts.append("PDL")
        if self.fp32_attention_scores:
            parts.append("fp32 attention scores")
        line = ", ".join(parts)
        return line + (f" (fell back from: {'; '.join(self.fallbacks)})" if self.fallbacks else "")


def _version(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 0)
    numbers = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple((numbers + [0, 0])[:2])


def _cc(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def plan(hw: Hardware, *, dtype: str | None = "auto", engine: str = "auto") -> Plan:
    """The choices for `hw` under the user's --dtype and --engine (pure: no device is touched)."""
    reasons: list[tuple[str, str]] = []
    fallbacks: list[str] = []
    if dtype in (None, "auto"):
        chosen = auto_dtype("cuda" if hw.cuda else "cpu", hw.capability)
        if not hw.cuda:
            why = "the CPU: float16 products are slow or missing there"
        elif chosen == torch.bfloat16:
            why = f"compute capability {_cc(hw.capability)} has native bfloat16"
        else:
            why = f"compute capability {_cc(hw.capability)} < 8.0 has no native bfloat16"
            fallbacks.append(f"bfloat16 ({why})")
    elif dtype not in DTYPES:
        raise DeviceError(f"unknown dtype '{dtype}': use auto, float16, bfloat16 or float32")
    else:
        chosen = DTYPES[dtype]
        why = f"--dtype {dtype}"
        if chosen == torch.bfloat16 and hw.cuda and hw.capability < (8, 0):
            why += f" (emulated on compute capability {_cc(hw.capability)}: slow)"
    dtype_name = str(chosen).removeprefix("torch.")
    reasons.append(("dtype " + dtype_name, why))

    if engine == "transformers" or not hw.cuda:
        engine_name = "transformers"
        why = "--engine transformers" if engine == "transformers" else "the fast engine needs a CUDA GPU"
    else:
        engine_name, why = "fast", "a CUDA GPU: static KV cache and CUDA-graph decode steps"
    reasons.append((f"engine {engine_name}", why))
    fast = engine_name == "fast"

    triton_version = _version(hw.triton)
    if not hw.cuda:
        triton_ok, why = False, "no CUDA GPU"
    elif hw.triton is None:
        triton_ok, why = False, "Triton is not installed"
    elif triton_version < TRITON_MIN:
        triton_ok, why = False, f"Triton {hw.triton} < {TRITON_MIN[0]}.{TRITON_MIN[1]}"
    elif hw.capability < TRITON_CAPABILITY:
        triton_ok, why = False, f"compute capability {_cc(hw.capability)} < 8.0"
    else:
        triton_ok, why = True, f"Triton {hw.triton} on compute capability {_cc(hw.capability)}"
    if fast and not triton_ok and hw.cuda:
        fallbacks.append(f"Triton kernels ({why}): SDPA attention")
    triton_ok = triton_ok and fast
    reasons.append((f"Triton kernels {'on' if triton_ok else 'off'}", why if fast else "not the fast engine"))

    reasons.append((f"CUDA graphs {'on' if fast else 'off'}",
                    "one graph per batch-size bucket" if fast else "not the fast engine"))

    if not triton_ok:
        pdl_ok, why = False, "needs the Triton kernels"
    elif hw.capability < PDL_CAPABILITY:
        pdl_ok, why = False, f"compute capability {_cc(hw.capability)} < 9.0"
    elif triton_version < PDL_TRITON_MIN:
        pdl_ok, why = False, f"Triton {hw.triton} < {PDL_TRITON_MIN[0]}.{PDL_TRITON_MIN[1]}"
    else:
        pdl_ok, why = True, f"compute capability {_cc(hw.capability)}"
    if triton_ok and not pdl_ok:
        fallbacks.append(f"programmatic dependent launch ({why})")
    reasons.append((f"PDL {'on' if pdl_ok else 'off'}", why))

    fp32_scores = chosen == torch.float16
    reasons.append((f"fp32 attention scores {'on' if fp32_scores else 'off'}",
                    "float16 overflows in phi-2's attention" if fp32_scores else f"{dtype_name} does not overflow there"))
    return Plan(dtype_name, engine_name, triton_ok, fast, pdl_ok, fp32_scores, tuple(reasons), tuple(fallbacks))


def probe(device: torch.device | str) -> Hardware:
    """The Hardware of `device` on this machine (touches the GPU: memory and properties)."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type != "cuda":
        return Hardware(str(device), triton=triton_version)
    index = cuda_index(device)
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return Hardware(str(device), props.name, torch.cuda.get_device_capability(index), total, free, triton_version)
