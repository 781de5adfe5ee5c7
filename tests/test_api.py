"""The typed BentoML endpoints, their guard, the OpenAPI document and the upload page's routes,
in-process (the whole service through an ASGI client; no network)."""

import re

import numpy as np
import pytest

from serving import page
from serving.schemas import BatchClassification, Classification, Error
from tests.conftest import REAL_DATA
from tests.test_imaging import BAD

SAMPLE = page.SAMPLES / "test0000-ankle-boot.png"


def test_typed_endpoint_gives_classify_s_answer(client):
    png = SAMPLE.read_bytes()
    curl_like = client.post("/classify?top_k=4", files={"image": ("a.png", png, "image/png")}).json()
    typed = client.post("/api/classify", files={"image": ("a.png", png, "image/png")}, data={"top_k": "4"})
    assert typed.status_code == 200
    body = Classification.model_validate(typed.json()).model_dump(exclude_none=True)
    for key in ("label", "class_name", "top_k", "input", "model"):
        assert body[key] == curl_like[key]
    assert len(body["top_k"]) == 4


def test_typed_batch_endpoint(client):
    files = [("images", (f.name, f.read_bytes(), "image/png")) for f in sorted(page.SAMPLES.glob("*.png"))]
    r = client.post("/api/classify_batch", files=files)
    assert r.status_code == 200
    results = BatchClassification.model_validate(r.json()).results
    singles = [client.post("/classify", files={"image": f}).json() for _, f in files]
    assert [x.top_k[0].model_dump() for x in results] == [s["top_k"][0] for s in singles]


@pytest.mark.parametrize("name", sorted(BAD))
def test_typed_endpoint_bad_images_get_the_same_4xx_json(client, name):
    data, status, error = BAD[name]
    r = client.post("/api/classify", files={"image": ("x.png", data, "image/png")})
    assert r.status_code == status and r.json()["error"] == error
    Error.model_validate(r.json())


@pytest.mark.parametrize("kwargs, status, error", [
    (dict(files={"picture": ("x.png", b"x", "image/png")}), 422, "unknown_field"),
    (dict(data={"top_k": "3"}, files={"other": ("x", b"", "text/plain")}), 422, "unknown_field"),
    (dict(content=b"\x89PNG....", headers={"Content-Type": "image/png"}), 415, "unsupported_media_type"),
    (dict(files={"image": ("x.png", b"x", "image/png")}, data={"top_k": "many"}), 422, "bad_top_k"),
    # str.isdigit() is true for "٣" (Arabic-Indic 3), which BentoML's int parser refuses with its own 400
    (dict(files={"image": ("x.png", b"x", "image/png")}, data={"top_k": "\u0663"}), 422, "bad_top_k"),
    (dict(files={"image": ("x.png", b"x", "image/png")}, data={"top_k": "0"}), 422, "bad_top_k"),
    (dict(files={"image": ("x.png", b"x", "image/png")}, data={"top_k": "11"}), 422, "bad_top_k"),
    (dict(files={"image": ("x.png", b"x", "image/png")}, data={"top_k": "\u00b2"}), 422, "bad_top_k"),
    # int() refuses over 4,300 digits: BentoML answered a 500
    (dict(files={"image": ("x.png", b"x", "image/png")}, data={"top_k": "1" * 5000}), 422, "bad_top_k"),
    (dict(content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"}), 422, "missing_field"),
])
def test_typed_endpoint_request_errors_are_4xx_json_objects_never_500(client, kwargs, status, error):
    r = client.post("/api/classify", **kwargs)
    assert r.status_code == status, r.text
    assert isinstance(r.json(), dict) and r.json()["error"] == error
    Error.model_validate(r.json())


def multipart_body(field: str, data: bytes, boundary: str = "b0undary", filename: str = "a.png") -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.parametrize("route, field", [("/api/classify", "image"), ("/api/classify_batch", "images")])
@pytest.mark.parametrize("filename", ["x" * 300 + ".png", "a\x00b.png", "é" * 130 + ".png"])
def test_typed_endpoints_take_any_file_name(client, route, field, filename):
    """BentoML saves a typed endpoint's upload under the client's file name: over 255 bytes that
    was a 500 ("File name too long"), with a NUL byte BentoML's own 400 body (both found by
    fuzzing a real server). The guard now renames such files before BentoML sees them."""
    body = multipart_body(field, SAMPLE.read_bytes(), filename=filename)
    r = client.post(route, content=body, headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 200, r.text
    answer = r.json() if field == "image" else r.json()["results"][0]
    assert answer["top_k"] == client.post("/classify", files={"image": SAMPLE.read_bytes()}).json()["top_k"]


@pytest.mark.parametrize("route, field", [("/api/classify", "image"), ("/classify", "image"),
                                          ("/api/classify_batch", "images"), ("/classify_batch", "images")])
def test_media_types_are_case_insensitive_and_exact(client, route, field):
    """RFC 9110: "Multipart/Form-Data" is multipart/form-data. The typed endpoints' parser
    (BentoML's) picks its parser by the exact string and took such a body for JSON: a pydantic
    error in BentoML's shape and a traceback in the log (found by fuzzing a real server). And a
    media type is compared whole: "multipart/form-dataX" is not multipart/form-data."""
    body = multipart_body(field, SAMPLE.read_bytes())
    r = client.post(route, content=body, headers={"Content-Type": "Multipart/Form-Data; boundary=b0undary"})
    assert r.status_code == 200, r.text
    label = r.json()["label"] if field == "image" else r.json()["results"][0]["label"]
    assert label == client.post("/classify", files={"image": SAMPLE.read_bytes()}).json()["label"]
    r = client.post(route, content=body, headers={"Content-Type": "multipart/form-dataX; boundary=b0undary"})
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")


def test_typed_endpoint_body_cap_while_reading(client, service_cls):
    from serving.engine import Settings

    cap = Settings.from_env().max_bytes

    def chunks():  # no Content-Length: the cap must stop the stream itself
        for _ in range(cap // 2**20 + 2):
            yield b"\0" * 2**20

    r = client.post("/api/classify", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    r = client.post("/api/classify", content=b"x" * 10, headers={"Content-Type": "multipart/form-data; boundary=x",
                                                                "Content-Length": str(cap + 1)})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_show_input_returns_the_image_the_model_saw(client):
    import base64
    import io

    from PIL import Image

    r = client.post("/classify?show_input=true", content=SAMPLE.read_bytes(), headers={"Content-Type": "image/png"})
    seen = Image.open(io.BytesIO(base64.b64decode(r.json()["input"]["png_base64"])))
    assert seen.size == (224, 224) and seen.mode == "L"
    from serving import imaging

    contract = client.get("/model").json()["input_contract"]
    expected = imaging.to_contract(SAMPLE.read_bytes(), contract, 10**8).image  # the contract's preprocessing
    assert np.array_equal(np.asarray(seen), np.asarray(expected))
    assert "png_base64" not in client.post("/classify", content=SAMPLE.read_bytes(),
                                           headers={"Content-Type": "image/png"}).json()["input"]
    r = client.post("/classify?show_input=maybe", content=SAMPLE.read_bytes(), headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and r.json()["error"] == "bad_show_input"


def test_docs_json_lists_every_route_with_its_schemas(client):
    spec = client.get("/docs.json").json()
    paths = spec["paths"]
    for route in ("/classify", "/classify_batch", "/model", "/ui", "/ui/samples", "/api/classify", "/api/classify_batch"):
        assert route in paths, route
    post = paths["/classify"]["post"]
    body = post["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert "image/png" in body and "application/octet-stream" in body
    assert [p["name"] for p in post["parameters"]] == ["top_k", "show_input"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Classification")
    for status in ("400", "413", "415", "422", "503"):
        assert post["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    schemas = spec["components"]["schemas"]
    assert set(schemas["Error"]["properties"]) == {"error", "detail"}
    assert {"label", "class_name", "top_k", "input", "timing_ms", "memory", "batch_size", "model"} <= set(
        schemas["Classification"]["properties"])
    typed = paths["/api/classify"]["post"]
    assert typed["x-bentoml-name"] == "classify"
    assert "image" in typed["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]


def test_upload_page_is_self_contained(client):
    html = client.get("/ui").text
    assert "<title>NiN Fashion-MNIST classifier</title>" in html and 'name="viewport"' in html
    # nothing fetched from another origin: every src/href is relative or a data: URL
    for url in re.findall(r"""(?:src|href)=["']([^"']+)""", html):
        assert not re.match(r"^(https?:)?//", url), url
    assert "cdn" not in html.lower()


def test_sample_routes(client):
    listed = client.get("/ui/samples").json()
    assert len(listed) == len(list(page.SAMPLES.glob("*.png"))) >= 4
    r = client.get(listed[0]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == (page.SAMPLES / listed[0]["file"]).read_bytes()
    r = client.get("/ui/samples/..%2Fpage.py")
    assert r.status_code == 404
    r = client.get("/ui/samples/nope.png")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


@REAL_DATA
def test_samples_are_real_test_images_with_their_labels():
    """Each sample is Fashion-MNIST test image N exactly, named after its true class."""
    import gzip

    import numpy as np
    from PIL import Image

    from training.config import FASHION_MNIST_CLASSES

    root = "/usr/share/datasets/fashion-mnist/"
    x = np.frombuffer(gzip.open(root + "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(root + "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    for s in page.samples():
        i = s["test_index"]
        assert np.array_equal(np.asarray(Image.open(page.SAMPLES / s["file"])), x[i])
        assert FASHION_MNIST_CLASSES[y[i]].lower().replace("/", " ") == s["class_name"], s
