"""Optional API keys (serving/auth.py): the pure checks, then a real `bentoml serve` with keys."""

import httpx
import pytest

from serving.auth import ApiKeys, unauthorized, with_security
from serving.model_files import ModelLoadError
from serving.page import SAMPLES

SAMPLE = SAMPLES / "test0000-ankle-boot.png"

KEY, KEY2 = "k" * 20, "0123456789abcdef0123"


def test_unset_keys_protect_nothing():
    keys = ApiKeys.from_env({})
    assert not keys and not keys.protects("/classify") and not keys.protects("/metrics")


def test_keys_from_the_variable_and_a_secret_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# rotated 2026-11\n{KEY2}\n\n")
    keys = ApiKeys.from_env({"NIN_API_KEYS": f"{KEY}, {KEY}", "NIN_API_KEYS_FILE": str(f)})
    assert keys.count == 2
    assert keys.refusal(f"Bearer {KEY}") is None and keys.refusal(f"bearer  {KEY2} ") is None
    assert keys.refusal(f"Bearer {KEY}x") == "invalid" and keys.refusal(f"Bearer {KEY[:-1]}") == "invalid"
    for header in (None, "", "Bearer", "Bearer ", f"Basic {KEY}", KEY):
        assert keys.refusal(header) == "missing", header


def test_deny_by_default_with_the_probes_docs_and_page_open():
    keys = ApiKeys.from_env({"NIN_API_KEYS": KEY})
    for path in ("/classify", "/classify_batch", "/api/classify", "/api/classify_batch", "/model", "/schema.json",
                 "/a-route-added-later"):
        assert keys.protects(path), path
    for path in ("/livez", "/readyz", "/healthz", "/", "/docs.json", "/ui", "/ui/samples", "/ui/samples/x.png",
                 "/static_content/swagger-ui.css", "/metrics"):
        assert not keys.protects(path), path
    assert ApiKeys.from_env({"NIN_API_KEYS": KEY, "NIN_METRICS_AUTH": "1"}).protects("/metrics")


@pytest.mark.parametrize("env, message", [
    ({"NIN_API_KEYS": "short"}, "at least 16"),
    ({"NIN_API_KEYS": KEY + "\u00e9"}, "printable ASCII"),
    ({"NIN_API_KEYS_FILE": "/nonexistent/keys"}, "No such file"),
    ({"NIN_METRICS_AUTH": "1"}, "needs NIN_API_KEYS"),
])
def test_bad_key_settings_are_refused_without_echoing_a_key(env, message):
    with pytest.raises(ModelLoadError, match=message) as err:
        ApiKeys.from_env(env)
    assert "short" not in str(err.value) and KEY not in str(err.value)


def test_an_empty_key_file_is_refused(tmp_path):
    (tmp_path / "keys").write_text("# no key yet\n")
    with pytest.raises(ModelLoadError, match="holds no key"):
        ApiKeys.from_env({"NIN_API_KEYS_FILE": str(tmp_path / "keys")})


def test_the_401_follows_rfc_6750():
    status, body, headers = unauthorized("invalid")
    assert status == 401 and body["error"] == "invalid_api_key" and set(body) == {"error", "detail"}
    assert headers["WWW-Authenticate"].startswith("Bearer realm=") and 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert unauthorized("missing")[1]["error"] == "missing_api_key"


def test_the_openapi_document_gets_a_bearer_scheme_on_protected_operations():
    spec = {"paths": {"/classify": {"post": {}}, "/livez": {"get": {}}, "/model": {"get": {}}}, "components": {}}
    out = with_security(spec, ApiKeys.from_env({"NIN_API_KEYS": KEY}))
    assert out["components"]["securitySchemes"]["apiKey"] == {"type": "http", "scheme": "bearer",
                                                              "description": "one of NIN_API_KEYS"}
    assert out["paths"]["/classify"]["post"]["security"] == [{"apiKey": []}]
    assert out["paths"]["/model"]["get"]["security"] == [{"apiKey": []}] and "security" not in out["paths"]["/livez"]["get"]


@pytest.fixture(scope="module")
def keyed_server(served_model, tmp_path_factory):
    """A real `bentoml serve` with two keys (one from a Secret-like file) and /metrics protected."""
    from bench.servers import running_server

    secret = tmp_path_factory.mktemp("secret") / "api-keys"
    secret.write_text(KEY2 + "\n")
    with running_server(served_model, {"NIN_API_KEYS": KEY, "NIN_API_KEYS_FILE": str(secret),
                                       "NIN_METRICS_AUTH": "1", "NIN_ACCESS_LOG": "1"}) as proc:
        yield proc


@pytest.mark.integration
@pytest.mark.slow
def test_keys_through_a_real_server(keyed_server):
    import bentoml

    url, png = keyed_server.url, SAMPLE.read_bytes()
    with httpx.Client(base_url=url, timeout=30) as c:
        for path in ("/livez", "/readyz", "/ui", "/docs.json"):
            assert c.get(path).status_code == 200, path
        before = c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        for headers in ({}, {"Authorization": "Bearer " + "x" * 20}):
            for method, path, kw in (("POST", "/classify", {"content": png, "headers": {"Content-Type": "image/png"}}),
                                     ("POST", "/classify_batch", {"files": {"images": ("a.png", png, "image/png")}}),
                                     ("POST", "/api/classify", {"files": {"image": ("a.png", png, "image/png")}}),
                                     ("GET", "/model", {}), ("GET", "/metrics", {})):
                kw = {**kw, "headers": {**kw.get("headers", {}), **headers}}
                r = c.request(method, path, **kw)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"] == ("invalid_api_key" if headers else "missing_api_key")
                assert r.headers["WWW-Authenticate"].startswith("Bearer realm=")
        for key in (KEY, KEY2):
            r = c.post("/classify", content=png, headers={"Content-Type": "image/png", "Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json()["class_name"], r.text
        after = c.get("/metrics", headers={"Authorization": f"Bearer {KEY2}"}).text
        spec = c.get("/docs.json").json()
    count = lambda text, reason: float(next(  # noqa: E731
        (ln.split()[-1] for ln in text.splitlines() if ln.startswith(f'nin_auth_failures_total{{reason="{reason}"}}')), 0))
    assert count(after, "missing") - count(before, "missing") == 5
    assert count(after, "invalid") - count(before, "invalid") == 5
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["paths"]["/api/classify"]["post"]["security"] == [{"apiKey": []}]

    # BentoML's own client sends the key as a bearer token
    with bentoml.SyncHTTPClient(url, token=KEY2) as client:
        assert client.classify(image=SAMPLE)["class_name"]


@pytest.mark.integration
@pytest.mark.slow
def test_keys_are_never_logged(keyed_server):
    from bench.servers import server_output

    httpx.get(keyed_server.url + "/model", headers={"Authorization": "Bearer " + "y" * 24}, timeout=10)
    log = server_output(keyed_server, tail=10**7)
    assert "/model" in log  # the access log is on: requests are logged ...
    assert KEY not in log and KEY2 not in log and "y" * 24 not in log  # ... their keys are not


@pytest.mark.integration
def test_a_bad_key_setting_stops_bentoml_serve_in_one_line(served_model):
    from bench.servers import free_port, server_output, start_server, stop_server

    proc = start_server(served_model, free_port(), {"NIN_API_KEYS": "tooshort"})
    proc.wait(timeout=120)
    out = server_output(proc)
    stop_server(proc)
    assert proc.returncode == 1 and out.strip().splitlines()[-1] == (
        "error: cannot serve: API key 1: keys must be at least 16 printable ASCII characters with no spaces "
        "(e.g. `openssl rand -hex 24`)")
    assert "tooshort" not in out
