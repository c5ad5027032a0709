"""Every error a user can cause, model files included: one line on stderr, exit 2, nothing on stdout,
no traceback; and each check that needs no model runs before any model loads."""

from __future__ import annotations

import json
import os
import pty
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.errors import BilingualQAError, ModelLoadError
from cli_run import assert_one_line_error, run_cli  # tests/cli_run.py

QUESTION = "What is a bond?"


def damaged_copy(source: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# (which model, which option it is given to, how it is damaged, a fragment of the error)
DAMAGES = {
    "truncated phi-2 weights": ("phi2", "--llm", lambda d: truncate(d / "model.safetensors", 0.6), "truncated"),
    "phi-2 weights cut inside the header": ("phi2", "--llm", lambda d: truncate(d / "model.safetensors", 0.001), "truncated"),
    "empty Marian weights": ("ja_en", "--ja-en", lambda d: (d / "model.safetensors").write_bytes(b""), "truncated"),
    "phi-2 without tokenizer files": ("phi2", "--llm", lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], "tokenizer"),
    "phi-2 tokenizer.json not JSON": ("phi2", "--llm", lambda d: truncate(d / "tokenizer.json", 0.5), "tokenizer.json"),
    "Marian without source.spm": ("ja_en", "--ja-en", lambda d: (d / "source.spm").unlink(), "source.spm"),
    "Marian with a corrupt source.spm": ("ja_en", "--ja-en", lambda d: (d / "source.spm").write_bytes(b"\x00garbage" * 50), "source.spm"),
    "Marian with a truncated target.spm": ("en_ja", "--en-ja", lambda d: truncate(d / "target.spm", 0.3), "target.spm"),
    "Marian without vocab.json": ("en_ja", "--en-ja", lambda d: (d / "vocab.json").unlink(), "vocab.json"),
    "config.json not JSON": ("phi2", "--llm", lambda d: (d / "config.json").write_text("{\"model_type\": "), "config.json"),
    "config.json a JSON list": ("ja_en", "--ja-en", lambda d: (d / "config.json").write_text("[]"), "config.json"),
    "config.json not UTF-8": ("ja_en", "--ja-en", lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}"), "config.json"),
    "phi-2 passed as --ja-en": ("phi2", "--ja-en", lambda d: None, "MarianMT"),
    "Marian passed as --llm": ("ja_en", "--llm", lambda d: None, "phi-2"),
    "config without model_type": ("phi2", "--llm", lambda d: _edit_config(d, model_type=None), "phi-2"),
}


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny_dirs(tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir) -> dict[str, Path]:
    return {"phi2": tiny_phi2_dir, "ja_en": tiny_ja_en_dir, "en_ja": tiny_en_ja_dir}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_or_wrong_model_directory_is_one_line_before_loading(damage, tiny_dirs, tmp_path):
    which, option, spoil, fragment = DAMAGES[damage]
    directory = damaged_copy(tiny_dirs[which], tmp_path, "model")
    spoil(directory)
    args = {"--llm": str(tiny_dirs["phi2"]), "--ja-en": str(tiny_dirs["ja_en"]), "--en-ja": str(tiny_dirs["en_ja"])}
    args[option] = str(directory)
    proc = run_cli("ask", QUESTION, *[item for pair in args.items() for item in pair], "--max-new-tokens", "4")
    assert_one_line_error(proc, fragment)
    assert "loading" not in proc.stderr.decode()  # refused from the small files, before any weight


def _spoil_randomly(directory: Path, rng: random.Random) -> str:
    path = rng.choice(sorted(p for p in directory.iterdir() if p.is_file()))
    data = path.read_bytes()
    how = rng.choice(["truncate", "flip", "empty", "delete", "garbage"])
    if how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif how == "flip":
        spoiled = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            spoiled[rng.randrange(len(spoiled))] = rng.randrange(256)
        path.write_bytes(bytes(spoiled))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "delete":
        path.unlink()
    else:
        path.write_bytes(rng.randbytes(rng.randint(1, 4096)))
    return f"{how} {path.name}"


@pytest.mark.parametrize("which", ["phi2", "ja_en"])
def test_randomly_damaged_model_directories_load_or_give_a_model_error(which, tiny_dirs, tmp_path):
    """Fuzz (seeded): a damaged file either still loads (a flipped byte inside the weights is only
    another number) or is refused with our own error, never any other exception."""
    from pipeline.llm.answerer import Answerer
    from pipeline.mt.translator import Translator

    rng = random.Random(16)
    refused = 0
    for attempt in range(24):
        directory = damaged_copy(tiny_dirs[which], tmp_path, f"{which}-{attempt}")
        spoiled = _spoil_randomly(directory, rng)
        try:
            if which == "phi2":
                Answerer.from_pretrained(str(directory), device="cpu", engine="transformers")
            else:
                Translator.from_pretrained(str(directory), device="cpu", backend="transformers")
        except BilingualQAError as error:
            refused += 1
            assert "\n" not in str(error), (spoiled, str(error))
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{spoiled}: {type(error).__name__}: {error}")
    assert refused >= 8  # most damage must be seen, not loaded as if nothing were wrong


FLOAT_VALUES = ["nan", "NaN", "inf", "-inf", "1e309", "-1", "-0.0", "0", "0.5", "1", "1.5", "abc", "", " ", "0x10",
                "1e-320", "101"]
INT_VALUES = ["99999999999999999999999", "4294967296", "4294967295", "-1", "0", "1", "2.5", "abc", "", "1e3",
              "2001", "17"]
OPTION_VALUES = {
    "--temperature": FLOAT_VALUES, "--top-p": FLOAT_VALUES, "--seed": INT_VALUES, "--max-new-tokens": INT_VALUES,
    "--beams": INT_VALUES, "--device": ["cpu", "tpu", "cuda:99", "", "auto", "cpu:0", "../x"],
    "--dtype": ["float16", "int3", "", "auto", "fp32"], "--engine": ["fast", "slow", ""],
    "--mt-backend": ["fast", "ctranslate2", "magic", ""], "--source-lang": ["zh", "ja", ""],
    "--format": ["json", "yaml", ""],
}


def run_in_process(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["bilingual-qa", *args])
    code = 0
    try:
        cli.run()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fuzzed_option_values_are_refused_in_one_line_before_any_model(capsys, monkeypatch, tmp_path):
    """Fuzz (seeded): random combinations of valid and invalid option values. The models named do not
    exist, so every run ends in an error: one line, exit 2, nothing on stdout, no model loaded; a
    value that is invalid must be the error named (never a later failure)."""
    missing = str(tmp_path / "no-model")
    rng = random.Random(2)
    for attempt in range(150):
        options = rng.sample(sorted(OPTION_VALUES), rng.randint(1, 4))
        args = ["ask", QUESTION, "--llm", missing, "--ja-en", missing, "--en-ja", missing]
        for option in options:
            args += [option, rng.choice(OPTION_VALUES[option])]
        code, out, err = run_in_process(args, capsys, monkeypatch)
        lines = err.splitlines()
        assert code == 2 and out == "" and len(lines) == 1, (args, code, out, err)
        assert lines[0].startswith("bilingual-qa: error:") and "Traceback" not in err, args
        assert "loading" not in err
        for option in ("--temperature", "--top-p"):
            if option in args and args[args.index(option) + 1].strip().lower() in ("nan", "inf", "-inf", "1e309"):
                assert option in lines[0] or "--" in lines[0], (args, lines[0])


def test_nan_and_huge_seed_name_the_option(model_args):
    assert_one_line_error(run_cli("ask", QUESTION, *model_args, "--temperature", "nan"), "--temperature", "finite")
    assert_one_line_error(run_cli("ask", QUESTION, *model_args, "--seed", "99999999999999999999999"), "--seed")


def test_compare_checks_every_model_before_loading_the_first(model_args, tiny_phi2_dir, tmp_path):
    rest = [a for a in model_args if a not in ("--llm", str(tiny_phi2_dir))]
    proc = run_cli("compare", QUESTION, "--llm", str(tiny_phi2_dir), "--llm", str(tmp_path / "missing"), *rest)
    assert_one_line_error(proc, "missing", "--llm DIR")
    assert "loading" not in proc.stderr.decode()


def test_compare_refuses_a_translation_model_as_second_llm(model_args, tiny_phi2_dir, tiny_ja_en_dir):
    rest = [a for a in model_args if a not in ("--llm", str(tiny_phi2_dir))]
    proc = run_cli("compare", QUESTION, "--llm", str(tiny_phi2_dir), "--llm", str(tiny_ja_en_dir), *rest)
    assert_one_line_error(proc, "--llm needs a phi-2-family")
    assert "loading" not in proc.stderr.decode()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("option", [["--engine", "fast"], ["--mt-backend", "fast"]])
def test_cuda_only_engines_are_refused_before_loading(model_args, option):
    proc = run_cli("ask", QUESTION, *model_args, *option)
    assert_one_line_error(proc, option[0], "CUDA")
    assert "loading" not in proc.stderr.decode()


def test_translate_checks_the_backend_before_loading(tiny_ja_en_dir, tiny_en_ja_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    source = tmp_path / "in.txt"
    source.write_text("金利\n", encoding="utf-8")
    proc = run_cli("translate", str(source), "--output", str(tmp_path / "out.txt"), "--to", "en",
                   "--ja-en", str(tiny_ja_en_dir), "--en-ja", str(tiny_en_ja_dir), "--mt-backend", "fast")
    assert_one_line_error(proc, "--mt-backend fast")
    assert not (tmp_path / "out.txt").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_under_stdout_is_one_line(model_args):
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "ask", QUESTION, *model_args, "--max-new-tokens", "4",
                               "--beams", "1"], stdout=full, stderr=subprocess.PIPE,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    stderr = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert [line for line in stderr.splitlines() if "error:" in line] == [
        "bilingual-qa: error: cannot write the output: No space left on device"]


@pytest.mark.parametrize("question", [b"What\x00 is a bond?", b"What is \x1b[31ma bond\x1b[0m?", b"bond\x07"])
def test_control_characters_in_the_question_are_refused_before_loading(model_args, question):
    proc = run_cli("ask", *model_args, stdin=question)
    assert_one_line_error(proc, "control character")
    assert "loading" not in proc.stderr.decode()


def test_ask_without_question_on_a_terminal_says_how_to_give_one(model_args):
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "ask", *model_args], stdin=terminal,
                              capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    finally:
        os.close(controller)
        os.close(terminal)
    assert_one_line_error(proc, "no question", "echo")


def test_byte_order_mark_on_stdin_is_dropped(model_args):
    proc = run_cli("ask", *model_args, "--format", "json", "--max-new-tokens", "4", "--beams", "1",
                   stdin="\ufeffWhat is a bond?".encode())
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["question_en"] == "What is a bond?"


def test_model_load_error_is_raised_for_a_damaged_legacy_bin(tiny_ja_en_dir, tmp_path):
    from pipeline.loading import load_pretrained
    from transformers import MarianMTModel

    legacy = damaged_copy(tiny_ja_en_dir, tmp_path, "legacy")
    (legacy / "model.safetensors").unlink()
    (legacy / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_pretrained(MarianMTModel, str(legacy), "legacy", torch.device("cpu"), torch.float32)
