"""Rollouts lose nothing: SIGTERM drains (serving/drain.py), in-process and on a real
`bentoml serve` hit by a ramp of requests, each on a fresh connection."""

import asyncio
import os
from pathlib import Path
import signal
import socket
import threading
import time

import pytest

from bench.drain_ab import ramp_and_sigterm
from bench.servers import free_port, server_output, start_server, stop_server, wait_ready
from serving.drain import Drain, accept_queue, close_listeners


class FakeUvicorn:
    """What Drain finds behind the SIGTERM handler it replaces: uvicorn's Server.handle_exit."""

    def __init__(self, listener):
        self.should_exit, self.config = False, type("C", (), {"timeout_graceful_shutdown": None})()
        self.servers = [type("S", (), {"sockets": [listener]})()]

    def handle_exit(self, sig, frame):
        self.should_exit = True


def test_drain_fails_readiness_at_once_then_closes_the_shared_listener():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    fake = FakeUvicorn(listener)
    previous = signal.signal(signal.SIGTERM, fake.handle_exit)
    drain = Drain(drain_s=0.3, timeout_s=2)
    try:
        assert drain.install() and drain.bound_s == 7.3
        os.kill(os.getpid(), signal.SIGTERM)
        assert drain.draining.is_set() and not fake.should_exit  # readiness fails, serving goes on
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # still accepting
        deadline = time.monotonic() + 10  # the drain period is 0.3 s: poll for its end, fail loudly
        while not fake.should_exit and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.should_exit and fake.config.timeout_graceful_shutdown == 2
        with pytest.raises(ConnectionRefusedError):  # even though `listener` itself is still open
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        drain.cancel()  # its hard stop would end this test process
        signal.signal(signal.SIGTERM, previous)
        listener.close()


def queued_within(listener, n: int, timeout_s: float = 2) -> None:
    """Wait until the kernel has completed `n` connections into the listener's accept queue."""
    deadline = time.monotonic() + timeout_s
    while accept_queue(listener) != n:
        assert time.monotonic() < deadline, accept_queue(listener)
        time.sleep(0.001)


def test_the_listener_closes_only_once_every_completed_connection_was_accepted():
    """A connection the kernel completed just before the drain ends waits in the accept queue;
    shutting the listener down then would reset it (a dropped request). close_listeners waits
    until a worker took it (here: 0.2 s later), and only then refuses new connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=2)
    accepted = []
    try:
        queued_within(listener, 1)
        worker = threading.Timer(0.2, lambda: accepted.append(listener.accept()[0]))
        worker.start()
        t0 = time.monotonic()
        close_listeners([socket.socket(fileno=os.dup(listener.fileno()))], settle_s=5)
        assert 0.15 < time.monotonic() - t0 < 4
        worker.join()
        client.sendall(b"ping")  # the queued connection was served, not reset
        assert accepted[0].recv(4) == b"ping"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        for s in (client, listener, *accepted):
            s.close()


def test_the_listener_closes_after_the_settle_bound_when_nobody_accepts():
    """What the wait is for: a connection still queued at the shutdown is reset by Linux."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=2)
    try:
        queued_within(listener, 1)
        t0 = time.monotonic()
        close_listeners([socket.socket(fileno=os.dup(listener.fileno()))], settle_s=0.1)
        assert time.monotonic() - t0 < 2
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    finally:
        client.close()
        listener.close()


def test_the_installed_uvicorn_shows_drain_its_listening_sockets():
    """What serving.drain needs from uvicorn, asked of a real uvicorn.Server: its SIGTERM handler
    leads to the server, whose asyncio servers hold the listening socket. Fails on a uvicorn
    that changed them."""
    import uvicorn

    from serving.drain import listening_sockets, uvicorn_server

    async def app(scope, receive, send):
        pass

    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))

    async def main():
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.01)
        try:
            assert server.started and uvicorn_server(server.handle_exit) is server
            dups = listening_sockets(server.handle_exit)
            assert [s.getsockname() for s in dups] == [listener.getsockname()]
            for s in dups:
                s.close()
        finally:
            server.should_exit = True
            await serving

    try:
        asyncio.run(main())
    finally:
        listener.close()


def test_drain_settings_are_checked():
    with pytest.raises(ValueError):
        Drain(drain_s=-1)
    result = {}
    t = threading.Thread(target=lambda: result.update(ok=Drain().install()))
    t.start()
    t.join()
    assert result["ok"] is False  # signals belong to the main thread; refused, not crashed


@pytest.mark.integration
@pytest.mark.parametrize("drain_s, n, span_s, expect_refused, workers", [
    (5, 128, 1.3, False, 2),  # the probe: the whole ramp lands inside the drain period
    (1, 128, 3.0, True, 2),  # a ramp that outlasts it: late connections are refused, none stranded
    (1, 128, 3.0, True, 1),
])
def test_sigterm_mid_ramp_answers_every_request_it_accepted(served_model, drain_s, n, span_s, expect_refused, workers):
    port = free_port()
    # NIN_MAX_QUEUE: the ramp must not trip the overload bound, whose 503s are another feature
    proc = start_server(served_model, port, {"NIN_DRAIN_SECONDS": str(drain_s), "NIN_MAX_QUEUE": "10000",
                                             "NIN_WORKERS": str(workers)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        result = asyncio.run(ramp_and_sigterm(proc, url, n, span_s, signal_at_s=0.5))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = server_output(proc, 50000)
    stop_server(proc)
    seen = result["outcomes"]
    assert result["readyz_after_signal"] == 503 and result["readyz_failed_after_s"] < 1.0, result
    assert set(seen) <= {200, "refused at connect"}, (seen, output[-3000:])
    assert seen[200] > n * 0.5 * 0.5 / span_s  # what came in before and after the signal was served
    assert ("refused at connect" in seen) == expect_refused, seen
    assert result["rc"] == 0 and result["exit_s"] < drain_s + 20 + 5, result
    assert output.count("SIGTERM: readiness failing") == workers  # every worker drained


@pytest.mark.parametrize("env, error", [
    ({"NIN_DRAIN_SECONDS": "-1"}, "NIN_DRAIN_SECONDS must be >= 0"),
    ({"NIN_SHUTDOWN_TIMEOUT": "0"}, "NIN_SHUTDOWN_TIMEOUT must be > 0"),
    ({"NIN_DRAIN_SECONDS": "soon"}, r"bad NIN_\* setting"),
])
def test_bad_drain_settings_are_one_line(monkeypatch, env, error):
    from serving.engine import Settings
    from serving.model_files import ModelLoadError

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ModelLoadError, match=error):
        Settings.from_env()


@pytest.mark.integration
def test_rolling_restart_behind_haproxy_fails_nothing(served_model):
    """The short version of `make rollout`: 2 replicas, c=4, each restarted in turn under load."""
    import shutil as sh

    from bench import rollout

    if sh.which("haproxy") is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed (make setup installs it from Debian)")
        pytest.skip("haproxy is not installed (make setup installs it from Debian)")
    s = rollout.run(served_model, concurrency=4, duration=4, drain_s=1, log=lambda m: None)
    assert s["total"]["failed"] == 0, {k: s[k] for k in ("total", "setup")} | {
        phase: (s[phase]["failed"], s[phase]["failures"][:5]) for phase in ("before", "during", "after")}
    assert s["before"]["requests"] > 0 and s["during"]["requests"] > 0 and s["after"]["requests"] > 0
    assert "| during |" in rollout.markdown(s)


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("R", "S", "Z" ...), or "" once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def running(pid: int) -> bool:
    """Not exited: a zombie has exited and only waits for whoever inherited it (here PID 1, or a
    subreaper) to reap it, which on some hosts takes a while; /proc/PID exists until then."""
    return process_state(pid) not in ("", "Z", "X")


@pytest.mark.integration
def test_the_worker_exits_when_its_arbiter_is_killed(served_model):
    """`kill -9` of `bentoml serve` (the circus arbiter's process group): the worker, in a process
    group of its own, used to serve the port on, orphaned, for ever. Now Linux sends it SIGTERM
    (serving.drain.exit_with_parent) and it exits within its drain bound."""
    import httpx

    port = free_port()
    proc = start_server(served_model, port, {"NIN_DRAIN_SECONDS": "1", "NIN_SHUTDOWN_TIMEOUT": "2", "NIN_WORKERS": "2"})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    workers = {int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()}
    assert httpx.get(f"{url}/model", timeout=10).json()["pid"] in workers and len(workers) == 2
    assert all(os.getpgid(w) != proc.pid for w in workers)  # their own groups: killpg misses them
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.time() + 1 + 2 + 5 + 20  # drain + shutdown + the hard stop + slack for a loaded VM
    while time.time() < deadline and any(running(w) for w in workers):
        time.sleep(0.2)
    alive = {w: process_state(w) for w in workers if running(w)}
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers still running 28 s after their arbiter was killed (pid: state): {alive}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/readyz", timeout=2)
