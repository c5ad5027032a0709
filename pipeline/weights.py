"""A checkpoint's tensors read straight onto a device, and put into a module tree of the same names.

The fast engines read a model's weights and never run its transformers module, so where only they
will run it (llm/phi_direct.py, mt/marian_direct.py) the weights go into plain torch modules named as
transformers names them: no model class of transformers is imported or built. That saves a cold
process the modeling stack's imports (torch.distributed and sympy among them) and from_pretrained's
initialisation of weights it then overwrites.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ModelLoadError
from pipeline.gpu_gate import GATE
from pipeline.model_files import ConfigFile, read_generation_config

READERS = 4  # threads that copy tensors to the device: each copy waits on memory, not on Python


# Layers whose parameters are not initialised: they are built on the meta device and filled from a
# checkpoint (`fill`). Initialising even meta tensors runs torch's reference ops, which import
# torch._dynamo and sympy (a second of a cold start).
class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass


class LayerNorm(nn.LayerNorm):
    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


def weight_files(directory: str | Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", the files) of a checkpoint directory; safetensors where there are any."""
    folder = Path(directory)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return "safetensors", files
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"'{directory}' holds no weights (*.safetensors or pytorch_model*.bin)")
    return "bin", files


def read_weights(directory: str | Path, device: torch.device, dtype: torch.dtype | None = None,
                 name: str | None = None, stream=None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint on `device`, floating ones as `dtype` (None: as stored); the
    copies run on the CUDA `stream` if one is given.

    A legacy .bin is read with torch's weights_only loader (a pickle may not run code). A file that
    cannot be read, or weights that do not fit on the device, raise ModelLoadError naming `name`."""
    name = name or str(directory)
    place = functools.partial(_placed, device=device, dtype=dtype, stream=stream)
    try:
        return _read(directory, place)
    except torch.cuda.OutOfMemoryError:
        raise ModelLoadError(f"not enough GPU memory to load '{name}' on {device}; try --device cpu") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        text = str(error).strip()
        raise ModelLoadError(f"cannot load model '{name}': {text.splitlines()[0] if text else type(error).__name__}") from None


def _read(directory, place) -> dict[str, torch.Tensor]:
    kind, files = weight_files(directory)
    if kind == "bin":
        tensors = {}
        for file in files:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            tensors.update({key: place(t) for key, t in state.items()})
        return tensors
    from safetensors import safe_open

    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            with ThreadPoolExecutor(READERS) as pool:
                tensors.update(zip(keys, pool.map(lambda key: place(f.get_tensor(key)), keys)))
    return tensors


def _placed(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None, stream) -> torch.Tensor:
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        tensor = tensor.to(device)
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def read_in_background(directory: str | Path, device: torch.device, dtype: torch.dtype | None,
                       name: str) -> Future:
    """read_weights in a thread of its own, its copies on a CUDA stream of their own: they neither
    wait for the process's other GPU work nor hold it up. The future's tensors are complete on every
    stream (the stream is synchronised before it resolves); it raises what read_weights raises."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def read() -> dict[str, torch.Tensor]:
        tensors = read_weights(directory, device, dtype, name, stream)
        if stream is not None:
            stream.synchronize()
        return tensors

    # GPU work beside the main thread's: a graph capture there (a batch job's translator meets a
    # shape twice while the read is still on, after a cold boot's slow disk) waits for the copies,
    # which would break it (an allocation or a pageable copy during a capture).
    return GATE.in_background(read, "read-weights")


class DirectModel(nn.Module):
    """A checkpoint's weights under transformers' names, with its config and generation config, and
    the `device` and `dtype` that transformers' models report (of the output projection)."""

    def __init__(self, config, generation_config):
        super().__init__()
        self.config, self.generation_config = config, generation_config

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype


def fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
    """Put `tensors` into `module` (built on the meta device) by name; every parameter and buffer must
    be given and every tensor used, or the checkpoint does not fit the config: one clear line."""
    expected = set(module.state_dict())
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ModelLoadError(f"cannot load model '{name}': its weights do not fit its config.json"
                             f" (missing {missing[:3]}, unexpected {extra[:3]})")
    try:
        module.load_state_dict(tensors, assign=True, strict=True)
    except RuntimeError as error:  # a shape that does not match the config
        raise ModelLoadError(f"cannot load model '{name}': {str(error).strip().splitlines()[-1].strip()}") from None
    for parameter in module.parameters():
        parameter.requires_grad_(False)  # read, never trained: no autograd bookkeeping
    return module.eval()


def generation_config_of(directory: str, config):
    """The checkpoint's generation config, as from_pretrained gives it (else the model config's); for
    a config read without transformers (model_files.py), read the same way."""
    if isinstance(config, ConfigFile):
        return read_generation_config(directory, config)
    from transformers import GenerationConfig

    if (Path(directory) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(directory)
    return GenerationConfig.from_model_config(config)
