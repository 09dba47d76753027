"""Load the engine, bind the socket, run uvicorn: what `adaq serve` does."""

import errno
import socket
from dataclasses import dataclass, field

from adaq.engine.config import EngineConfig
from adaq.errors import AdaqError
from adaq.serve.app import ServeSettings


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
          on_ready=None, load_engine=None) -> None:
    """Serve until interrupted; `on_ready(Listening)` is called once the model is loaded and the socket bound.
    `load_engine()` makes the engine when the model is not a checkpoint folder (a synthetic model)."""
    import uvicorn

    from adaq.engine.llm_engine import LLMEngine
    from adaq.serve.app import build_app

    sock = bind(host, port)
    try:
        engine = load_engine() if load_engine is not None else LLMEngine(config)
        app = build_app(engine, settings)
        if on_ready is not None:
            on_ready(_listening(engine, settings, sock, host))
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, log_config=_log_config(),
                                               timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: uvicorn has shut down gracefully already
        pass
    finally:
        sock.close()


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
