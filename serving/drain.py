"""Graceful drain on SIGTERM, which Docker and Kubernetes send on every rollout.

uvicorn alone stops accepting at once, and connections already completed into the arbiter's
listening socket then wait in its backlog, never answered. Here the worker instead:
1. fails readiness at once and keeps serving for `drain_s` (NIN_DRAIN_SECONDS);
2. then, once the workers have accepted every connection the kernel completed (Linux resets
   those still queued), shuts the shared listening socket down (a late connection is refused at
   connect) and hands over to uvicorn's graceful shutdown, which answers what is in flight
   within `timeout_s` (NIN_SHUTDOWN_TIMEOUT);
3. exits within drain_s + timeout_s + 5 s whatever happens.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import threading
import time

log = logging.getLogger("serving")


class Drain:
    def __init__(self, drain_s: float = 5.0, timeout_s: float = 20.0) -> None:
        if drain_s < 0 or timeout_s <= 0:
            raise ValueError(f"drain seconds must be >= 0 and the shutdown timeout > 0, got {drain_s}, {timeout_s}")
        self.drain_s, self.timeout_s = drain_s, timeout_s
        self.draining = threading.Event()
        self._next = None  # the handler ours replaced (uvicorn's Server.handle_exit)
        self._listeners: list[socket.socket] = []
        self._timers: list[threading.Timer] = []

    @property
    def bound_s(self) -> float:
        """The longest a SIGTERM'd worker lives."""
        return self.drain_s + self.timeout_s + 5

    def install(self) -> bool:
        """Take over SIGTERM (only possible on the main thread, where uvicorn installed its own)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("graceful drain not installed: not on the main thread")
            return False
        self._next = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return True

    def _on_sigterm(self, signum, frame) -> None:
        if self.draining.is_set():  # a second SIGTERM: stop draining, shut down now
            threading.Thread(target=self._close, name="drain-close", daemon=True).start()
            return
        self.draining.set()
        self._listeners = listening_sockets(self._next)
        log.info("SIGTERM: readiness failing; serving for %g s more, then closing the listener "
                 "(requests in flight get %g s)", self.drain_s, self.timeout_s)
        close, hard = threading.Timer(self.drain_s, self._close), threading.Timer(self.bound_s, os._exit, (1,))
        hard.daemon = True  # the last resort: never alive past the bound
        self._timers = [close, hard]
        for t in self._timers:
            t.start()

    def cancel(self) -> None:
        """Stop the pending close and hard stop (tests that drain inside their own process)."""
        for t in self._timers:
            t.cancel()

    def _close(self) -> None:
        server = uvicorn_server(self._next)
        if server is not None:
            server.config.timeout_graceful_shutdown = self.timeout_s
        log.info("drain period over: closing the listener, answering what is in flight")
        # the shared socket first (the arbiter holds a copy): new connections are refused, not stranded
        close_listeners(self._listeners)
        if callable(self._next):
            self._next(signal.SIGTERM, None)  # uvicorn: stop accepting, finish in-flight requests, exit
        elif self._next in (signal.SIG_DFL, None):
            os._exit(0)


def accept_queue(sock: socket.socket) -> int:
    """Connections the kernel completed on a listening socket that nobody has accepted yet
    (Linux: `tcpi_unacked` of TCP_INFO on a listener); 0 where the platform does not say."""
    try:
        return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32), 24)[0]
    except (OSError, AttributeError, struct.error):
        return 0


def close_listeners(socks: list[socket.socket], settle_s: float = 1.0) -> None:
    """Shut the listening sockets down once their accept queues are empty (or after `settle_s`):
    Linux resets a connection still queued at the shutdown, which its client sees as dropped."""
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and any(accept_queue(s) for s in socks):
        time.sleep(0.001)
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def uvicorn_server(handler):
    """The uvicorn Server whose `handle_exit` is `handler` (uvicorn installs it for SIGTERM), or
    None. The one place that knows uvicorn's insides: `Server.servers` (its asyncio servers) is
    undocumented; tests/test_drain.py checks it against the installed uvicorn."""
    server = getattr(handler, "__self__", None)
    return server if hasattr(server, "servers") and hasattr(server, "config") else None


def listening_sockets(handler) -> list[socket.socket]:
    """Duplicates of the listening sockets of the uvicorn server behind `handler`."""
    out = []
    for srv in getattr(uvicorn_server(handler), "servers", None) or []:
        for s in getattr(srv, "sockets", None) or []:
            try:
                out.append(socket.socket(fileno=os.dup(s.fileno())))
            except OSError:
                pass
    return out


def exit_with_parent() -> bool:
    """Ask Linux for SIGTERM when the parent (the arbiter) dies (prctl PR_SET_PDEATHSIG), so a
    worker orphaned by `kill -9` or the OOM killer drains and exits instead of serving the port
    for ever. Only in a worker: the arbiter must outlive `nohup`'s shell. Whether it is armed."""
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True
