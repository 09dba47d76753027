"""Prometheus metrics of the server (GET /metrics), named after vLLM's where there is one.

One registry per app, so that several servers (tests) in one process do not collide. Gauges of the engine's state
are read when scraped; counters and histograms are fed by the engine loop after each step and by the HTTP layer.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client.core import GaugeMetricFamily

from adaq.engine.llm_engine import LLMEngine, RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ServerMetrics:
    def __init__(self, engine: LLMEngine, model_name: str, in_flight=lambda: 0):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self._model = model_name
        self.http_requests = Counter("adaq_http_requests", "HTTP requests by route and status code",
                                     ["route", "status"], registry=r)
        self.finished = Counter("adaq_request_success", "Requests finished, by finish reason",
                                labels + ["finish_reason"], registry=r)
        self.aborted_requests = Counter("adaq_request_aborted", "Requests cancelled because their client left",
                                        labels, registry=r).labels(model_name)
        self.prompt_tokens = Counter("adaq_prompt_tokens", "Prompt tokens of finished requests",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("adaq_generation_tokens", "Tokens generated", labels,
                                         registry=r).labels(model_name)
        self.ttft = self._histogram("adaq_time_to_first_token_seconds", "Arrival to first token", LATENCY_BUCKETS)
        self.e2e = self._histogram("adaq_e2e_request_latency_seconds", "Arrival to last token", LATENCY_BUCKETS)
        self.queue_time = self._histogram("adaq_request_queue_time_seconds", "Arrival to first scheduled",
                                          LATENCY_BUCKETS)
        self.tpot = self._histogram("adaq_time_per_output_token_seconds", "Mean time between output tokens",
                                    TOKEN_LATENCY_BUCKETS)
        self.step_time = self._histogram("adaq_engine_step_seconds", "Duration of one engine step",
                                         TOKEN_LATENCY_BUCKETS)
        self._engine_gauges(engine, in_flight)

    def _histogram(self, name: str, documentation: str, buckets) -> Histogram:
        return Histogram(name, documentation, ["model_name"], buckets=buckets, registry=self.registry).labels(
            self._model)

    def _engine_gauges(self, engine: LLMEngine, in_flight) -> None:
        def gauge(name: str, documentation: str, read) -> None:
            Gauge(name, documentation, ["model_name"], registry=self.registry).labels(self._model).set_function(read)

        gauge("adaq_num_requests_waiting", "Requests queued in the engine", lambda: engine.queue_lengths()[0])
        gauge("adaq_num_requests_running", "Requests being computed", lambda: engine.queue_lengths()[1])
        gauge("adaq_num_requests_in_flight", "Requests admitted by the server and not finished", in_flight)
        gauge("adaq_kv_cache_usage_perc", "Share of KV-cache blocks in use (0..1)", engine.kv_usage)
        gauge("adaq_kv_cache_free_blocks", "Free KV-cache blocks", lambda: engine.block_manager.num_free_blocks)
        gauge("adaq_kv_cache_blocks", "KV-cache blocks in all", lambda: engine.block_manager.num_blocks)
        gauge("adaq_fallbacks", "Fallbacks so far (adaq_fallback lists them)", lambda: len(engine.fallbacks))
        gauge("adaq_cuda_graphs", "1 when decode steps replay CUDA graphs",
              lambda: float(engine.runner.decode_graphs is not None))
        self.registry.register(_FallbackCollector(engine, self._model))

    # ---- fed by the engine loop and the HTTP layer -------------------------------------------------------------
    def step(self, outputs: list[RequestOutput], seconds: float) -> None:
        self.step_time.observe(seconds)
        self.generation_tokens.inc(sum(len(output.new_token_ids) for output in outputs))
        for output in outputs:
            if output.finished and output.finish_reason != "abort":
                self._finished(output)

    def _finished(self, output: RequestOutput) -> None:
        m = output.metrics
        self.finished.labels(self._model, output.finish_reason).inc()
        self.prompt_tokens.inc(m.num_prompt_tokens)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        if m.num_output_tokens > 1 and m.finished_time is not None and m.first_token_time is not None:
            self.tpot.observe((m.finished_time - m.first_token_time) / (m.num_output_tokens - 1))

    def aborted(self, count: int) -> None:
        self.aborted_requests.inc(count)

    def http_request(self, path: str, status: int) -> None:
        self.http_requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FallbackCollector:
    """`adaq_fallback{what, cause, setting} 1` for each fallback the engine reported, read when scraped (a kernel
    fallback may first happen while serving)."""

    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def describe(self):
        return []  # no samples known at registration: collected only when scraped

    def collect(self):
        family = GaugeMetricFamily("adaq_fallback", "A fallback the engine took (what gave way, why, the setting)",
                                   labels=["model_name", "what", "cause", "setting"])
        for fallback in self.engine.fallbacks:
            family.add_metric([self.model_name, fallback.what, fallback.cause, fallback.setting], 1)
        yield family
