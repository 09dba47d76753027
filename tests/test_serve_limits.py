"""What a hostile checkpoint or client must not do to `adaq serve` and `adaq run` (issue 20): a chat template that
loops or builds a huge string gets a 400 (a one-line error in `run`) while /health keeps answering; SIGINT and
SIGTERM stop the server during such a render; a prompt too long to fit is refused before it is tokenized; idle and
half-open connections are closed; the API key guards /metrics and the OpenAPI pages and cannot be empty."""

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers.hostile import HOSTILE_TEMPLATE, READ_TIMEOUT_S, TEMPLATE_TIMEOUT_S
from test_serve import API_KEY, AUTH, MODEL, SERVER_FLAGS, Server, run_cli, start_server, stop_server

LIMIT_FLAGS = ["--read-timeout", str(READ_TIMEOUT_S), "--keep-alive", "1", "--chat-template-timeout",
               str(TEMPLATE_TIMEOUT_S), "--api-key", API_KEY, "--served-model-name", MODEL]


def chat(content: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def hostile_checkpoint(tiny_qwen3_nvfp4, tmp_path_factory) -> Path:
    folder = Path(shutil.copytree(tiny_qwen3_nvfp4, tmp_path_factory.mktemp("hostile") / "ckpt"))
    (folder / "chat_template.jinja").write_text(HOSTILE_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def server(hostile_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-limits") / "server.log"
    server = start_server(hostile_checkpoint, log, *SERVER_FLAGS, *LIMIT_FLAGS)
    yield server
    stop_server(server)
    assert server.process.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def health_while(work, server: Server) -> tuple[object, list[float]]:
    """Run `work()` in a thread; probe /health (no key) until it returns; (its result, each probe's seconds)."""
    result, probes = {}, []
    thread = threading.Thread(target=lambda: result.setdefault("value", work()))
    thread.start()
    while thread.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        probes.append(time.monotonic() - started)
        time.sleep(0.2)
    thread.join()
    return result["value"], probes


# ---- chat templates ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, says", [("loop", f"longer than {TEMPLATE_TIMEOUT_S} s"), ("big", "MiB")])
def test_a_runaway_chat_template_gets_a_400_while_health_keeps_answering(server, content, says):
    started = time.monotonic()
    response, probes = health_while(lambda: server.post("/v1/chat/completions", json=chat(content)), server)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "chat_template_failed" and error["param"] == "messages" and says in error["message"]
    assert time.monotonic() - started < TEMPLATE_TIMEOUT_S + 20
    assert probes and max(probes) < 2, probes
    assert server.post("/v1/chat/completions", json=chat("hello")).status_code == 200  # a fresh worker renders


def test_the_template_renders_as_apply_chat_template_does(tiny_qwen3_nvfp4):
    from transformers import AutoTokenizer

    from adaq.engine.chat import TemplateRenderer, render_chat

    # Never the hostile template in this process: jinja folds constants when it compiles, so merely compiling
    # {{ 'x' * 10000000000 }} allocates the 10 GB string.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen3_nvfp4))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo ☃"}]
    with TemplateRenderer() as renderer:
        assert render_chat(tokenizer, messages, renderer=renderer) == \
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_a_closed_renderer_stops_a_render_at_once():
    from adaq.engine.chat import TemplateError, TemplateLimits, TemplateRenderer

    renderer = TemplateRenderer(TemplateLimits(timeout_s=60))
    renderer.warm()
    threading.Timer(0.5, renderer.close).start()
    started = time.monotonic()
    with pytest.raises(TemplateError):
        renderer.render(HOSTILE_TEMPLATE, [{"role": "user", "content": "loop"}], True, {})
    assert time.monotonic() - started < 10


def test_run_stops_a_runaway_template_with_one_line(hostile_checkpoint):
    started = time.monotonic()
    result = run_cli("run", str(hostile_checkpoint), "loop", "--chat", "--chat-template-timeout", "2", "--backend",
                     "reference", "--device", "cpu", "--max-model-len", "64", "--max-tokens", "2")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the chat template took longer than 2 s")
    assert time.monotonic() - started < 100


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_server_during_a_render(hostile_checkpoint, tmp_path, stop):
    log = tmp_path / "server.log"
    server = start_server(hostile_checkpoint, log, *SERVER_FLAGS, *LIMIT_FLAGS, "--chat-template-timeout", "60")
    answers = []
    thread = threading.Thread(target=lambda: answers.append(
        server.post("/v1/chat/completions", json=chat("loop")).status_code), daemon=True)
    thread.start()
    time.sleep(1.5)
    started = time.monotonic()
    server.process.send_signal(stop)
    try:
        code = server.process.wait(timeout=15)
    finally:
        server.process.kill()
    assert code == 0 and time.monotonic() - started < 15, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


# ---- prompts -------------------------------------------------------------------------------------------------------
def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(server):
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "word " * 12000, "max_tokens": 2}),
                       ("/v1/chat/completions", chat("word " * 12000))):
        response = server.post(path, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "60000 characters" in error["message"], error


def test_a_prompt_that_cannot_be_tokenized_is_a_400(server):
    for path, body in (("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'),
                       ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": '
                                                b'"\\udfff"}], "max_tokens": 2}')):
        response = server.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_prompt", response.text


# ---- connections ---------------------------------------------------------------------------------------------------
def test_idle_and_half_open_connections_are_closed(server):
    host, port = server.url.removeprefix("http://").split(":")
    partial = [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n",
               b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
               b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": \"hel"]
    sockets = []
    for index in range(30):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(partial[index % len(partial)])
        sockets.append(sock)
    started = time.monotonic()
    for sock in sockets:
        sock.settimeout(READ_TIMEOUT_S + 10)
        while sock.recv(65536):  # until the server closes it (it may answer first: 400 for a cut request)
            pass
        sock.close()
    assert time.monotonic() - started < READ_TIMEOUT_S + 10
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.complete().status_code == 200


# ---- authentication ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"])
def test_metrics_and_the_openapi_pages_need_the_key(server, path):
    assert httpx.get(f"{server.url}{path}").status_code == 401
    assert httpx.get(f"{server.url}{path}", headers=AUTH).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_public_flags_open_metrics_and_docs_only():
    from adaq.serve.app import ServeSettings

    closed = ServeSettings(["m"], "m", api_key="k").open_paths()
    assert closed == ("/health",)
    opened = ServeSettings(["m"], "m", api_key="k", public_metrics=True, public_docs=True).open_paths()
    assert {"/metrics", "/docs", "/redoc", "/openapi.json"} <= set(opened) and "/v1/models" not in opened


@pytest.mark.parametrize("key", ["", "   ", " padded "])
def test_an_empty_or_whitespace_api_key_is_a_one_line_error(hostile_checkpoint, key):
    for args, env in ((["--api-key", key], {}), ([], {"ADAQ_API_KEY": key})):
        result = run_cli_env(env, "serve", str(hostile_checkpoint), "--port", "0", *args)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "--api-key" in result.stderr


def test_no_key_on_a_public_address_warns_and_a_bad_port_is_one_line(hostile_checkpoint):
    # --port -1 fails before anything listens: the warning comes first, and nothing binds 0.0.0.0
    result = run_cli_env({}, "serve", str(hostile_checkpoint), "--host", "0.0.0.0", "--port", "-1")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "warning: serving on 0.0.0.0 without --api-key" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: invalid setting --port -1: must be 0-65535 (0: any " \
                                                      "free port)"


def run_cli_env(env: dict, *args: str) -> subprocess.CompletedProcess:
    import os

    environment = {key: value for key, value in os.environ.items() if key != "ADAQ_API_KEY"}
    return subprocess.run([sys.executable, "-c", "from adaq.cli import main; main()", *args], capture_output=True,
                          text=True, timeout=120, env={**environment, "OMP_NUM_THREADS": "1", **env})
