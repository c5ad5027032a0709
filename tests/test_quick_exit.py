"""A finished command that used the GPU ends without the interpreter's teardown, and only then."""

import subprocess
import sys

import pytest

# A stand-in for a command's entry point after a GPU run: CUDA reported initialised (this machine
# may have no GPU), a buffered line not yet flushed, and an atexit handler that tells whether the
# interpreter's teardown ran.
SCRIPT = """
import atexit, sys, threading
import torch
from pipeline import quick_exit
mode = sys.argv[1]
if mode != "no-cuda":
    torch.cuda.is_initialized = lambda: True
atexit.register(lambda: print("teardown ran", file=sys.stderr, flush=True))
if mode == "thread":
    threading.Thread(target=threading.Event().wait, args=(0.5,)).start()
if mode == "traced":
    sys.settrace(lambda *args: None)
print("the answer", end="")

@quick_exit.ends_quickly
def run():
    sys.exit({code!r})

run()
"""


def finish(mode: str, code=3) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(code=code), mode], capture_output=True,
                          text=True, timeout=120)


def test_a_process_that_used_cuda_skips_the_teardown_but_keeps_its_output_and_exit_code():
    done = finish("cuda")
    assert (done.returncode, done.stdout) == (3, "the answer")
    assert "teardown ran" not in done.stderr


@pytest.mark.parametrize("mode", ["no-cuda", "thread", "traced"])
def test_the_teardown_runs_without_cuda_with_another_thread_alive_or_under_a_tracer(mode):
    done = finish(mode)
    assert (done.returncode, done.stdout) == (3, "the answer")
    assert "teardown ran" in done.stderr


def test_a_message_as_exit_code_is_printed_and_exits_1_as_sys_exit_does():
    done = finish("cuda", code="bilingual-qa: stopped")
    assert done.returncode == 1
    assert "bilingual-qa: stopped" in done.stderr and "teardown ran" not in done.stderr


def test_the_console_entry_point_ends_through_quick_exit():
    from pipeline import cli

    assert cli.run.__wrapped__.__name__ == "run" and cli.run.__module__ == "pipeline.cli"
