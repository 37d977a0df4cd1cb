"""FastAPI app for an inspection station.

- Predictions run in worker threads; at most `workers` run at once and at most `queue` more wait. Beyond
  that the service answers 503 with Retry-After instead of letting memory grow.
- The model in use is one reference that is swapped in a single assignment after an update has been built
  and saved, so a prediction sees either the old or the new model, never a half-updated one.
- Uploads are size-limited before they are read (Content-Length, then a running byte count for chunked
  bodies); image decoding goes through hyads.data.io with a pixel limit, and every bad input is a 4xx JSON error.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from scipy import ndimage
from concurrent.futures import ThreadPoolExecutor

from .. import __version__
from ..data.io import load_image
from ..errors import HyADSError, ImageError
from ..persist import load_model
from ..pipeline import HyADS
from ..report.overlay import heatmap_overlay

STATIC = Path(__file__).parent / "static"


@dataclass
class ServiceSettings:
    model_path: Path
    runtime: str = "torch"
    onnx_dir: Path | None = None
    admin_token: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    workers: int = 2
    queue: int = 16
    max_batch: int = 16
    retry_after_s: int = 1


class _TooLarge(Exception):
    pass


class UploadLimitMiddleware:
    """Pure ASGI middleware: refuse bodies over the limit before they are read in full."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = True
            if too_big:
                return await _send_json(send, 413, {"error": f"upload larger than {self.limit} bytes"})
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await _send_json(send, 413, {"error": f"upload larger than {self.limit} bytes"})


async def _send_json(send: Any, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class ModelHolder:
    """The current model, swapped atomically; updates are serialised."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.model = self._load()
        self.update_lock = threading.Lock()

    def _load(self) -> HyADS:
        model = load_model(self.settings.model_path)
        model.progress = False
        if self.settings.runtime != "torch":
            model.use_runtime(self.settings.runtime, self.settings.onnx_dir or self.settings.model_path / "onnx")
        return model

    def add_normal(self, images: list[np.ndarray]) -> HyADS:
        with self.update_lock:
            fresh = self._load()  # a private copy: in-flight predictions keep using the old one
            fresh.add_normal(images)
            fresh.save(self.settings.model_path)  # atomic directory swap on disk
            self.model = fresh  # one reference assignment: atomic for readers
            return fresh


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _boxes(mask: np.ndarray) -> list[dict[str, int]]:
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    out = []
    for sl in ndimage.find_objects(lab):
        if sl is not None:
            out.append({"x": int(sl[1].start), "y": int(sl[0].start), "width": int(sl[1].stop - sl[1].start),
                        "height": int(sl[0].stop - sl[0].start)})
    return out


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def create_app(settings: ServiceSettings) -> FastAPI:
    holder = ModelHolder(settings)
    registry = CollectorRegistry()
    requests_total = Counter("hyads_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("hyads_predict_seconds", "Prediction latency per request", registry=registry,
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    verdicts = Counter("hyads_verdicts_total", "Verdicts given", ["verdict"], registry=registry)
    # A fixed pool: decoding, inference and rendering run only on these threads (bounded memory, and the
    # event loop never blocks on pixels).
    pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="hyads-worker")
    capacity = {"free": settings.workers + settings.queue}
    cap_lock = threading.Lock()

    app = FastAPI(title="hyads inspection service", version=__version__,
                  description="Anomaly score, verdict, heat map and defect mask for each image.")
    app.add_middleware(UploadLimitMiddleware, limit=settings.max_upload_bytes)
    app.state.holder = holder

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors())
        return _error(422, f"invalid request: missing or wrong fields ({fields})")

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        requests_total.labels(request.url.path, str(response.status_code)).inc()
        return response

    def _acquire() -> bool:
        with cap_lock:
            if capacity["free"] <= 0:
                return False
            capacity["free"] -= 1
            return True

    def _release() -> None:
        with cap_lock:
            capacity["free"] += 1

    def _decode(data: bytes, name: str, size: int) -> np.ndarray:
        if not data:
            raise ImageError(name, "empty upload")
        return load_image(data, size, name=name, max_pixels=settings.max_pixels)

    def _work(model: HyADS, items: list[tuple[str, bytes]], want: str | None, as_png: bool,
              batch: bool) -> Response:
        """Decode, predict and render on a worker thread."""
        size = model.config.image_size
        try:
            rgbs = [_decode(data, name, size) for name, data in items]
        except ImageError as exc:
            return _error(415 if "recognised" in exc.problem or "mode" in exc.problem else 400, str(exc))
        t = time.perf_counter()
        maps = model.anomaly_map(rgbs)
        seconds = time.perf_counter() - t
        latency.observe(seconds)
        if as_png and want:
            return Response(_render(model, rgbs[0], maps[0], want), media_type="image/png")
        results = [_result(model, r, m, seconds / len(rgbs), want, name)
                   for (name, _), r, m in zip(items, rgbs, maps)]
        return JSONResponse({"results": results} if batch else results[0])

    async def _in_pool(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _result(model: HyADS, rgb: np.ndarray, amap: np.ndarray, seconds: float, want: str | None,
                name: str) -> dict[str, Any]:
        thr = model.threshold_
        raw = float(amap.max())
        mask = amap >= thr
        verdict = "defect" if raw >= thr else "normal"
        verdicts.labels(verdict).inc()
        out: dict[str, Any] = {
            "image": name, "score": float(model.normalise(raw)), "raw_score": raw, "verdict": verdict,
            "threshold": 0.5, "raw_threshold": thr, "defect_area_fraction": float(mask.mean()),
            "boxes": _boxes(mask), "timing_ms": round(seconds * 1000, 2),
            "size": model.config.image_size,
        }
        if want:
            out["png_base64"] = base64.b64encode(_render(model, rgb, amap, want)).decode()
        return out

    def _render(model: HyADS, rgb: np.ndarray, amap: np.ndarray, want: str) -> bytes:
        norm = model.normalise(amap)
        if want == "overlay":
            return _png(heatmap_overlay(rgb, norm, amap >= model.threshold_))
        if want == "mask":
            return _png((amap >= model.threshold_).astype(np.uint8) * 255)
        return _png((np.clip(norm, 0, 1) * 255).round().astype(np.uint8))

    async def _read_images(request: Request, files: list[UploadFile] | None) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        if files:
            return [(f.filename or "upload", await f.read()) for f in files]
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return [("upload", await request.body())]
        if ctype.startswith("multipart/form-data"):
            raise HyADSError("multipart upload without an image field: send the image as 'file' (or 'files')")
        raise HyADSError(f"unsupported content type {ctype or 'none'!r}: send multipart 'file' or an image/* body")

    async def _handle(request: Request, files: list[UploadFile] | None, want: str | None,
                      as_png: bool, batch: bool = False) -> Response:
        if want not in (None, "overlay", "mask", "map"):
            return _error(422, "return must be one of overlay, mask, map")
        if not _acquire():
            return _error(503, "server busy, retry later", **{"Retry-After": str(settings.retry_after_s)})
        try:
            try:
                items = await _read_images(request, files)
            except HyADSError as exc:
                return _error(415 if "content type" in str(exc) else 422, str(exc))
            if len(items) > settings.max_batch:
                return _error(413, f"at most {settings.max_batch} images per request")
            model = holder.model  # one consistent model for the whole request
            return await _in_pool(_work, model, items, want, as_png, batch)
        finally:
            _release()

    @app.post("/v1/predict", summary="Score one image (multipart 'file' or a raw image body)")
    async def predict(
        request: Request,
        file: UploadFile | None = File(None, description="The image"),
        return_: str | None = Query(None, alias="return", description="overlay | mask | map"),
        embed: bool = Query(False, description="With return=...: put the PNG in the JSON as base64"),
    ) -> Response:
        return await _handle(request, [file] if file is not None else None, return_, as_png=not embed)

    @app.post("/v1/predict/batch", summary="Score several images (multipart 'files')")
    async def predict_batch(
        request: Request,
        files: list[UploadFile] = File(..., description="The images"),
        return_: str | None = Query(None, alias="return", description="overlay | mask | map (base64 in JSON)"),
    ) -> Response:
        return await _handle(request, files, return_, as_png=False, batch=True)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model", summary="Model description")
    async def model_info() -> dict[str, Any]:
        m = holder.model
        return {"hyads_version": __version__, "config": m.config.to_dict(), "threshold": m.threshold_,
                "threshold_method": m.calibration_.method, "bank_size": int(m.fit_info_.get("bank_size", 0)),
                "fit_info": m.fit_info_, "runtime": settings.runtime}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/normal", summary="Add confirmed-normal images to the memory bank (admin token required)")
    async def add_normal(request: Request, files: list[UploadFile] = File(...)) -> Response:
        token = settings.admin_token
        given = request.headers.get("x-admin-token") or request.headers.get("authorization", "").removeprefix(
            "Bearer ")
        if not token:
            return _error(403, "updates are disabled: start the service with --admin-token")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return _error(401, "missing or wrong admin token")
        size = holder.model.config.image_size
        items = [(f.filename or "upload", await f.read()) for f in files]
        try:
            rgbs = await _in_pool(lambda: [_decode(data, name, size) for name, data in items])
        except ImageError as exc:
            return _error(400, str(exc))
        # The update runs beside the prediction pool so a long update never blocks inspections.
        model = await asyncio.get_running_loop().run_in_executor(None, holder.add_normal, rgbs)
        return JSONResponse({"added": len(rgbs), "bank_size": int(model.fit_info_.get("bank_size", 0)),
                             "threshold": model.threshold_})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = STATIC / name
        if name not in {p.name for p in STATIC.iterdir()}:
            return _error(404, "not found")
        media = {"js": "text/javascript", "css": "text/css"}.get(path.suffix.lstrip("."), "application/octet-stream")
        return FileResponse(path, media_type=media)

    return app
