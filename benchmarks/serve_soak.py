"""`bilingual-qa serve` soaked: many loopback clients sending good, bad, abandoned and slow requests
for minutes, on the CPU with the tiny checkpoints; afterwards a good request must still answer, no
response may be a 5xx, and the server's memory must have stopped growing.

Each of --clients threads loops until --minutes have passed, picking at random (seeded):
- good (55%): /v1/ask (English or Japanese, streamed or not), /translate, /detect, chat completions;
- bad (25%): broken JSON, lone surrogates, Infinity, huge integers, deep nesting, lists for strings,
  text/plain bodies, another site's Host or Origin, a 1.5 MB body (413);
- abandoned (17%): a stream closed after its first event, a client that gives up after 0.2 s, a
  connection closed mid-body;
- slow (3%, but each holds its client until the server's timeouts close it): a head or a body sent
  a byte a second;
- attacks (issue 33, --attacks, 10% of the rolls taken from good): a translation of 20 KB sent and
  dropped, a document without a sentence break (50 KB), a /detect of 150 KB, a megabyte of nested
  arrays without a key, a tiny temperature (1e-300), the key's name percent-escaped in the query,
  a request with both Content-Length and Transfer-Encoding, a Host of 127.0.0.1:80@evil.example.
  The server then has a key (sent as a bearer token by every other kind) and `--max-queue 64`, so
  the floods meet the queue limit: its 503s are counted apart from any other 5xx.
The server's RSS is read from /proc every 5 s. One table at the end; --out writes it (and JSON) too.

    nice python benchmarks/serve_soak.py                        # 10 minutes, 50 clients
    python benchmarks/serve_soak.py --minutes 1 --clients 8     # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json", **AUTH}
TOPICS = ["bonds", "loans", "prices", "wages", "savings", "mortgages", "stocks", "pensions", "taxes", "rents",
          "deposits", "exports", "imports", "profits", "dividends", "budgets"]
JA_TOPICS = ["金利", "インフレ", "債券", "株式", "複利", "為替", "年金", "住宅ローン", "預金", "税金"]
BAD_BODIES = [b'{"question": "\\ud800"}', b'{"question": "What?", "max_new_tokens": Infinity}',
              b'{"question": "What?", "temperature": 1e400}', b'{"question": "What?", "seed": ' + b"9" * 5000 + b"}",
              b'{"question": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", b'{"question": ["What?"]}', b"{oops"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, url: str, seed: int, attacks: bool = False):
        self.url = url
        self.host, self.port = url.removeprefix("http://").split(":")
        self.seed = seed
        self.attacks = attacks
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()  # (kind, status) -> count
        self.good_seconds: list[float] = []

    def record(self, kind: str, status, seconds: float | None = None) -> None:
        with self.lock:
            self.outcomes[(kind, status)] += 1
            if seconds is not None:
                self.good_seconds.append(seconds)

    def client(self, index: int, until: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        with httpx.Client(base_url=self.url, timeout=120, headers=AUTH) as http:
            while time.monotonic() < until:
                roll = rng.random()
                kind = "attack" if self.attacks and roll < 0.10 else "good" if roll < 0.55 else \
                    "bad" if roll < 0.80 else "abandoned" if roll < 0.97 else "slow"
                try:
                    if kind == "attack":
                        self.attack(http, rng)
                    elif kind == "good":
                        self.good(http, rng)
                    elif kind == "bad":
                        self.bad(http, rng)
                    elif kind == "abandoned":
                        self.abandoned(rng)
                    else:
                        self.slow(rng)
                except (httpx.TransportError, OSError) as error:  # by the kind that met it
                    self.record(f"transport-error ({kind})", type(error).__name__)
                except Exception as error:  # noqa: BLE001 - a client's own bug must not end the soak silently
                    self.record("client-error", f"{type(error).__name__}: {error}"[:80])

    def good(self, http: httpx.Client, rng: random.Random) -> None:
        topic = f"{rng.choice(TOPICS)} and {rng.choice(TOPICS)}"  # many different texts: the memory cannot hold all
        choice = rng.randrange(5)
        began = time.perf_counter()
        if choice == 0:
            response = http.post("/v1/ask", json={"question": f"How do {topic} change when interest rates rise?",
                                                  "max_new_tokens": 16})
        elif choice == 1:
            with http.stream("POST", "/v1/ask", json={"question": f"{rng.choice(JA_TOPICS)}とは何ですか？",
                                                      "max_new_tokens": 16, "stream": True}) as response:
                lines = list(response.iter_lines())
            if response.status_code == 200 and "event: result" not in lines:
                self.record("good", "stream without result")
                return
        elif choice == 2:
            response = http.post("/translate", data={"q": f"The bank said that {topic} would rise.", "target": "ja"})
        elif choice == 3:
            response = http.post("/detect", json={"q": f"{rng.choice(JA_TOPICS)}について教えてください"})
        else:
            response = http.post("/v1/chat/completions", json={"max_tokens": 16, "messages": [
                {"role": "user", "content": [{"type": "text", "text": f"Why do {topic} matter to savers?"}]}]})
        if response.status_code != 200:
            try:
                said = response.text[:100]
            except httpx.ResponseNotRead:  # the streamed one's lines were read instead
                said = "(streamed)"
            self.record("good", f"{response.status_code} {said}")
            return
        self.record("good", response.status_code, time.perf_counter() - began)

    def bad(self, http: httpx.Client, rng: random.Random) -> None:
        choice = rng.randrange(len(BAD_BODIES) + 5)
        if choice < len(BAD_BODIES):
            response = http.post("/v1/ask", content=BAD_BODIES[choice], headers=JSON)
        elif choice == len(BAD_BODIES):
            response = http.post("/translate", content=b"q=hi&target=ja&target=en",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        elif choice == len(BAD_BODIES) + 1:
            response = http.post("/v1/ask", content=b'{"question": "What?"}', headers={"Content-Type": "text/plain"})
        elif choice == len(BAD_BODIES) + 2:
            response = http.post("/detect", json={"q": "hello"}, headers={"Host": "attacker.example"})
        elif choice == len(BAD_BODIES) + 3:
            response = http.post("/detect", json={"q": "hello"}, headers={"Origin": "https://attacker.example"})
        else:
            response = http.post("/translate", content=b'{"q": "' + b"x" * 1_500_000 + b'", "target": "ja"}',
                                 headers=JSON)
        self.record("bad", response.status_code)

    def attack(self, http: httpx.Client, rng: random.Random) -> None:
        choice = rng.randrange(8)
        if choice == 0:  # a translation sent and dropped
            with socket.create_connection((self.host, int(self.port)), timeout=10) as sock:
                body = json.dumps({"q": f"Prices rose {rng.random()} points. " * 600, "target": "ja"}).encode()
                sock.sendall(b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                time.sleep(0.3)
            self.record("attack", "dropped translation")
            return
        if choice == 1:
            response = http.post("/translate", json={"q": f"hello world {rng.random()}. " * 2000, "target": "ja"},
                                 timeout=900)
        elif choice == 2:
            response = http.post("/detect", json={"q": f"The rate {rng.random()} rose again. " * 6000})
        elif choice == 3:  # no key, a megabyte of arrays
            response = httpx.post(f"{self.url}/translate", content=b'{"q": [' + b"[]," * 330_000 + b"[]]}",
                                  headers={"Content-Type": "application/json"}, timeout=60)
        elif choice == 4:
            response = http.post("/v1/ask", json={"question": "What is a bond?", "temperature": "1e-300",
                                                  "max_new_tokens": 16})
        elif choice == 5:
            response = httpx.get(f"{self.url}/v1/models?api%5Fkey={KEY}", timeout=30)
        elif choice == 6:
            with socket.create_connection((self.host, int(self.port)), timeout=10) as sock:
                sock.sendall(b"POST /detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
                status = sock.recv(64).split(b" ")[1:2]
            self.record("attack", int(status[0]) if status else "no answer")
            return
        else:
            response = httpx.get(f"{self.url}/health", headers={"Host": "127.0.0.1:80@evil.example"}, timeout=30)
        self.record("attack", response.status_code)

    def abandoned(self, rng: random.Random) -> None:
        choice = rng.randrange(3)
        if choice == 0:
            with httpx.stream("POST", f"{self.url}/v1/ask", timeout=60, headers=AUTH,
                              json={"question": "What is a bond?", "max_new_tokens": 200, "stream": True}) as response:
                next(response.iter_lines())
        elif choice == 1:
            try:
                httpx.post(f"{self.url}/translate", json={"q": f"A long wait {rng.random()}.", "target": "ja"},
                           headers=AUTH, timeout=0.2)
            except httpx.TimeoutException:
                pass
        else:
            with socket.create_connection((self.host, int(self.port)), timeout=10) as sock:
                sock.sendall(b"POST /v1/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             + f"Authorization: Bearer {KEY}\r\n".encode() + b"Content-Length: 500\r\n\r\n{\"question\": \"Wh")
        self.record("abandoned", "sent")

    def slow(self, rng: random.Random) -> None:
        began = time.monotonic()
        head = b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        with socket.create_connection((self.host, int(self.port)), timeout=10) as sock:
            if rng.random() < 0.5:  # the head a byte a second
                trickle = head + b"X-Slow: " + b"a" * 200
            else:  # the head at once, the body a byte a second
                sock.sendall(head + b"Content-Length: 1000\r\n\r\n")
                trickle = b'{"q": "' + b"a" * 200
            try:
                for byte in trickle:
                    sock.sendall(bytes([byte]))
                    time.sleep(1)
                    sock.settimeout(0.01)
                    try:
                        if sock.recv(4096) == b"":
                            break
                    except socket.timeout:
                        pass
            except OSError:
                pass
        self.record("slow", f"closed after {10 * round((time.monotonic() - began) / 10)} s")


def run(args) -> dict:
    from pipeline.checkpoints import build_tiny_marian, build_tiny_phi2
    from pipeline.serve.ready import ServerNotReady, wait_until_ready

    root = Path(tempfile.mkdtemp(prefix="serve-soak-"))
    models = ["--llm", str(build_tiny_phi2(root / "phi-2")), "--ja-en", str(build_tiny_marian(root / "opus-mt-ja-en",
              "ja", "en")), "--en-ja", str(build_tiny_marian(root / "fugumt-en-ja", "en", "ja"))]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--device", "cpu",
                               "--engine", "transformers", "--mt-backend", "transformers",
                               *(["--api-key", KEY, "--max-queue", "64"] if args.attacks else []),
                               *models], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until_ready(url, process=server, timeout=180)
    except ServerNotReady as error:
        server.kill()
        raise SystemExit(f"{error}: {(root / 'server.log').read_text()[-2000:]}") from None
    soak = Soak(url, args.seed, args.attacks)
    rss = [(0.0, rss_mib(server.pid))]
    began = time.monotonic()
    until = began + args.minutes * 60
    threads = [threading.Thread(target=soak.client, args=(i, until), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        time.sleep(5)
        rss.append((time.monotonic() - began, rss_mib(server.pid)))
    after = httpx.post(f"{url}/v1/ask", json={"question": "What is a bond?", "max_new_tokens": 16}, timeout=120,
                       headers=AUTH)
    health = httpx.get(f"{url}/health", timeout=10).status_code
    stop_began = time.monotonic()
    server.send_signal(signal.SIGTERM)
    exit_code = server.wait(timeout=120)
    return {"soak": soak, "rss": rss, "after": after.status_code, "after_has_answer": bool(after.json().get("answer_ja")),
            "health": health, "exit": exit_code, "stop_seconds": time.monotonic() - stop_began,
            "log_errors": sum("Traceback" in line for line in (root / "server.log").read_text().splitlines())}


def report(args, result: dict) -> tuple[str, dict]:
    soak, rss = result["soak"], result["rss"]
    by_kind: dict[str, Counter] = {}
    for (kind, status), count in soak.outcomes.items():
        by_kind.setdefault(kind, Counter())[str(status)] += count
    fives = sum(count for (kind, status), count in soak.outcomes.items() if _server_error(status))
    queue_full = sum(count for (kind, status), count in soak.outcomes.items() if _queue_full(status))
    third = len(rss) // 3
    thirds = [rss[third][1], rss[2 * third][1], rss[-1][1]]
    seconds = sorted(soak.good_seconds)
    figures = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join(["python", "benchmarks/serve_soak.py", *sys.argv[1:]]),
        "minutes": args.minutes, "clients": args.clients, "requests": sum(soak.outcomes.values()),
        "by_kind": {kind: dict(counts) for kind, counts in by_kind.items()}, "responses_5xx": fives,
        "queue_full_503": queue_full,
        "good_p50_s": round(statistics.median(seconds), 3) if seconds else None,
        "good_p99_s": round(seconds[int(0.99 * (len(seconds) - 1))], 3) if seconds else None,
        "rss_mib_start_third_twothirds_end": [round(rss[0][1]), *[round(value) for value in thirds]],
        "rss_growth_last_third_mib": round(thirds[2] - thirds[1], 1),
        "after": result["after"], "after_has_answer": result["after_has_answer"], "health_after": result["health"],
        "sigterm_exit": result["exit"], "sigterm_seconds": round(result["stop_seconds"], 1),
        "tracebacks_in_log": result["log_errors"],
    }
    lines = [f"serve soak: {figures['minutes']} min, {figures['clients']} clients, {figures['requests']:,} requests "
             f"({figures['date']}; {figures['machine']})", "",
             "| kind | outcomes |", "|---|---|"]
    lines += [f"| {kind} | {', '.join(f'{status}: {count:,}' for status, count in sorted(counts.items()))} |"
              for kind, counts in sorted(by_kind.items())]
    lines += ["", f"- 5xx responses: {fives} (besides {queue_full} 503s of a full --max-queue, which the limit"
              f" promises); tracebacks in the server log: {figures['tracebacks_in_log']}",
              f"- good requests: p50 {figures['good_p50_s']} s, p99 {figures['good_p99_s']} s",
              f"- server RSS (MiB) at start, 1/3, 2/3, end: {figures['rss_mib_start_third_twothirds_end']};"
              f" growth over the last third {figures['rss_growth_last_third_mib']} MiB",
              f"- afterwards: /v1/ask {figures['after']} (answer_ja present: {figures['after_has_answer']}),"
              f" /health {figures['health_after']}; SIGTERM: exit {figures['sigterm_exit']} after"
              f" {figures['sigterm_seconds']} s"]
    return "\n".join(lines), figures


def _queue_full(status) -> bool:
    """A 503 of the queue limit: an attack's (its status alone) or a good request's (with its text)."""
    return status == 503 or (isinstance(status, str) and status.startswith("503 ") and "queue is full" in status)


def _server_error(status) -> bool:
    code = status if isinstance(status, int) else int(status[:3]) if str(status)[:3].isdigit() else 0
    return code >= 500 and not _queue_full(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--attacks", action="store_true", help="mix in issue 33's attacks (with a key, --max-queue 64)")
    parser.add_argument("--out", type=Path, default=None, help="write the table (.md) and figures (.json) here")
    args = parser.parse_args()
    table, figures = report(args, run(args))
    print(table)
    if args.out:
        args.out.with_suffix(".md").write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
