"""Mutation check: six deliberate one-line breakages of the product; the test suite must fail on
each. Not run by CI (it runs tests once per mutation); run it after changing tests:

    .venv/bin/python tests/mutations/run.py            # all six, ~1 min on 2 cores
    .venv/bin/python tests/mutations/run.py top_k      # one

Each mutation is applied to a fresh worktree of HEAD (the working tree is never touched) and the
tests that should catch it run there; a mutation the tests survive is a hole in the suite.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# name -> (file, the line as it is, the line broken, the tests that must fail)
MUTATIONS = {
    "mean": ("serving/imaging.py", 'a -= np.float32(contract["mean"])', 'a -= np.float32(contract["mean"] + 0.01)',
             ["tests/test_imaging.py", "tests/test_service.py"]),
    "int8-served-as-fp32": ("serving/model_files.py",
                            'VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}',
                            'VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.onnx", "fp16": "model.fp16.onnx"}',
                            ["tests/test_service.py", "tests/test_export.py"]),
    "top_k": ("serving/imaging.py", 'order = np.argsort(-row, kind="stable")[:k]', 'order = np.argsort(-row, kind="stable")[:k + 1]',
              ["tests/test_service.py", "tests/test_api.py"]),
    "drain-ignored": ("serving/drain.py", "threading.Timer(self.drain_s, self._close)", "threading.Timer(0, self._close)",
                      ["tests/test_drain.py"]),
    "queued-connections-reset": ("serving/drain.py", "while time.monotonic() < deadline and any(accept_queue(s) for s in socks):",
                                 "while False:", ["tests/test_drain.py"]),
    "4xx-as-500": ("serving/imaging.py", 'raise InputError(400, "not_an_image", f"{len(data)} bytes', 'raise InputError(500, "not_an_image", f"{len(data)} bytes',
                   ["tests/test_imaging.py", "tests/test_service.py"]),
}


def caught(name: str, python: str) -> bool:
    path, before, after, tests = MUTATIONS[name]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), "HEAD"], check=True)
        try:
            source = (tree / path).read_text()
            assert source.count(before) == 1, f"{name}: {before!r} is not in {path} exactly once"
            (tree / path).write_text(source.replace(before, after))
            r = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *tests],
                               cwd=tree, capture_output=True, text=True, timeout=1800)
            print(f"{name}: {'caught' if r.returncode != 0 else 'SURVIVED'} ({r.stdout.strip().splitlines()[-1]})", flush=True)
            return r.returncode != 0
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def main(argv: list[str]) -> int:
    names = argv or list(MUTATIONS)
    unknown = sorted(set(names) - set(MUTATIONS))
    if unknown:
        print(f"error: unknown mutations {unknown}; known: {', '.join(MUTATIONS)}", file=sys.stderr)
        return 2
    survived = [n for n in names if not caught(n, sys.executable)]
    print(f"{len(names) - len(survived)} of {len(names)} mutations caught" + (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
