"""Tensor parallelism over torch.distributed: one process per rank, started by the engine itself.

Rank 0 is the caller's process: it owns the scheduler, the sampler (and a server's HTTP loop) and drives the other
ranks, which adaq spawns (`torch.multiprocessing`, spawn) and which only run the model:

- start: every rank joins one process group (NCCL on GPUs, gloo on the CPU; rank r on cuda:base+r), loads its shard
  of the checkpoint (adaq.formats.shards: only its slices are read) and builds its ModelRunner alike, so the GPU
  warm-up, the agreement on the KV cache's size (the fewest blocks any rank can hold) and the decode-graph captures
  run the same collectives on every rank.
- each step: rank 0 broadcasts the step's inputs (`StepPlan`, host lists, through `broadcast_object_list`; a
  look-ahead step's device tokens through `broadcast`), every rank stages and runs the same forward, and for each
  output-layer call rank 0 broadcasts the hidden rows so every rank computes its vocabulary share (all-gathered).
  Only rank 0 samples.
- failure: a worker's exception travels to rank 0 through a queue before the worker exits; rank 0 turns a failed
  collective, or a worker found dead, into `AdaqError("tensor-parallel rank N died: ...")`. Collectives time out
  after `$ADAQ_TP_TIMEOUT` seconds (default 300), and a watchdog thread ends a step stuck on a dead rank (an NCCL
  collective does not notice a dead peer) with the same message after `$ADAQ_TP_GRACE` seconds (default 30).
"""

import copy
import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from adaq.backends.parallel import TPGroup
from adaq.engine.config import EngineConfig
from adaq.errors import AdaqError, AdaqNotice

TIMEOUT_ENV = "ADAQ_TP_TIMEOUT"
GRACE_ENV = "ADAQ_TP_GRACE"
FAIL_ENV = "ADAQ_TP_FAIL"  # debugging / tests: "RANK:STEP" makes that worker raise at that step
STOP, STEP, LOGITS, MEMORY = "stop", "step", "logits", "memory"


def timeout_seconds() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "300"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """cuda:base+rank on GPUs (base: the device rank 0 was given), the CPU otherwise."""
    if config.device.type != "cuda":
        return config.device
    return torch.device("cuda", (config.device.index or 0) + rank)


def check_devices(config: EngineConfig) -> None:
    size = config.tensor_parallel_size
    if config.device.type == "cuda":
        last = (config.device.index or 0) + size - 1
        if last >= torch.cuda.device_count():
            raise AdaqError(f"invalid setting --tensor-parallel-size {size}: ranks need cuda:"
                            f"{config.device.index or 0}..cuda:{last}, but only {torch.cuda.device_count()} GPU(s) "
                            f"are visible")


def join_group(config: EngineConfig, rank: int, port: int) -> TPGroup:
    import torch.distributed as dist

    if dist.is_initialized():
        raise AdaqError("a tensor-parallel engine is already running in this process: close it first "
                        "(LLM.close() / LLMEngine.close())")
    device = rank_device(config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # ranks share the cores: more threads than cores makes OpenMP's spinning threads fight
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=config.tensor_parallel_size,
                            timeout=timedelta(seconds=timeout_seconds()))
    return TPGroup(rank, config.tensor_parallel_size, dist.group.WORLD)


class StepLink:
    """Rank 0's and the workers' ends of the step broadcast."""

    def __init__(self, tp: TPGroup, device: torch.device):
        self.tp = tp
        self.device = device

    def _send(self, message: tuple) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([message], src=0, group=self.tp.group, device=self._object_device())

    def _object_device(self):
        return self.device if self.device.type == "cuda" else None

    def receive(self) -> tuple:
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.tp.group, device=self._object_device())
        return box[0]

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.broadcast(tensor, src=0, group=self.tp.group)
        return tensor

    def send_step(self, plan, input_tokens: torch.Tensor | None) -> None:
        self._send((STEP, plan, None if input_tokens is None else input_tokens.numel()))
        if input_tokens is not None:
            self.broadcast(input_tokens.contiguous())

    def send_logits(self, rows: torch.Tensor) -> None:
        self._send((LOGITS, tuple(rows.shape), rows.dtype))
        self.broadcast(rows.contiguous())

    def send_stop(self) -> None:
        self._send((STOP,))

    def gather_memory(self, mine: dict) -> list[dict]:
        """Every rank's memory figures (rank order): what `adaq bench` reports per rank."""
        import torch.distributed as dist

        self._send((MEMORY,))
        every = [None] * self.tp.size
        dist.all_gather_object(every, mine, group=self.tp.group)
        return every


def memory_of(runner) -> dict:
    """A rank's weights and cache bytes, and its device's peak allocation (GPU) so far."""
    model = runner.model
    weights = sum(t.numel() * t.element_size() for t in _tensors_of(model))
    peak = torch.cuda.max_memory_allocated(runner.device) if runner.device.type == "cuda" else None
    return {"rank": runner.tp.rank, "device": str(runner.device), "weight_bytes": weights,
            "kv_cache_bytes": runner.kv_cache_bytes, "state_cache_bytes": runner.state_cache_bytes,
            "peak_allocated_bytes": peak}


def _tensors_of(model) -> list[torch.Tensor]:
    """Every weight tensor the layers hold (handles are plain attributes, not parameters), each counted once."""
    seen, found = set(), []

    def visit(value, depth=0):
        if depth > 4:
            return
        if isinstance(value, torch.Tensor):
            if value.data_ptr() not in seen and value.numel():
                seen.add(value.data_ptr())
                found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
            for item in vars(value).values():
                visit(item, depth + 1)

    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("k_cache", "v_cache", "k_scale", "v_scale", "conv_state", "ssm_state", "backend"):
                visit(value)
    return found


@dataclass
class WorkerFailure:
    rank: int
    message: str


class Workers:
    """Rank 0's view of ranks 1..N-1: spawn, join the group, watch, stop."""

    def __init__(self, config: EngineConfig, model_config: dict, fit_context: bool, source_factory=None):
        check_devices(config)
        if config.device.type == "cuda":
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off: not every host's driver has it
        context = torch.multiprocessing.get_context("spawn")
        self.errors = context.Queue()
        self.size = config.tensor_parallel_size
        port = free_port()
        args = (config, model_config, fit_context, source_factory, port, self.errors)
        self.processes = [context.Process(target=worker_main, args=(rank, *args), daemon=True, name=f"adaq-tp{rank}")
                          for rank in range(1, self.size)]
        for process in self.processes:
            process.start()
        self.failure: WorkerFailure | None = None
        self.noticed_at: float | None = None
        self.closing = False
        self.busy_since: float | None = None  # when rank 0 entered a step (the watchdog's clock)
        self.tp = self._join(config, port)
        self.link = StepLink(self.tp, rank_device(config, 0))
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name="adaq-tp-watchdog")
        self._watchdog.start()

    def _join(self, config: EngineConfig, port: int) -> TPGroup:
        try:
            return join_group(config, 0, port)
        except AdaqError:
            self.close()
            raise
        except Exception as error:
            self.close()
            raise self.died(error) from None

    # ---- failures ---------------------------------------------------------------------------------------------
    def dead_worker(self) -> WorkerFailure | None:
        """The first failure a worker reported, or a worker that ended without reporting."""
        if self.failure is None and not self.errors.empty():
            self.failure = WorkerFailure(*self.errors.get_nowait())
        if self.failure is None and not self.closing:
            ended = [(rank, p) for rank, p in enumerate(self.processes, start=1) if not p.is_alive()]
            if ended:
                rank, process = ended[0]
                self.failure = WorkerFailure(rank, f"the process ended (exit code {process.exitcode})")
        if self.failure is not None and self.noticed_at is None:
            self.noticed_at = time.monotonic()
        return self.failure

    def died(self, error: BaseException | None = None) -> AdaqError:
        """The error to raise after a collective failed: which rank died and why (waiting briefly for its report)."""
        deadline = time.monotonic() + 5
        while self.dead_worker() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        failure = self.failure
        if failure is None:
            cause = str(error).splitlines()[0][:300] if error is not None else "no rank reported a failure"
            return AdaqError(f"tensor-parallel step failed on rank 0: {type(error).__name__}: {cause}")
        return AdaqError(f"tensor-parallel rank {failure.rank} died: {failure.message}")

    def _watch(self) -> None:
        grace = float(os.environ.get(GRACE_ENV, "30"))
        while not self.closing:
            time.sleep(0.5)
            if self.dead_worker() is None or self.busy_since is None:
                continue
            if time.monotonic() - max(self.busy_since, self.noticed_at) > grace and not self.closing:
                message = f"error: {self.died()} (rank 0 was stuck in a collective for {grace:.0f} s)"
                print(message, file=sys.stderr, flush=True)
                os._exit(1)

    def check(self) -> None:
        """Before a step: a rank already dead fails now, not inside a collective."""
        if self.dead_worker() is not None:
            raise self.died()

    # ---- shutdown ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        import torch.distributed as dist

        if getattr(self, "link", None) is not None and self.failure is None and self.dead_worker() is None:
            try:
                self.link.send_stop()
            except Exception:  # a rank died while stopping: the processes are ended below anyway
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()


def worker_main(rank: int, config: EngineConfig, model_config: dict, fit_context: bool, source_factory, port: int,
                errors) -> None:
    """A spawned rank: join, load its shard, build its runner, then run what rank 0 sends until it says stop.
    Notices (a tower ignored, prefix caching off) are rank 0's to print, once: the other ranks keep quiet."""
    warnings.filterwarnings("ignore", category=AdaqNotice)
    try:
        tp = join_group(config, rank, port)
        worker_config = copy.copy(config)
        worker_config.device = rank_device(config, rank)
        from adaq.engine.llm_engine import load_model
        from adaq.engine.model_runner import ModelRunner

        model = load_model(model_config, worker_config, tp, source_factory)
        runner = ModelRunner(model, model_config, worker_config, fit_context)
        serve_steps(runner, StepLink(tp, worker_config.device), rank)
    except BaseException as error:  # reported to rank 0 whatever it is, then the process ends
        errors.put((rank, f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"))
        errors.close()
        errors.join_thread()
        os._exit(1)
    import torch.distributed as dist

    dist.destroy_process_group()


@torch.inference_mode()
def serve_steps(runner, link: StepLink, rank: int) -> None:
    from adaq.backends.context import reset_context

    fail_at = _injected_failure(rank)
    steps = 0
    while True:
        message = link.receive()
        if message[0] == STOP:
            return
        if message[0] == STEP:
            steps += 1
            if steps == fail_at:
                raise RuntimeError(f"injected failure at step {steps} (${FAIL_ENV})")
            _, plan, num_tokens = message
            tokens = None
            if num_tokens is not None:
                tokens = link.broadcast(torch.empty(num_tokens, dtype=torch.int64, device=runner.device))
            try:
                input_ids, positions, bucket = runner.stage(plan, tokens)
                runner.forward(input_ids, positions, bucket, len(plan.tables))
            finally:
                reset_context()
        elif message[0] == LOGITS:
            _, shape, dtype = message
            rows = link.broadcast(torch.empty(shape, dtype=dtype, device=runner.device))
            runner.model.compute_logits(rows)
        elif message[0] == MEMORY:
            import torch.distributed as dist

            dist.all_gather_object([None] * runner.tp.size, memory_of(runner), group=runner.tp.group)


def _injected_failure(rank: int) -> int | None:
    value = os.environ.get(FAIL_ENV)
    if not value:
        return None
    failing_rank, step = value.split(":")
    return int(step) if int(failing_rank) == rank else None
