"""`adaq serve` under load, end to end: start the server on loopback, run the load generator, check greedy agreement
with solo runs, write one JSON report.

    python -m adaq.bench.serve_load --synthetic gemma3-4b --clients 64 --requests 500 --out $OUT/serve_load.json \\
        -- --max-model-len 1024 --strict

The model is a synthetic NVFP4 one in a real model's shapes (`adaq serve --synthetic`, weights made on the device)
served with a real tokenizer: by default the demo's Gemma 3 tokenizer (adaq.demo; `--tokenizer FOLDER` for another,
e.g. one exported here with `--export-tokenizer FOLDER`, which copies only the tokenizer files). A tokenizer without
a chat template gets Gemma 3's turn format, so the chat half of the load runs. Arguments after `--` go to
`adaq serve` (backend, device, lengths, --strict, ...).

Bounded: the server binds 127.0.0.1 on a free port, the load is `--requests` requests from `--clients` clients, and
every phase has a deadline (start, load, solo runs); the server is stopped (SIGINT, then killed) whatever happens.
The report: the ready line (backend, CUDA graphs, fallbacks), the load's figures (adaq.serve.load: throughput,
latency / TTFT / TPOT percentiles, errors), agreement (each of `--solo` requests sent again alone, idle server,
same text, finish reason and token count), the engine's step times and fallbacks from /metrics, and GPU memory
before and after the load. Exit status 1 when anything failed: errors, a disagreement, a fallback.
"""

import argparse
import asyncio
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from adaq.errors import AdaqError
from adaq.serve.load import Job, make_jobs, run_load

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
# Gemma 3's turn format: no system role, so a system message is put before the first user turn's text, as Gemma 3's
# own template does.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set first = '' %}{% if messages[0]['role'] == 'system' %}"
    "{% set first = (messages[0]['content'] | trim) ~ '\\n\\n' %}{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ (first if loop.first else '') ~ (message['content'] | trim) }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def demo_tokenizer() -> Path:
    from adaq.demo import gemma3_270m_folder

    return gemma3_270m_folder()


def tokenizer_folder(source: Path, target: Path) -> dict:
    """Copy the tokenizer files of `source` into `target`, with a chat template if it has none; what was done."""
    target.mkdir(parents=True, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not copied:
        raise AdaqError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})")
    for name in copied:
        shutil.copyfile(source / name, target / name)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    added = not config.get("chat_template") and not (target / "chat_template.jinja").is_file()
    if added:
        config["chat_template"] = GEMMA3_CHAT_TEMPLATE
        config_path.write_text(json.dumps(config, indent=2))
    return {"source": str(source), "files": copied, "chat_template_added": added}


# ---- the server ---------------------------------------------------------------------------------------------------
class Server:
    """`adaq serve ... --json` in a child process; `ready` is its ready line."""

    def __init__(self, args: list[str], log: Path, start_timeout_s: float):
        command = [sys.executable, "-c", "from adaq.cli import main; main()", "serve", *args, "--host", "127.0.0.1",
                   "--port", "0", "--json", "--log-level", "warning"]
        self.command = command
        self.log = log
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                        start_new_session=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout], daemon=True).start()
        self.ready = self._wait_ready(lines, start_timeout_s)
        self.url = self.ready["url"]
        self.http = httpx.Client(base_url=self.url, timeout=120)
        self._wait_healthy(start_timeout_s)

    def _wait_ready(self, lines: queue.Queue, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                return json.loads(lines.get(timeout=1))
            except queue.Empty:
                if self.process.poll() is not None:
                    break
        self.stop()
        raise AdaqError(f"the server did not start (exit {self.process.returncode}): {self.log_tail()}")

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AdaqError(f"/health never answered: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.is_file() else []
        return " | ".join(text[-lines:]) or "(empty log)"

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics by name plus labels other than model_name."""
        samples = {}
        for line in self.http.get("/metrics").text.splitlines():
            match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
            if match and not line.startswith("#"):
                labels = re.sub(r'model_name="[^"]*",?', "", match.group(2) or "").strip(",")
                samples[match.group(1) + (f"{{{labels}}}" if labels else "")] = float(match.group(3))
        return samples

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


# ---- agreement with solo runs -------------------------------------------------------------------------------------
def solo_indices(count: int, total: int) -> list[int]:
    """`count` jobs spread evenly over the load (so both endpoints, streamed or not, are among them)."""
    count = min(count, total)
    return sorted({round(k * (total - 1) / max(count - 1, 1)) for k in range(count)}) if count else []


async def solo_agreement(url: str, jobs: list[Job], results, indices: list[int], timeout_s: float) -> dict:
    """Each chosen request again, alone on the idle server: the same text, finish reason and token count?"""
    mismatches, checked = [], 0
    for index in indices:
        alone = (await run_load(url, [jobs[index]], clients=1, timeout_s=timeout_s)).results[0]
        under_load = results[index]
        checked += 1
        same = (alone.error is None and under_load.error is None and
                (alone.text, alone.finish_reason, alone.completion_tokens) ==
                (under_load.text, under_load.finish_reason, under_load.completion_tokens))
        if not same:
            mismatches.append({"job": index, "endpoint": jobs[index].endpoint, "stream": jobs[index].stream,
                               "under_load": [under_load.text[:200], under_load.finish_reason, under_load.error],
                               "alone": [alone.text[:200], alone.finish_reason, alone.error]})
    return {"checked": checked, "equal": checked - len(mismatches), "mismatches": mismatches[:10]}


def gpu_memory_used_mib() -> list[int] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [int(value) for value in out.stdout.split()] if out.returncode == 0 else None


def engine_figures(metrics: dict[str, float]) -> dict:
    steps = metrics.get("adaq_engine_step_seconds_count", 0.0)
    return {"steps": int(steps),
            "mean_step_s": metrics.get("adaq_engine_step_seconds_sum", 0.0) / steps if steps else None,
            "generation_tokens": int(metrics.get("adaq_generation_tokens_total", 0)),
            "cuda_graphs": bool(metrics.get("adaq_cuda_graphs", 0)),
            "fallbacks": int(metrics.get("adaq_fallbacks", 0)),
            "fallback_samples": [name for name in metrics if name.startswith("adaq_fallback{")],
            "kv_cache_blocks": int(metrics.get("adaq_kv_cache_blocks", 0))}


def against_bench(path: Path, batch: int, served_tokens_per_s: float) -> dict:
    """The served output tok/s over the engine's own decode tok/s at batch = clients (an `adaq bench --json`
    report of the same model; issue 23's goal is >= 0.8)."""
    try:
        bench = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return {"error": f"{path}: {error}"}
    rows = [result for variant in bench.get("variants", []) if variant["variant"] == "nvfp4"
            for result in variant["results"] if result["batch"] == batch]
    if not rows or not rows[0].get("decode_tokens_per_s"):
        return {"error": f"{path}: no nvfp4 row at batch {batch}"}
    engine = rows[0]["decode_tokens_per_s"]
    return {"bench": str(path), "batch": batch, "engine_decode_tokens_per_s": engine,
            "served_output_tokens_per_s": served_tokens_per_s, "ratio": served_tokens_per_s / engine}


# ---- the run ------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, serve_args: list[str]) -> dict:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="adaq-serve-load-"))
    try:
        tokenizer = tokenizer_folder(Path(args.tokenizer) if args.tokenizer else demo_tokenizer(), work / "tokenizer")
        model = ["--synthetic", args.synthetic, "--tokenizer", str(work / "tokenizer")] if args.synthetic else \
            [args.checkpoint]
        server = Server([*model, *serve_args], out.with_suffix(".server.log"), args.start_timeout_s)
        try:
            report = measure(server, args)
        finally:
            report_exit = server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.update(tokenizer=tokenizer, server_command=server.command[3:], server_exit=report_exit)
    if args.bench_json:
        report["vs_engine"] = against_bench(Path(args.bench_json), args.clients, report["load"]["output_tokens_per_s"])
    report["ok"] = bool(report["load"]["errors"] == 0 and report["agreement"]["equal"] == report["agreement"]["checked"]
                        and not report["server"].get("fallbacks") and report["engine"]["fallbacks"] == 0)
    return report


def measure(server: Server, args: argparse.Namespace) -> dict:
    model = server.ready["model"]
    jobs = make_jobs(args.requests, model, tuple(args.max_tokens))
    memory_before = gpu_memory_used_mib()
    load = asyncio.run(asyncio.wait_for(run_load(server.url, jobs, args.clients, timeout_s=args.request_timeout_s),
                                        args.load_timeout_s))
    memory_after = gpu_memory_used_mib()
    indices = solo_indices(args.solo, len(jobs))
    agreement = asyncio.run(asyncio.wait_for(solo_agreement(server.url, jobs, load.results, indices,
                                                            args.request_timeout_s), args.load_timeout_s))
    metrics = server.metrics()
    return {"report": "adaq serve load", "server": server.ready, "load": load.summary(), "agreement": agreement,
            "engine": engine_figures(metrics), "gpu_memory_used_mib": {"before": memory_before, "after": memory_after},
            "settings": {"clients": args.clients, "requests": args.requests, "max_tokens": list(args.max_tokens),
                         "solo": len(indices)}}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, serve_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--synthetic", default=None, help="bundled config name or config.json (default gemma3-4b)")
    model.add_argument("--checkpoint", default=None, help="a checkpoint folder instead of a synthetic model")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the demo's Gemma 3 one)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--solo", type=int, default=48, help="requests sent again alone to check agreement")
    parser.add_argument("--max-tokens", type=int, nargs=2, default=(32, 128), metavar=("LOW", "HIGH"))
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "serve_load.json"))
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--load-timeout-s", type=float, default=1200.0)
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--bench-json", default=None, help="an adaq bench --json report of the same model: the "
                        "served tok/s over its decode tok/s at batch = --clients")
    parser.add_argument("--export-tokenizer", default=None, metavar="FOLDER",
                        help="only copy the tokenizer (default: the demo's) into FOLDER, for a machine without it")
    args = parser.parse_args(ours)
    if not args.checkpoint and not args.synthetic:
        args.synthetic = "gemma3-4b"
    if min(args.clients, args.requests) < 1 or args.solo < 0 or not 1 <= args.max_tokens[0] <= args.max_tokens[1]:
        parser.error("--clients and --requests must be >= 1, --solo >= 0, 1 <= LOW <= HIGH")
    return args, serve_args


def main(argv: list[str] | None = None) -> int:
    args, serve_args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.export_tokenizer:
            done = tokenizer_folder(Path(args.tokenizer) if args.tokenizer else demo_tokenizer(),
                                    Path(args.export_tokenizer))
            print(json.dumps(done))
            return 0
        report = run(args, serve_args)
    except (AdaqError, asyncio.TimeoutError, httpx.HTTPError) as error:  # the server log says more
        print(f"error: {str(error) or 'a phase ran past its deadline'}", file=sys.stderr)
        return 2
    from adaq.bench.environment import command_line
    from adaq.bench.report import write_json

    report["command"] = command_line()
    write_json(report, Path(args.out))
    load, agreement = report["load"], report["agreement"]
    print(f"{load['requests']} requests from {load['clients']} clients in {load['wall_s']:.1f} s: {load['errors']} "
          f"errors, {load['output_tokens_per_s']:.1f} output tok/s, latency p50 "
          f"{(load['latency_s'] or {}).get('p50', float('nan')) * 1000:.0f} ms; agreement {agreement['equal']}/"
          f"{agreement['checked']}; {report['engine']['fallbacks']} fallbacks; wrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
