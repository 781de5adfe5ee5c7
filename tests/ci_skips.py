"""A pytest plugin: under CI=true a run fails if any test skipped that is not a GPU test.

CI installs everything the project's own set-up installs (data, Docker, Chromium, wrk, HAProxy),
so there a skip means a broken install step, not a missing optional tool. Only tests marked `gpu`
or `cuda_ort` may skip (no GPU on CI); NIN_EXPECT_GPU=1 turns those into failures on a GPU host.
"""

from __future__ import annotations

import os

ALLOWED = {"gpu", "cuda_ort"}
_unexpected: list[str] = []


def pytest_runtest_logreport(report) -> None:
    if report.skipped and os.environ.get("CI", "").lower() == "true" and not ALLOWED & set(report.keywords):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _unexpected.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter) -> None:
    if _unexpected:
        terminalreporter.write_line(f"CI=true: {len(_unexpected)} test(s) skipped that only a GPU test may skip:", red=True)
        for line in _unexpected:
            terminalreporter.write_line(f"  {line}", red=True)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _unexpected and session.exitstatus == 0:
        session.exitstatus = 1
