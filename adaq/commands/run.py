"""`adaq run CKPT [PROMPT]`: stream a completion (or chat interactively) on an NVFP4 or dense checkpoint."""

import json
import sys
from pathlib import Path

import typer

from adaq.commands import PREFILL_PATH_HELP as PATH_HELP
from adaq.commands import LM_HEAD_HELP, STRICT_HELP, TP_HELP

SAMPLING_FALLBACK = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}  # llama.cpp's defaults
# The demo's decode on a busy 2-core CPU, median tok/s: 4.9 with 1 thread, 3.1 with torch's default (2), 0.87 with
# an explicit 2 (README's --threads figures).
DEFAULT_THREADS = 1
# run answers one prompt (or one conversation) at a time: one sequence, so sliding-window layers reserve a single
# window (+ chunk) and the KV budget is what `adaq validate --batch 1` plans.
RUN_SEQUENCES = 1


def run(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (compressed-tensors NVFP4, ModelOpt or dense)."),
    prompt: str | None = typer.Argument(None, help="Prompt; without it, an interactive chat (or plain completion)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens to generate per reply."),
    temperature: float | None = typer.Option(None, help="0 = greedy. Default: generation_config.json, else 0.8."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus mass (default: generation_config, else 0.95)."),
    top_k: int | None = typer.Option(None, "--top-k", help="Keep the k likeliest tokens; 0 = off (default 40)."),
    min_p: float | None = typer.Option(None, "--min-p", help="Drop tokens below min_p x the top probability."),
    seed: int | None = typer.Option(None, help="Seed of this request's sampler."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable); trimmed from the output."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence tokens."),
    kv_cache_dtype: str = typer.Option("fp8", "--kv-cache-dtype", help="fp8 (E4M3 + per-token scales), nvfp4 (E2M1 + E4M3 per 16, 0.57 B/value) or bf16."),
    backend: str = typer.Option("auto", help="auto (cuda when a GPU and the kernels are there), cuda, reference."),
    lm_head: str = typer.Option("bf16", "--lm-head", help=LM_HEAD_HELP),
    max_model_len: int | None = typer.Option(None, "--max-model-len", help="Context length (default: the model's)."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", help="GPU share adaq may use."),
    kv_cache_memory: str | None = typer.Option(None, "--kv-cache-memory", help="KV cache size, e.g. 2GiB."),
    window_kv: bool = typer.Option(True, "--window-kv/--no-window-kv",
                                   help="Sliding-window layers keep only their window of KV (default on)."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)."),
    dtype: str | None = typer.Option(None, help="Compute dtype: bf16, fp16, fp32 (default bf16 GPU, fp32 CPU)."),
    threads: int = typer.Option(DEFAULT_THREADS, "--threads", "-t",
                                help="CPU threads for torch (1: the fastest measured on a busy 2-core CPU)."),
    chat: bool | None = typer.Option(None, "--chat/--no-chat", help="Apply the chat template (default: if any)."),
    system: str | None = typer.Option(None, "--system", help="System message for chat."),
    chat_template_timeout: float = typer.Option(10.0, "--chat-template-timeout",
                                                help="Seconds the chat template may take to render (else an error)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    prefill_path: str | None = typer.Option(None, "--prefill-path", help=PATH_HELP),
    strict: bool = typer.Option(False, "--strict", envvar="ADAQ_STRICT", help=STRICT_HELP),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "-tp", help=TP_HELP),
) -> None:
    """Generate text with adaq's engine: streams tokens, then prompt and decode tok/s and peak memory."""
    from rich.console import Console

    from adaq.engine.api import LLM
    from adaq.engine.chat import TemplateLimits, TemplateRenderer
    from adaq.engine.sampling_params import SamplingParams

    from adaq.backends.prefill_route import select_path
    from adaq.validate import check_checkpoint

    console = Console(stderr=True)
    select_path(prefill_path)
    template_limits = TemplateLimits(chat_template_timeout)
    _set_threads(threads)
    with console.status(f"loading {checkpoint}"):
        check_checkpoint(checkpoint, level="layout")  # validate's own rules: what it calls valid, run runs
        llm = LLM(checkpoint, backend=backend, kv_cache_dtype=kv_cache_dtype, lm_head=lm_head,
                  max_model_len=max_model_len,
                  max_num_seqs=RUN_SEQUENCES, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, device=device,
                  kv_cache_memory=kv_cache_memory, window_kv=window_kv, strict=strict,
                  tensor_parallel_size=tensor_parallel_size)
    with llm:  # stops tensor-parallel workers however the command ends
        chosen = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        defaults = {**SAMPLING_FALLBACK, **llm.engine.default_sampling_params()}
        sampling = {key: defaults[key] if value is None else value for key, value in chosen.items()}
        params = SamplingParams(max_tokens=max_tokens, seed=seed, stop=stop, ignore_eos=ignore_eos, **sampling)
        use_chat = _has_template(llm) if chat is None else chat
        if json_output and prompt is None:
            raise _error("--json needs a PROMPT (the interactive chat is for people)")
        with TemplateRenderer(template_limits) as renderer:
            if prompt is None:
                _interactive(llm, params, system, console, chat, renderer)
                return
            token_ids = _encode(llm, _messages(system, prompt) if use_chat else prompt, renderer)
        if json_output:
            output = llm.generate(token_ids, params)[0]
            print(json.dumps({"text": output.text, "token_ids": output.token_ids,
                              "finish_reason": output.finish_reason, **_figures(llm, output)}, indent=2))
            return
        output = _stream_reply(llm, token_ids, params)
        _print_stats(console, llm, output)


EXIT_COMMANDS = ("/exit", "/quit", "/bye")


def _interactive(llm, params, system: str | None, console, chat: bool | None, renderer) -> None:
    if chat and not _has_template(llm):
        raise _error("--chat needs a tokenizer with a chat template; --no-chat (or no flag) continues plain text")
    if chat is False or not _has_template(llm):
        why = "--no-chat" if chat is False else "this model has no chat template (a base model)"
        console.print(f"[dim]{why}: plain completion, each line you type is continued; /exit (or Ctrl-D) quits[/]")
        _complete_interactively(llm, params, console)
    else:
        console.print("[dim]chat with the model; /exit (or Ctrl-D) to quit, /clear to forget the conversation[/]")
        _chat_interactively(llm, params, system, console, renderer)


def _ask(console) -> str | None:
    """The next line typed, or None when the user quits."""
    from rich.prompt import Prompt

    try:
        line = Prompt.ask("[bold green]>>>[/]", console=console)
    except (EOFError, KeyboardInterrupt):
        return None
    except BaseException:  # SIGTERM at the prompt: the error said next starts a line of its own, not after ">>>:"
        console.print()
        raise
    return None if line.strip() in EXIT_COMMANDS else line


def _complete_interactively(llm, params, console) -> None:
    from adaq.errors import AdaqError

    while (line := _ask(console)) is not None:
        try:
            output = _stream_reply(llm, llm.engine.encode(line), params)
        except AdaqError as error:  # e.g. a line longer than the context: say so, keep going
            console.print(f"error: {error}", style="red", soft_wrap=True)
            continue
        console.print(_stats_line(llm, output), style="dim", soft_wrap=True)


def _chat_interactively(llm, params, system: str | None, console, renderer) -> None:
    from adaq.errors import AdaqError

    messages = _messages(system, None)
    while (user := _ask(console)) is not None:
        if user.strip() == "/clear":
            messages = _messages(system, None)
            continue
        messages.append({"role": "user", "content": user})
        try:
            output = _stream_reply(llm, _encode(llm, messages, renderer), params)
        except AdaqError as error:  # e.g. the conversation outgrew the context: say so, keep chatting
            console.print(f"error: {error}; /clear starts a new conversation", style="red", soft_wrap=True)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": output.text})
        _print_stats(console, llm, output)


def _stream_reply(llm, token_ids: list[int], params):
    """Print the reply as it comes; Ctrl-C stops this reply only. Returns the final RequestOutput."""
    engine = llm.engine
    request_id = engine.add_request(token_ids, params)
    final = None
    try:
        while final is None:
            for output in engine.step():
                if output.request_id == request_id:
                    sys.stdout.write(output.new_text)
                    sys.stdout.flush()
                    final = output if output.finished else None
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        final = next(o for o in engine.step() if o.request_id == request_id)
    sys.stdout.write("\n")
    return final


def _figures(llm, output) -> dict:
    import torch

    m = output.metrics
    prefill_s = (m.first_token_time or m.finished_time) - m.first_scheduled_time
    on_gpu = llm.engine.config.device.type == "cuda"
    return {
        "prompt_tokens": m.num_prompt_tokens,
        "output_tokens": m.num_output_tokens,
        "prompt_tok_s": m.num_prompt_tokens / prefill_s if prefill_s > 0 else None,
        "decode_tok_s": m.decode_tokens_per_s,
        "time_to_first_token_s": m.time_to_first_token,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else _peak_rss_bytes(),
        "device": torch.cuda.get_device_name() if on_gpu else "CPU",
        "backend": llm.engine.runner.model.backend.name if hasattr(llm.engine.runner.model, "backend") else None,
        "kv_cache_dtype": llm.engine.config.kv_cache_dtype,
        "lm_head": llm.engine.config.lm_head,
        "kv_cache_bytes": llm.engine.runner.kv_cache_bytes,
        "cuda_graphs": llm.engine.runner.decode_graphs is not None,
        "fallbacks": llm.engine.fallbacks.as_dicts(),
    }


def _print_stats(console, llm, output) -> None:
    style = "yellow" if len(llm.engine.fallbacks) else "dim"  # a fallback should not read like a footnote
    console.print(_stats_line(llm, output), style=style, soft_wrap=True)


def _stats_line(llm, output) -> str:
    f = _figures(llm, output)
    rate = lambda value: "-" if value is None else f"{value:,.1f}"  # noqa: E731
    memory = "peak GPU memory" if f["device"] != "CPU" else "peak RSS"
    return (f"prompt: {f['prompt_tokens']} tokens, {rate(f['prompt_tok_s'])} tok/s · decode: {f['output_tokens']} "
            f"tokens, {rate(f['decode_tok_s'])} tok/s · {memory} {f['peak_memory_bytes'] / 2**30:.2f} GiB (KV cache "
            f"{f['kv_cache_bytes'] / 2**30:.2f} GiB) · "
            f"{f['device']}, {f['backend']} backend, {f['kv_cache_dtype']} KV"
            f"{', CUDA graphs' if f['cuda_graphs'] else ''} · {llm.engine.fallbacks.summary()} · "
            f"{output.finish_reason}")


def _set_threads(threads: int) -> None:
    import torch

    if threads < 1:
        raise _error(f"invalid setting --threads {threads}: must be >= 1")
    torch.set_num_threads(threads)


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _messages(system: str | None, prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + ([{"role": "user", "content": prompt}] if prompt is not None else [])


def _encode(llm, prompt_or_messages, renderer) -> list[int]:
    from adaq.engine.chat import chat_token_ids

    if isinstance(prompt_or_messages, str):
        return llm.engine.encode(prompt_or_messages)
    return chat_token_ids(llm.tokenizer, prompt_or_messages, renderer)


def _has_template(llm) -> bool:
    from adaq.engine.chat import has_chat_template

    return llm.tokenizer is not None and has_chat_template(llm.tokenizer)


def _error(message: str):
    from adaq.errors import AdaqError

    return AdaqError(message)
