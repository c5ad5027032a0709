"""CTranslate2 as the CPU translation backend.

CTranslate2 is an inference engine made for Marian-style models; on 2 CPU cores its int8 decoding
is several times faster than `MarianMTModel.generate`. The Marian checkpoint is converted once, on
first use, into a cache directory keyed by the checkpoint's files, and reused after. The backend
speaks our token ids: ids become vocabulary pieces on the way in and ids again on the way out.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import ModelLoadError
from pipeline.quiet import status

QUANTIZATIONS = ("int8", "float32")
# Small files are hashed by content; the weights by size and modification time (hashing 300 MB
# at every start would cost more than it protects).
KEY_FILES = ("config.json", "generation_config.json", "vocab.json", "source.spm", "target.spm")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bilingual-qa" / "ct2"


def ctranslate2_available() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


def cache_key(model_dir: str | Path) -> str:
    """A short hash of the checkpoint's files: a changed checkpoint gets a new conversion."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in KEY_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + (model_dir / name).read_bytes())
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            stat = (model_dir / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def converted_model_dir(model_dir: str | Path, quantization: str = "int8",
                        cache_root: str | Path | None = None) -> Path:
    """The CTranslate2 model of `model_dir`, converted now if the cache does not hold it yet."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    model_dir = Path(model_dir)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / f"{model_dir.name}-{cache_key(model_dir)}-{quantization}"
    if (target / "model.bin").is_file():
        return target
    from ctranslate2.converters import TransformersConverter

    status(f"converting {model_dir.name} for CTranslate2 into {target} (first use only)")
    root.mkdir(parents=True, exist_ok=True)
    # Convert beside the target and rename: an interrupted or concurrent conversion never leaves a
    # half-written model where a later run would trust it.
    work = Path(tempfile.mkdtemp(dir=root, prefix=".converting-"))
    try:
        TransformersConverter(str(model_dir)).convert(str(work / "model"), quantization=quantization,
                                                      force=True)
        try:
            (work / "model").rename(target)
        except OSError:
            if not (target / "model.bin").is_file():   # lost a race only if the winner finished
                raise
    except Exception as error:
        raise ModelLoadError(f"could not convert {model_dir} for CTranslate2: {error}") from error
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


class CTranslate2Backend:
    """Greedy and beam decoding with a CTranslate2 Translator on the CPU."""

    name = "ctranslate2"
    concurrent = True  # CTranslate2 translators take calls from several threads

    def __init__(self, model_dir: str | Path, *, quantization: str = "int8", threads: int = 0,
                 cache_root: str | Path | None = None, tokenizer=None):
        import ctranslate2
        from transformers import MarianTokenizer

        self.quantization = quantization   # int8 and float32 translate differently: memory keys tell them apart
        self.model_path = converted_model_dir(model_dir, quantization, cache_root)
        self.translator = ctranslate2.Translator(str(self.model_path), device="cpu",
                                                 compute_type="default", intra_threads=threads)
        self.tokenizer = tokenizer or MarianTokenizer.from_pretrained(str(model_dir))
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id

    def generate(self, batch: list[list[int]], max_new_tokens: int, num_beams: int) -> list[list[int]]:
        source = [self.tokenizer.convert_ids_to_tokens(row) for row in batch]
        results = self.translator.translate_batch(
            source, beam_size=num_beams, max_decoding_length=max_new_tokens, min_decoding_length=0,
            max_input_length=0, max_batch_size=256 if num_beams == 1 else 64,
        )
        out = []
        for result in results:
            ids = self.tokenizer.convert_tokens_to_ids(result.hypotheses[0])
            out.append([i for i in ids if i not in (self.eos_token_id, self.pad_token_id)][:max_new_tokens])
        return out

