"""The micro-batcher with a stand-in model: which lane runs what, batch sizes, no overlap."""

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import MicroBatcher


class FakeModel:
    """Sleeps `ms` per batch; records (lane, batch size, start, end) and checks that the latency
    lane never runs beside a throughput lane."""

    def __init__(self, ms: float = 20) -> None:
        self.ms, self.runs, self.lock, self.active = ms, [], threading.Lock(), []

    def __call__(self, x, lane):
        with self.lock:
            assert lane is None and not self.active or lane is not None and None not in self.active, (lane, self.active)
            self.active.append(lane)
        t = time.perf_counter()
        time.sleep(self.ms / 1000)
        with self.lock:
            self.active.remove(lane)
            self.runs.append((lane, len(x), t, time.perf_counter()))
        return x[:, 0, 0, :2].copy(), {"lane": lane}


def run_clients(batcher, n_clients: int, per_client: int) -> list:
    async def client(i):
        out = []
        for j in range(per_client):
            x = np.full((1, 1, 2, 2), i * 100 + j, np.float32)
            r = await batcher.submit(x)
            assert r.logits[0, 0] == i * 100 + j  # every request gets its own row back
            out.append(r)
        return out

    async def main():
        return await asyncio.gather(*(client(i) for i in range(n_clients)))

    return [r for rs in asyncio.run(main()) for r in rs]


def test_a_lone_request_takes_the_latency_lane():
    model = FakeModel()
    results = run_clients(MicroBatcher(model, 16, 0, lanes=2), 1, 5)
    assert [lane for lane, *_ in model.runs] == [None] * 5 and all(r.batch_size == 1 for r in results)


@pytest.mark.parametrize("inline", [True, False])
def test_a_lone_image_runs_on_the_event_loop_s_thread_only_when_asked(inline):
    """inline_single: a lone image runs on the loop's thread (no hand-off); overlapping work
    still goes to the lanes' threads; without it every batch runs off the loop."""
    model, threads = FakeModel(ms=5), []

    def run(x, lane):
        threads.append((lane, len(x), threading.get_ident()))
        return model(x, lane)

    loop_thread = threading.get_ident()  # asyncio.run runs the loop here
    run_clients(MicroBatcher(run, 8, 0, lanes=2, inline_single=inline), 1, 3)
    assert [(lane, t == loop_thread) for lane, _, t in threads] == [(None, inline)] * 3
    threads.clear()
    run_clients(MicroBatcher(run, 8, 0, lanes=2, inline_single=inline), 8, 3)
    assert all(t != loop_thread for lane, n, t in threads if lane is not None or n > 1)
    assert any(lane is not None for lane, _, _ in threads)


def test_overlapping_requests_go_to_the_throughput_lanes_side_by_side():
    model = FakeModel()
    results = run_clients(MicroBatcher(model, 8, 0, lanes=2), 16, 6)
    lanes = [lane for lane, *_ in model.runs]
    assert {0, 1} <= set(lanes) and lanes.count(None) < len(lanes) / 4
    assert max(n for _, n, *_ in model.runs) <= 8 and len(results) == 96
    lane_runs = sorted((s, e) for lane, _, s, e in model.runs if lane is not None)
    assert any(s2 < e1 for (s1, e1), (s2, e2) in zip(lane_runs, lane_runs[1:]))  # some ran at once


def test_without_lanes_every_batch_takes_the_one_lane_and_grows_with_load():
    model = FakeModel()
    run_clients(MicroBatcher(model, 16, 0, lanes=0), 12, 4)
    assert {lane for lane, *_ in model.runs} == {None} and max(n for _, n, *_ in model.runs) > 4


def test_an_error_reaches_every_waiter_and_the_batcher_keeps_serving():
    calls = []

    def flaky(x, lane):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return x[:, 0, 0, :2].copy(), {}

    async def main():
        b = MicroBatcher(flaky, 4, 0)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(np.zeros((1, 1, 2, 2), np.float32))
        return await b.submit(np.ones((1, 1, 2, 2), np.float32))

    assert asyncio.run(main()).logits.shape == (1, 2)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        MicroBatcher(lambda x, lane: None, 0, 0)
    with pytest.raises(ValueError):
        MicroBatcher(lambda x, lane: None, 4, 0, lanes=-1)


def test_close_refuses_what_still_queues_and_stops_the_lane_threads():
    gate = threading.Event()

    def model(x, lane):  # the first batch holds until the gate opens
        gate.wait(10)
        return np.zeros((len(x), 2), np.float32), {}

    threads = lambda: {t for t in threading.enumerate() if t.name.startswith(("lane-", "latency-lane"))}  # noqa: E731
    before = threads()  # other tests' lanes may come and go meanwhile: only ours are counted
    batcher = MicroBatcher(model, 8, 0, lanes=2)
    x = np.zeros((1, 1, 2, 2), np.float32)

    async def main():
        running = asyncio.create_task(batcher.submit(x))
        await asyncio.sleep(0.1)  # its batch is on the latency lane, held at the gate
        queued = asyncio.create_task(batcher.submit(x))
        await asyncio.sleep(0.1)  # waits for the next batch
        assert threads() - before and not queued.done()
        gate.set()
        batcher.close()  # at shutdown, after uvicorn has answered what was in flight
        with pytest.raises(RuntimeError, match="closed"):
            await asyncio.wait_for(queued, 5)
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.submit(x)
        running.cancel()

    asyncio.run(main())
    assert not threads() - before  # the lanes' threads are gone
