"""The inspection service: API contract, bad input (4xx, never 500), back-pressure, admin updates, fuzzing."""

import io
import threading
import time
import zlib
import struct

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from hyads import load_model
from hyads.data.synth import add_defect, make_surface
from hyads.serve import ServiceSettings, create_app


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def surface(seed: int, defect: str | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    img = make_surface(rng, 128)
    if defect:
        img, _ = add_defect(img, rng, defect)
    return png_bytes((img * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def model_dir(synth_model, tmp_path_factory):
    return synth_model.save(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def client(model_dir):
    app = create_app(ServiceSettings(model_path=model_dir, admin_token="s3cret", max_upload_bytes=2_000_000))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_predict_multipart_and_raw_body(client):
    good = client.post("/v1/predict", files={"file": ("good.png", surface(1), "image/png")})
    bad = client.post("/v1/predict", content=surface(2, "spot"), headers={"content-type": "image/png"})
    assert good.status_code == 200 and bad.status_code == 200
    g, b = good.json(), bad.json()
    assert set(g) >= {"score", "raw_score", "verdict", "threshold", "defect_area_fraction", "boxes", "timing_ms"}
    assert 0 <= g["score"] <= 1 and b["score"] > g["score"]
    assert b["verdict"] == "defect" and b["boxes"] and b["defect_area_fraction"] > 0
    assert (g["verdict"] == "defect") == (g["score"] >= 0.5)


@pytest.mark.parametrize("what", ["overlay", "mask", "map"])
def test_return_pngs(client, what):
    r = client.post(f"/v1/predict?return={what}", files={"file": ("x.png", surface(3, "scratch"), "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (128, 128)
    r = client.post(f"/v1/predict?return={what}&embed=true", files={"file": ("x.png", surface(3), "image/png")})
    assert r.status_code == 200 and "png_base64" in r.json()


def test_batch_endpoint(client):
    files = [("files", (f"{i}.png", surface(10 + i), "image/png")) for i in range(3)]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_health_model_metrics_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["bank_size"] > 0 and "fitted_at" in info["fit_info"] and info["config"]["image_size"] == 128
    client.post("/v1/predict", files={"file": ("g.png", surface(4), "image/png")})
    text = client.get("/metrics").text
    assert "hyads_requests_total" in text and "hyads_predict_seconds_bucket" in text and "hyads_verdicts_total" in text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/predict/batch", "/v1/normal", "/healthz", "/v1/model", "/metrics"} <= set(paths)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (1-bit, all zero: compresses to almost nothing)."""
    raw = zlib.compress(b"\x00" * ((width // 8 + 1) * 64), 9)
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _nan_tiff() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,content,status,needle",
    [
        ("text.png", b"this is not an image at all", 415, "not a recognised"),
        ("trunc.png", None, 400, "trunc.png"),
        ("empty.png", b"", 400, "empty upload"),
        ("bomb.png", _bomb_png(20000, 20000), 400, "limit"),
        ("big.png", _bomb_png(7000, 7000), 400, "exceeds the limit of 40000000"),
        ("nan.tif", _nan_tiff(), 400, "NaN"),
    ],
)
def test_bad_uploads_are_4xx_json(client, name, content, status, needle):
    if content is None:
        full = surface(5)
        content = full[: len(full) // 2]
    r = client.post("/v1/predict", files={"file": (name, content, "image/png")})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_wrong_field_and_content_type(client):
    r = client.post("/v1/predict", files={"image": ("x.png", surface(6), "image/png")})
    assert r.status_code == 422 and "file" in r.json()["error"]
    r = client.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415
    r = client.post("/v1/predict?return=bogus", files={"file": ("x.png", surface(6), "image/png")})
    assert r.status_code == 422


def test_oversized_upload_refused_before_reading(model_dir):
    app = create_app(ServiceSettings(model_path=model_dir, max_upload_bytes=10_000))
    with TestClient(app) as c:
        big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
        r = c.post("/v1/predict", files={"file": ("big.png", png_bytes(big), "image/png")})
        assert r.status_code == 413 and "larger than" in r.json()["error"]

        def chunks():  # no Content-Length: the running count must stop it
            for _ in range(100):
                yield b"\x00" * 1000

        r = c.post("/v1/predict", content=chunks(), headers={"content-type": "image/png"})
        assert r.status_code == 413


@given(st.binary(min_size=0, max_size=3000))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_random_bytes_never_crash(client, data):
    r = client.post("/v1/predict", content=data, headers={"content-type": "image/png"})
    assert 400 <= r.status_code < 500 or r.status_code == 200
    assert "error" in r.json() or "score" in r.json()


@given(st.integers(min_value=0, max_value=2000), st.binary(min_size=1, max_size=8))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_corrupted_png(client, pos, junk):
    good = bytearray(surface(7))
    pos = min(pos, len(good) - 1)
    good[pos : pos + len(junk)] = junk
    r = client.post("/v1/predict", files={"file": ("c.png", bytes(good), "image/png")})
    assert r.status_code in (200, 400, 415), r.text


def test_admin_endpoint_requires_token(client, model_dir):
    files = [("files", ("n.png", surface(20), "image/png"))]
    assert client.post("/v1/normal", files=files).status_code == 401
    assert client.post("/v1/normal", files=files, headers={"x-admin-token": "wrong"}).status_code == 401
    before = client.get("/v1/model").json()["fit_info"]["patches_seen"]
    r = client.post("/v1/normal", files=files, headers={"authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json()["added"] == 1
    after = client.get("/v1/model").json()["fit_info"]["patches_seen"]
    assert after == before + 16 * 16
    assert load_model(model_dir).fit_info_["patches_seen"] == after  # persisted


def test_admin_disabled_without_token(model_dir):
    with TestClient(create_app(ServiceSettings(model_path=model_dir))) as c:
        r = c.post("/v1/normal", files=[("files", ("n.png", surface(21), "image/png"))])
        assert r.status_code == 403


class _Server:
    """uvicorn on a free loopback port in a background thread."""

    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_overload_gives_503_with_retry_after(model_dir):
    app = create_app(ServiceSettings(model_path=model_dir, workers=1, queue=1))
    model = app.state.holder.model
    original = model.anomaly_map

    def slow(images):
        time.sleep(0.4)
        return original(images)

    model.anomaly_map = slow
    statuses, retry = [], []
    body = surface(30)
    with _Server(app) as url:
        def hit():
            r = httpx.post(f"{url}/v1/predict", content=body, headers={"content-type": "image/png"}, timeout=30)
            statuses.append(r.status_code)
            if r.status_code == 503:
                retry.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=hit) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503} and all(r == "1" for r in retry)


def test_predictions_during_update_never_fail(model_dir, tmp_path):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(model_dir, path)
    added_before = load_model(path).fit_info_.get("n_added_images", 0)
    app = create_app(ServiceSettings(model_path=path, admin_token="t", workers=2, queue=32))
    errors = []
    with _Server(app) as url:
        stop = threading.Event()

        def predict_loop():
            while not stop.is_set():
                r = httpx.post(f"{url}/v1/predict", content=surface(40), headers={"content-type": "image/png"},
                               timeout=30)
                if r.status_code != 200:
                    errors.append(r.status_code)

        workers = [threading.Thread(target=predict_loop) for _ in range(3)]
        for w in workers:
            w.start()
        for i in range(2):
            r = httpx.post(f"{url}/v1/normal", files=[("files", ("n.png", surface(50 + i), "image/png"))],
                           headers={"x-admin-token": "t"}, timeout=60)
            assert r.status_code == 200
        stop.set()
        for w in workers:
            w.join()
    assert errors == []
    assert load_model(path).fit_info_["n_added_images"] == added_before + 2


def test_bounded_load_on_loopback(model_dir):
    """200 requests from 16 concurrent clients: no errors, and memory does not keep growing."""
    import resource

    app = create_app(ServiceSettings(model_path=model_dir, workers=2, queue=64))
    body = surface(60)
    codes = []
    with _Server(app) as url:
        def client_loop(n):
            with httpx.Client(timeout=60) as c:
                for _ in range(n):
                    codes.append(c.post(f"{url}/v1/predict", content=body,
                                        headers={"content-type": "image/png"}).status_code)

        def burst(total):
            threads = [threading.Thread(target=client_loop, args=(total // 16,)) for _ in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        burst(96)
        rss_mid = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        burst(112)
        rss_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert codes.count(200) == len(codes) == 96 + 112
    assert rss_end - rss_mid < 100 * 1024  # KiB: under 100 MiB of growth across the second half


def test_serve_binds_loopback_by_default():
    from typer.testing import CliRunner

    from hyads.cli import app

    r = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert "127.0.0.1" in r.output
