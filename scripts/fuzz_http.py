"""A bounded HTTP fuzz run against `adaq serve` on loopback: mutated requests, half-open sockets and a hostile chat
template; it counts 5xx answers, tracebacks in the server's log, hangs (a /health probe after every batch) and
client-side errors.

    python scripts/fuzz_http.py [CKPT] [--requests 600] [--max-seconds 300] [--seed 0] [--json out.json]

Without CKPT it builds the tests' tiny random NVFP4 Qwen3 (tests/helpers) in a temporary folder. The checkpoint is
copied and given a chat template that loops 10^10 times for the message "loop" and builds a 10 GB string for
"big". The server listens on 127.0.0.1 only; the run stops after --requests requests or --max-seconds, whichever
comes first. Exit code 0 when every count that matters (5xx, tracebacks, hangs) is zero.
"""

import argparse
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers.hostile import HOSTILE_TEMPLATE, READ_TIMEOUT_S, TEMPLATE_TIMEOUT_S  # noqa: E402

API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "tiny"
BATCH = 20
SERVER_FLAGS = ["--backend", "reference", "--device", "cpu", "--dtype", "fp32", "--kv-cache-dtype", "bf16",
                "--max-model-len", "192", "--max-num-seqs", "8", "--max-queue", "16", "--max-prompt-tokens", "128",
                "--max-output-tokens", "8", "--max-body-bytes", str(256 * 1024), "--kv-cache-memory", "64MiB",
                "--api-key", API_KEY, "--served-model-name", MODEL, "--read-timeout", str(READ_TIMEOUT_S),
                "--keep-alive", "1", "--chat-template-timeout", str(TEMPLATE_TIMEOUT_S), "--log-level", "warning"]
ODD_STRINGS = ["", " ", "\x00", "\ud800", "\udfff", "\u202e\u202d", "\u200b" * 50, "☃" * 1000, "🤖" * 500,
               "\r\n\r\n", "%s%n%x", "{{ 7*7 }}", "<|endoftext|>", "a" * 100_000, "\\u0000", "' OR 1=1 --",
               "é" * 50_000, "\uffff\ufffe", "loop", "big"]
ODD_VALUES = [None, True, False, 0, -1, 2**31, 2**63, 2**70, -(2**70), 1e308, -1e308, 0.5, float("nan"),
              float("inf"), [], {}, [None], {"a": 1}, [[1, 2], [3]], "x", [1] * 10_000, [[7] * 200] * 2]
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream",
          "stop", "seed", "stop_token_ids", "logit_bias", "stream_options", "echo", "max_completion_tokens",
          "response_format", "tools", "ignore_eos", "add_generation_prompt", "logprobs", "best_of", "suffix"]


# ---- the server ----------------------------------------------------------------------------------------------------
def tiny_checkpoint(folder: Path) -> Path:
    import torch
    from helpers.tiny_models import random_model
    from helpers.tiny_tokenizer import write_tokenizer

    from adaq.quant.pipeline import quantize_model

    dense = folder / "dense"
    random_model("qwen3", seed=1).to(torch.bfloat16).save_pretrained(dense)
    write_tokenizer(dense)
    quantize_model(str(dense), folder / "nvfp4", scheme="nvfp4a16", method="rtn", device="cpu")
    return folder / "nvfp4"


def hostile_copy(checkpoint: Path, folder: Path) -> Path:
    copy = Path(shutil.copytree(checkpoint, folder / "hostile"))
    (copy / "chat_template.jinja").write_text(HOSTILE_TEMPLATE)
    config_file = copy / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config.pop("chat_template", None)
        config_file.write_text(json.dumps(config))
    return copy


def start_server(checkpoint: Path, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "adaq", "serve", str(checkpoint), "--host", "127.0.0.1", "--port", "0",
               "--json", *SERVER_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        return process, json.loads(lines.get(timeout=300))["url"]
    except queue.Empty:
        process.kill()
        raise SystemExit(f"the server did not start:\n{log.read_text()}") from None


def stop_server(process: subprocess.Popen) -> tuple[int, float]:
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=30), time.monotonic() - started
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(), time.monotonic() - started


# ---- mutations -----------------------------------------------------------------------------------------------------
def good_completion(rng: random.Random) -> dict:
    return {"model": MODEL, "prompt": rng.choice(["hello", "the cat", "1 2 3"]), "max_tokens": rng.randint(1, 4),
            "temperature": 0}


def good_chat(rng: random.Random) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": rng.choice(["hi", "what?", "ok"])}],
            "max_tokens": rng.randint(1, 4)}


def mutate_fields(rng: random.Random, body: dict) -> dict:
    body = dict(body)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS)
        body[field] = rng.choice(ODD_VALUES + ODD_STRINGS)
    return body


def odd_messages(rng: random.Random) -> dict:
    roles = ["user", "assistant", "system", "tool", "developer", "wizard", "", None, 5]
    messages = [{"role": rng.choice(roles), "content": rng.choice(ODD_STRINGS + [None, [], [{"type": "text",
                                                                                           "text": "x"}]])}
                for _ in range(rng.randint(0, 6))]
    return {"model": MODEL, "messages": messages, "max_tokens": 2}


def raw_body(rng: random.Random) -> bytes:
    choices = [
        lambda: json.dumps(good_completion(rng)).encode()[:rng.randint(0, 40)],  # cut JSON
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))),  # noise
        lambda: b"[" * 100_000 + b"]" * 100_000,  # deep nesting
        lambda: b'{"prompt": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}",
        lambda: b'{"prompt": "\\ud800\\udfff\\u0000", "max_tokens": 2, "model": "tiny"}',
        lambda: b'{"prompt": "hi", "max_tokens": NaN, "temperature": Infinity}',
        lambda: b'{"prompt": "hi", "prompt": [1, 2], "max_tokens": 1e999}',
        lambda: json.dumps({"prompt": "x " * 120_000, "max_tokens": 2}).encode(),  # under the body limit
        lambda: b"\xef\xbb\xbf" + json.dumps(good_chat(rng)).encode(),  # BOM
        lambda: b"null", lambda: b"[]", lambda: b'"just a string"', lambda: b"0",
    ]
    return rng.choice(choices)()


def http_case(rng: random.Random) -> tuple[str, str, dict, bytes]:
    """(method, path, headers, body) of one mutated request."""
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    kind = rng.random()
    headers = {"Content-Type": "application/json", **AUTH}
    if kind < 0.30:
        body = mutate_fields(rng, good_completion(rng) if path.endswith("/completions") and "chat" not in path
                             else good_chat(rng))
        content = json.dumps(body, allow_nan=True).encode()
    elif kind < 0.45:
        content = json.dumps(odd_messages(rng)).encode()
        path = "/v1/chat/completions"
    elif kind < 0.65:
        content = raw_body(rng)
    elif kind < 0.72:
        content = json.dumps({**good_chat(rng), "messages": [{"role": "user", "content": rng.choice(
            ["loop", "big"])}]}).encode()
        path = "/v1/chat/completions"
    elif kind < 0.80:
        content = json.dumps({**good_completion(rng), "stream": True}).encode()
    elif kind < 0.88:
        headers = rng.choice([{}, {"Authorization": "Bearer"}, {"Authorization": "Bearer " + "k" * 10_000},
                              {"Authorization": "Basic Zm9vOmJhcg=="}, {"Content-Type": "text/plain", **AUTH},
                              {**AUTH, "Content-Type": "application/json; charset=latin-1"}])
        content = json.dumps(good_completion(rng)).encode()
    else:
        path = rng.choice(["/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/models/" + "x" * 5000,
                           "/v1/models/%00", "/health/../metrics", "/" + "a" * 8000, "/v1/embeddings"])
        return rng.choice(["GET", "OPTIONS", "DELETE", "HEAD", "PUT"]), path, rng.choice([AUTH, {}]), b""
    return "POST", path, headers, content


def raw_socket_case(rng: random.Random, host: str, port: int) -> str:
    """A half-open or malformed connection; returns what happened ('closed' or 'answered')."""
    payloads = [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
                b"\r\nContent-Length: 5000\r\n\r\n{\"prompt\":",
                b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"h" * 70_000 + b"\r\n\r\n",
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" +
                b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\nffffffff\r\nabc",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS hello
                b"GET /health HTTP/9.9\r\n\r\n", b"GARBAGE\r\n\r\n"]
    with socket.create_connection((host, port), timeout=READ_TIMEOUT_S + 15) as sock:
        sock.sendall(rng.choice(payloads))
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return "answered" if received else "closed"


# ---- the run -------------------------------------------------------------------------------------------------------
def fuzz(url: str, requests: int, max_seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    counts = {"requests": 0, "raw_sockets": 0, "status": {}, "5xx": 0, "client_errors": 0, "hangs": 0,
              "health_probes": 0, "examples_5xx": [], "examples_errors": []}
    deadline = time.monotonic() + max_seconds
    with httpx.Client(base_url=url, timeout=TEMPLATE_TIMEOUT_S + 30) as client:
        while counts["requests"] + counts["raw_sockets"] < requests and time.monotonic() < deadline:
            batch_socket_cases = [threading.Thread(target=_raw, args=(rng.random(), host, int(port), counts))
                                  for _ in range(2)]
            for thread in batch_socket_cases:
                thread.start()
            for _ in range(BATCH):
                one_request(client, rng, counts)
            for thread in batch_socket_cases:
                thread.join()
            counts["health_probes"] += 1
            if not healthy(url):
                counts["hangs"] += 1
    return counts


def _raw(seed: float, host: str, port: int, counts: dict) -> None:
    try:
        raw_socket_case(random.Random(seed), host, port)
    except OSError as error:  # a timeout here means the server kept a half-open socket: a hang
        counts["hangs" if isinstance(error, TimeoutError) else "client_errors"] += 1
        counts["examples_errors"].append(f"raw socket: {type(error).__name__}: {error}"[:200])
    counts["raw_sockets"] += 1


def one_request(client: httpx.Client, rng: random.Random, counts: dict) -> None:
    method, path, headers, content = http_case(rng)
    counts["requests"] += 1
    try:
        if content and b'"stream": true' in content and rng.random() < 0.5:
            with client.stream(method, path, headers=headers, content=content) as response:
                next(response.iter_bytes(), None)  # read a little, then hang up mid-stream
            status = response.status_code
        else:
            status = client.request(method, path, headers=headers, content=content).status_code
    except httpx.HTTPError as error:
        counts["client_errors"] += 1
        counts["examples_errors"].append(f"{method} {path[:60]}: {type(error).__name__}: {error}"[:200])
        return
    counts["status"][str(status)] = counts["status"].get(str(status), 0) + 1
    if status >= 500:
        counts["5xx"] += 1
        counts["examples_5xx"].append(f"{status} {method} {path[:60]} {content[:120]!r}")


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="NVFP4 checkpoint folder (default: a tiny random one)")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adaq-fuzz-") as temp:
        folder = Path(temp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(folder)
        log = folder / "server.log"
        process, url = start_server(hostile_copy(checkpoint, folder), log)
        started = time.monotonic()
        try:
            counts = fuzz(url, args.requests, args.max_seconds, args.seed)
        finally:
            exit_code, stop_seconds = stop_server(process)
        text = log.read_text(errors="replace")
        counts.update(seconds=round(time.monotonic() - started, 1), tracebacks=text.count("Traceback"),
                      server_exit_code=exit_code, stop_seconds=round(stop_seconds, 2),
                      command=" ".join([sys.executable, *sys.argv]))
        if counts["tracebacks"]:
            counts["log_tail"] = text[-3000:]
    counts["examples_5xx"], counts["examples_errors"] = counts["examples_5xx"][:10], counts["examples_errors"][:10]
    print(json.dumps(counts, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(counts, indent=2) + "\n")
    bad = counts["5xx"] + counts["tracebacks"] + counts["hangs"] + (counts["server_exit_code"] != 0)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
