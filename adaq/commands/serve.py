"""`adaq serve CKPT`: an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics) over one engine with continuous batching."""

import json
from pathlib import Path

import typer

from adaq.commands import PREFILL_PATH_HELP as PATH_HELP


def serve(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (compressed-tensors NVFP4, ModelOpt or dense)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="TCP port (0: any free port, printed when ready)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="ADAQ_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on /v1/* (env ADAQ_API_KEY)."),
    served_model_name: list[str] = typer.Option([], "--served-model-name",
                                                help="Model name clients use (repeatable; default: folder name)."),
    max_model_len: int | None = typer.Option(None, "--max-model-len", help="Context length (default: the model's)."),
    max_num_seqs: int | None = typer.Option(None, "--max-num-seqs",
                                            help="Sequences decoded together (default 256 GPU, 32 CPU)."),
    max_num_batched_tokens: int | None = typer.Option(None, "--max-num-batched-tokens",
                                                      help="Token budget of one step (default 8192 GPU, 2048 CPU)."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", help="GPU share adaq may use."),
    kv_cache_dtype: str = typer.Option("fp8", "--kv-cache-dtype", help="fp8 (E4M3 + per-token scales), nvfp4 (E2M1 + E4M3 per 16, 0.57 B/value) or bf16."),
    kv_cache_memory: str | None = typer.Option(None, "--kv-cache-memory", help="KV cache size on CPU, e.g. 2GiB."),
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
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug."),
    json_output: bool = typer.Option(False, "--json", help="Print the ready line as one JSON object on stdout."),
    prefill_path: str | None = typer.Option(None, "--prefill-path", help=PATH_HELP),
) -> None:
    """Serve a checkpoint over the OpenAI API (streaming and plain JSON), with Prometheus metrics."""
    from rich.console import Console

    from adaq.errors import AdaqError

    if not (checkpoint / "config.json").is_file():
        raise AdaqError(f"{checkpoint}: not a checkpoint folder (no config.json)")

    from adaq.engine.config import EngineConfig
    from adaq.backends.prefill_route import select_path
    from adaq.serve.app import ServeSettings
    from adaq.serve.server import serve as run_server

    console = Console(stderr=True)
    select_path(prefill_path)
    names = served_model_name or [checkpoint.name]
    settings = ServeSettings(names + [str(checkpoint)], str(checkpoint), api_key, max_queue, max_prompt_tokens,
                             max_output_tokens, max_body_bytes)
    config = EngineConfig(checkpoint, backend=backend, kv_cache_dtype=kv_cache_dtype, max_model_len=max_model_len,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory=kv_cache_memory,
                          enable_prefix_caching=prefix_caching, dtype=dtype, device=device)

    status = console.status(f"loading {checkpoint}")

    def ready(listening) -> None:
        status.stop()
        if json_output:
            print(json.dumps(vars(listening)), flush=True)
        console.print(listening.line(), soft_wrap=True)

    status.start()
    try:
        run_server(config, settings, host, port, log_level, on_ready=ready)
    finally:
        status.stop()
