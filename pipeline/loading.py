"""Finding and loading models: hub ids or local directories, devices and dtypes.

Every stage loads through here, so tests (tiny checkpoints in directories) and users (hub ids) run
the same code. Weights go straight to the device through accelerate's device_map, and a hub id that
is not cached is downloaded once, with progress on stderr.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import threading
from pathlib import Path

import torch

from pipeline.errors import DeviceError, ModelLoadError
from pipeline.model_files import read_tokenizer
from pipeline.quiet import status

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


# Status lines and --quiet live in quiet.py (no torch: the CLI enters them before it knows it needs a model).


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


def auto_dtype(device_type: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """`--dtype auto`: bfloat16 from compute capability 8.0 (native there), float16 below it (a T4's
    `torch.cuda.is_bf16_supported()` says yes through emulation, so the capability decides), float32
    on the CPU (where float16 products are slow or missing)."""
    if device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if capability is not None and capability >= (8, 0) else torch.float16


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype `--dtype` names; auto: see auto_dtype."""
    if name in (None, "auto"):
        cuda = device.type == "cuda" and torch.cuda.is_available()
        capability = torch.cuda.get_device_capability(device) if cuda else None
        return auto_dtype(device.type, capability)
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype '{name}': use auto, float16, bfloat16 or float32")
    return DTYPES[name]


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that names no directory is a missing path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def _is_model_dir(directory: Path, adapters: bool) -> bool:
    return (directory / CHECKPOINT_MARKER).is_file() or (adapters and (directory / ADAPTER_MARKER).is_file())


def locate_model(name: str, option: str = "--llm", *, adapters: bool = False) -> str:
    """A local directory holding the model `name` (a directory already, or a hub id, downloaded once),
    a checkpoint's files checked for the role `option` names before any weight is read.

    With `adapters`, a PEFT adapter directory (adapter_config.json, no config.json) is accepted too.
    """
    path = Path(name).expanduser()
    what = "config.json" + (" or adapter_config.json" if adapters else "")
    if path.is_dir():
        if not _is_model_dir(path, adapters):
            raise ModelLoadError(f"model directory '{name}' has no {what}: is it a transformers checkpoint?")
        directory = str(path)
    elif _looks_like_path(name):
        raise ModelLoadError(f"model directory '{name}' does not exist; pass an existing local directory with {option} DIR")
    else:
        directory = _download(name, option)
        if not _is_model_dir(Path(directory), adapters):
            raise ModelLoadError(f"model '{name}' has no {what}: it is not a transformers checkpoint")
    if (Path(directory) / CHECKPOINT_MARKER).is_file():
        _check_once(directory, name, option, _listing(directory))
    return directory


def _listing(directory: str) -> tuple:
    """The directory's files with their sizes and times: a file changed since the last check is checked again."""
    return tuple(sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                        for entry in os.scandir(directory) if entry.is_file()))


@functools.lru_cache(maxsize=32)
def _check_once(directory: str, name: str, option: str, listing: tuple) -> None:
    """check_model_files, once per unchanged directory and role: a command checks every model before
    loading any (qa.py), then each loader looks its model up again (a sentencepiece model is parsed
    to check it)."""
    check_model_files(directory, name, option)


# What each option's model must be, by config.json, and the tokenizer files it cannot work without
# (any one of each group). phi-msft is phi-2's config before transformers took the model in.
ROLES = {
    "--llm": ("a phi-2-family causal LM", {"phi", "phi-msft"}, [("tokenizer.json", "vocab.json")]),
    "--ja-en": ("a MarianMT translation model", {"marian"}, [("source.spm",), ("target.spm",), ("vocab.json",)]),
    "--en-ja": ("a MarianMT translation model", {"marian"}, [("source.spm",), ("target.spm",), ("vocab.json",)]),
}


def _damaged(name: str, what: str) -> ModelLoadError:
    return ModelLoadError(f"model '{name}' is damaged: {what}; download it again or pass another directory")


def check_model_files(directory: str, name: str, option: str = "--llm") -> None:
    """Refuse a model of the wrong kind for its role, or with missing or corrupt files, from its small
    files alone: seconds before minutes of loading, and one clear line instead of a loader's traceback."""
    folder = Path(directory)
    config = None
    for json_file in sorted(folder.glob("*.json")):
        try:
            parsed = json.loads(json_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _damaged(name, f"{json_file.name} is not valid JSON ({error})") from None
        if json_file.name == "config.json":
            config = parsed
    if not isinstance(config, dict):
        raise _damaged(name, "config.json does not hold a JSON object")
    if option in ROLES:
        role, model_types, needed = ROLES[option]
        model_type = config.get("model_type") or "unknown"
        if model_type not in model_types:
            architectures = ", ".join(map(str, config.get("architectures") or [])) or "a model"
            raise ModelLoadError(f"{option} needs {role}, but '{name}' is {architectures} (model_type '{model_type}')")
        for group in needed:
            if not any((folder / file).is_file() for file in group):
                raise _damaged(name, f"{' or '.join(group)} is missing (a tokenizer file)")
    for spm in sorted(folder.glob("*.spm")):
        _check_sentencepiece(spm, name)
    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors(weights, name)


def _check_sentencepiece(path: Path, name: str) -> None:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        raise _damaged(name, f"{path.name} is not a sentencepiece model") from None


def _check_safetensors(path: Path, name: str) -> None:
    # Reads only the header, and safetensors checks that the header's tensors fill the file exactly:
    # a truncated download is caught here.
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise _damaged(name, f"{path.name} is truncated or not a safetensors file ({error})") from None


def announcing_bars(line: str) -> type:
    """The hub's progress bar class, printing `line` (a status line) once, when the first bytes of a
    download arrive: a hub that cannot be reached, or a model that is not there, is then one line
    (the error), not a "downloading" line followed by it."""
    from huggingface_hub.utils import tqdm as hub_bar

    announced = threading.Event()

    class AnnouncingBar(hub_bar):
        def __init__(self, *args, **kwargs):
            self.counts_bytes = kwargs.get("unit") == "B"  # not the bar counting files (some cached)
            super().__init__(*args, **kwargs)  # a disabled bar (no terminal, --quiet) keeps no `unit`

        def update(self, n=1):
            if n and self.counts_bytes and not announced.is_set():
                announced.set()
                status(line)
            return super().update(n)

    return AnnouncingBar


def _download(repo_id: str, option: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    # One line for the whole model, printed only when its first bytes arrive (see announcing_bars).
    bars = announcing_bars(f"downloading {repo_id} from the Hugging Face hub (first use only; phi-2 is about 5.6 GB)")
    try:
        try:  # already cached: no network, no progress bar
            directory = snapshot_download(repo_id, allow_patterns=CONFIG_PATTERNS + SAFETENSORS_PATTERNS,
                                          local_files_only=True)
        except LocalEntryNotFoundError:
            if offline:
                raise
            directory = snapshot_download(repo_id, allow_patterns=CONFIG_PATTERNS + SAFETENSORS_PATTERNS,
                                          tqdm_class=bars)
        if not any(Path(directory).glob("*.safetensors")):
            directory = snapshot_download(repo_id, allow_patterns=LEGACY_PATTERNS, local_files_only=offline,
                                          tqdm_class=bars)
    except (RepositoryNotFoundError, HFValidationError):
        raise ModelLoadError(f"model '{repo_id}' does not exist on the hub (or needs a login: `hf auth login`);"
                             f" check the id or pass {option} DIR") from None
    except (LocalEntryNotFoundError, OSError) as error:
        where = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else f"it could not be downloaded ({_why(error)})"
        raise ModelLoadError(
            f"model '{repo_id}' is not in the local cache and {where}; download it on a connected machine"
            f" or pass a local directory with {option} DIR"
        ) from None
    return directory


def _why(error: BaseException) -> str:
    """What went wrong underneath the hub's own error (its message is a paragraph): `ConnectError:
    [Errno 111] Connection refused`, a timeout, an HTTP status."""
    cause = error.__cause__ or error.__context__
    shown = cause if cause is not None and not isinstance(cause, type(error)) else error
    text = " ".join(_first_line(shown).split())
    return f"{type(shown).__name__}: {text[:160]}" if text != type(shown).__name__ else text


def load_pretrained(model_class, directory: str, name: str, device: torch.device, dtype: torch.dtype,
                    runs_as: str | None = None):
    """Load weights straight onto `device` (accelerate's device_map), never running remote code.

    `runs_as` is what the loading line says the model will run as, where that is not the weights'
    dtype (a translator that CTranslate2 runs in int8)."""
    status(f"loading {name} on {device} ({runs_as or str(dtype).removeprefix('torch.')})")
    try:
        model = model_class.from_pretrained(
            directory, dtype=dtype, device_map={"": device}, low_cpu_mem_usage=True,
            trust_remote_code=False,
        )
    except torch.cuda.OutOfMemoryError:
        raise ModelLoadError(f"not enough GPU memory to load '{name}' on {device}; try --device cpu") from None
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        # RuntimeError and pickle errors: a damaged legacy .bin, or weights that fit no layer.
        raise ModelLoadError(f"cannot load model '{name}': {_first_line(error)}") from None
    return model.eval()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_tokenizer(directory: str, name: str, lean: bool = False):
    """AutoTokenizer's tokenizer of the checkpoint; `lean` (no transformers model is built): read
    without transformers where model_files.py reads its files as transformers does."""
    tokenizer = read_tokenizer(directory) if lean else None
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as error:  # tokenizers and sentencepiece raise bare Exception/RuntimeError on bad files
        raise ModelLoadError(f"cannot load the tokenizer of '{name}': {_first_line(error)}") from None
