"""A pytest plugin: under CI=true a run fails if any test skipped that is not a GPU test, and
under NIN_EXPECT_GPU=1 (the GPU machine) if any test skipped at all.

CI installs everything the project's own set-up installs (data, Docker, Chromium, wrk, HAProxy),
so there a skip means a broken install step, not a missing optional tool. Only tests marked `gpu`
or `cuda_ort` may skip (no GPU on CI). On the GPU machine the proof runs only the tests it means
to run, with the data it carried (FASHION_MNIST_DIR): a skip there is a check that did not run.
"""

from __future__ import annotations

import os

ALLOWED = {"gpu", "cuda_ort"}
_unexpected: list[str] = []


def flag(name: str) -> bool:
    """An environment switch: 1, true or yes."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def pytest_runtest_logreport(report) -> None:
    if not report.skipped:
        return
    if flag("NIN_EXPECT_GPU") or (flag("CI") and not ALLOWED & set(report.keywords)):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _unexpected.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter) -> None:
    if _unexpected:
        rule = "NIN_EXPECT_GPU=1: no test may skip" if flag("NIN_EXPECT_GPU") else "CI=true: only a GPU test may skip"
        terminalreporter.write_line(f"{rule}; {len(_unexpected)} did:", red=True)
        for line in _unexpected:
            terminalreporter.write_line(f"  {line}", red=True)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _unexpected and session.exitstatus == 0:
        session.exitstatus = 1
