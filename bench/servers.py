"""Servers under test, each in its own process group on a free port of 127.0.0.1: `bentoml serve`
(the service) and uvicorn with bench/reference.py (what a user would write instead)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess  # nosec B404  # starts the servers under test, fixed argument lists, never a shell
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 180, path: str = "/readyz") -> None:
    """Poll URL + `path` until it answers 200; fail early if `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}\n{server_output(proc)}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout:g} s")


def _spawn(cmd: list[str], env: dict, quiet: bool) -> subprocess.Popen:
    """Output to an unnamed temporary file (`proc.log`), never to a pipe: a pipe nobody reads
    fills up with access-log lines after a few hundred requests and then blocks the server.
    No load balancer watches these servers' readiness, so a service stops at once
    (NIN_DRAIN_SECONDS 0, not 5) unless set: the drain tests, bench.drain_ab
    and bench.rollout do."""
    log = None if quiet else tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={"NIN_DRAIN_SECONDS": "0", **os.environ, **env}, stdout=log or subprocess.DEVNULL,  # nosec B603  # bentoml/uvicorn under this interpreter, argument lists built in this module
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log = log
    return proc


def start_server(model: str | Path, port: int, env: dict | None = None, quiet: bool = False) -> subprocess.Popen:
    """`bentoml serve` from the repository root (`python -m bentoml`: also where bentoml travels
    as wheels without its script). A model folder gets the server a BentoML home of its own:
    every `bentoml serve` start empties $BENTOML_HOME/prometheus_multiproc_dir, so servers
    sharing a home would read each other's metrics files in /metrics and lose their own."""
    env = {"NIN_MODEL": str(model), **(env or {})}
    home = None
    if "BENTOML_HOME" not in env and Path(model).is_dir():
        home = env["BENTOML_HOME"] = tempfile.mkdtemp(prefix="nin-bentoml-home-")
    proc = _spawn([sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)], env, quiet)
    proc.home = home
    return proc


def start_reference(model: str | Path, variant: str, port: int, quiet: bool = False,
                    module: str = "bench.reference") -> subprocess.Popen:
    """bench/reference.py under uvicorn, one worker, uvicorn's defaults (`module`
    bench.reference_timed: the same app with its phases timed)."""
    return _spawn([sys.executable, "-m", "uvicorn", f"{module}:app", "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "warning"], {"NIN_REF_MODEL": str(model), "NIN_REF_VARIANT": variant}, quiet)


def write_results(out: str | os.PathLike | None, name: str, data, text: str) -> None:
    """`name`.json and `name`.md into folder `out` (nothing when `out` is None)."""
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(data, indent=1))
        (out / f"{name}.md").write_text(text)


def server_output(proc: subprocess.Popen, tail: int = 3000) -> str:
    log = getattr(proc, "log", None)
    if log is None:
        return ""
    log.seek(0)
    return log.read()[-tail:]


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    if getattr(proc, "log", None) is not None:
        proc.log.close()
    if getattr(proc, "home", None):
        shutil.rmtree(proc.home, ignore_errors=True)


@contextlib.contextmanager
def running_server(model: str | Path, env: dict | None = None):
    """start_server on a free port: ready on entry (its `url` set), stopped on exit."""
    port = free_port()
    proc = start_server(model, port, env)
    proc.url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc.url, proc)
        yield proc
    finally:
        stop_server(proc)


class Server:
    """A server for one model variant, ready on return: kind `service` or `reference`."""

    def __init__(self, kind: str, model: str, variant: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        if kind == "service":
            self.proc = start_server(model, port, {"NIN_VARIANT": variant}, quiet=True)
        else:
            self.proc = start_reference(model, variant, port, quiet=True)
        try:
            wait_ready(self.url, self.proc)
        except Exception:
            self.close()
            raise

    @property
    def root_pid(self) -> int:
        """The process started (`bentoml serve` under circus, or uvicorn): the root of the tree
        whose CPU the bench counts (the service's worker runs in a process group of its own)."""
        return self.proc.pid

    def close(self) -> None:
        stop_server(self.proc)
