"""Finding and loading models: hub ids or local directories, devices and dtypes.

Every stage loads through here, so tests (tiny checkpoints in directories) and users (hub ids) run
the same code. Weights go straight to the device through accelerate's device_map, and a hub id that
is not cached is downloaded once, with progress on stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from pipeline.errors import DeviceError, ModelLoadError

# What a model directory needs; weights come as safetensors where published, else as a legacy .bin
# that transformers reads with torch's weights_only loader.
CONFIG_PATTERNS = ["*.json", "*.spm", "*.model", "*.txt", "*.tiktoken"]
SAFETENSORS_PATTERNS = ["*.safetensors"]
LEGACY_PATTERNS = ["pytorch_model*.bin", "adapter_model.bin"]
# A transformers checkpoint has config.json; a PEFT adapter (accepted where `adapters=True`) has
# adapter_config.json instead, and its base is located separately.
CHECKPOINT_MARKER = "config.json"
ADAPTER_MARKER = "adapter_config.json"

DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def status(message: str) -> None:
    """A status line on stderr, kept off stdout so JSON output stays clean."""
    if os.environ.get("BILINGUAL_QA_QUIET") != "1":
        print(f"bilingual-qa: {message}", file=sys.stderr, flush=True)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} was asked for, but no CUDA GPU is available here; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device '{name}': use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on the CPU (where fp16 matmuls are slow or missing), unless asked."""
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype '{name}': use auto, float16, bfloat16 or float32")
    return DTYPES[name]


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that names no directory is a missing path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def _is_model_dir(directory: Path, adapters: bool) -> bool:
    return (directory / CHECKPOINT_MARKER).is_file() or (adapters and (directory / ADAPTER_MARKER).is_file())


def locate_model(name: str, option: str = "--llm", *, adapters: bool = False) -> str:
    """A local directory holding the model `name` (a directory already, or a hub id, downloaded once).

    With `adapters`, a PEFT adapter directory (adapter_config.json, no config.json) is accepted too.
    """
    path = Path(name).expanduser()
    what = "config.json" + (" or adapter_config.json" if adapters else "")
    if path.is_dir():
        if not _is_model_dir(path, adapters):
            raise ModelLoadError(f"model directory '{name}' has no {what}: is it a transformers checkpoint?")
        return str(path)
    if _looks_like_path(name):
        raise ModelLoadError(f"model directory '{name}' does not exist; pass an existing local directory with {option} DIR")
    directory = _download(name, option)
    if not _is_model_dir(Path(directory), adapters):
        raise ModelLoadError(f"model '{name}' has no {what}: it is not a transformers checkpoint")
    return directory


def _download(repo_id: str, option: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        try:  # already cached: no network, no progress bar
            directory = snapshot_download(repo_id, allow_patterns=CONFIG_PATTERNS + SAFETENSORS_PATTERNS,
                                          local_files_only=True)
        except LocalEntryNotFoundError:
            if offline:
                raise
            status(f"downloading {repo_id} from the Hugging Face hub (first use only; phi-2 is about 5.6 GB)")
            directory = snapshot_download(repo_id, allow_patterns=CONFIG_PATTERNS + SAFETENSORS_PATTERNS)
        if not any(Path(directory).glob("*.safetensors")):
            directory = snapshot_download(repo_id, allow_patterns=LEGACY_PATTERNS, local_files_only=offline)
    except (LocalEntryNotFoundError, OSError) as error:
        where = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else f"it could not be downloaded ({type(error).__name__})"
        raise ModelLoadError(
            f"model '{repo_id}' is not in the local cache and {where}; download it on a connected machine"
            f" or pass a local directory with {option} DIR"
        ) from None
    except (RepositoryNotFoundError, HFValidationError):
        raise ModelLoadError(f"model '{repo_id}' does not exist on the hub; check the id or pass {option} DIR") from None
    return directory


def load_pretrained(model_class, directory: str, name: str, device: torch.device, dtype: torch.dtype):
    """Load weights straight onto `device` (accelerate's device_map), never running remote code."""
    status(f"loading {name} on {device} ({str(dtype).removeprefix('torch.')})")
    try:
        model = model_class.from_pretrained(
            directory, dtype=dtype, device_map={"": device}, low_cpu_mem_usage=True,
            trust_remote_code=False,
        )
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load model '{name}': {first_line}") from None
    return model.eval()


def load_tokenizer(directory: str, name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load the tokenizer of '{name}': {first_line}") from None
