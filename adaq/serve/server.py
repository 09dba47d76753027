"""Load the engine, bind the socket, run uvicorn: what `adaq serve` does.

Connections are bounded in time: a client has `read_timeout_s` to send a whole request (headers and body), from
the moment it connects or its previous response ends, and an idle keep-alive connection closes after
`keep_alive_s`. uvicorn itself times out only keep-alive connections that have had a response, so a client that
connects and sends nothing, or half a request, would hold its socket forever. SIGINT and SIGTERM both stop the
server: in-flight chat template renders are killed at once, requests get `GRACEFUL_SHUTDOWN_S` to finish.
"""

import errno
import signal
import socket
from dataclasses import dataclass, field

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from adaq.engine.config import EngineConfig
from adaq.errors import AdaqError
from adaq.serve.app import ServeSettings

DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_S = 5
GRACEFUL_SHUTDOWN_S = 5


@dataclass
class Listening:
    """What the server prints once it is ready."""

    url: str
    host: str
    port: int
    model: str
    max_model_len: int
    max_num_seqs: int
    kv_cache_blocks: int
    block_size: int
    backend: str
    device: str
    cuda_graphs: bool = False
    fallbacks: list[dict] = field(default_factory=list)  # adaq.backends.fallbacks.Fallback as dicts

    def line(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        fallbacks = "; ".join(f"{f['what']} ({f['cause']})" for f in self.fallbacks)
        return (f"serving {self.model} at {self.url}/v1 · context {self.max_model_len} · up to {self.max_num_seqs} "
                f"sequences · {self.kv_cache_blocks} KV blocks of {self.block_size} · {self.backend} on "
                f"{self.device}{graphs} · {'FALLBACKS: ' + fallbacks if fallbacks else 'no fallbacks'}")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a busy port fails at once."""
    if not 0 <= port <= 65535:
        raise AdaqError(f"invalid setting --port {port}: must be 0-65535 (0: any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        hint = "choose another --port" if error.errno == errno.EADDRINUSE else "check --host and --port"
        raise AdaqError(f"cannot listen on {host}:{port} ({error.strerror}): {hint}") from None
    sock.listen(2048)
    return sock


def serve(config: EngineConfig, settings: ServeSettings, host: str, port: int, log_level: str = "info",
          on_ready=None, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
          keep_alive_s: int = DEFAULT_KEEP_ALIVE_S, load_engine=None) -> None:
    """Serve until SIGINT or SIGTERM; `on_ready(Listening)` is called once the model is loaded and the socket
    bound. `load_engine()` makes the engine when the model is not a checkpoint folder (a synthetic model)."""
    from adaq.engine.llm_engine import LLMEngine
    from adaq.serve.app import build_app

    if not read_timeout_s > 0 or not keep_alive_s > 0:
        raise AdaqError(f"invalid setting --read-timeout {read_timeout_s} / --keep-alive {keep_alive_s}: must be > 0")
    sock = bind(host, port)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # while loading, and re-raised by uvicorn after its exit
    engine = None
    try:
        engine = load_engine() if load_engine is not None else LLMEngine(config)
        app = build_app(engine, settings)
        if on_ready is not None:
            on_ready(_listening(engine, settings, sock, host))
        uvicorn_config = uvicorn.Config(app, log_level=log_level, log_config=_log_config(),
                                        http=read_timeout_protocol(read_timeout_s), timeout_keep_alive=keep_alive_s,
                                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        StoppingServer(uvicorn_config, on_exit=app.state.renderer.close).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM is how a server is stopped: uvicorn has shut down already
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        if engine is not None:
            engine.close()  # tensor-parallel workers stop with the server


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class StoppingServer(uvicorn.Server):
    """uvicorn's server, plus `on_exit()` at the first SIGINT/SIGTERM: work that uvicorn's graceful shutdown cannot
    interrupt (a chat template rendering in a worker process) is stopped there and then."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._on_exit()


READING = (h11.IDLE, h11.SEND_BODY)  # the client's side of h11: a request not yet (fully) received


def read_timeout_protocol(read_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for reading each request (headers and body)."""

    class ReadTimeoutProtocol(H11Protocol):
        read_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_read_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state not in READING:
                self._cancel_read_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state in READING and not self.transport.is_closing():
                self._arm_read_deadline()

        def connection_lost(self, exc) -> None:
            self._cancel_read_deadline()
            super().connection_lost(exc)

        def _arm_read_deadline(self) -> None:
            self._cancel_read_deadline()
            self.read_deadline = self.loop.call_later(read_timeout_s, self._read_deadline_passed)

        def _cancel_read_deadline(self) -> None:
            if self.read_deadline is not None:
                self.read_deadline.cancel()
                self.read_deadline = None

        def _read_deadline_passed(self) -> None:
            self.read_deadline = None
            if self.conn.their_state in READING and not self.transport.is_closing():
                self.transport.close()

    return ReadTimeoutProtocol


def _log_config() -> dict:
    """uvicorn's logging, with the access log on stderr too: stdout carries only the ready line (--json)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def _listening(engine, settings: ServeSettings, sock: socket.socket, host: str) -> Listening:
    port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    model = engine.runner.model
    backend = getattr(getattr(model, "backend", None), "name", engine.config.backend)
    return Listening(f"http://{shown_host}:{port}", host, port, settings.model_names[0], engine.max_model_len,
                     engine.config.max_num_seqs, engine.block_manager.num_blocks, engine.config.block_size,
                     str(backend), str(engine.config.device), engine.runner.decode_graphs is not None,
                     engine.fallbacks.as_dicts())
