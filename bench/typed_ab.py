"""`python -m bench.typed_ab`: the typed endpoints' guard (http.Edge's checks and serving/forms.py)
beside BentoML's own parsing, on the requests that broke BentoML:
each request sent to both arms, status and body shape recorded.

    .venv/bin/python -m bench.typed_ab --out bench/cpu-2core-amx/typed-ab
"""

from __future__ import annotations

import argparse
import sys

import httpx

from bench.servers import _spawn, free_port, stop_server, wait_ready, write_results
from serving.model_files import DEFAULT_MODEL
from serving.page import SAMPLES

PNG = (SAMPLES / "test0000-ankle-boot.png").read_bytes()
ARMS = {"guarded": "service", "bentoml": "bentoml-parsing"}


def multipart(field: str, data: bytes, filename: str = "a.png", extra: str = "") -> bytes:
    return (extra + f'--b0\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n--b0--\r\n"


def top_k_field(value: str) -> str:
    return f'--b0\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{value}\r\n'


MP = "multipart/form-data; boundary=b0"
CASES = {  # name -> (Content-Type, body)
    "a good upload": (MP, multipart("image", PNG)),
    "file name of 300 bytes": (MP, multipart("image", PNG, "x" * 296 + ".png")),
    "file name with a NUL byte": (MP, multipart("image", PNG, "a\x00b.png")),
    "Multipart/Form-Data in capitals": ("Multipart/Form-Data; boundary=b0", multipart("image", PNG)),
    "unknown field": (MP, multipart("picture", PNG)),
    "raw PNG body": ("image/png", PNG),
    "top_k 'many'": (MP, multipart("image", PNG, extra=top_k_field("many"))),
    "top_k of 5,000 digits": (MP, multipart("image", PNG, extra=top_k_field("1" * 5000))),
    "top_k Arabic-Indic 3": (MP, multipart("image", PNG, extra=top_k_field("\u0663"))),
    "top_k 11 (10 classes)": (MP, multipart("image", PNG, extra=top_k_field("11"))),
    "broken multipart": (MP, b"--b0\r\nbroken"),
    "not an image": (MP, multipart("image", b"not an image")),
}


def ask(url: str, ctype: str, body: bytes) -> dict:
    r = httpx.post(f"{url}/api/classify", content=body, headers={"Content-Type": ctype}, timeout=60)
    try:
        shape = "JSON object" if isinstance(r.json(), dict) else f"JSON {type(r.json()).__name__}"
    except ValueError:
        shape = "not JSON"
    error = r.json().get("error") if shape == "JSON object" else None
    return {"status": r.status_code, "shape": shape, "error": error if isinstance(error, str) else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The typed endpoints' guard beside BentoML's own parsing.")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="exported model folder")
    p.add_argument("--out", default=None, help="folder for typed_ab.json and typed_ab.md (default: print only)")
    args = p.parse_args(argv)
    results: dict[str, dict] = {}
    for arm, env_arm in ARMS.items():
        port = free_port()
        proc = _spawn([sys.executable, "-m", "bentoml", "serve", "bench.arms:svc", "--host", "127.0.0.1", "--port", str(port)],
                      {"NIN_MODEL": args.model, "NIN_AB_ARM": env_arm}, quiet=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            results[arm] = {name: ask(url, ctype, body) for name, (ctype, body) in CASES.items()}
        finally:
            stop_server(proc)
    fmt = lambda r: f"{r['status']} {r['error'] or r['shape']}"  # noqa: E731
    lines = ["| request to POST /api/classify | guarded (the service) | BentoML's own parsing |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(results['guarded'][name])} | {fmt(results['bentoml'][name])} |" for name in CASES]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, "typed_ab", results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
