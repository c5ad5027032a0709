"""y = x @ weight.T + bias through cuBLASLt with a chosen algorithm: decode_step_study.py --lt-algos.

torch's addmm takes the first algorithm cuBLASLt's heuristic proposes, and torch offers no way to
choose another (its TunableOp tunes GEMMs on ROCm only). The study times every algorithm the
heuristic lists for the decode step's products on the real weights, to see whether choosing would
pay. It did not pay enough to put a ctypes binding into the engine (docs/benchmarks.md has the
figures), so this stays a measuring tool. Calls go to the libcublasLt that torch itself has loaded;
the products are capturable in CUDA graphs like torch's own (a fixed workspace, the current stream).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

_COMPUTE_32F = 68  # cublasComputeType_t: fp32 accumulation, as torch uses for fp16 products
_R_32F, _R_16F, _R_16BF = 0, 2, 14  # cudaDataType_t
_DTYPES = {torch.float16: _R_16F, torch.bfloat16: _R_16BF, torch.float32: _R_32F}
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_EPILOGUE_DEFAULT, _EPILOGUE_BIAS, _EPILOGUE_GELU_BIAS = 1, 4, 36
_OP_N, _OP_T = 0, 1
_PREF_MAX_WORKSPACE_BYTES = 1
_CONFIG_ID, _CONFIG_TILE_ID, _CONFIG_SPLITK_NUM, _CONFIG_STAGES_ID = 0, 1, 2, 6
WORKSPACE_BYTES = 32 << 20


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class LtError(RuntimeError):
    pass


def _loaded_library() -> ctypes.CDLL:
    """The libcublasLt torch uses (found in this process's mappings after one product)."""
    probe = torch.ones(16, 16, device="cuda", dtype=torch.float16)
    torch.addmm(probe[0], probe, probe)  # torch loads cuBLASLt lazily, on its first product
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcublasLt" in line}
    if not paths:
        raise LtError("libcublasLt is not loaded in this process")
    return ctypes.CDLL(sorted(paths)[0])


class _Lt:
    """The library, one handle and one workspace per process."""

    _instance: _Lt | None = None

    def __init__(self):
        self.lib = _loaded_library()
        self.handle = ctypes.c_void_p()
        self.check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")

    @classmethod
    def get(cls) -> _Lt:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise LtError(f"{what} failed with cuBLAS status {status}")

    def set_attribute(self, setter, obj, attribute: int, value) -> None:
        self.check(setter(obj, attribute, ctypes.byref(value), ctypes.sizeof(value)), "set attribute")

    def layout(self, dtype: torch.dtype, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        layout = ctypes.c_void_p()
        self.check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), _DTYPES[dtype], ctypes.c_uint64(rows),
                                                       ctypes.c_uint64(cols), ctypes.c_int64(ld)), "layout")
        return layout


@dataclass(frozen=True)
class AlgoInfo:
    index: int  # rank in the heuristic's list
    algo_id: int
    tile: int
    split_k: int
    stages: int
    waves: float


class LtLinear:
    """y = x @ weight.T + bias for x of exactly `rows` rows (weight [N, K] with unit column stride).

    In cuBLAS's column-major terms this is y.T [N, rows] = weight [N, K] . x.T: the weight is the
    transposed A, which is how torch calls it too.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, x_stride: int | None = None,
                 y_stride: int | None = None, gelu: bool = False, accumulate: bool = False):
        if weight.stride(1) != 1:
            raise LtError("the weight needs unit column stride")
        self.lt = _Lt.get()
        lib = self.lt.lib
        self.weight, self.bias, self.rows = weight, bias, rows
        n, k = weight.shape
        self.n, self.k = n, k
        self.desc = ctypes.c_void_p()
        self.lt.check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "desc")
        setter = lib.cublasLtMatmulDescSetAttribute
        self.lt.set_attribute(setter, self.desc, _DESC_TRANSA, ctypes.c_int32(_OP_T))
        self.lt.set_attribute(setter, self.desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
        epilogue = (_EPILOGUE_GELU_BIAS if gelu else _EPILOGUE_BIAS) if bias is not None else _EPILOGUE_DEFAULT
        self.lt.set_attribute(setter, self.desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        if bias is not None:
            self.lt.set_attribute(setter, self.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        self.a = self.lt.layout(weight.dtype, k, n, weight.stride(0))
        self.b = self.lt.layout(weight.dtype, k, rows, x_stride or k)
        self.d = self.lt.layout(weight.dtype, n, rows, y_stride or n)
        self.algo: _Algo | None = None
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(1.0 if accumulate else 0.0)

    def candidates(self, count: int = 32) -> list[_Heuristic]:
        lib = self.lt.lib
        pref = ctypes.c_void_p()
        self.lt.check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        try:
            self.lt.set_attribute(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES,
                                  ctypes.c_uint64(WORKSPACE_BYTES))
            results = (_Heuristic * count)()
            found = ctypes.c_int(0)
            self.lt.check(lib.cublasLtMatmulAlgoGetHeuristic(self.lt.handle, self.desc, self.a, self.b, self.d,
                                                             self.d, pref, count, results, ctypes.byref(found)),
                          "heuristic")
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        return [results[i] for i in range(found.value) if results[i].state == 0]

    def describe(self, index: int, heuristic: _Heuristic) -> AlgoInfo:
        def config(attribute: int) -> int:
            value, written = ctypes.c_int64(0), ctypes.c_size_t(0)
            self.lt.lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(heuristic.algo), attribute,
                                                             ctypes.byref(value), 4, ctypes.byref(written))
            return value.value & 0xFFFFFFFF
        return AlgoInfo(index, config(_CONFIG_ID), config(_CONFIG_TILE_ID), config(_CONFIG_SPLITK_NUM),
                        config(_CONFIG_STAGES_ID), round(heuristic.waves, 2))

    def use(self, heuristic: _Heuristic) -> None:
        self.algo = _Algo()
        ctypes.memmove(ctypes.byref(self.algo), ctypes.byref(heuristic.algo), ctypes.sizeof(_Algo))

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.algo is None:
            raise LtError("no algorithm chosen: call use() first")
        if out is None:
            out = torch.empty((self.rows, self.n), dtype=x.dtype, device=x.device)
        ws = self.lt.workspace
        self.lt.check(self.lt.lib.cublasLtMatmul(
            self.lt.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(self.weight.data_ptr()), self.a,
            ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta),
            ctypes.c_void_p((c if c is not None else out).data_ptr()), self.d,
            ctypes.c_void_p(out.data_ptr()), self.d, ctypes.byref(self.algo), ctypes.c_void_p(ws.data_ptr()),
            ctypes.c_size_t(WORKSPACE_BYTES), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "matmul")
        return out
