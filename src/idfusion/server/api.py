"""The FastAPI app: the HTTP API over the job service, with the gradio UI mounted at ``/ui``.

Endpoints (OpenAPI docs at ``/docs``, the schema at ``/openapi.json``):

- ``GET /api/health``, ``GET /api/methods``: what the server offers, and each method's parameters.
- ``POST /api/jobs``: multipart form: ``params`` (a JSON object: ``method``, the method's options by name, and
  ``num_images``, ``seed``, ``face_weights``, ``face_index``, ``template``, ``score``), ``faces`` (1-4 files),
  the method's image options by name (``pose_image``...) and ``template``. 202 with the job's status.
- ``GET /api/jobs``, ``GET /api/jobs/{id}`` (``?wait=S`` waits up to S seconds for the end),
  ``POST /api/jobs/{id}/cancel``.
- ``GET /api/jobs/{id}/images/{name}``: a PNG with its metadata embedded; ``GET /api/jobs/{id}/metadata``.
- ``POST /api/faces``: what the method's face analyzer finds in one photo (``method``, ``face``, ``face_index``).

Errors are JSON ``{"detail": "one line"}`` with 400 (malformed id or name), 401 (token), 403 (host or origin),
404, 409 (cancel after the end), 413 (too large), 422 (bad input), 429 (queue full).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request, imported inside
# create_app so that importing this module stays light) as objects.
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .. import __version__
from .config import ServerConfig, is_loopback
from .service import JobService, ServiceError, Upload

__all__ = ["create_app", "serve_in_background", "UI_PATH"]

logger = logging.getLogger(__name__)

UI_PATH = "/ui"
MAX_WAIT_S = 30.0
_JOB_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["params"],
                    "properties": {
                        "params": {
                            "type": "string",
                            "description": "a JSON object: method (see GET /api/methods), the method's options by "
                            "name (prompt, steps, guidance, width, height, ...), and num_images, seed, face_weights "
                            "(one per face), face_index (in group photos, 0 = leftmost), template "
                            "({face_index, strength, use_pose}), score (true: the world judge's identity scores)",
                            "example": '{"method": "world-base", "prompt": "a photo of a person", "seed": 1}',
                        },
                        "faces": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "1-4 face photos (the baseline takes them as references only)",
                        },
                        "template": {"type": "string", "format": "binary", "description": "a template photo"},
                    },
                    "additionalProperties": {
                        "type": "string",
                        "format": "binary",
                        "description": "a method's image option by name (pose_image, controlnet_image)",
                    },
                }
            }
        },
    }
}


def _with_urls(status: dict[str, Any]) -> dict[str, Any]:
    base = f"/api/jobs/{status['id']}"
    status["urls"] = {
        "status": base,
        "cancel": f"{base}/cancel",
        "metadata": f"{base}/metadata",
        "images": [f"{base}/images/{name}" for name in status["images"]],
        "sheet": f"{base}/images/{status['sheet']}" if status["sheet"] else None,
    }
    return status


async def _read(upload: Any, limit: int, fallback: str) -> Upload:
    data = await upload.read(limit + 1)
    name = Upload.named(b"", getattr(upload, "filename", None), fallback).name
    if len(data) > limit:
        raise ServiceError(f"{name}: over the upload limit of {limit:,} bytes ({limit / 2**20:.0f} MiB)", 413)
    return Upload(data, name)


def create_app(service: JobService, *, ui: bool = True) -> Any:
    """The FastAPI app over ``service``: the API, the UI at ``/ui`` (with ``ui``) and the request checks."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
    from starlette.datastructures import UploadFile

    from .security import RequestGuard

    config: ServerConfig = service.config
    app = FastAPI(
        title="idfusion",
        version=__version__,
        description="Identity-preserving image generation: submit a job with face photos and parameters, follow its "
        "progress, fetch its PNGs (generation metadata embedded). The web UI is at /ui.",
    )

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, error: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/" if ui else "/docs", status_code=307)

    @app.get("/api/health", tags=["server"], summary="server status")
    def health() -> dict[str, Any]:
        jobs = service.jobs()
        return {
            "ok": True,
            "version": __version__,
            "methods": list(service.methods),
            "queued": sum(j.state.value == "queued" for j in jobs),
            "running": sum(j.state.value == "running" for j in jobs),
            "concurrency": config.concurrency,
        }

    @app.get("/api/methods", tags=["methods"], summary="the served methods and their parameters")
    def list_methods() -> list[dict[str, Any]]:
        return [served.describe() for served in service.methods.values()]

    @app.post(
        "/api/jobs", status_code=202, tags=["jobs"], summary="submit a job (multipart form)", openapi_extra=_JOB_FORM
    )
    async def submit(request: Request) -> dict[str, Any]:
        from .service import JobRequest

        limit = config.max_upload_bytes
        async with request.form(max_files=config.max_faces + 3, max_fields=8) as form:
            params_text, faces, files = "{}", [], {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key == "faces":
                        faces.append(await _read(value, limit, f"face {len(faces) + 1}"))
                    elif key in files:
                        raise ServiceError(f"file field {key!r} given twice")
                    else:
                        files[key] = await _read(value, limit, key)
                elif key == "params":
                    params_text = value
                else:
                    raise ServiceError(f"unknown form field {key!r}: send parameters in the JSON 'params' field")
        try:
            params = json.loads(params_text)
        except json.JSONDecodeError as error:
            raise ServiceError(f"params: not valid JSON ({error})") from error
        if not isinstance(params, dict):
            raise ServiceError("params: expected a JSON object")
        method = params.pop("method", None)
        if method is None:
            raise ServiceError(f"params: give a method ({', '.join(service.methods)})")
        job = await run_in_threadpool(service.submit, JobRequest(method, params, faces, files))
        return _with_urls(job.status())

    @app.get("/api/jobs", tags=["jobs"], summary="every job this server remembers")
    def list_jobs() -> list[dict[str, Any]]:
        return [_with_urls(status) for status in service.statuses()]

    @app.get("/api/jobs/{job_id}", tags=["jobs"], summary="a job's status (wait: seconds to wait for its end)")
    async def job_status(job_id: str, wait: float = 0.0) -> dict[str, Any]:
        if wait > 0:
            job = await run_in_threadpool(service.wait, job_id, min(wait, MAX_WAIT_S))
        else:
            job = service.get(job_id)
        return _with_urls(job.status())

    @app.post("/api/jobs/{job_id}/cancel", tags=["jobs"], summary="cancel a queued or running job")
    def cancel(job_id: str) -> dict[str, Any]:
        return _with_urls(service.cancel(job_id).status())

    @app.get(
        "/api/jobs/{job_id}/images/{name}",
        tags=["jobs"],
        summary="one result PNG (generation metadata embedded)",
        response_class=FileResponse,
    )
    def image(job_id: str, name: str) -> FileResponse:
        path = service.file_path(job_id, name)
        return FileResponse(path, media_type="image/png", filename=name, content_disposition_type="inline")

    @app.get("/api/jobs/{job_id}/metadata", tags=["jobs"], summary="each image's embedded generation metadata")
    def metadata(job_id: str) -> list[dict[str, Any]]:
        return service.metadata(job_id)

    @app.post("/api/faces", tags=["methods"], summary="the faces a method's analyzer finds in one photo")
    async def faces(request: Request) -> dict[str, Any]:
        async with request.form(max_files=1, max_fields=4) as form:
            method, face, index = form.get("method"), form.get("face"), form.get("face_index")
            if not isinstance(method, str) or not isinstance(face, UploadFile):
                raise ServiceError("send a 'method' field and one 'face' file")
            upload = await _read(face, config.max_upload_bytes, "face")
        try:
            chosen = None if index in (None, "") else int(str(index))
        except ValueError as error:
            raise ServiceError(f"face_index: expected a whole number, got {index!r}") from error
        report = await run_in_threadpool(service.inspect_face, method, upload, chosen)
        return report.describe()

    if ui:
        import gradio as gr

        from .ui import build_ui, ui_theme

        blocks = build_ui(service)
        app = gr.mount_gradio_app(
            app,
            blocks,
            path=UI_PATH,
            max_file_size=config.max_upload_bytes,
            allowed_paths=[str(service.out_dir)],
            footer_links=[],  # the API is FastAPI's (/docs); the UI's own handlers are private
            theme=ui_theme(),
            ssr_mode=False,
        )
    app.add_middleware(
        RequestGuard, token=config.token, loopback=is_loopback(config.host), max_body=config.max_body_bytes
    )
    return app


@contextmanager
def serve_in_background(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread (``port=0``: a free port) and yield its base URL; stop it on exit.

    For tests and notebooks; ``idfusion serve`` runs uvicorn in the foreground.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="idfusion-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
