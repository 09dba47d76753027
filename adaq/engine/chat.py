"""Chat prompts through the tokenizer's own chat template, as transformers' apply_chat_template renders them, but in
a worker process with a time limit and a memory limit.

A chat template is code that comes with a checkpoint. jinja's sandbox keeps it from touching the system, not from
looping for hours (`range(100000)` nested) or building a 10 GB string (a constant one already while it compiles:
jinja folds constants), so the parent never even compiles one. Rendered in the caller's thread, such a
template froze `adaq serve` (SIGINT included) and took `adaq run` to 4 GB. So TemplateRenderer keeps a few
spawned worker processes (no fork of a threaded parent), each under RLIMIT_AS; one that overruns its time is killed
and replaced, and the caller gets a TemplateError (a one-line CLI error, an HTTP 400).
"""

import json
import os
import threading
import time
from dataclasses import dataclass

from adaq.errors import AdaqError

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_BYTES = 2**30  # address space a worker may add to what it holds once started
WORKER_START_TIMEOUT_S = 120.0  # python + transformers' template module, on a busy machine
DEFAULT_MAX_CHARS = 2**26  # longest rendered prompt sent back (the caller's prompt limit is usually far lower)


class TemplateError(AdaqError):
    """The chat template failed, or overran its time or memory."""


@dataclass(frozen=True)
class TemplateLimits:
    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    max_chars: int = DEFAULT_MAX_CHARS

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise AdaqError(f"invalid setting --chat-template-timeout {self.timeout_s}: must be > 0")
        if self.memory_bytes < 2**20 or self.max_chars < 1:
            raise AdaqError(f"invalid chat template limits: {self}")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                renderer: "TemplateRenderer | None" = None) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]), ending where the assistant's turn starts."""
    if tokenizer is None or not has_chat_template(tokenizer):
        raise AdaqError("the tokenizer has no chat template: use --no-chat (plain completion) or add a "
                        "chat_template to tokenizer_config.json")
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, TypeError) as error:
        raise TemplateError(f"cannot pick the chat template ({error})") from None
    special = {key: value for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
    return (renderer or shared_renderer()).render(template, messages, add_generation_prompt, special)


def chat_token_ids(tokenizer, messages: list[dict], renderer: "TemplateRenderer | None" = None) -> list[int]:
    """Token ids of the rendered chat; the template already writes BOS, so the tokenizer must not add another."""
    return tokenizer.encode(render_chat(tokenizer, messages, renderer=renderer), add_special_tokens=False)


class TemplateRenderer:
    """Renders chat templates in `workers` worker processes; `render` is blocking and thread-safe (callers beyond
    `workers` wait for a free worker). `close()` kills every worker: a render in progress fails at once."""

    def __init__(self, limits: TemplateLimits = TemplateLimits(), workers: int = 1):
        import queue

        self.limits = limits
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(workers):
            self._idle.put(None)  # a slot; its worker starts on first use

    def render(self, template: str, messages: list[dict], add_generation_prompt: bool, special: dict) -> str:
        worker = self._take()
        try:
            return worker.render(json.dumps([template, messages, add_generation_prompt, special,
                                             self.limits.max_chars]), self.limits)
        except TemplateError:
            if not worker.alive:
                self._forget(worker)
                worker = None
            raise
        finally:
            self._idle.put(worker)

    def warm(self) -> None:
        """Start one worker now and wait until it is ready, so that the first request does not wait for it."""
        worker = self._take()
        try:
            worker.wait_ready()
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
        for worker in workers:
            worker.kill()

    def __enter__(self) -> "TemplateRenderer":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _take(self) -> "_Worker":
        import queue

        try:  # bounded: behind a few runaway templates, a caller waits at most about one time limit
            worker = self._idle.get(timeout=self.limits.timeout_s)
        except queue.Empty:
            raise TemplateError("every chat template worker is busy: retry later") from None
        with self._lock:
            if self._closed:
                self._idle.put(worker)
                raise TemplateError("the chat template renderer is shut down (the server is stopping)")
            if worker is None or not worker.alive:
                worker = _Worker(self.limits.memory_bytes)
                self._all.add(worker)
        return worker

    def _forget(self, worker: "_Worker") -> None:
        with self._lock:
            self._all.discard(worker)


class _Worker:
    """One worker process (`python -c`, not multiprocessing: spawn would re-run an unguarded main script) and one
    JSON line per request and per answer on its pipes. Its own session: a terminal's Ctrl-C reaches the parent only,
    which decides; if the parent dies, the worker reads EOF and ends."""

    def __init__(self, memory_bytes: int):
        import subprocess
        import sys

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from adaq.engine.chat import worker_main; worker_main()", str(memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONPATH": path})
        self.ready = False  # the worker says so once its imports are done (not counted in a render's time)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def render(self, request: str, limits: TemplateLimits) -> str:
        try:
            self.wait_ready()
            self.process.stdin.write(request.encode() + b"\n")
            self.process.stdin.flush()
            if not self._answer_within(limits.timeout_s):
                self.kill()
                raise TemplateError(f"the chat template took longer than {limits.timeout_s:g} s to render: it was "
                                    f"stopped (a template with runaway loops?)")
            kind, value = json.loads(self.process.stdout.readline())
        except (OSError, ValueError):
            self.kill()
            raise TemplateError("the chat template worker ended while rendering (out of memory, or the server is "
                                "stopping)") from None
        if kind == "memory":
            self.kill()  # a MemoryError may leave the worker half-broken: start a fresh one next time
            raise TemplateError(f"the chat template needed more than {limits.memory_bytes / 2**20:.0f} MiB to "
                                f"render: it was stopped")
        if kind == "error":
            raise TemplateError(value)
        return value

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self._answer_within(WORKER_START_TIMEOUT_S) or json.loads(self.process.stdout.readline()) != "ready":
            self.kill()
            raise TemplateError(f"the chat template worker did not start in {WORKER_START_TIMEOUT_S:g} s")
        self.ready = True

    def _answer_within(self, timeout_s: float) -> bool:
        import select

        readable, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        return bool(readable)

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


_SHARED: TemplateRenderer | None = None
_SHARED_LOCK = threading.Lock()


def shared_renderer() -> TemplateRenderer:
    """One process-wide renderer with the default limits (for callers that do not keep their own)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = TemplateRenderer()
        return _SHARED


# ---- the worker process --------------------------------------------------------------------------------------------
def worker_main() -> None:
    """Render requests (one JSON line each on stdin) until stdin closes; answer one JSON line each on stdout.
    transformers' own renderer, so prompts equal apply_chat_template's."""
    import sys

    from transformers.utils.chat_template_utils import render_jinja_template

    limit_address_space(int(sys.argv[1]))
    threading.Thread(target=end_with_parent, args=(os.getppid(),), daemon=True).start()
    out = sys.stdout
    out.write(json.dumps("ready") + "\n")
    out.flush()
    for line in sys.stdin:
        template, messages, add_generation_prompt, special, max_chars = json.loads(line)
        answer = render_one(render_jinja_template, template, messages, add_generation_prompt, special, max_chars)
        out.write(json.dumps(answer) + "\n")
        out.flush()


def end_with_parent(parent: int) -> None:
    """A parent killed mid-render (SIGKILL) cannot kill its worker: the worker notices it was orphaned and exits,
    rather than loop for hours. (jinja renders in Python, so this thread gets the GIL in between.)"""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def render_one(render, template: str, messages: list[dict], add_generation_prompt: bool, special: dict,
               max_chars: int) -> tuple[str, str]:
    try:
        rendered, _ = render(conversations=[messages], chat_template=template,
                             add_generation_prompt=add_generation_prompt, **special)
        text = rendered[0]
    except MemoryError:
        return "memory", ""
    except RecursionError:
        return "error", "the chat template recursed too deeply"
    except Exception as error:  # jinja errors: a bad role order, a template that raises on purpose
        return "error", f"the chat template rejected the messages ({type(error).__name__}: {error})"[:2000]
    if len(text) > max_chars:
        return "error", f"the chat template rendered {len(text)} characters, more than the limit ({max_chars})"
    return "ok", text


def limit_address_space(extra_bytes: int) -> None:
    """RLIMIT_AS = what the worker maps now + extra_bytes (Linux; elsewhere only the time limit holds)."""
    import resource

    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            line = next(line for line in status if line.startswith("VmSize:"))
        now = int(line.split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (now + extra_bytes, now + extra_bytes))
    except (OSError, StopIteration, ValueError):
        pass
