"""`adaq serve CKPT`: an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics) over one engine with continuous batching."""

import json
import os
from pathlib import Path

import typer

from adaq.commands import PREFILL_PATH_HELP as PATH_HELP
from adaq.commands import LM_HEAD_HELP, STRICT_HELP, TP_HELP
from adaq.engine.chat import DEFAULT_TIMEOUT_S

API_KEY_ENV = "ADAQ_API_KEY"
DEFAULT_READ_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S = 30.0, 5  # adaq.serve.server's (not imported: --help stays instant)


def serve(
    checkpoint: Path = typer.Argument(None, help="Checkpoint folder (compressed-tensors NVFP4, ModelOpt or dense)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="TCP port (0: any free port, printed when ready)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar=API_KEY_ENV,
                                       help="Require 'Authorization: Bearer KEY' on every route but /health "
                                            "(env ADAQ_API_KEY)."),
    public_metrics: bool = typer.Option(False, "--public-metrics", help="Serve /metrics without the API key."),
    public_docs: bool = typer.Option(False, "--public-docs",
                                     help="Serve /docs, /redoc and /openapi.json without the API key."),
    served_model_name: list[str] = typer.Option([], "--served-model-name",
                                                help="Model name clients use (repeatable; default: folder name)."),
    max_model_len: int | None = typer.Option(None, "--max-model-len", help="Context length (default: the model's)."),
    max_num_seqs: int | None = typer.Option(None, "--max-num-seqs",
                                            help="Sequences decoded together (default 256 GPU, 32 CPU)."),
    max_num_batched_tokens: int | None = typer.Option(
        None, "--max-num-batched-tokens",
        help="Token budget of one step (default 2048 on GPUs under 70 GiB and on the CPU, 8192 on larger ones)."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", help="GPU share adaq may use."),
    kv_cache_dtype: str = typer.Option("fp8", "--kv-cache-dtype", help="fp8 (E4M3 + per-token scales), nvfp4 (E2M1 + E4M3 per 16, 0.57 B/value) or bf16."),
    kv_cache_memory: str | None = typer.Option(None, "--kv-cache-memory", help="KV cache size on CPU, e.g. 2GiB."),
    lm_head: str = typer.Option("bf16", "--lm-head", help=LM_HEAD_HELP),
    backend: str = typer.Option("auto", help="auto (cuda when a GPU and the kernels are there), cuda, reference."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)."),
    dtype: str | None = typer.Option(None, help="Compute dtype: bf16, fp16, fp32 (default bf16 GPU, fp32 CPU)."),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching",
                                        help="Share the KV blocks of common prompt prefixes."),
    max_queue: int = typer.Option(256, "--max-queue",
                                  help="Requests queued beyond --max-num-seqs; past it the server answers 429."),
    max_prompt_tokens: int | None = typer.Option(None, "--max-prompt-tokens",
                                                 help="Longest prompt accepted (default: context - 1)."),
    max_output_tokens: int | None = typer.Option(None, "--max-output-tokens",
                                                 help="Largest max_tokens accepted (default: context - 1)."),
    max_body_bytes: int = typer.Option(8 * 2**20, "--max-body-bytes", help="Largest request body (else 413)."),
    read_timeout: float = typer.Option(DEFAULT_READ_TIMEOUT_S, "--read-timeout",
                                       help="Seconds a client has to send a whole request (headers and body)."),
    keep_alive: int = typer.Option(DEFAULT_KEEP_ALIVE_S, "--keep-alive",
                                   help="Seconds an idle keep-alive connection stays open."),
    chat_template_timeout: float = typer.Option(DEFAULT_TIMEOUT_S, "--chat-template-timeout",
                                                help="Seconds a chat template may take to render (else 400)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug."),
    json_output: bool = typer.Option(False, "--json", help="Print the ready line as one JSON object on stdout."),
    prefill_path: str | None = typer.Option(None, "--prefill-path", help=PATH_HELP),
    strict: bool = typer.Option(False, "--strict", envvar="ADAQ_STRICT", help=STRICT_HELP),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "-tp", help=TP_HELP),
    synthetic: str | None = typer.Option(None, "--synthetic", help="Instead of CHECKPOINT: random NVFP4 weights in a "
                                         "real model's shapes (as adaq bench --synthetic), e.g. gemma3-4b."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="With --synthetic: a folder with the tokenizer "
                                          "(and generation_config.json) to serve it with."),
) -> None:
    """Serve a checkpoint over the OpenAI API (streaming and plain JSON), with Prometheus metrics."""
    from rich.console import Console

    from adaq.errors import AdaqError

    if api_key is None and os.environ.get(API_KEY_ENV) is not None:
        api_key = os.environ[API_KEY_ENV]  # click reads an empty variable as unset: ServeSettings refuses it
    if synthetic is not None:
        checkpoint, load_engine = _synthetic(synthetic, tokenizer, checkpoint)
    elif checkpoint is None or not (checkpoint / "config.json").is_file():
        raise AdaqError(f"{checkpoint}: not a checkpoint folder (no config.json)" if checkpoint else
                        "give a CHECKPOINT folder (or --synthetic NAME --tokenizer FOLDER)")
    else:
        load_engine = None

    from adaq.engine.config import EngineConfig
    from adaq.backends.prefill_route import select_path
    from adaq.serve.app import ServeSettings
    from adaq.serve.server import serve as run_server
    from adaq.validate import check_checkpoint

    console = Console(stderr=True)
    select_path(prefill_path)
    names = served_model_name or [f"synthetic-{Path(synthetic).stem}" if synthetic else checkpoint.name]
    settings = ServeSettings(names + [str(checkpoint)], str(checkpoint), api_key, max_queue, max_prompt_tokens,
                             max_output_tokens, max_body_bytes, public_metrics, public_docs, chat_template_timeout)
    if not api_key and not is_loopback(host):
        console.print(f"warning: serving on {host} without --api-key: anyone who can reach this address can use "
                      f"the model", style="yellow", soft_wrap=True)
    config = EngineConfig(checkpoint, backend=backend, kv_cache_dtype=kv_cache_dtype, lm_head=lm_head,
                          max_model_len=max_model_len,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory=kv_cache_memory,
                          enable_prefix_caching=prefix_caching, dtype=dtype, device=device, strict=strict,
                          tensor_parallel_size=tensor_parallel_size)

    status = console.status(f"loading {checkpoint}")

    def ready(listening) -> None:
        status.stop()
        if json_output:
            print(json.dumps(vars(listening)), flush=True)
        console.print(listening.line(), soft_wrap=True)

    status.start()
    try:
        if load_engine is None:
            check_checkpoint(checkpoint, level="layout")  # validate's own rules: what it calls valid, serve serves
        run_server(config, settings, host, port, log_level, on_ready=ready, read_timeout_s=read_timeout,
                   keep_alive_s=keep_alive, load_engine=None if load_engine is None else lambda: load_engine(config))
    finally:
        status.stop()


def _synthetic(name: str, tokenizer: Path | None, checkpoint: Path | None):
    """(the tokenizer folder, which stands for the checkpoint, and the engine loader) of `--synthetic NAME`."""
    from adaq.errors import AdaqError

    if checkpoint is not None:
        raise AdaqError("give either a CHECKPOINT or --synthetic NAME, not both")
    if tokenizer is None or not tokenizer.is_dir():
        found = "" if tokenizer is None else f"; {tokenizer} is not a folder"
        raise AdaqError(f"--synthetic needs --tokenizer FOLDER (a folder with tokenizer files){found}")
    from adaq.bench.synthetic import synthetic_engine

    return tokenizer, lambda config: synthetic_engine(name, config)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
