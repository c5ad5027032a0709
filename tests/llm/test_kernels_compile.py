"""The Triton kernels of the decode path compile for an H100 (sm_90) on a machine without a GPU.

Triton's interpreter (TRITON_INTERPRET=1, the other kernel tests on the CPU) runs a kernel as Python
and takes one side of each branch, so a kernel can pass there and fail to compile on the GPU: a
branch on a tensor compiles both sides, and on 2026-12-08 an attention variant whose other side
could not compile passed every CPU test and failed on an H100 ("CompilationError at 42:27"). Here
each launch is compiled for sm_90 instead of run (Triton's compiler, ptxas included, needs no GPU).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from pipeline.kernels.attention_tiles import ATTENTION_TILES, AttentionConfig  # noqa: E402
from pipeline.kernels.linear import skinny_linear  # noqa: E402
from pipeline.kernels.norm import add_layer_norm  # noqa: E402
from pipeline.kernels.phi_attention import triton_attention  # noqa: E402
from pipeline.llm.phi_model import DecodeState  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
POINTERS = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64",
            torch.int32: "*i32"}


def _signature(kernel: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, compile options) of a launch, as Triton's launcher would work them out."""
    names = [param.name for param in kernel.params]
    bound = dict(zip(names, args)) | {name: value for name, value in kwargs.items() if name in names}
    signature, constexprs = {}, {}
    for index, param in enumerate(kernel.params):
        value = bound[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTERS[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, constexprs, {name: value for name, value in kwargs.items() if name not in names}


@pytest.fixture
def compiled(monkeypatch) -> list[str]:
    """Every kernel launch compiles for sm_90 instead of running; the names of those compiled."""
    names: list[str] = []

    def compile_instead(kernel, *args, grid, warmup, **kwargs):
        signature, constexprs, options = _signature(kernel, args, kwargs)
        triton.compile(ASTSource(kernel, signature, constexprs), target=H100, options=options)
        names.append(kernel.__name__)

    monkeypatch.setattr(JITFunction, "run", compile_instead)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU's Triton (3.6) fuses; 3.9 warns it will stop
    return names


def _attention_variants() -> list[AttentionConfig]:
    """The tiles in use, each reading the table per tile, once, and once finding consecutive blocks by
    arithmetic; the tuner's other forms (CUDA cores, splits, wider tiles)."""
    variants = []
    for _, tile in ATTENTION_TILES:
        variants += [replace(tile, table_once=False, consecutive=False), replace(tile, table_once=True,
                     consecutive=False), replace(tile, table_once=True, consecutive=True)]
    variants += [AttentionConfig("sum", 16, 2, 3, 1), AttentionConfig("sum", 16, 2, 3, 3, table_once=True),
                 AttentionConfig("dot", 32, 2, 3, 3, table_once=True, consecutive=True),
                 AttentionConfig("dot", 64, 4, 4, 1)]
    return variants


@pytest.mark.parametrize("config", _attention_variants(), ids=str)
def test_every_attention_variant_compiles_for_an_h100(compiled, config):
    heads, head_dim, rows, block_size = 32, 80, 2, 32  # phi-2's heads
    long = dict(dtype=torch.long)
    keys = torch.zeros(9, heads, block_size, head_dim, dtype=torch.float16)
    state = DecodeState(torch.zeros(rows, **long), torch.zeros(rows, **long), torch.zeros(rows, **long),
                        torch.zeros(rows, **long), keys, keys.clone(), torch.zeros(rows, 64, **long), block_size)
    qkv = torch.zeros(rows, 3 * heads * head_dim, dtype=torch.float16)
    tables = torch.zeros(2048, 32)
    shape = SimpleNamespace(heads=heads, head_dim=head_dim, rotary_dim=32)
    for rope_inside in (True, False):
        triton_attention(qkv, state, keys, keys.clone(), tables, tables, shape, config, rope_inside=rope_inside)
    assert compiled and all(name.startswith("_") for name in compiled)


def test_the_layer_norm_and_skinny_product_compile_for_an_h100(compiled):
    hidden = torch.zeros(4, 2560, dtype=torch.float16)
    bias = torch.zeros(2560, dtype=torch.float16)
    add_layer_norm(hidden, (bias, hidden.clone()), bias, bias, 1e-5, warps=16, pdl=False)
    skinny_linear(hidden, torch.zeros(10240, 2560, dtype=torch.float16), torch.zeros(10240, dtype=torch.float16),
                  gelu=True)
    assert compiled == ["_add_layer_norm_kernel", "_skinny_linear_kernel"]
