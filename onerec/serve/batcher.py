"""Gathers concurrent requests into one beam search (`onerec serve`).

A beam search over 64 requests costs little more than over one, so the server does not
search per HTTP request: each request is queued, and one worker task takes everything queued
once the oldest request has waited `max_wait_s` (or as soon as `max_batch_size` are queued),
and runs the batch in a thread (asyncio.to_thread), so the event loop keeps accepting and
answering requests while the model runs. A latency of at most max_wait_s is traded for
throughput; max_wait_s=0 runs whatever is queued at once.

A batch whose search fails (a model error, not enough memory) is retried one request at a
time, so only the requests that fail alone get the error; the worker carries on with the
next batch either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, Optional, Sequence, TypeVar

log = logging.getLogger("onerec.serve")

RequestT = TypeVar("RequestT")
AnswerT = TypeVar("AnswerT")


class BatchError(RuntimeError):
    """A request's search failed; the message says why."""


class Overloaded(BatchError):
    """The queue is full: the request was refused without waiting (the server answers 503)."""


@dataclass
class _Waiting(Generic[RequestT]):
    request: RequestT
    future: asyncio.Future
    arrived: float  # loop time


class Batcher(Generic[RequestT, AnswerT]):
    """`await submit(request)` -> its answer, computed by `run_batch(requests)` (answers in
    request order) together with the other requests waiting at the time.

    start() and stop() run inside the event loop (the app's lifespan)."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[RequestT]], list[AnswerT]],
        max_batch_size: int = 64,
        max_wait_s: float = 0.005,
        max_queued: int = 0,
    ) -> None:
        if max_batch_size < 1 or max_wait_s < 0 or max_queued < 0:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1, max_wait_s={max_wait_s} >= 0 "
                             f"and max_queued={max_queued} >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        # Requests allowed to wait at once (0: no limit): past it a request is refused at once
        # (Overloaded), so a server behind on its work sheds load instead of queueing without end.
        self.max_queued = max_queued
        self.batches = 0  # searches run, for logs and tests
        self._waiting: deque[_Waiting] = deque()
        self._arrived: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None

    @property
    def queued(self) -> int:
        """Requests waiting for a search now."""
        return len(self._waiting)

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = asyncio.create_task(self._work(), name="onerec-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(BatchError("the server is shutting down"))

    async def submit(self, request: RequestT) -> AnswerT:
        if self._arrived is None or self._worker is None or self._worker.done():
            raise BatchError("the batching worker is not running")
        if self.max_queued and len(self._waiting) >= self.max_queued:
            raise Overloaded(f"{len(self._waiting)} requests are already waiting (--max-queued {self.max_queued})")
        loop = asyncio.get_running_loop()
        waiting = _Waiting(request, loop.create_future(), loop.time())
        self._waiting.append(waiting)
        self._arrived.set()
        return await waiting.future

    async def _next_batch(self) -> list[_Waiting]:
        """The requests of the next search: wait for one, then until the oldest has waited
        max_wait_s or max_batch_size are queued."""
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._waiting[0].arrived + self.max_wait_s
        while len(self._waiting) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:  # waiting on an Event loses nothing when the timeout wins
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        count = min(len(self._waiting), self.max_batch_size)
        batch = [self._waiting.popleft() for _ in range(count)]
        return [waiting for waiting in batch if not waiting.future.done()]  # a client that left is cancelled

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            outcomes = await asyncio.to_thread(self._run, [waiting.request for waiting in batch])
            self.batches += 1
            for waiting, outcome in zip(batch, outcomes):
                if waiting.future.done():
                    continue
                if isinstance(outcome, BatchError):
                    waiting.future.set_exception(outcome)
                else:
                    waiting.future.set_result(outcome)

    def _run(self, requests: list[RequestT]) -> list:
        """Answers, or a BatchError per request that failed (run in the worker thread)."""
        try:
            return list(self.run_batch(requests))
        except Exception as err:  # noqa: BLE001 - any failure of the model stays inside this batch
            if len(requests) == 1:
                log.exception("a search failed")
                return [BatchError(f"{type(err).__name__}: {err}")]
            log.warning("a search of %d requests failed (%s: %s): retrying them one by one",
                        len(requests), type(err).__name__, err)
        return [self._run([request])[0] for request in requests]
