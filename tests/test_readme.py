"""The README is the front door: its commands must work as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def readme_commands() -> list[str]:
    return [line.split("  #")[0].strip() for block in bash_blocks() for line in block.splitlines()
            if "bilingual-qa " in line and not line.lstrip().startswith("#")]


def test_install_command_is_the_one_ci_runs():
    install = next(line for block in bash_blocks() for line in block.splitlines() if "pip install" in line)
    pip_args = install.split("pip install", 1)[1].strip()
    assert f"pip install --quiet {pip_args}" in (ROOT / ".ci" / "run").read_text()


def test_test_command_is_the_one_ci_runs():
    assert "pytest\n" in bash_blocks()
    assert re.search(r"^HF_HUB_OFFLINE=1 pytest$", (ROOT / ".ci" / "run").read_text(), re.M)


@pytest.fixture(scope="session")
def hub_models(tiny_models_dir, tiny_phi2_dir) -> dict[str, Path]:
    """Tiny stand-ins, under their hub ids, for the models of the article's comparison: phi-2 and
    the finance fine-tune, a LoRA adapter whose adapter_config.json names microsoft/phi-2 as its base."""
    from pipeline.checkpoints import build_lora_adapter

    adapter = build_lora_adapter(tiny_models_dir / "phi2_finance_SFT", tiny_phi2_dir, base_name="microsoft/phi-2")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the published adapter ships its tokenizer
        shutil.copy(tiny_phi2_dir / name, adapter / name)
    return {"microsoft/phi-2": tiny_phi2_dir, "Ronal999/phi2_finance_SFT": adapter}


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir, hub_models, tmp_path):
    """Commands that name no model run on the tiny checkpoints (set as the defaults through the
    environment variables); so do commands that name only the article's hub models (tiny stand-ins
    put in the hub cache, found offline as a download would be); commands that name directories
    this machine lacks must fail with the one-line error that says how to pass a local directory."""
    from pipeline.checkpoints import seed_hub_cache

    for repo_id, directory in hub_models.items():
        seed_hub_cache(tmp_path / "hub", repo_id, directory)
    executable = shutil.which("bilingual-qa", path=str(Path(sys.executable).parent)) or "bilingual-qa"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path),
           "BILINGUAL_QA_LLM": str(tiny_phi2_dir), "BILINGUAL_QA_JA_EN": str(tiny_ja_en_dir),
           "BILINGUAL_QA_EN_JA": str(tiny_en_ja_dir)}
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    quick = " --beams 1" if " translate " in command or " finetune " in command else " --max-new-tokens 8 --beams 1"
    shell = command.replace("bilingual-qa", executable, 1) + quick
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, env=env, timeout=300, cwd=tmp_path)
    named = re.findall(r"--(?:llm|base|ja-en|en-ja) (\S+)", command)
    if any(name not in hub_models for name in named):
        assert proc.returncode == 2 and b"Traceback" not in proc.stderr, proc.stderr.decode()
        assert b"pass a local directory" in proc.stderr or b"does not exist" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr.decode()
        outputs = (".txt", ".jsonl", ".md", ".html", ".srt", ".vtt", ".docx")  # rows, or a document
        written = [p for p in tmp_path.iterdir() if p.suffix in outputs and p.stat().st_size]
        assert proc.stdout.strip() or written  # an answer on stdout, or a job's output file


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_python_block_runs(tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir, tmp_path):
    """The Python API block, as written, with one documented substitution: the hub ids it names become
    the tiny checkpoints (the models it leaves to the defaults come from BILINGUAL_QA_*). Each
    `print(...)  # "value"` must print that value."""
    [block] = [block for block in python_blocks() if block.startswith("from pipeline import")]
    swaps = {"microsoft/phi-2": tiny_phi2_dir, "Helsinki-NLP/opus-mt-ja-en": tiny_ja_en_dir}
    code = block
    for hub_id, directory in swaps.items():
        assert f'"{hub_id}"' in code
        code = code.replace(f'"{hub_id}"', repr(str(directory)))
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BILINGUAL_QA_LLM": str(tiny_phi2_dir),
           "BILINGUAL_QA_JA_EN": str(tiny_ja_en_dir), "BILINGUAL_QA_EN_JA": str(tiny_en_ja_dir)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    printed = proc.stdout.decode().splitlines()
    promised = re.findall(r'^print\(.*\)\s+# "([^"]+)"', block, re.M)
    assert promised == ["ja", "zh"]
    found = [line for line in printed if line in promised]
    assert found == promised, printed
    assert (tmp_path / "questions_en.txt").stat().st_size > 0


def test_flow_line_names_files_that_exist():
    flow = re.search(r"```\n(pipeline/.*?)```", README, re.S).group(1)
    named = re.findall(r"pipeline/[\w/]+\.py", flow)
    assert len(named) >= 5
    for path in named:
        assert (ROOT / path).is_file(), path


def test_benchmark_list_names_every_script_in_benchmarks():
    section = README.split("## Benchmarks", 1)[1]
    for script in sorted((ROOT / "benchmarks").iterdir()):
        if script.suffix in (".py", ".sh"):
            assert f"`{script.name}`" in section, f"README's benchmark list lacks {script.name}"


# ---- the serve section's curl lines, against a live `bilingual-qa serve` -----------------------------

def sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, re.S)


def sh_commands(program: str) -> list[str]:
    """The commands of the README's sh blocks that start with `program`, continuation lines joined
    and trailing comments cut."""
    joined = [" ".join(part.strip() for part in command.split("\\\n"))
              for block in sh_blocks() for command in re.split(r"(?<!\\)\n", block)]
    return [command.split("  #")[0].strip() for command in joined if command.startswith(program + " ")]


def curl_commands() -> list[str]:
    return sh_commands("curl")


def test_the_readme_has_the_curl_lines_of_every_api():
    paths = [re.search(r"localhost:8000(\S*)", command).group(1) for command in curl_commands()]
    assert {"/v1/ask", "/translate", "/detect", "/languages", "/v1/chat/completions", "/v1/models", "/metrics",
            "/health"} <= set(paths)
    assert any("-sN" in command and '"stream": true' in command for command in curl_commands())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def readme_server(hub_models, tiny_ja_en_dir, tiny_en_ja_dir, tmp_path_factory):
    """The README's first serve command, as written (on a free port instead of 8000, which another
    server may hold), with microsoft/phi-2 a tiny stand-in in an offline hub cache: so /v1/models
    lists it by its hub id, as it would list the real one. The translators are tiny ones through
    BILINGUAL_QA_JA_EN/EN_JA."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    from pipeline.checkpoints import seed_hub_cache

    home = tmp_path_factory.mktemp("readme-serve")
    seed_hub_cache(home / "hub", "microsoft/phi-2", hub_models["microsoft/phi-2"])
    [serve] = [command for command in sh_commands("bilingual-qa") if command == "bilingual-qa serve"]
    port = free_port()
    executable = shutil.which("bilingual-qa", path=str(Path(sys.executable).parent)) or "bilingual-qa"
    env = {key: value for key, value in os.environ.items() if not key.startswith("BILINGUAL_QA_")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"),
                "BILINGUAL_QA_JA_EN": str(tiny_ja_en_dir), "BILINGUAL_QA_EN_JA": str(tiny_en_ja_dir)})
    log = open(home / "serve.log", "wb")
    server = subprocess.Popen(["bash", "-c", f"exec {serve.replace('bilingual-qa', executable, 1)} --port {port}"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (home / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not come up"
            done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{url}/health"],
                                  capture_output=True, text=True)
            if done.stdout == "200":
                break
            time.sleep(0.5)
        yield port
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("command", curl_commands())
def test_readme_curl_line_runs_against_a_live_server(command, readme_server):
    """Each curl line as written, against `bilingual-qa serve` on loopback: 200 and the body it promises."""
    shell = command.replace("localhost:8000", f"127.0.0.1:{readme_server}") + " -w '\\n%{http_code}'"
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    body, _, status = proc.stdout.decode().rpartition("\n")
    assert status == "200", body
    path = re.search(r"localhost:8000(\S*)", command).group(1)
    if path == "/metrics":
        assert "bilingual_qa_requests_total" in body
        return
    if '"stream": true' in command:
        events = re.findall(r"^event: (\w+)$", body, re.M)
        assert events[0] == "question" and events[-1] == "result", body
        return
    reply = json.loads(body)
    if path == "/v1/ask":
        assert reply["answer_ja"] and reply["question_ja"] == "インフレとは何ですか？"
    elif path == "/translate":
        assert reply["translatedText"] and reply["detectedLanguage"]["language"] == "ja"
    elif path == "/detect":
        assert reply[0]["language"] == "ja"
    elif path == "/languages":
        assert {language["code"] for language in reply} == {"ja", "en"}
    elif path == "/v1/chat/completions":
        assert reply["model"] == "microsoft/phi-2" and reply["choices"][0]["message"]["content"]
    elif path == "/v1/models":
        assert [model["id"] for model in reply["data"]] == ["microsoft/phi-2"]  # the hub id, as the chat line uses
    elif path == "/health":
        assert reply == {"status": "ok", "max_batch": 64}  # max_batch: what `--server` clients send at once
    else:
        raise AssertionError(f"a curl line this test does not know what to expect of: {command}")
