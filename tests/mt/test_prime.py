"""The GPU primer of a cold ask (pipeline/mt/prime.py): it pays first uses in a thread, and can
neither fail a translation nor run where no fast translator will."""

import logging

import pytest
import torch

from pipeline.mt import prime
from pipeline.mt.translator import Translator


def test_without_triton_the_primer_runs_its_products_and_resolves_false_without_a_warning(caplog):
    if _has_triton():
        pytest.skip("Triton is installed here")
    with caplog.at_level(logging.WARNING, logger="pipeline.mt.prime"):
        assert prime.prime_in_background(torch.device("cpu"), torch.float32).result(timeout=60) is False
    assert caplog.records == []   # the products ran: a failing one would have logged its error


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_primer_that_fails_logs_one_warning_and_resolves_false(monkeypatch, caplog):
    def broken(device, dtype):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(prime, "first_products", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.mt.prime"):
        assert prime.prime_in_background(torch.device("cpu"), torch.float32).result(timeout=60) is False
    assert [r.getMessage() for r in caplog.records] == [
        "priming the GPU for translation failed: CUDA error: out of memory"]


def test_the_primer_runs_only_where_the_fast_translator_will():
    assert Translator.prime(device=torch.device("cpu")) is None
    if torch.cuda.is_available():
        assert Translator.prime(device=torch.device("cuda"), backend="transformers") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_primer_leaves_tritons_cache_key_computed():
    triton_key = pytest.importorskip("triton.runtime.cache").triton_key
    triton_key.cache_clear()
    assert Translator.prime(device=torch.device("cuda")).result(timeout=120) is True
    assert triton_key.cache_info().currsize == 1
