"""`adaq serve` end to end on loopback: the real CLI in a subprocess, a tiny random NVFP4 Qwen3, CPU.

Counts are sized for CI on a small shared machine; ADAQ_SERVE_LOAD_FULL=1 runs the issue's numbers (64 clients,
500 requests; a soak of 2,000 requests). The server runs with one torch thread: on a CPU shared with other jobs,
torch's thread pools spin against each other and a tiny model's step goes from milliseconds to a second.
"""

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from adaq.serve.load import Job, make_jobs, run_load

FULL = os.environ.get("ADAQ_SERVE_LOAD_FULL") == "1"
CLIENTS = 64
LOAD_REQUESTS = 500 if FULL else 128
SOAK_REQUESTS = 2000 if FULL else 300
API_KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 192
MAX_NUM_SEQS = 32
MAX_QUEUE = 40  # capacity 72: the 64 load clients always fit, a burst of 100 does not
MAX_PROMPT_TOKENS = 128
MAX_OUTPUT_TOKENS = 96
MAX_BODY_BYTES = 64 * 1024
SERVER_FLAGS = ["--backend", "reference", "--device", "cpu", "--dtype", "fp32", "--kv-cache-dtype", "bf16",
                "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue",
                str(MAX_QUEUE), "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-output-tokens",
                str(MAX_OUTPUT_TOKENS), "--max-body-bytes", str(MAX_BODY_BYTES), "--kv-cache-memory", "64MiB"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=120)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.http.post(path, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by name plus its labels other than model_name."""
        samples = {}
        for line in self.http.get("/metrics").text.splitlines():
            match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
            if match:
                labels = ",".join(part for part in (match.group(2) or "").split(",")
                                  if part and not part.startswith("model_name"))
                samples[match.group(1) + (f"{{{labels}}}" if labels else "")] = float(match.group(3))
        return samples

    def wait_idle(self, timeout_s: float = 60) -> dict[str, float]:
        """Metrics once nothing is in flight and every KV block is free again (fails if that never happens)."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            idle = m["adaq_num_requests_in_flight"] == 0 and m["adaq_num_requests_running"] == 0 and \
                m["adaq_num_requests_waiting"] == 0 and m["adaq_kv_cache_free_blocks"] == m["adaq_kv_cache_blocks"]
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def complete(self, prompt: str = "ok", **fields) -> httpx.Response:
        return self.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                                  "temperature": 0, **fields})


def start_server(checkpoint: Path, log: Path, *flags: str, timeout_s: float = 300) -> Server:
    command = [sys.executable, "-c", "from adaq.cli import main; main()", "serve", str(checkpoint), "--port", "0",
               "--json", "--log-level", "warning", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        ready = json.loads(lines.get(timeout=timeout_s))
    except queue.Empty:
        process.kill()
        raise AssertionError(f"the server did not start in {timeout_s} s:\n{log.read_text()}") from None
    server = Server(process, ready["url"], log)
    _wait_healthy(server, log)
    return server


def _wait_healthy(server: Server, log: Path) -> None:
    for _ in range(300):
        try:
            if server.http.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.process.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"/health never answered:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.http.close()
    server.process.send_signal(signal.SIGINT)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def server(tiny_qwen3_nvfp4, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    server = start_server(tiny_qwen3_nvfp4, log, *SERVER_FLAGS, "--api-key", API_KEY,
                          "--served-model-name", MODEL)
    yield server
    stop_server(server)
    assert server.process.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def alone(tiny_qwen3_nvfp4):
    """The answer to one job from the same engine serving it alone (one sequence, no prefix cache)."""
    from adaq.engine.api import LLM
    from adaq.engine.chat import chat_token_ids
    from adaq.engine.sampling_params import SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs: the same GEMM blocking, so the same rounding
    llm = LLM(tiny_qwen3_nvfp4, backend="reference", device="cpu", dtype="fp32", kv_cache_dtype="bf16",
              max_model_len=MAX_MODEL_LEN, max_num_seqs=1, enable_prefix_caching=False)
    cache: dict[str, tuple[str, str, int]] = {}

    def answer(job: Job) -> tuple[str, str, int]:
        key = json.dumps([job.endpoint, job.payload.get("prompt"), job.payload.get("messages"),
                          job.payload["max_tokens"]])
        if key not in cache:
            payload = job.payload
            ids = llm.engine.encode(payload["prompt"]) if job.endpoint == "completions" else \
                chat_token_ids(llm.tokenizer, payload["messages"])
            out = llm.generate(ids, SamplingParams(max_tokens=payload["max_tokens"], temperature=0))[0]
            cache[key] = (out.text, out.finish_reason, len(out.token_ids))
        return cache[key]

    yield answer
    torch.set_num_threads(threads)


# ---- the official client -------------------------------------------------------------------------------------------
def test_openai_client_completions_and_chat(server, alone):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert [model.id for model in client.models.list()] == [MODEL]

    prompt, messages = "The quick brown fox", [{"role": "user", "content": "Say something."}]
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    text, reason, count = alone(Job("completions", {"prompt": prompt, "max_tokens": 12}, False))
    assert (completion.choices[0].text, completion.choices[0].finish_reason) == (text, reason)
    assert completion.usage.completion_tokens == count and completion.usage.prompt_tokens == len(prompt) + 1
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + count
    assert completion.object == "text_completion" and completion.model == MODEL

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason

    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    text, reason, count = alone(Job("chat", {"messages": messages, "max_tokens": 10}, False))
    assert chat.choices[0].message.role == "assistant"
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (text, reason)
    assert chat.usage.completion_tokens == count

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count

    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.completions.create(model=MODEL, prompt=prompt, max_tokens=2)


def test_stop_strings_n_and_several_prompts(server):
    body = server.complete("abc", max_tokens=16, n=2, ignore_eos=True).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: both samples agree
    assert body["usage"]["completion_tokens"] == 32
    text = body["choices"][0]["text"]
    stop = next(char for char in text[2:] if char.isascii() and char.isprintable())
    cut = server.complete("abc", max_tokens=16, ignore_eos=True, stop=[stop]).json()["choices"][0]
    assert (cut["text"], cut["finish_reason"]) == (text[:text.index(stop)], "stop")
    several = server.post("/v1/completions", json={"model": MODEL, "prompt": ["one", "two", "three"],
                                                   "max_tokens": 3, "temperature": 0}).json()
    assert [c["index"] for c in several["choices"]] == [0, 1, 2]
    singles = [server.complete(p, max_tokens=3).json()["choices"][0]["text"] for p in ("one", "two", "three")]
    assert [c["text"] for c in several["choices"]] == singles
    assert server.complete("one", max_tokens=3, echo=True).json()["choices"][0]["text"] == "one" + singles[0]
    echoed = server.complete([ord("o"), ord("n"), ord("e")], max_tokens=3, echo=True).json()["choices"][0]["text"]
    assert echoed.startswith("one")


# ---- load ----------------------------------------------------------------------------------------------------------
def test_64_clients_get_exactly_what_each_request_gets_alone(server, alone, capsys):
    jobs = make_jobs(LOAD_REQUESTS, MODEL)
    report = asyncio.run(run_load(server.url, jobs, CLIENTS, API_KEY))
    failures = [r for r in report.results if r.error or r.status != 200]
    assert report.errors == 0 and not failures, failures[:3]
    for result in report.results:
        text, reason, count = alone(jobs[result.job])
        assert (result.text, result.finish_reason, result.completion_tokens) == (text, reason, count), \
            f"request {result.job} ({jobs[result.job].payload}) differs from the same request served alone"
    m = server.wait_idle()
    assert m["adaq_kv_cache_free_blocks"] == m["adaq_kv_cache_blocks"]
    with capsys.disabled():
        print(f"\nserve load ({CLIENTS} clients, {LOAD_REQUESTS} requests): {json.dumps(report.summary())}")


def test_disconnects_cancel_requests_and_free_their_blocks(server):
    before = server.metrics()["adaq_request_aborted_total"]
    payload = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": MAX_OUTPUT_TOKENS,
               "ignore_eos": True, "temperature": 0}

    async def disconnect_streams(count: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            async def one(index: int) -> None:
                async with client.stream("POST", "/v1/completions", json={**payload, "stream": True}) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                            break  # leave after the first token

            await asyncio.gather(*(one(i) for i in range(count)))

    async def abandon_non_streaming(count: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=httpx.Timeout(30, read=0.1)) as c:
            results = await asyncio.gather(*(c.post("/v1/completions", json=payload) for _ in range(count)),
                                           return_exceptions=True)
            assert any(isinstance(result, httpx.TimeoutException) for result in results)

    asyncio.run(disconnect_streams(12))
    asyncio.run(abandon_non_streaming(6))
    m = server.wait_idle()
    assert m["adaq_num_requests_in_flight"] == 0
    assert m["adaq_kv_cache_free_blocks"] == m["adaq_kv_cache_blocks"]
    assert m["adaq_request_aborted_total"] - before >= 9  # most left long before their 96 tokens were done
    assert server.complete().status_code == 200


def test_a_full_queue_answers_429(server):
    capacity = MAX_NUM_SEQS + MAX_QUEUE
    payload = {"model": MODEL, "prompt": "x", "max_tokens": MAX_OUTPUT_TOKENS, "ignore_eos": True, "stream": True}

    burst_size = capacity + 28

    async def burst() -> list[int]:
        answered, everyone_answered = [], asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60,
                                     limits=httpx.Limits(max_connections=burst_size)) as client:
            async def one() -> int:
                async with client.stream("POST", "/v1/completions", json=payload) as response:
                    answered.append(response.status_code)
                    if len(answered) == burst_size:
                        everyone_answered.set()
                    if response.status_code == 429:
                        body = json.loads(await response.aread())
                        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
                        assert response.headers["retry-after"] == "1"
                    else:
                        await everyone_answered.wait()  # hold the stream open until the burst is over
                    return response.status_code  # leaving the block disconnects: the request is cancelled

            return await asyncio.gather(*(one() for _ in range(burst_size)))

    statuses = asyncio.run(burst())
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 28 - 4  # a few may finish inside the burst
    assert statuses.count(200) >= capacity
    m = server.wait_idle()
    assert m["adaq_kv_cache_free_blocks"] == m["adaq_kv_cache_blocks"]
    assert m['adaq_http_requests_total{route="/v1/completions",status="429"}'] >= statuses.count(429)
    assert server.complete().status_code == 200


# ---- bad input -----------------------------------------------------------------------------------------------------
GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_REQUESTS = {
    "malformed JSON": ("/v1/completions", b'{"model": "tiny", "prompt": "hi",', AUTH, 400, "invalid_json"),
    "not JSON at all": ("/v1/chat/completions", b"\xff\xfe garbage", AUTH, 400, "invalid_json"),
    "empty body": ("/v1/completions", b"", AUTH, 400, "invalid_json"),
    "prompt of the wrong type": ("/v1/completions", {**GOOD, "prompt": 123}, AUTH, 422, None),
    "max_tokens of the wrong type": ("/v1/completions", {**GOOD, "max_tokens": "many"}, AUTH, 422, None),
    "temperature of the wrong type": ("/v1/completions", {**GOOD, "temperature": "hot"}, AUTH, 422, None),
    "messages of the wrong type": ("/v1/chat/completions", {**CHAT, "messages": "hi"}, AUTH, 422, None),
    "unknown role": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, AUTH,
                     422, None),
    "missing prompt": ("/v1/completions", {"model": MODEL}, AUTH, 422, "missing"),
    "empty messages": ("/v1/chat/completions", {**CHAT, "messages": []}, AUTH, 422, None),
    "negative max_tokens": ("/v1/completions", {**GOOD, "max_tokens": -5}, AUTH, 422, None),
    "zero max_tokens (chat)": ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, AUTH, 422, None),
    "top_p out of range": ("/v1/completions", {**GOOD, "top_p": 1.5}, AUTH, 422, None),
    "n too large": ("/v1/completions", {**GOOD, "n": 1000}, AUTH, 422, None),
    "empty stop string": ("/v1/completions", {**GOOD, "stop": [""]}, AUTH, 422, None),
    "huge prompt": ("/v1/completions", {**GOOD, "prompt": "word " * 2000}, AUTH, 400, "context_length_exceeded"),
    "huge token-id prompt": ("/v1/completions", {**GOOD, "prompt": [7] * 500}, AUTH, 400,
                             "context_length_exceeded"),
    "prompt plus max_tokens past the context": ("/v1/completions", {**GOOD, "prompt": [7] * 120, "max_tokens": 90},
                                                AUTH, 400, "context_length_exceeded"),
    "max_tokens over the server's limit": ("/v1/completions", {**GOOD, "max_tokens": MAX_OUTPUT_TOKENS + 1}, AUTH,
                                           400, "max_tokens_too_large"),
    "token ids outside the vocabulary": ("/v1/completions", {**GOOD, "prompt": [1, 99999]}, AUTH, 400, None),
    "unsupported logprobs": ("/v1/completions", {**GOOD, "logprobs": 3}, AUTH, 400, None),
    "body over the size limit": ("/v1/completions", {**GOOD, "prompt": "a" * (MAX_BODY_BYTES + 1)}, AUTH, 413,
                                 "request_too_large"),
    "wrong API key": ("/v1/completions", GOOD, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    "missing API key": ("/v1/chat/completions", CHAT, {}, 401, "invalid_api_key"),
    "unknown model": ("/v1/completions", {**GOOD, "model": "gpt-9"}, AUTH, 404, "model_not_found"),
    "unknown route": ("/v1/embeddings", GOOD, AUTH, 404, "not_found"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, case):
    path, body, headers, status, code = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}{path}", content=content, timeout=60,
                          headers={"Content-Type": "application/json", **headers})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    if status == 422:
        assert error["param"], error
    assert server.complete().status_code == 200


def test_a_chunked_body_over_the_limit_is_refused(server):
    def chunks():
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    response = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=60,
                          headers={"Content-Type": "application/json", **AUTH})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert server.complete().status_code == 200


def test_health_models_and_metrics(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    card = server.http.get(f"/v1/models/{MODEL}").json()
    assert card["id"] == MODEL and card["max_model_len"] == MAX_MODEL_LEN
    before = server.metrics()
    assert server.complete(max_tokens=3, ignore_eos=True).status_code == 200
    after = server.metrics()
    assert after["adaq_generation_tokens_total"] - before["adaq_generation_tokens_total"] == 3
    assert after["adaq_prompt_tokens_total"] - before["adaq_prompt_tokens_total"] == 3  # BOS + "ok"
    assert after['adaq_request_success_total{finish_reason="length"}'] > \
        before.get('adaq_request_success_total{finish_reason="length"}', 0)
    for name in ("adaq_time_to_first_token_seconds", "adaq_e2e_request_latency_seconds",
                 "adaq_time_per_output_token_seconds", "adaq_request_queue_time_seconds"):
        assert after[f"{name}_count"] == before[f"{name}_count"] + 1
    assert after['adaq_http_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert after["adaq_kv_cache_blocks"] > 0 and 0 <= after["adaq_kv_cache_usage_perc"] <= 1


# ---- soak ----------------------------------------------------------------------------------------------------------
def test_memory_is_stable_over_a_soak_of_short_requests(server):
    jobs = [Job("completions", {"model": MODEL, "prompt": f"soak {i}", "max_tokens": 2, "temperature": 0},
                i % 2 == 0) for i in range(SOAK_REQUESTS)]
    warm = SOAK_REQUESTS // 5
    assert asyncio.run(run_load(server.url, jobs[:warm], 16, API_KEY)).errors == 0
    server.wait_idle()
    rss_warm = server.rss_bytes()
    report = asyncio.run(run_load(server.url, jobs[warm:], 16, API_KEY))
    assert report.errors == 0
    m = server.wait_idle()
    assert m["adaq_kv_cache_free_blocks"] == m["adaq_kv_cache_blocks"]
    growth = server.rss_bytes() - rss_warm
    print(f"soak: {SOAK_REQUESTS} requests, RSS {rss_warm / 2**20:.0f} MiB after {warm}, growth "
          f"{growth / 2**20:+.1f} MiB")
    assert growth < 24 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {SOAK_REQUESTS - warm} requests"


# ---- the engine loop alone, on a fake engine -----------------------------------------------------------------------
class FakeEngine:
    """LLMEngine's serving surface: one token per step per request; a step can be made to fail."""

    def __init__(self, max_num_seqs: int = 2):
        from types import SimpleNamespace

        self.config = SimpleNamespace(max_num_seqs=max_num_seqs)
        self.live: dict[str, int] = {}
        self.aborts: list[str] = []
        self.aborted: list[str] = []
        self.fail_next_step = False

    def add_request(self, prompt, params, request_id):
        self.live[request_id] = params.max_tokens

    def abort_request(self, request_id):
        self.aborts.append(request_id)

    def has_unfinished(self):
        return bool(self.live or self.aborts)

    def step(self):
        from adaq.engine.llm_engine import RequestOutput
        from adaq.engine.sequence import RequestMetrics

        def output(request_id, finished, reason):
            return RequestOutput(request_id, None, [1], "", [], "", [] if reason == "abort" else [7], finished,
                                 reason, None, RequestMetrics(0.0, 1))

        outputs = []
        while self.aborts:
            request_id = self.aborts.pop()
            if self.live.pop(request_id, None) is not None:
                self.aborted.append(request_id)
                outputs.append(output(request_id, True, "abort"))
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("CUDA out of memory (simulated)")
        for request_id in list(self.live):
            self.live[request_id] -= 1
            done = self.live[request_id] == 0
            outputs.append(output(request_id, done, "length" if done else None))
            if done:
                del self.live[request_id]
        return outputs


def test_engine_loop_routes_outputs_bounds_admission_and_survives_a_failed_step():
    from adaq.engine.sampling_params import SamplingParams
    from adaq.serve.engine_loop import EngineFailed, EngineLoop, EngineRequest, QueueFull

    async def scenario(engine: FakeEngine) -> None:
        loop = EngineLoop(engine, max_queue=1)  # capacity 3
        await loop.start()
        request = EngineRequest([1], SamplingParams(max_tokens=3))
        pair = loop.submit([request, request], "x")
        with pytest.raises(QueueFull):
            loop.submit([request, request], "y")
        finals = await pair.final_outputs()
        assert [(o.finish_reason, len(o.new_token_ids)) for o in finals] == [("length", 1), ("length", 1)]
        assert loop.num_in_flight == 0
        long = loop.submit([EngineRequest([1], SamplingParams(max_tokens=1000))], "z")
        first = await long.outputs().__anext__()
        assert first[0] == 0 and not first[1].finished
        long.close()  # the client left
        while engine.has_unfinished():
            await asyncio.sleep(0.01)
        assert engine.aborted == long.request_ids and loop.num_in_flight == 0
        engine.fail_next_step = True
        doomed = loop.submit([request], "f")
        with pytest.raises(EngineFailed, match="out of memory"):
            await doomed.final_outputs()
        assert loop.alive and len(await loop.submit([request], "g").final_outputs()) == 1
        await loop.stop()

    asyncio.run(scenario(FakeEngine()))


# ---- the command line ----------------------------------------------------------------------------------------------
def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from adaq.cli import main; main()", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_serve_cli_errors_are_one_line(tmp_path, tiny_qwen3_nvfp4):
    missing = run_cli("serve", str(tmp_path / "nothing"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "error:" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        taken = run_cli("serve", str(tiny_qwen3_nvfp4), "--port", str(port), "--device", "cpu")
    assert taken.returncode != 0 and "--port" in taken.stderr and "Traceback" not in taken.stderr, taken.stderr


@pytest.mark.parametrize("setting, flag", [({"max_queue": -1}, "--max-queue"),
                                           ({"max_prompt_tokens": 0}, "--max-prompt-tokens"),
                                           ({"model_names": [""]}, "--served-model-name"),
                                           ({"chat_template_timeout": 0}, "--chat-template-timeout")])
def test_bad_server_settings_name_the_flag(setting, flag):
    from adaq.errors import AdaqError
    from adaq.serve.app import ServeSettings

    with pytest.raises(AdaqError, match=flag):
        ServeSettings(**{"model_names": ["m"], "model_root": "m", **setting})


# ---- the real model ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_gemma3_270m_nvfp4_answers_the_openai_client(gemma3_270m_nvfp4, tmp_path):
    openai = pytest.importorskip("openai")
    server = start_server(gemma3_270m_nvfp4, tmp_path / "server.log", "--device", "cpu", "--max-model-len", "256",
                          "--max-num-seqs", "4", "--kv-cache-memory", "64MiB", "--served-model-name", "gemma3-270m")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        prompt = "The capital of France is"
        completion = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=8, temperature=0)
        streamed = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=8, temperature=0,
                                             stream=True)
        text = completion.choices[0].text
        assert completion.usage.prompt_tokens == 6  # [2, 818, 5279, 529, 7001, 563]: BOS + 5 tokens (NOTES)
        assert (completion.usage.completion_tokens, completion.choices[0].finish_reason) == (8, "length")
        assert "capital" in text or "Paris" in text, text  # coherent: the tokenizer and weights are right
        assert "".join(chunk.choices[0].text for chunk in streamed) == text
        with pytest.raises(openai.BadRequestError, match="chat template"):  # a base model: no chat template
            client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "hi"}])
    finally:
        stop_server(server)
    assert server.process.returncode == 0 and "Traceback" not in server.log.read_text()
