"""Optional API keys: with NIN_API_KEYS (comma-separated) or NIN_API_KEYS_FILE (one per line, a
Kubernetes Secret mounted as a file) set, every route but the open ones needs
`Authorization: Bearer <key>`; unset, nothing is checked.

Deny by default: a route added later is protected until it is listed in OPEN. /metrics is open
unless NIN_METRICS_AUTH=1 (Prometheus then sends a key: `authorization.credentials_file`).
Keys are compared as SHA-256 digests with hmac.compare_digest, against every key, so the time
does not depend on which key or how much of it matched; they are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter

from serving.model_files import ModelLoadError

FAILURES = Counter("nin_auth_failures_total", "requests refused with 401: no key, or a wrong one", ["reason"])
# Probes, the docs and the upload page (it asks for the key and sends it itself).
OPEN = frozenset({"/livez", "/readyz", "/healthz", "/", "/docs.json", "/ui", "/ui/samples"})
OPEN_PREFIXES = ("/ui/samples/", "/static_content/", "/assets/")  # the two Swagger UIs' files
MIN_KEY_CHARS = 16
REALM = 'Bearer realm="nin-fashion-mnist"'


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKeys:
    digests: tuple[bytes, ...] = ()
    metrics: bool = False  # /metrics needs a key too
    count: int = field(default=0, compare=False)

    @classmethod
    def from_env(cls, env=os.environ) -> "ApiKeys":
        """The keys NIN_API_KEYS and NIN_API_KEYS_FILE name (both may be set); ModelLoadError for
        a missing or empty file, a key under MIN_KEY_CHARS or with spaces, or NIN_METRICS_AUTH
        without keys. The message never contains a key."""
        keys = [k for k in env.get("NIN_API_KEYS", "").replace(",", " ").split()]
        if path := env.get("NIN_API_KEYS_FILE"):
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as e:
                raise ModelLoadError(f"NIN_API_KEYS_FILE {path}: {e.strerror}") from None
            file_keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not file_keys:
                raise ModelLoadError(f"NIN_API_KEYS_FILE {path} holds no key")
            keys += file_keys
        for i, k in enumerate(keys):
            if len(k) < MIN_KEY_CHARS or not k.isascii() or not k.isprintable() or " " in k:
                raise ModelLoadError(f"API key {i + 1}: keys must be at least {MIN_KEY_CHARS} printable ASCII "
                                     f"characters with no spaces (e.g. `openssl rand -hex 24`)")
        metrics = env.get("NIN_METRICS_AUTH", "0").lower() in ("1", "true", "yes")
        if metrics and not keys:
            raise ModelLoadError("NIN_METRICS_AUTH=1 needs NIN_API_KEYS or NIN_API_KEYS_FILE")
        return cls(tuple(_digest(k) for k in dict.fromkeys(keys)), metrics, len(set(keys)))

    def __bool__(self) -> bool:
        return bool(self.digests)

    def protects(self, path: str) -> bool:
        if not self.digests:
            return False
        if path == "/metrics":
            return self.metrics
        return path not in OPEN and not path.startswith(OPEN_PREFIXES)

    def refusal(self, authorization: str | None) -> str | None:
        """None when `authorization` carries one of the keys; else "missing" or "invalid"."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing"
        given = _digest(token.strip())
        ok = False
        for d in self.digests:  # every key, no early exit
            ok |= hmac.compare_digest(given, d)
        return None if ok else "invalid"


def unauthorized(reason: str) -> tuple[int, dict, dict]:
    """The 401 answer (RFC 6750): (status, JSON body, headers)."""
    FAILURES.labels(reason).inc()
    if reason == "missing":
        detail = "this service needs an API key: send the header Authorization: Bearer <key>"
        challenge = REALM
    else:
        detail = "the API key sent is not one of this service's keys"
        challenge = REALM + ', error="invalid_token"'
    return 401, {"error": f"{reason}_api_key", "detail": detail}, {"WWW-Authenticate": challenge}


def with_security(spec: dict, keys: ApiKeys) -> dict:
    """The OpenAPI document with a bearer scheme on every protected operation, so Swagger UI shows
    its Authorize button (BentoML's own spec model has no place for security schemes)."""
    spec.setdefault("components", {})["securitySchemes"] = {
        "apiKey": {"type": "http", "scheme": "bearer", "description": "one of NIN_API_KEYS"}}
    for path, item in spec.get("paths", {}).items():
        if keys.protects(path):
            for op in item.values():
                if isinstance(op, dict):
                    op["security"] = [{"apiKey": []}]
    return spec
