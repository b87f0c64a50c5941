"""``idfusion serve``'s HTTP API over real HTTP on loopback: uvicorn in a thread, httpx as the client.

Two servers: one on real weights (the tiny Arc2Face kit and the world base model), one whose pipelines are fakes
from the cache's ``loader`` (slow, counting, or failing on request) for the queue, concurrency and cancellation.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from idfusion.jobs import PipelineCache  # noqa: E402
from idfusion.server.api import create_app, serve_in_background  # noqa: E402
from idfusion.server.catalogue import BASELINE, ServedMethod, serve_catalogue  # noqa: E402
from idfusion.server.config import BindError, ServerConfig, check_bind  # noqa: E402
from idfusion.server.service import JobService, ServiceError  # noqa: E402

TIMEOUT = httpx.Timeout(120.0)  # the first request imports torch and loads a pipeline (seconds on a slow CPU)
MAX_UPLOAD = 600_000  # obama.jpg (280 kB) fits, obama_rgba.png (887 kB) does not
MAX_PIXELS = 4_000_000


def png(width: int, height: int, colour: tuple[int, int, int] = (128, 128, 128)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def submit(client: httpx.Client, params: dict[str, Any], faces: list[tuple[str, bytes]] = (), **files: bytes):
    parts = [("faces", (name, data, "application/octet-stream")) for name, data in faces]
    parts += [(key, (key, data, "application/octet-stream")) for key, data in files.items()]
    return client.post("/api/jobs", data={"params": json.dumps(params)}, files=parts or None)


def finished(client: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = client.get(f"/api/jobs/{job['id']}", params={"wait": 10}).json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
    raise AssertionError(f"job {job['id']} did not finish: {status}")


# ---- a server on real weights -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory, tiny_release, faces_dir):
    catalogue = serve_catalogue({"arc2face": str(tiny_release("arc2face"))}, world=True, official=False)
    config = ServerConfig(
        out_dir=tmp_path_factory.mktemp("serve-real"), max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS
    )
    service = JobService(catalogue, config)
    with serve_in_background(create_app(service, ui=False)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        yield c, service, faces_dir
    service.close()


def test_served_methods_come_from_the_registry(real):
    client, _, _ = real
    methods = {m["name"]: m for m in client.get("/api/methods").json()}
    from idfusion.world.demo import world_methods

    assert set(methods) == {"arc2face", BASELINE, *(name for name, _ in world_methods())}  # world: FlashFace
    arc2face = {o["name"]: o for o in methods["arc2face"]["options"]}
    assert {"prompt", "steps", "guidance", "width", "height", "negative_prompt", "controlnet_image"} <= set(arc2face)
    assert "base_model" not in arc2face and "lora" not in arc2face  # server-side files: not per request
    assert arc2face["controlnet_image"]["upload"] and arc2face["steps"]["type"] == "int"
    assert {o["name"] for o in methods[BASELINE]["options"]} >= {"prompt", "negative_prompt", "steps"}
    assert client.get("/docs").status_code == 200
    assert "/api/jobs/{job_id}/cancel" in client.get("/openapi.json").json()["paths"]


def test_a_job_runs_to_completion(real, tmp_path):
    from idfusion.outputs import read_generation_metadata

    client, service, faces = real
    face = (faces / "obama.jpg").read_bytes()
    response = submit(client, {"method": "arc2face", "steps": 2, "seed": 7, "num_images": 2}, [("obama.jpg", face)])
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] in ("queued", "running") and job["urls"]["status"] == f"/api/jobs/{job['id']}"
    status = finished(client, job)
    assert status["state"] == "done", status
    assert status["progress"] == {"step": 2, "steps": 2, "fraction": 1.0}
    assert len(status["images"]) == 2 and status["sheet"]
    image = client.get(status["urls"]["images"][1])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    saved = tmp_path / "image.png"
    saved.write_bytes(image.content)
    metadata = read_generation_metadata(saved)
    assert metadata["method"] == "arc2face" and metadata["seed"] == 8 and metadata["steps"] == 2
    listed = client.get(status["urls"]["metadata"]).json()
    assert [entry["metadata"]["seed"] for entry in listed] == [7, 8]
    assert (service.out_dir / job["id"] / status["images"][0]).is_file()  # the job's own folder


def test_the_world_base_model_is_a_prompt_only_baseline_with_judge_scores(real):
    client, _, faces = real
    face = (faces / "obama.jpg").read_bytes()
    params = {"method": BASELINE, "prompt": "a photo of a person in a red shirt", "steps": 3, "seed": 1, "score": True}
    status = finished(client, submit(client, params, [("obama.jpg", face)]).json())
    assert status["state"] == "done", status
    assert len(status["scores"]["scores"]) == 1 and status["scores"]["threshold"] > 0
    assert finished(client, submit(client, {"method": BASELINE, "steps": 2}).json())["state"] == "done"  # no faces


def test_bad_uploads_get_clear_errors(real):
    client, _, faces = real
    params = {"method": "arc2face", "steps": 2}
    response = submit(client, params, [("notes.jpg", b"these are not pixels")])
    assert response.status_code == 422 and "notes.jpg: not an image" in response.json()["detail"]
    response = submit(client, params, [("grey.png", png(256, 256))])
    assert response.status_code == 422 and "grey.png: no face found" in response.json()["detail"]
    response = submit(client, params, [("big.png", (faces / "obama_rgba.png").read_bytes())])
    assert response.status_code == 413 and f"{MAX_UPLOAD:,} bytes" in response.json()["detail"]
    response = submit(client, params, [("huge.png", png(2100, 2100))])
    assert response.status_code == 413 and "pixels" in response.json()["detail"]
    host, port = str(client.base_url).removeprefix("http://").rstrip("/").split(":")
    with socket.create_connection((host, int(port))) as raw:  # a body announced far beyond the limit
        raw.sendall(f"POST /api/jobs HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {10**9}\r\n\r\n".encode())
        assert raw.recv(200).startswith(b"HTTP/1.1 413")
    assert submit(client, params).status_code == 422  # no face at all
    response = submit(client, params, [("group.jpg", (faces / "group_six_faces.jpg").read_bytes())] * 1)
    assert response.status_code == 202 and "6 faces found" in response.json()["warnings"][0]
    finished(client, response.json())
    response = submit(
        client, {**params, "face_index": 9}, [("group.jpg", (faces / "group_six_faces.jpg").read_bytes())]
    )
    assert response.status_code == 422 and "face index 9" in response.json()["detail"]


def test_bad_parameters_name_what_is_wrong(real):
    client, _, faces = real
    face = [("obama.jpg", (faces / "obama.jpg").read_bytes())]
    cases = {
        json.dumps({"method": "nope"}): "unknown method 'nope'",
        json.dumps({"method": "arc2face", "colour": "red"}): "unknown parameter(s) 'colour'",
        json.dumps({"method": "arc2face", "ref_strength": 1.0}): "--ref-strength is an option of FlashFace",
        json.dumps({"method": "arc2face", "base_model": "/etc"}): "base_model is chosen when the server starts",
        json.dumps({"method": "arc2face", "steps": "many"}): "steps: expected a whole number",
        json.dumps({"method": "arc2face", "width": 100}): "--width must be a multiple of 8",
        json.dumps({"method": "arc2face", "steps": 100000}): "above the limit of 1000",
        json.dumps({"method": "arc2face", "face_weights": [0.5]}): "blend identities in",
        json.dumps([1, 2]): "expected a JSON object",
        "{not json": "not valid JSON",
    }
    for params, expected in cases.items():
        parts = [("faces", (n, d, "image/jpeg")) for n, d in face]
        response = client.post("/api/jobs", data={"params": params}, files=parts)
        assert response.status_code == 422, (params, response.text)
        assert expected in response.json()["detail"], (params, response.json())
    response = client.post("/api/jobs", data={"params": "{}", "prompt": "x"}, files=[("faces", face[0])])
    assert response.status_code == 422 and "unknown form field 'prompt'" in response.json()["detail"]


def test_path_traversal_is_refused(real, tmp_path):
    client, service, faces = real
    status = finished(client, submit(client, {"method": BASELINE, "steps": 2}).json())
    job = status["id"]
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(8, 8))
    for path in (
        "/api/jobs/..%2F..%2Fetc%2Fpasswd",
        "/api/jobs/%2e%2e",
        "/api/jobs/not-a-job-id",
        f"/api/jobs/{'0' * 32}",  # well formed, unknown
        f"/api/jobs/{job}/images/..%2F..%2F{outside.name}",
        f"/api/jobs/{job}/images/%2e%2e%2fmetadata.json",
        f"/api/jobs/{job}/images/.hidden.png",
        f"/api/jobs/{job}/images/other_0000.png",
        f"/api/jobs/{job}/images/{outside}",
        f"/api/jobs/{job[:-1]}x/images/{status['images'][0]}",
    ):
        response = client.get(path)
        assert 400 <= response.status_code < 500, (path, response.status_code)
        assert response.headers["content-type"].startswith("application/json"), path
    for name in ("../secret.png", "/etc/passwd", "a/b.png", "", ".png"):
        with pytest.raises(ServiceError):
            service.file_path(job, name)
    record = service.get(job)
    (record.folder / "link.png").symlink_to(outside)  # a name the job lists, pointing out of its folder
    record.images.append("link.png")
    try:
        with pytest.raises(ServiceError, match="has no file"):
            service.file_path(job, "link.png")
    finally:
        record.images.remove("link.png")
    assert client.get(status["urls"]["images"][0]).status_code == 200


# ---- a server on fake pipelines -----------------------------------------------------------------------------------


class FakeAnalyzer:
    def analyze(self, image: Any, select: Any = "all", name: str | None = None) -> list[Any]:
        from idfusion.faces import Face

        landmarks = np.array([[20, 20], [40, 20], [30, 30], [22, 40], [38, 40]], np.float32)
        return [Face(bbox=np.array([10, 10, 50, 50], np.float32), det_score=1.0, landmarks=landmarks, detector="fake")]


class FakePipe:
    """Sleeps ``step_s`` per step, calls the step callback, counts how many run at once; fails on request."""

    active = 0
    most = 0
    lock = threading.Lock()

    def __init__(self, name: str, step_s: float = 0.05) -> None:
        self.name, self.step_s = name, step_s

    def default_face_analyzer(self) -> FakeAnalyzer:
        return FakeAnalyzer()

    def __call__(self, *, num_inference_steps: int = 4, prompt: str = "", callback_on_step_end=None, **call: Any):
        from PIL import Image

        from idfusion.pipelines.core import IdentityPipelineOutput

        with FakePipe.lock:
            FakePipe.active += 1
            FakePipe.most = max(FakePipe.most, FakePipe.active)
        try:
            for step in range(num_inference_steps):
                time.sleep(self.step_s)
                if callback_on_step_end is not None:
                    callback_on_step_end(self, step, None, {})
            if prompt == "fail":
                raise ValueError("the prompt asked this job to fail")
            if prompt == "crash":
                raise RuntimeError("boom")
        finally:
            with FakePipe.lock:
                FakePipe.active -= 1
        count = call.get("num_images_per_prompt", 1)
        images = [Image.new("RGB", (16, 16), (k * 40, 0, 0)) for k in range(count)]
        return IdentityPipelineOutput(images, [{"method": self.name, "seed": k} for k in range(count)], [])


@pytest.fixture(scope="module")
def fake(tmp_path_factory, faces_dir):
    from idfusion.registry import get_method

    names = ("arc2face", "adaface", "fact")
    catalogue = [ServedMethod(get_method(name), f"fake/{name}", "model") for name in names]
    cache = PipelineCache(max_items=3, loader=lambda spec, model, settings, options: FakePipe(spec.name))
    config = ServerConfig(out_dir=tmp_path_factory.mktemp("serve-fake"), concurrency=2, max_queued=3)
    service = JobService(catalogue, config, cache=cache)
    with serve_in_background(create_app(service, ui=False)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        yield c, service, url, [("obama.jpg", (faces_dir / "obama.jpg").read_bytes())]
    service.close()


def test_concurrent_jobs_respect_the_limit(fake):
    client, _, _, face = fake
    FakePipe.most = 0
    jobs = [submit(client, {"method": name, "steps": 20}, face).json() for name in ("arc2face", "adaface", "fact")]
    ids, seen = {job["id"] for job in jobs}, set()
    while True:
        states = [s["state"] for s in client.get("/api/jobs").json() if s["id"] in ids]  # one moment
        seen.add(tuple(sorted(states)))
        assert states.count("running") <= 2
        if all(state == "done" for state in states):
            break
        time.sleep(0.02)
    assert ("queued", "running", "running") in seen  # the third waited while two ran
    assert FakePipe.most == 2


def test_a_full_queue_is_refused(fake):
    client, _, _, face = fake
    jobs = [submit(client, {"method": "arc2face", "steps": 20}, face) for _ in range(6)]
    codes = [r.status_code for r in jobs]
    assert 429 in codes and "queue is full" in next(r for r in jobs if r.status_code == 429).json()["detail"]
    for response in jobs:
        if response.status_code == 202:
            client.post(response.json()["urls"]["cancel"])


def test_cancel_works(fake):
    client, _, _, face = fake
    running = submit(client, {"method": "adaface", "steps": 400}, face).json()
    queued = [submit(client, {"method": "adaface", "steps": 400}, face).json() for _ in range(2)]
    deadline = time.monotonic() + 30
    while client.get(f"/api/jobs/{running['id']}").json()["progress"]["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiting = queued[-1]
    assert client.get(f"/api/jobs/{waiting['id']}").json()["state"] == "queued"
    response = client.post(f"/api/jobs/{waiting['id']}/cancel")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"  # at once
    response = client.post(f"/api/jobs/{running['id']}/cancel")
    assert response.status_code == 200
    status = finished(client, running)
    assert status["state"] == "cancelled" and status["progress"]["step"] < 400
    client.post(f"/api/jobs/{queued[0]['id']}/cancel")
    response = client.post(f"/api/jobs/{running['id']}/cancel")
    assert response.status_code == 409 and "already finished" in response.json()["detail"]


def test_the_server_keeps_serving_after_failing_jobs(fake):
    client, _, _, face = fake
    failed = finished(client, submit(client, {"method": "fact", "steps": 1, "prompt": "fail"}, face).json())
    assert failed["state"] == "failed" and failed["error"] == "the prompt asked this job to fail"
    crashed = finished(client, submit(client, {"method": "fact", "steps": 1, "prompt": "crash"}, face).json())
    assert crashed["state"] == "failed" and crashed["error"] == "internal error: RuntimeError: boom"
    assert client.get("/api/health").json()["ok"]
    done = finished(client, submit(client, {"method": "fact", "steps": 1}, face).json())
    assert done["state"] == "done" and done["images"]


def test_the_server_survives_clients_that_disconnect(fake):
    client, _, url, face = fake
    host, port = url.removeprefix("http://").split(":")
    job = submit(client, {"method": "arc2face", "steps": 30}, face).json()
    with socket.create_connection((host, int(port))) as raw:  # waits for the job's end, then hangs up
        raw.sendall(f"GET /api/jobs/{job['id']}?wait=30 HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        time.sleep(0.1)
    body = b'--b\r\nContent-Disposition: form-data; name="faces"; filename="a.jpg"\r\n\r\n' + face[0][1][:1000]
    with socket.create_connection((host, int(port))) as raw:  # an upload cut off halfway
        raw.sendall(
            f"POST /api/jobs HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body) * 2}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.1)
    assert client.get("/api/health").status_code == 200
    assert finished(client, job)["state"] == "done"


def test_a_method_whose_weights_fail_to_load_is_a_clear_error(tmp_path, faces_dir):
    from idfusion.errors import ModelFilesError
    from idfusion.registry import get_method
    from idfusion.server.service import JobRequest, Upload

    def missing(spec, model, settings, options):
        raise ModelFilesError(f"{model}: arc2face/config.json is missing")

    catalogue = [ServedMethod(get_method("arc2face"), "gone/arc2face", "model")]
    service = JobService(catalogue, ServerConfig(out_dir=tmp_path), cache=PipelineCache(loader=missing))
    try:
        face = Upload((faces_dir / "obama.jpg").read_bytes(), "obama.jpg")
        with pytest.raises(ServiceError, match="config.json is missing") as raised:
            service.submit(JobRequest("arc2face", {}, [face]))
        assert raised.value.status == 503
    finally:
        service.close()


# ---- access -------------------------------------------------------------------------------------------------------


def test_a_request_without_the_token_is_refused(tmp_path, faces_dir):
    from idfusion.registry import get_method

    token = "s3cret-token_for.tests"
    catalogue = [ServedMethod(get_method("arc2face"), "fake/arc2face", "model")]
    cache = PipelineCache(loader=lambda spec, model, settings, options: FakePipe(spec.name, 0.0))
    service = JobService(catalogue, ServerConfig(out_dir=tmp_path, token=token), cache=cache)
    face = [("obama.jpg", (faces_dir / "obama.jpg").read_bytes())]
    try:
        with serve_in_background(create_app(service, ui=False)) as url:
            with httpx.Client(base_url=url, timeout=TIMEOUT) as anonymous:
                response = anonymous.get("/api/health")
                assert response.status_code == 401 and "access token" in response.json()["detail"]
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert anonymous.get("/docs").status_code == 401
                assert submit(anonymous, {"method": "arc2face"}, face).status_code == 401
                wrong = anonymous.get("/api/health", headers={"Authorization": "Bearer nope-nope-nope"})
                assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong access token"
                visit = anonymous.get("/?token=" + token)
                assert visit.status_code == 303 and visit.headers["location"] == "/"
                assert "HttpOnly" in visit.headers["set-cookie"] and "SameSite=Strict" in visit.headers["set-cookie"]
            with httpx.Client(base_url=url, timeout=TIMEOUT, cookies={"idfusion_token": token}) as browser:
                assert browser.get("/api/health").status_code == 200  # the UI's cookie
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=url, timeout=TIMEOUT, headers=headers) as client:
                assert client.get("/api/health").status_code == 200
                assert (
                    finished(client, submit(client, {"method": "arc2face", "steps": 1}, face).json())["state"]
                    == "done"
                )
                evil = client.post("/api/jobs", headers={"Origin": "http://evil.example"})
                assert evil.status_code == 403 and "cross-origin" in evil.json()["detail"]
                rebound = client.get("/api/health", headers={"Host": "evil.example"})
                assert rebound.status_code == 403  # DNS rebinding onto a loopback server
    finally:
        service.close()


def test_binding_beyond_localhost_needs_the_explicit_flag_and_a_token(monkeypatch):
    from idfusion.cli.main import main

    monkeypatch.delenv("IDFUSION_TOKEN", raising=False)
    assert check_bind("127.0.0.1", allow_remote=False, token=None) is None
    assert check_bind("localhost", allow_remote=False, token="given-token") == "given-token"
    with pytest.raises(BindError, match="--allow-remote"):
        check_bind("0.0.0.0", allow_remote=False, token=None)
    generated = check_bind("0.0.0.0", allow_remote=True, token=None)
    assert generated and len(generated) >= 24
    monkeypatch.setenv("IDFUSION_TOKEN", "from-the-environment")
    assert check_bind("::", allow_remote=True, token=None) == "from-the-environment"
    assert main(["serve", "--host", "0.0.0.0"]) == 1


def test_the_offline_default_serves_the_synthetic_world():
    from idfusion.world.demo import world_methods

    served = {m.name: m for m in serve_catalogue(official=False)}
    assert set(served) == {BASELINE, *(name for name, _ in world_methods())}
    assert not served[BASELINE].conditioned
    assert all(m.face_analysis == ("world", "world") for m in served.values() if m.name != BASELINE)
    assert BASELINE not in {m.name for m in serve_catalogue({"arc2face": "x/y"}, official=False)}
