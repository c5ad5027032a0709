"""Jobs on a Dask cluster of two CPU worker processes: the same bytes as one process, whatever dies.

One local cluster serves the module (started once: its workers are processes that import torch);
the kill -9 test starts the CLI's own cluster in a subprocess, as a user's run would.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys

import pytest

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")
psutil = pytest.importorskip("psutil")

from pipeline import GenerationSettings, Translator  # noqa: E402
from pipeline.jobs import workers as jobs  # noqa: E402
from pipeline.jobs.cluster import local_cluster, worker_count  # noqa: E402

from crashes import kill_when_committed  # tests/jobs/crashes.py

# Test-made loaders and translators travel to the workers by value: the workers cannot import this file.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROWS = ["金利が上がると、人や企業にとって借り入れの費用が高くなります。", "円安は日本の輸出品を海外で安くします。", "",
        "The quick brown fox jumps over the lazy dog.", "東京の株式市場は午後に少し下がりました。", "これはペンです。",
        "这个问题很难吗"]


def many_rows(count: int) -> list[str]:
    return [ROWS[i % len(ROWS)] + ("これはペンです。" if i % 4 == 0 and ROWS[i % len(ROWS)] else "")
            for i in range(count)]


def write_rows(path, rows):
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(2) as running:
        with distributed.Client(running) as client:
            client.wait_for_workers(2, timeout=180)
        yield running.scheduler_address


def load_translator(directory: str) -> Translator:
    return Translator.from_pretrained(directory, device="cpu", backend="transformers", num_beams=1)


class DiesOnce(Translator):
    """Kills its own worker process in the middle of its first chunk (once per marker file)."""
    marker = ""

    def translate(self, texts, progress=None):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().translate(texts, progress)


def load_dying_translator(directory: str, marker: str) -> Translator:
    translator = DiesOnce.from_pretrained(directory, device="cpu", backend="transformers", num_beams=1)
    translator.marker = marker
    return translator


def translate(source, output, loader, **kwargs):
    return jobs.translate_file(source, output, to="en", load_translator=loader, options={"model": "tiny"},
                               quiet=True, chunk_rows=5, **kwargs)


def files_of(output):
    errors = output.with_name(output.name + ".errors.jsonl")  # only where a row failed
    return output.read_bytes(), errors.read_bytes() if errors.exists() else None


@pytest.fixture(scope="module")
def one_worker(tiny_ja_en_dir, tmp_path_factory):
    """An input of 40 rows (blank and failed ones among them) and its output from one process."""
    folder = tmp_path_factory.mktemp("one-worker")
    source = write_rows(folder / "in.txt", many_rows(40))
    summary = translate(source, folder / "out.txt", functools.partial(load_translator, str(tiny_ja_en_dir)))
    assert summary.failed > 0 and summary.blank > 0 and summary.copied > 0
    return source, files_of(folder / "out.txt"), summary.counts()


def test_two_workers_write_the_same_bytes_as_one(cluster, one_worker, tiny_ja_en_dir, tmp_path):
    source, expected, counts = one_worker
    summary = translate(source, tmp_path / "out.txt", functools.partial(load_translator, str(tiny_ja_en_dir)),
                        cluster=cluster)
    assert files_of(tmp_path / "out.txt") == expected and summary.counts() == counts


def test_a_worker_killed_mid_chunk_has_its_chunk_run_again_and_the_bytes_stay_the_same(
        cluster, one_worker, tiny_ja_en_dir, tmp_path):
    source, expected, counts = one_worker
    marker = tmp_path / "a-worker-died"
    loader = functools.partial(load_dying_translator, str(tiny_ja_en_dir), str(marker))
    summary = translate(source, tmp_path / "out.txt", loader, cluster=cluster)
    assert marker.exists()  # a worker did die
    assert files_of(tmp_path / "out.txt") == expected and summary.counts() == counts


def load_qa(phi2: str, ja_en: str, en_ja: str):
    from pipeline import BilingualQA

    return BilingualQA.from_pretrained(phi2, ja_en, en_ja, device="cpu", engine="transformers",
                                       mt_backend="transformers", beams=1)


def test_ask_file_on_two_workers_writes_the_same_bytes_as_one(cluster, qa, tiny_phi2_dir, tiny_ja_en_dir,
                                                              tiny_en_ja_dir, tmp_path):
    source = write_rows(tmp_path / "q.txt", ["What is inflation?", "円安とは何ですか？", "", "这个问题很难吗",
                                             "Why do rates rise?", "株式とは何ですか？", "What is a bond?"])
    kwargs = dict(options=qa.job_options(), settings=GenerationSettings(max_new_tokens=4), quiet=True, chunk_rows=2)
    jobs.ask_file(source, tmp_path / "one.jsonl", load_qa=lambda: qa, **kwargs)
    loader = functools.partial(load_qa, str(tiny_phi2_dir), str(tiny_ja_en_dir), str(tiny_en_ja_dir))
    jobs.ask_file(source, tmp_path / "two.jsonl", load_qa=loader, cluster=cluster, **kwargs)
    assert files_of(tmp_path / "two.jsonl") == files_of(tmp_path / "one.jsonl")


def test_workers_auto_is_one_on_a_machine_without_a_gpu():
    import torch

    assert worker_count("auto") == max(1, torch.cuda.device_count())
    assert worker_count("3") == 3


def test_driver_killed_by_kill_9_leaves_no_worker_behind_and_resumes_to_the_same_bytes(tiny_ja_en_dir, tmp_path):
    source = write_rows(tmp_path / "in.txt", many_rows(120))  # long enough to be killed mid-job
    output, progress = tmp_path / "out.txt", tmp_path / "out.txt.progress.json"
    args = ["translate", str(source), "-o", str(output), "--to", "en", "--chunk-rows", "5", "--ja-en",
            str(tiny_ja_en_dir), "--device", "cpu", "--beams", "1", "--mt-backend", "transformers", "--workers", "2"]
    whole = subprocess.run([sys.executable, "-m", "pipeline", *args[:3], str(tmp_path / "whole.txt"), *args[4:-2]],
                           capture_output=True, timeout=300)  # one process, no --workers
    assert whole.returncode == 0, whole.stderr.decode()

    driver = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stderr=subprocess.DEVNULL)
    workers = []

    def note_workers() -> None:
        workers[:] = psutil.Process(driver.pid).children(recursive=True) or workers

    kill_when_committed(driver, progress, 10, 240, poll=0.02, while_waiting=note_workers)
    assert len(workers) >= 2  # the two worker processes were the driver's children
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"worker processes outlived their driver: {alive}"
    assert not json.loads(progress.read_text())["finished"]

    resumed = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert output.read_bytes() == (tmp_path / "whole.txt").read_bytes()
    assert files_of(output)[1] == files_of(tmp_path / "whole.txt")[1]
