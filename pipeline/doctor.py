"""`bilingual-qa doctor`: what this machine has and what will run here, and why.

For users ("why is it slow here?") and bug reports: the device, its compute capability and memory,
the versions that matter, and the answer stage's plan (llm/hardware.py) with the translation
backend `auto` would take. Nothing is loaded; no model is needed.
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from pipeline.llm.hardware import Hardware, Plan, plan, probe
from pipeline.loading import resolve_device

PACKAGES = ("bilingual-qa", "torch", "transformers", "triton", "ctranslate2", "tokenizers", "accelerate", "peft")


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def translation_backend(hardware: Hardware) -> tuple[str, str]:
    """(backend, why) that `--mt-backend auto` takes here (the rule of mt/backends.select_mt_backend)."""
    if hardware.cuda:
        return "fast", "a CUDA GPU: CUDA-graph Marian decoding"
    from pipeline.mt.ctranslate2 import ctranslate2_available

    if ctranslate2_available():
        return "ctranslate2", "the CPU with CTranslate2 installed (int8)"
    return "transformers", "the CPU without CTranslate2 (pip install 'bilingual-qa[cpu-fast]' is faster)"


def report(device: str = "auto", dtype: str = "auto", engine: str = "auto") -> dict:
    """Everything `doctor` prints, as one JSON-ready dict."""
    resolved = resolve_device(device)
    hardware = probe(resolved)
    chosen: Plan = plan(hardware, dtype=dtype, engine=engine)
    backend, backend_why = translation_backend(hardware)
    gib = lambda n: None if n is None else round(n / 2**30, 2)  # noqa: E731
    return {
        "device": hardware.device,
        "name": hardware.name,
        "compute_capability": None if hardware.capability is None else ".".join(map(str, hardware.capability)),
        "memory_total_gib": gib(hardware.total_memory),
        "memory_free_gib": gib(hardware.free_memory),
        "versions": _versions(),
        "dtype": chosen.dtype,
        "engine": chosen.engine,
        "triton_kernels": chosen.triton_kernels,
        "cuda_graphs": chosen.cuda_graphs,
        "pdl": chosen.pdl,
        "fp32_attention_scores": chosen.fp32_attention_scores,
        "translation_backend": backend,
        "reasons": {what: why for what, why in chosen.reasons} | {f"translation {backend}": backend_why},
        "fell_back_from": list(chosen.fallbacks),
        "summary": chosen.summary(),
    }


def render(info: dict) -> str:
    """The report as aligned text lines."""
    memory = ("" if info["memory_total_gib"] is None
              else f", {info['memory_free_gib']} GiB free of {info['memory_total_gib']} GiB")
    capability = "" if info["compute_capability"] is None else f", compute capability {info['compute_capability']}"
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items() if version)
    lines = [f"device: {info['device']} ({info['name']}{capability}{memory})", f"versions: {versions}",
             f"will run: {info['summary']}; translation: {info['translation_backend']}", "why:"]
    lines += [f"  {what}: {why}" for what, why in info["reasons"].items()]
    return "\n".join(lines) + "\n"
