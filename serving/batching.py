"""Adaptive micro-batching: while a batch runs (in a thread; onnxruntime releases the GIL), new
requests queue, and the next batch takes what queued, so a lone request never waits and batches
grow with load (`max_wait_ms` > 0 also holds a batch open for newcomers).

On the CPU (`lanes` > 0) a batch runs on the latency lane (one session whose threads span every
core) when nothing else runs or waits, else on a throughput lane (one single-threaded session per
core, nice +5 so the event loop keeps its share); the two kinds never run at once. A GPU has one
lane. Why: docs/decisions.md, "Latency lane and throughput lanes".
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np


def _lower_priority() -> None:
    """A lane's thread yields to the event loop's when both want a core (Linux: per-thread nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)
    except (OSError, AttributeError):
        pass


@dataclass
class BatchResult:
    logits: np.ndarray  # this request's rows
    queue_ms: float  # from submit until its batch started running
    inference_ms: float  # the batch's run time
    batch_size: int
    info: dict  # what the runner reported for the batch (memory, lane, ...)


class MicroBatcher:
    def __init__(self, run: Callable[[np.ndarray, int | None], tuple[np.ndarray, dict]], max_batch_size: int,
                 max_wait_ms: float, lanes: int = 0, inline_single: bool = False) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or lanes < 0:
            raise ValueError(f"bad batching settings: max_batch_size={max_batch_size}, max_wait_ms={max_wait_ms}, lanes={lanes}")
        self.run, self.max_batch_size, self.max_wait, self.lanes = run, max_batch_size, max_wait_ms / 1000, lanes
        self.inline_single = inline_single
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.closed = False
        self._carry = None  # an item taken from the queue that did not fit the last batch
        self.queued_images = 0  # submitted and not yet in a batch
        self.busy_lanes = 0
        self.lane_batch = math.ceil(max_batch_size / lanes) if lanes else max_batch_size
        # one thread per lane, each kept for its lane's batches: no thread pool to queue behind,
        # no context copy per batch (asyncio.to_thread copies every contextvar BentoML sets)
        self._latency_thread = ThreadPoolExecutor(1, thread_name_prefix="latency-lane")
        self._lane_threads = [ThreadPoolExecutor(1, thread_name_prefix=f"lane-{i}", initializer=_lower_priority)
                              for i in range(lanes)]

    def close(self) -> None:
        """Stop the batching task and the lanes' threads (at shutdown, once nothing is in
        flight: a batch still running is waited for, and whatever still queues is refused)."""
        self.closed = True
        if self._worker is not None:
            self._worker.cancel()
        while self._queue is not None and not self._queue.empty():
            _, _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("the batcher was closed"))
        for thread in (self._latency_thread, *self._lane_threads):
            thread.shutdown(wait=True, cancel_futures=True)

    async def submit(self, x: np.ndarray) -> BatchResult:
        """Queue `x` (n, C, H, W) with n <= max_batch_size; returns when its batch has run."""
        if self.closed:
            raise RuntimeError("the batcher was closed")
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        self.queued_images += len(x)
        await self._queue.put((x, time.perf_counter(), fut))
        return await fut

    async def _next(self):
        """The item carried over from the last batch, else the next one queued."""
        item, self._carry = self._carry, None
        return item if item is not None else await self._queue.get()

    def _waiting(self) -> bool:
        return self._carry is not None or not self._queue.empty()

    async def _gather(self, first, cap: int) -> tuple[list, int]:
        """`first` and whatever else is queued, up to `cap` images (with max_wait_ms > 0, also
        newcomers until the deadline). An item that does not fit is kept for the next batch."""
        items, n = [first], len(first[0])
        deadline = time.perf_counter() + self.max_wait
        while n < cap:
            item, self._carry = self._carry, None
            if item is None:
                try:  # whatever queued up while the last batch ran joins at once ...
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - time.perf_counter()
                    if timeout <= 0:
                        break
                    try:  # ... and, with max_wait_ms > 0, newcomers until the deadline
                        item = await asyncio.wait_for(self._queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
            if n + len(item[0]) > cap:
                self._carry = item  # opens the next batch
                break
            items.append(item)
            n += len(item[0])
        self.queued_images -= n
        return items, n

    async def _loop(self) -> None:
        free: asyncio.Queue[int] = asyncio.Queue()
        for lane in range(self.lanes):
            free.put_nowait(lane)
        while True:
            first = await self._next()
            if not self.lanes or (not self.busy_lanes and not self._waiting()):
                items, n = await self._gather(first, self.max_batch_size)
                await self._run(items, n, None)  # the latency lane: alone on the machine
                continue
            lane = await free.get()
            # share what waits between the lanes free now, so one lane does not take it all
            cap = max(len(first[0]), min(self.lane_batch, math.ceil(self.queued_images / (free.qsize() + 1))))
            items, n = await self._gather(first, cap)
            self.busy_lanes += 1
            asyncio.get_running_loop().create_task(self._run_lane(items, n, lane, free))

    async def _run_lane(self, items: list, n: int, lane: int, free: asyncio.Queue) -> None:
        try:
            await self._run(items, n, lane)
        finally:
            self.busy_lanes -= 1
            free.put_nowait(lane)

    async def _run(self, items: list, n: int, lane: int | None) -> None:
        start = time.perf_counter()
        x = items[0][0] if len(items) == 1 else np.concatenate([x for x, _, _ in items])  # one: no copy
        try:
            if lane is None and n == 1 and self.inline_single:
                # a lone image on the latency lane runs on the event loop's own thread: nothing else
                # is in flight, and the hand-off to a thread and back costs two wake-ups.
                logits, info = self.run(x, lane)
            else:
                thread = self._latency_thread if lane is None else self._lane_threads[lane]
                logits, info = await asyncio.get_running_loop().run_in_executor(thread, self.run, x, lane)
        except Exception as e:  # the error goes to every waiter; the loop keeps serving
            for _, _, fut in items:
                if not fut.done():
                    fut.set_exception(e)
            return
        ms = (time.perf_counter() - start) * 1000
        row = 0
        for x, t_submit, fut in items:
            if not fut.done():
                fut.set_result(BatchResult(logits[row : row + len(x)], (start - t_submit) * 1000, ms, n, info))
            row += len(x)
