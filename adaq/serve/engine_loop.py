"""One asyncio task drives the engine for every HTTP request: continuous batching across all clients.

`LLMEngine.step()` runs in one dedicated worker thread, so the event loop keeps accepting, validating and
streaming while the model computes. Requests are added and aborted from the event loop's thread (the engine
queues them and applies them at the start of its next step). Each step's outputs (per-request deltas) are routed
to the asyncio queue of the request group they belong to. A group whose client goes away is closed: its unfinished
requests are aborted, and the engine frees their KV blocks at the next step.

Admission is bounded: at most `max_num_seqs + max_queue` requests may be in flight; past that `submit` raises
QueueFull (the server answers 429) instead of letting the queue grow without bound.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from adaq.engine.llm_engine import LLMEngine, RequestOutput
from adaq.engine.sampling_params import SamplingParams

log = logging.getLogger("adaq.serve")


class QueueFull(Exception):
    """More requests than the server admits at once."""


class EngineFailed(Exception):
    """The engine raised during a step; the requests in flight cannot finish."""


@dataclass
class EngineRequest:
    prompt_token_ids: list[int]
    params: SamplingParams


class RequestGroup:
    """The engine requests of one HTTP request (several prompts, or n > 1): their outputs, in arrival order."""

    def __init__(self, loop: "EngineLoop", group_id: str, size: int):
        self.group_id = group_id
        self.request_ids = [f"{group_id}-{index}" for index in range(size)]
        self.unfinished = set(self.request_ids)
        self.queue: asyncio.Queue[RequestOutput | EngineFailed] = asyncio.Queue()
        self._loop = loop

    def index_of(self, request_id: str) -> int:
        return int(request_id.rsplit("-", 1)[1])

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(index, output) pairs until every request has finished; deltas in `output.new_text`."""
        try:
            while self.unfinished:
                item = await self.queue.get()
                if isinstance(item, EngineFailed):
                    raise item
                if item.finished:
                    self.unfinished.discard(item.request_id)
                yield self.index_of(item.request_id), item
        finally:
            self.close()

    async def final_outputs(self) -> list[RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for index, output in self.outputs():
            if output.finished:
                finals[index] = output
        return [finals[index] for index in range(len(self.request_ids))]

    def close(self) -> None:
        """Abort what has not finished (the client left, or an error); idempotent."""
        self._loop.release(self)


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_queue: int, metrics=None):
        self.engine = engine
        self.capacity = engine.config.max_num_seqs + max_queue
        self.metrics = metrics
        self._groups: dict[str, RequestGroup] = {}
        self._owner: dict[str, RequestGroup] = {}  # engine request id -> its group
        self._ids = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaq-engine",
                                            initializer=_use_device, initargs=(getattr(engine.config, "device", None),))
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.failure: BaseException | None = None

    # ---- life cycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="adaq-engine-loop")

    async def stop(self) -> None:
        for group in list(self._groups.values()):
            group.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def num_in_flight(self) -> int:
        return len(self._owner)

    # ---- requests ---------------------------------------------------------------------------------------------
    def submit(self, requests: list[EngineRequest], prefix: str) -> RequestGroup:
        """Queue a group of requests; QueueFull past capacity, AdaqError for a request the engine refuses."""
        if self.num_in_flight + len(requests) > self.capacity:
            raise QueueFull(f"the server is at capacity ({self.capacity} requests in flight or queued); "
                            f"retry later")
        group = RequestGroup(self, f"{prefix}-{next(self._ids)}", len(requests))
        added = []
        try:
            for request_id, request in zip(group.request_ids, requests):
                self.engine.add_request(request.prompt_token_ids, request.params, request_id)
                added.append(request_id)
        except Exception:
            for request_id in added:
                self.engine.abort_request(request_id)
            self._wake.set()
            raise
        self._groups[group.group_id] = group
        self._owner.update(dict.fromkeys(group.request_ids, group))
        self._wake.set()
        return group

    def release(self, group: RequestGroup) -> None:
        if self._groups.pop(group.group_id, None) is None:
            return
        for request_id in group.request_ids:
            self._owner.pop(request_id, None)
        for request_id in group.unfinished:
            self.engine.abort_request(request_id)
        if group.unfinished and self.metrics is not None:
            self.metrics.aborted(len(group.unfinished))
        group.unfinished.clear()
        self._wake.set()

    # ---- the loop ---------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
                self._dispatch(outputs)
                if self.metrics is not None:
                    self.metrics.step(outputs, time.perf_counter() - started)
            except Exception as error:  # an engine bug or out-of-memory: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(error)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            group = self._owner.get(output.request_id)
            if group is not None:
                group.queue.put_nowait(output)
            if output.finished:
                self._owner.pop(output.request_id, None)

    def _fail_all(self, error: Exception) -> None:
        failure = EngineFailed(f"the engine failed: {type(error).__name__}: {error}")
        for group in list(self._groups.values()):
            group.queue.put_nowait(failure)  # its reader raises it and closes the group
            for request_id in group.unfinished:
                self.engine.abort_request(request_id)  # the next step drops them: the loop does not spin on them


def _use_device(device) -> None:
    """The worker thread computes on the engine's GPU (a new thread starts on cuda:0, whatever the engine uses)."""
    import torch

    if getattr(device, "type", None) == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
