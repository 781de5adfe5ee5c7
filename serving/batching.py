"""Adaptive micro-batching of concurrent single-image requests.

While one batch runs (in a worker thread; onnxruntime releases the GIL), new requests queue;
the next batch takes everything queued, up to `max_batch_size` images. So a lone request
never waits, and under load batches grow by themselves. `max_wait_ms` > 0 also holds a batch
open that long for newcomers (more throughput, more latency). Requests are never rejected for
load: they queue (BentoML's batcher answers 503 when it predicts a missed deadline).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class BatchResult:
    logits: np.ndarray  # this request's rows
    queue_ms: float  # from submit until its batch started running
    inference_ms: float  # the batch's run time
    batch_size: int
    info: dict  # what the runner reported for the batch (memory, ...)


class MicroBatcher:
    def __init__(self, run: Callable[[np.ndarray], tuple[np.ndarray, dict]], max_batch_size: int, max_wait_ms: float) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(f"bad batching settings: max_batch_size={max_batch_size}, max_wait_ms={max_wait_ms}")
        self.run, self.max_batch_size, self.max_wait = run, max_batch_size, max_wait_ms / 1000
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, x: np.ndarray) -> BatchResult:
        """Queue `x` (n, C, H, W) with n <= max_batch_size; returns when its batch has run."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((x, time.perf_counter(), fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            items = [await self._queue.get()]
            n = len(items[0][0])
            deadline = time.perf_counter() + self.max_wait
            while n < self.max_batch_size:
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
                if n + len(item[0]) > self.max_batch_size:
                    await self._run(items, n)  # the newcomer does not fit: it opens the next batch
                    items, n, deadline = [item], len(item[0]), time.perf_counter() + self.max_wait
                    continue
                items.append(item)
                n += len(item[0])
            await self._run(items, n)

    async def _run(self, items: list, n: int) -> None:
        start = time.perf_counter()
        try:
            logits, info = await asyncio.to_thread(self.run, np.concatenate([x for x, _, _ in items]))
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
