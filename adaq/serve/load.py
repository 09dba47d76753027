"""A load generator for an OpenAI-compatible server: C concurrent clients send N requests, half of them streamed.

    python -m adaq.serve.load --url http://127.0.0.1:8000 --clients 64 --requests 500 [--api-key KEY] [--json]

Each request is greedy (temperature 0) on a distinct prompt, completions and chat alternating. Reports errors (by
status, with the first few messages), request and token throughput, end-to-end latency, time to first token and time
per output token after the first (streamed requests) as percentiles, and the mix of requests that ran.
`run_load(...)` returns every response too, so tests can compare each against the same request served alone
(`python -m adaq.bench.serve_load` starts a server, runs this and checks that agreement).
"""

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo")
SYSTEM = "Answer in one line."


@dataclass
class Job:
    endpoint: str  # "completions" or "chat"
    payload: dict  # the request body, without "stream"
    stream: bool


@dataclass
class Result:
    job: int
    status: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    error: str | None = None


@dataclass
class LoadReport:
    clients: int
    requests: int
    errors: int
    wall_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    latency_s: dict
    ttft_s: dict
    tpot_s: dict = field(default_factory=dict)  # streamed requests: (latency - ttft) / (tokens - 1)
    prompt_tokens: int = 0
    errors_by_status: dict = field(default_factory=dict)  # "0" = no HTTP answer (connection, timeout, bad stream)
    first_errors: list[str] = field(default_factory=list)
    mix: dict = field(default_factory=dict)  # requests that succeeded, by endpoint and streamed or not
    results: list[Result] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("results")
        return data


def make_jobs(count: int, model: str, max_tokens: tuple[int, int] = (4, 12),
              endpoints: tuple[str, ...] = ("completions", "chat")) -> list[Job]:
    """`count` distinct greedy requests cycling through `endpoints`; half of them streamed."""
    low, high = max_tokens
    jobs = []
    for index in range(count):
        words = " ".join(WORDS[(index + k) % len(WORDS)] for k in range(1 + index % 7))
        tokens = low + index % (high - low + 1)
        common = {"model": model, "max_tokens": tokens, "temperature": 0}
        if endpoints[index % len(endpoints)] == "completions":
            payload = {**common, "prompt": f"Request {index}: {words}"}
            endpoint = "completions"
        else:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"#{index} {words}"}]
            payload = {**common, "messages": messages}
            endpoint = "chat"
        jobs.append(Job(endpoint, payload, stream=index % 4 in (1, 2)))
    return jobs


async def run_load(url: str, jobs: list[Job], clients: int, api_key: str | None = None,
                   timeout_s: float = 600.0) -> LoadReport:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(jobs)):
        queue.put_nowait(index)
    results: list[Result | None] = [None] * len(jobs)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout_s) as client:
        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                results[index] = await _send(client, index, jobs[index])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    return _report(clients, results, wall, jobs)


async def _send(client: httpx.AsyncClient, index: int, job: Job) -> Result:
    path = "/v1/completions" if job.endpoint == "completions" else "/v1/chat/completions"
    started = time.perf_counter()
    try:
        if job.stream:
            result = await _send_streamed(client, path, index, job, started)
        else:
            response = await client.post(path, json=job.payload)
            result = _whole(index, job, response)
    except (httpx.HTTPError, ValueError, KeyError) as error:
        result = Result(index, 0, error=f"{type(error).__name__}: {error}")
    result.latency_s = time.perf_counter() - started
    return result


def _whole(index: int, job: Job, response: httpx.Response) -> Result:
    body = response.json()
    if response.status_code != 200:
        return Result(index, response.status_code, error=json.dumps(body))
    choice = body["choices"][0]
    text = choice["text"] if job.endpoint == "completions" else choice["message"]["content"]
    usage = body["usage"]
    return Result(index, 200, text, choice["finish_reason"], usage["completion_tokens"], usage["prompt_tokens"])


async def _send_streamed(client: httpx.AsyncClient, path: str, index: int, job: Job, started: float) -> Result:
    result = Result(index, 0)
    payload = {**job.payload, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", path, json=payload) as response:
        result.status = response.status_code
        if response.status_code != 200:
            result.error = (await response.aread()).decode()
            return result
        pieces, done = [], False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            _take_chunk(json.loads(data), job, result, pieces, started)
        result.text = "".join(pieces)
        if not done:
            result.error = "the stream ended without [DONE]"
    return result


def _take_chunk(chunk: dict, job: Job, result: Result, pieces: list[str], started: float) -> None:
    if "error" in chunk:
        result.error = json.dumps(chunk)
        return
    if chunk.get("usage"):
        result.completion_tokens = chunk["usage"]["completion_tokens"]
        result.prompt_tokens = chunk["usage"]["prompt_tokens"]
    for choice in chunk.get("choices", []):
        text = choice["text"] if job.endpoint == "completions" else choice["delta"].get("content")
        if text:
            result.ttft_s = result.ttft_s or time.perf_counter() - started
            pieces.append(text)
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]


def _report(clients: int, results: list[Result], wall: float, jobs: list[Job] | None = None) -> LoadReport:
    ok = [r for r in results if r is not None and r.status == 200 and r.error is None]
    failed = [r for r in results if r is None or not (r.status == 200 and r.error is None)]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    tpot = [(r.latency_s - r.ttft_s) / (r.completion_tokens - 1) for r in ok
            if r.ttft_s and r.completion_tokens and r.completion_tokens > 1]
    by_status: dict[str, int] = {}
    for r in failed:
        key = str(r.status) if r is not None else "0"
        by_status[key] = by_status.get(key, 0) + 1
    mix: dict[str, int] = {}
    for r in ok:
        if jobs is not None:
            key = f"{jobs[r.job].endpoint}{' streamed' if jobs[r.job].stream else ''}"
            mix[key] = mix.get(key, 0) + 1
    return LoadReport(clients, len(results), len(failed), wall, len(ok) / wall, tokens, tokens / wall,
                      _percentiles([r.latency_s for r in ok]), _percentiles([r.ttft_s for r in ok if r.ttft_s]),
                      _percentiles(tpot), sum(r.prompt_tokens or 0 for r in ok), by_status,
                      [f"request {r.job}: {r.status} {(r.error or '')[:300]}" for r in failed[:5] if r is not None],
                      mix, list(results))


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"mean": statistics.fmean(values), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": values[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument("--max-tokens", type=int, nargs=2, default=(4, 12), metavar=("LOW", "HIGH"))
    parser.add_argument("--endpoints", nargs="+", choices=("completions", "chat"), default=("completions", "chat"))
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"][0]["id"]
    jobs = make_jobs(args.requests, model, tuple(args.max_tokens), tuple(args.endpoints))
    report = asyncio.run(run_load(args.url, jobs, args.clients, args.api_key))
    summary = report.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{summary['requests']} requests from {summary['clients']} clients in {summary['wall_s']:.1f} s: "
          f"{summary['errors']} errors, {summary['requests_per_s']:.1f} req/s, "
          f"{summary['output_tokens_per_s']:.1f} output tok/s")
    for name in ("latency_s", "ttft_s", "tpot_s"):
        print(f"{name}: " + ", ".join(f"{key} {value * 1000:.0f} ms" for key, value in summary[name].items()))


if __name__ == "__main__":
    main()
