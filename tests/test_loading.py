import pytest
import torch

from pipeline.errors import DeviceError, ModelLoadError
from pipeline.loading import load_pretrained, locate_model, resolve_device, resolve_dtype


def test_local_directory_is_used_as_it_is(tiny_phi2_dir):
    assert locate_model(str(tiny_phi2_dir)) == str(tiny_phi2_dir)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        locate_model(str(tmp_path))


def test_offline_hub_id_not_in_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        locate_model("microsoft/phi-2", "--llm")


def test_dtype_defaults_follow_the_device():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(DeviceError):
        resolve_dtype("int3", torch.device("cpu"))


def test_unknown_device_is_refused():
    with pytest.raises(DeviceError):
        resolve_device("tpu")


def test_legacy_bin_checkpoint_loads_through_weights_only(tiny_ja_en_dir, tmp_path):
    """opus-mt is published as pytorch_model.bin: it loads, through torch's weights_only loader."""
    import shutil

    from safetensors.torch import load_file
    from transformers import MarianMTModel

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_ja_en_dir, legacy)
    state = load_file(legacy / "model.safetensors")
    (legacy / "model.safetensors").unlink()
    torch.save(state, legacy / "pytorch_model.bin")
    model = load_pretrained(MarianMTModel, str(legacy), "legacy", torch.device("cpu"), torch.float32)
    name = next(iter(state))
    assert torch.equal(model.state_dict()[name], state[name])


def test_legacy_bin_with_pickled_code_is_refused(tiny_ja_en_dir, tmp_path):
    import shutil

    from transformers import MarianMTModel

    evil = tmp_path / "evil"
    shutil.copytree(tiny_ja_en_dir, evil)
    (evil / "model.safetensors").unlink()
    torch.save({"weights": torch.zeros(1), "payload": Exploit()}, evil / "pytorch_model.bin")
    with pytest.raises(Exception):
        load_pretrained(MarianMTModel, str(evil), "evil", torch.device("cpu"), torch.float32)
    assert not EXPLOITED


EXPLOITED: list = []


class Exploit:
    def __reduce__(self):
        return (EXPLOITED.append, ("ran",))


def test_a_model_file_damaged_after_a_check_is_refused_at_the_next_lookup(tiny_ja_en_dir, tmp_path):
    """A command checks each model once (qa.py checks all, each loader looks its own up again), but
    a file that changed since is checked again."""
    import shutil

    copy = tmp_path / "opus-mt-ja-en"
    shutil.copytree(tiny_ja_en_dir, copy)
    assert locate_model(str(copy), "--ja-en") == str(copy)
    assert locate_model(str(copy), "--ja-en") == str(copy)
    (copy / "source.spm").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelLoadError, match="source.spm is not a sentencepiece model"):
        locate_model(str(copy), "--ja-en")
