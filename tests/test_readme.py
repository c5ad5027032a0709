"""The README and the docs pages are the front door: every command and code block in them works as
written. `bilingual-qa` lines of bash blocks run on the tiny checkpoints; the curl lines and the
`--server` commands of sh blocks run against a live `bilingual-qa serve`; every Python block runs
(hub ids swapped for tiny checkpoints, a server's address for the live one); the download recipe
runs against a stand-in hub on loopback."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_hub import FakeHub  # tests/fake_hub.py

ROOT = Path(__file__).resolve().parents[1]
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
README = PAGES["README.md"]
EXECUTABLE = shutil.which("bilingual-qa", path=str(Path(sys.executable).parent)) or "bilingual-qa"
HUB_IDS = ("microsoft/phi-2", "Ronal999/phi2_finance_SFT", "Helsinki-NLP/opus-mt-ja-en", "staka/fugumt-en-ja")


def blocks(kind: str, text: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", text, re.S)


def lines_of(kind: str) -> list[tuple[str, str]]:
    """(page, command) for each command of the pages' `kind` blocks: continuation lines joined."""
    found = []
    for page, text in PAGES.items():
        for block in blocks(kind, text):
            for command in re.split(r"(?<!\\)\n", block):
                command = " ".join(part.strip() for part in command.split("\\\n")).strip()
                if command and not command.startswith("#"):
                    found.append((page, command))
    return found


def without_comment(command: str) -> str:
    return command.split("  #")[0].strip()


def documented_commands_raw() -> list[tuple[str, str]]:
    return [(page, without_comment(command)) for page, command in lines_of("bash") if "bilingual-qa " in command]


def documented_commands() -> list:
    """Each command once, under the first page that shows it."""
    first = {}
    for page, command in documented_commands_raw():
        first.setdefault(command, page)
    return [pytest.param(command, id=f"{page}: {command[:70]}") for command, page in first.items()]


def test_install_command_is_the_one_ci_runs():
    """The contributor's line of the README is CI's, CI adding only the torch version it pins."""
    [install] = [line for block in blocks("bash", README) for line in block.splitlines()
                 if "pip install" in line and ".[test" in line]
    pip_args = install.split("pip install", 1)[1].strip()
    assert re.search(rf"^pip install --quiet (torch==\S+ )?{re.escape(pip_args)}$",
                     (ROOT / ".ci" / "run").read_text(), re.M)


def test_test_command_is_the_one_ci_runs():
    assert any(block.rstrip().endswith("\npytest") or block == "pytest\n" for block in blocks("bash", README))
    assert re.search(r"^HF_HUB_OFFLINE=1 pytest$", (ROOT / ".ci" / "run").read_text(), re.M)


@pytest.fixture(scope="session")
def hub_models(tiny_models_dir, tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir) -> dict[str, Path]:
    """Tiny stand-ins, under their hub ids, for the models the pages name: phi-2, the finance
    fine-tune (a LoRA adapter whose adapter_config.json names microsoft/phi-2 as its base) and the
    two translators."""
    from pipeline.checkpoints import build_lora_adapter

    adapter = build_lora_adapter(tiny_models_dir / "phi2_finance_SFT", tiny_phi2_dir, base_name="microsoft/phi-2")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the published adapter ships its tokenizer
        shutil.copy(tiny_phi2_dir / name, adapter / name)
    return {"microsoft/phi-2": tiny_phi2_dir, "Ronal999/phi2_finance_SFT": adapter,
            "Helsinki-NLP/opus-mt-ja-en": tiny_ja_en_dir, "staka/fugumt-en-ja": tiny_en_ja_dir}


def tiny_environment(tmp_path: Path, hub_models: dict[str, Path], **extra: str) -> dict[str, str]:
    """The tiny checkpoints as the defaults, and as the hub's models in an offline cache."""
    from pipeline.checkpoints import seed_hub_cache

    for repo_id, directory in hub_models.items():
        if not (tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))).exists():
            seed_hub_cache(tmp_path / "hub", repo_id, directory)
    env = {key: value for key, value in os.environ.items() if not key.startswith("BILINGUAL_QA_")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "BILINGUAL_QA_LLM": str(hub_models["microsoft/phi-2"]),
            "BILINGUAL_QA_JA_EN": str(hub_models["Helsinki-NLP/opus-mt-ja-en"]),
            "BILINGUAL_QA_EN_JA": str(hub_models["staka/fugumt-en-ja"]), **extra}


def quick(command: str) -> str:
    """The command, answering and translating briefly (8 tokens, one beam), run by our executable."""
    words = command.split("bilingual-qa ", 1)[1].split()
    flags = {"ask": " --max-new-tokens 8 --beams 1", "compare": " --max-new-tokens 8 --beams 1",
             "translate": " --beams 1", "finetune": " --beams 1"}.get(words[0], "")
    return command.replace("bilingual-qa", EXECUTABLE, 1) + flags if flags else command.replace(
        "bilingual-qa", EXECUTABLE)


@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_runs(command, hub_models, tmp_path):
    """Commands that name no model run on the tiny checkpoints (the defaults, through the environment
    variables); so do commands that name only hub models (tiny stand-ins in the hub cache, found
    offline as a download would be); commands that name directories this machine lacks must fail
    with the one-line error that says how to pass a local directory."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    proc = subprocess.run(["bash", "-c", quick(command)], capture_output=True, env=tiny_environment(tmp_path, hub_models),
                          timeout=300, cwd=tmp_path)
    named = re.findall(r"--(?:llm|base|ja-en|en-ja) (\S+)", command)
    if any(name not in hub_models for name in named):
        assert proc.returncode == 2 and b"Traceback" not in proc.stderr, proc.stderr.decode()
        assert b"pass a local directory" in proc.stderr or b"does not exist" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr.decode()
    if "tiny-models" in command:
        assert (tmp_path / "tiny-models" / "TINY-MODELS.txt").is_file()
        return
    outputs = (".txt", ".jsonl", ".md", ".html", ".srt", ".vtt", ".docx")  # rows, or a document
    written = [p for p in tmp_path.iterdir() if p.suffix in outputs and p.stat().st_size]
    assert proc.stdout.strip() or written  # an answer on stdout, or a job's output file


def test_the_download_recipe_runs_as_written_then_offline(hub_models, tmp_path):
    """Every `hf download` the pages show, and the Python `snapshot_download` block, against a
    stand-in hub; then, offline, the commands that run on the downloaded directories."""
    downloads = sorted({line.strip() for text in PAGES.values()
                        for line in re.findall(r"(?:^|`)(hf download [^`\n]+)", text, re.M)})
    assert len(downloads) >= 4 and any("--local-dir" in line for line in downloads)
    [snapshot] = [block for text in PAGES.values() for block in blocks("python", text) if "snapshot_download" in block]
    offline = tiny_environment(tmp_path, hub_models)
    with FakeHub(repos=hub_models) as hub:
        online = {**offline, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "fresh"),
                  "HF_HUB_DISABLE_TELEMETRY": "1"}
        online.pop("TRANSFORMERS_OFFLINE", None)
        for line in downloads:
            hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or "hf"
            proc = subprocess.run(["bash", "-c", line.replace("hf", hf, 1)], capture_output=True, env=online,
                                  timeout=300, cwd=tmp_path)
            assert proc.returncode == 0, f"{line}: {proc.stderr.decode()[-2000:]}"
        (tmp_path / "snapshot").mkdir()
        proc = subprocess.run([sys.executable, "-c", snapshot], capture_output=True, env=online, timeout=300,
                              cwd=tmp_path / "snapshot")
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert (tmp_path / "snapshot" / "models" / "phi-2" / "model.safetensors").is_file()
    local = [command for _, command in documented_commands_raw() if "./models/" in command]
    assert len(local) >= 2
    for command in local:
        proc = subprocess.run(["bash", "-c", quick(command)], capture_output=True, env=offline, timeout=300,
                              cwd=tmp_path)
        assert proc.returncode == 0, f"{command}: {proc.stderr.decode()[-2000:]}"
        assert proc.stdout.startswith(b"Q: ")


def python_blocks() -> list:
    return [pytest.param(block, id=f"{page}: {block.splitlines()[0][:60]}")
            for page, text in PAGES.items() for block in blocks("python", text)
            if "snapshot_download" not in block and ":8000" not in block]


@pytest.mark.parametrize("block", python_blocks())
def test_documented_python_block_runs(block, hub_models, tmp_path):
    """Each Python block as written, the hub ids it names swapped for the tiny checkpoints (the
    models it leaves to the defaults come from BILINGUAL_QA_*). Each `print(...)  # "value"` must
    print that value."""
    code = block
    for hub_id in HUB_IDS:
        code = code.replace(f'"{hub_id}"', repr(str(hub_models[hub_id])))
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=tiny_environment(tmp_path, hub_models),
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    promised = re.findall(r'^\s*print\(.*\)\s+# "([^"]+)"', block, re.M)
    printed = proc.stdout.decode().splitlines()
    assert [line for line in printed if line in promised] == promised, printed
    if "translate_file(" in block:
        assert (tmp_path / "questions_en.txt").stat().st_size > 0


def test_the_readme_python_block_promises_what_detection_says():
    [block] = [block for page, text in PAGES.items() if page == "docs/python.md"
               for block in blocks("python", text) if block.startswith("from pipeline import BilingualQA,")]
    assert re.findall(r'^print\(.*\)\s+# "([^"]+)"', block, re.M) == ["ja", "zh"]


def test_flow_line_names_files_that_exist():
    flow = re.search(r"```\n(pipeline/.*?)```", README, re.S).group(1)
    named = re.findall(r"pipeline/[\w/]+\.py", flow)
    assert len(named) >= 5
    for path in named:
        assert (ROOT / path).is_file(), path


def test_benchmark_list_names_every_script_in_benchmarks():
    page = PAGES["docs/hardware.md"]
    for script in sorted((ROOT / "benchmarks").iterdir()):
        if script.suffix in (".py", ".sh"):
            assert f"`{script.name}`" in page, f"the hardware page's benchmark list lacks {script.name}"


# ---- the sh blocks: curl lines and `--server` commands against a live `bilingual-qa serve` -------------

def curl_commands() -> list:
    return [pytest.param(command, id=f"{page}: {without_comment(command)[:80]}")
            for page, command in lines_of("sh") if command.startswith("curl ")]


def test_the_pages_have_the_curl_lines_of_every_api():
    paths = [re.search(r"localhost:8000(\S*)", command.values[0]).group(1) for command in curl_commands()]
    assert {"/v1/ask", "/translate", "/detect", "/languages", "/v1/chat/completions", "/v1/models", "/metrics",
            "/health"} <= set(paths)
    assert any("-sN" in c.values[0] and '"stream": true' in c.values[0] for c in curl_commands())
    assert any(re.search(r"localhost:8000/v1/ask", c) for c in re.findall(r"^curl .*", "\n".join(blocks("sh", README)), re.M))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def readme_server(hub_models, tmp_path_factory):
    """The pages' first serve command, as written (on a free port instead of 8000, which another
    server may hold), with microsoft/phi-2 a tiny stand-in in an offline hub cache: so /v1/models
    lists it by its hub id, as it would list the real one. The translators are tiny ones through
    BILINGUAL_QA_JA_EN/EN_JA."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    from pipeline.checkpoints import seed_hub_cache

    home = tmp_path_factory.mktemp("readme-serve")
    seed_hub_cache(home / "hub", "microsoft/phi-2", hub_models["microsoft/phi-2"])
    assert ("README.md", "bilingual-qa serve") in lines_of("sh")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("BILINGUAL_QA_")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"),
                "BILINGUAL_QA_JA_EN": str(hub_models["Helsinki-NLP/opus-mt-ja-en"]),
                "BILINGUAL_QA_EN_JA": str(hub_models["staka/fugumt-en-ja"])})
    log = open(home / "serve.log", "wb")
    server = subprocess.Popen(["bash", "-c", f"exec {EXECUTABLE} serve --port {port}"],
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


def expected_status(command: str) -> int:
    """200, or the status a line's comment promises (`# 400: ...`)."""
    comment = command.split("  #", 1)[1] if "  #" in command else ""
    found = re.match(r"\s*(\d{3})\b", comment)
    return int(found.group(1)) if found else 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("command", curl_commands())
def test_documented_curl_line_runs_against_a_live_server(command, readme_server):
    """Each curl line as written, against `bilingual-qa serve` on loopback: the status and the body it promises."""
    status_wanted = expected_status(command)
    shell = without_comment(command).replace("localhost:8000", f"127.0.0.1:{readme_server}") + " -w '\\n%{http_code}'"
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    body, _, status = proc.stdout.decode().rpartition("\n")
    assert status == str(status_wanted), body
    path = re.search(r"localhost:8000(\S*)", command).group(1)
    if status_wanted != 200:
        reply = json.loads(body)
        assert reply["error"]
        for name, value in re.findall(r'"(code|language)": "(\w+)"', command.split("  #", 1)[1]):
            assert reply[name] == value, reply
        return
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


def server_commands() -> list:
    """The `bilingual-qa` commands of sh blocks that send their work to a server (not `serve` itself)."""
    return [pytest.param(without_comment(command), id=f"{page}: {without_comment(command)[:70]}")
            for page, command in lines_of("sh") if command.startswith("bilingual-qa ") and " serve" not in command]


@pytest.mark.parametrize("command", server_commands())
def test_documented_server_command_runs_against_a_live_server(command, readme_server, tmp_path):
    """The `--server` examples, with BILINGUAL_QA_SERVER exported as the page exports it."""
    assert any(line == "export BILINGUAL_QA_SERVER=http://127.0.0.1:8000" for _, line in lines_of("sh"))
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {key: value for key, value in os.environ.items() if not key.startswith("BILINGUAL_QA_")}
    env |= {"HF_HUB_OFFLINE": "1", "BILINGUAL_QA_SERVER": f"http://127.0.0.1:{readme_server}"}
    shell = command.replace("bilingual-qa", EXECUTABLE, 1) + (" --max-new-tokens 8" if " ask" in command else "")
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    written = [p for p in tmp_path.iterdir() if p.is_file() and p.stat().st_size]
    assert proc.stdout.startswith(b"Q: ") or written


def test_documented_serve_lines_take_their_options():
    """Every `bilingual-qa serve ...` line the pages show parses (its options exist, its values fit)."""
    from pipeline.cli import main

    lines = [command for _, command in lines_of("sh") if "bilingual-qa serve" in command]
    assert len(lines) >= 3
    for line in lines:
        args = shlex.split(without_comment(line).split("bilingual-qa serve", 1)[1])
        context = main.get_command(None, "serve").make_context("serve", args)  # raises on an unknown option
        assert context.params["port"] == 8000


@pytest.mark.parametrize("block", [pytest.param(block, id=f"{page}: {block.splitlines()[0][:50]}")
                                   for page, text in PAGES.items() for block in blocks("python", text)
                                   if ":8000" in block])
def test_documented_client_block_runs_against_a_live_server(block, readme_server):
    """The openai and LibreTranslate client examples, as written, against the live server."""
    code = block.replace("127.0.0.1:8000", f"127.0.0.1:{readme_server}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.strip()
    promised = re.findall(r'^\s*print\(.*\)\s+# "([^"]+)"', block, re.M)
    assert [line for line in proc.stdout.decode().splitlines() if line in promised] == promised
