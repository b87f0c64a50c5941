"""The job service: the one implementation of the work behind the HTTP API and the web UI.

A request (:class:`JobRequest`: a served method, JSON parameters, uploads) is checked in full when it is submitted:
every upload's size, pixels and format, every parameter against the method (:func:`idfusion.jobs.check_job`), and
each face photo against the method's own face analyzer. It then waits in a queue for one of ``concurrency`` worker
threads, which runs it through :func:`idfusion.jobs.run_job` (or the entry's own runner) with one shared
:class:`~idfusion.jobs.PipelineCache`, reporting progress per sampling step and polling for cancellation, and saves
the PNGs (metadata embedded) with :func:`idfusion.jobs.save_results` into the job's own folder
``<out_dir>/<job id>/``. A failing job records its one-line message; the workers and the server carry on.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FaceError, IdfusionError, ImageError, ImageTooLargeError
from ..jobs import GenerationJob, JobCancelled, LoadSettings, PipelineCache
from .catalogue import RequestError, ServedMethod
from .config import ServerConfig

__all__ = [
    "JOB_ID",
    "FILE_NAME",
    "FaceReport",
    "Job",
    "JobRequest",
    "JobService",
    "JobState",
    "ServiceError",
    "Upload",
    "error_message",
]

logger = logging.getLogger(__name__)

#: a job id: 32 lowercase hex digits (uuid4), the name of the job's folder
JOB_ID = re.compile(r"[0-9a-f]{32}")
#: a result file name: one path component, no leading dot
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.png")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9 _.()+-]")


class ServiceError(IdfusionError):
    """A request the service refuses; ``status`` is the HTTP status (400, 404, 409, 413, 422, 429)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class Upload:
    """An uploaded file: its bytes and the client's file name (for messages only; never a path here)."""

    data: bytes
    name: str = "upload"

    @staticmethod
    def named(data: bytes, name: str | None, fallback: str) -> Upload:
        clean = _NAME_CHARS.sub("_", (name or "").replace("\\", "/").rsplit("/", 1)[-1])[:100]
        return Upload(bytes(data), clean or fallback)


@dataclass
class JobRequest:
    """What a client asks for.

    Attributes:
        method: a served method's name.
        params: JSON parameters: ``num_images``, ``seed``, ``face_weights``, ``face_index``, ``template`` (an object:
            ``face_index``, ``strength``, ``use_pose``), ``score`` (add the world judge's identity scores), and the
            method's options by name (``prompt``, ``steps``, ...; ``GET /api/methods`` lists them).
        faces: the face photos (1 to ``max_faces``; optional references for the baseline).
        files: other uploads by field name: the method's image options (``pose_image``...) and ``template``.
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    faces: list[Upload] = field(default_factory=list)
    files: dict[str, Upload] = field(default_factory=dict)


@dataclass
class FaceReport:
    """What the method's face analyzer finds in one photo: ``ok`` when the job can use it."""

    ok: bool
    message: str
    count: int = 0
    chosen: int | None = None
    boxes: list[list[float]] = field(default_factory=list)
    preview: np.ndarray | None = None  # the chosen face (box and landmarks drawn), else the photo

    def describe(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "message": self.message,
            "count": self.count,
            "chosen": self.chosen,
            "boxes": self.boxes,
        }


@dataclass
class Job:
    """One job's record. Read it through :meth:`status`; the service updates it."""

    id: str
    method: str
    folder: Path
    generation: GenerationJob | None
    score: bool = False
    state: JobState = JobState.QUEUED
    phase: str = "queued"
    step: int = 0
    steps: int = 0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    sheet: str | None = None
    scores: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def files(self) -> list[str]:
        return [*self.images, *([self.sheet] if self.sheet else [])]

    def status(self) -> dict[str, Any]:
        fraction = self.step / self.steps if self.steps else (1.0 if self.state is JobState.DONE else 0.0)
        return {
            "id": self.id,
            "method": self.method,
            "state": self.state.value,
            "phase": self.phase,
            "progress": {"step": self.step, "steps": self.steps, "fraction": round(fraction, 4)},
            "error": self.error,
            "warnings": list(self.warnings),
            "images": list(self.images),
            "sheet": self.sheet,
            "scores": self.scores,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }


def error_message(error: BaseException) -> str:
    """The one line a user reads for a failed job, as the CLI prints it."""
    if isinstance(error, (IdfusionError, ValueError)):
        return str(error)
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return (
            f"out of memory; make fewer or smaller images at once (num_images, width/height) ({type(error).__name__})"
        )
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}"
    return f"internal error: {type(error).__name__}: {error}"


class JobService:
    """Checked submission, a bounded queue, ``config.concurrency`` workers, progress, cancellation, results.

    Args:
        catalogue: the served methods (:func:`~idfusion.server.catalogue.serve_catalogue`).
        config: limits and the output folder.
        settings: how pipelines load (device, dtype...); default: CPU, never downloading, no progress bars.
        cache: the shared pipeline cache; default one of ``config.cache_size`` loading through each entry's hook.
    """

    def __init__(
        self,
        catalogue: Sequence[ServedMethod],
        config: ServerConfig | None = None,
        *,
        settings: LoadSettings | None = None,
        cache: PipelineCache | None = None,
    ) -> None:
        from ..atomic import check_output_folder

        self.config = config or ServerConfig()
        self.methods: dict[str, ServedMethod] = {m.name: m for m in catalogue}
        if not self.methods:
            raise ValueError("a job service needs at least one served method")
        self.settings = settings or LoadSettings(local_files_only=True, progress_bar=False)
        self.cache = cache or PipelineCache(self.config.cache_size, loader=self._load)
        self.out_dir = self.config.out_dir.expanduser().resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        check_output_folder(self.out_dir)  # an unwritable folder fails at start, not in the first job
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: list[Job] = []  # FIFO of queued jobs, guarded by _lock
        self._closing = threading.Event()
        self._analyzers: dict[str, Any] = {}
        self._analyzer_locks: dict[str, threading.Lock] = {name: threading.Lock() for name in self.methods}
        self._judge: Any = None
        self._judge_lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, name=f"idfusion-job-{k}", daemon=True)
            for k in range(self.config.concurrency)
        ]
        for worker in self._workers:
            worker.start()

    # ---- loading -------------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Import torch and diffusers now, so that the first request does not wait for them (call it in a thread)."""
        import importlib

        importlib.import_module("idfusion.pipelines.core")

    def _load(self, spec: Any, model: str | None, settings: LoadSettings, load_options: Any) -> Any:
        served = self.methods[spec.name]
        pipe = served.hook("load")(spec, model, settings, load_options)
        if served.face_analysis is not None:
            pipe.configure_face_analysis(*served.face_analysis)
        return pipe

    def _analyzer(self, served: ServedMethod) -> Any:
        """The face analyzer the method's pipeline uses (taken from the pipeline once, then kept)."""
        analyzer = self._analyzers.get(served.name)
        if analyzer is None:
            try:
                with self.cache.use(served.spec, served.model, self.settings, {}) as pipe:
                    analyzer = pipe.default_face_analyzer()
            except Exception as error:  # missing weights and the like: the client learns why, the server stays up
                logger.warning("%s: cannot load: %s", served.name, error_message(error))
                raise ServiceError(f"{served.title} cannot be loaded: {error_message(error)}", 503) from error
            self._analyzers[served.name] = analyzer
        return analyzer

    # ---- uploads -------------------------------------------------------------------------------------------------

    def check_image(self, upload: Upload) -> Any:
        """The decoded upload (:class:`~idfusion.images.LoadedImage`); 413 beyond the byte or pixel limit, 422 when
        it is not a readable image."""
        from ..images import load_image

        limit = self.config.max_upload_bytes
        if len(upload.data) > limit:
            raise ServiceError(
                f"{upload.name}: {len(upload.data):,} bytes; uploads are limited to {limit:,} bytes "
                f"({limit / 2**20:.0f} MiB)",
                413,
            )
        try:
            return load_image(upload.data, max_pixels=self.config.max_pixels, name=upload.name)
        except ImageTooLargeError as error:
            raise ServiceError(str(error), 413) from error
        except ImageError as error:
            raise ServiceError(str(error), 422) from error

    def inspect_face(self, method: str, upload: Upload, index: int | None = None) -> FaceReport:
        """Find the faces of one photo with ``method``'s analyzer: which one the job uses, or why none can be.

        Raises:
            ServiceError: an unknown method, or an upload that is too large or not an image.
        """
        from ..faces.draw import draw_faces

        served = self._served(method)
        loaded = self.check_image(upload)
        if not served.conditioned:
            return FaceReport(True, f"{upload.name}: a reference only ({served.title} reads the prompt)", 0)
        analyzer = self._analyzer(served)
        with self._analyzer_locks[served.name]:
            try:
                faces = analyzer.analyze(loaded.array, select="all", name=upload.name)
            except FaceError as error:
                return FaceReport(False, str(error), 0, preview=loaded.array)
        boxes = [[round(float(v), 1) for v in face.bbox] for face in faces]
        if index is not None and index >= len(faces):
            message = f"{upload.name}: face index {index} requested, but the photo has {len(faces)} face(s)"
            return FaceReport(False, message, len(faces), None, boxes, draw_faces(loaded.array, faces))
        chosen = index if index is not None else max(range(len(faces)), key=lambda i: faces[i].area)
        if len(faces) == 1:
            message = f"{upload.name}: one face found"
        elif index is not None:
            message = f"{upload.name}: {len(faces)} faces found; using face {index} from the left (face_index)"
        else:
            message = (
                f"{upload.name}: {len(faces)} faces found; using the largest, face {chosen} from the left; choose "
                "another with face_index (0 = leftmost)"
            )
        preview = _crop(draw_faces(loaded.array, faces), faces[chosen].bbox)
        return FaceReport(True, message, len(faces), chosen, boxes, preview)

    # ---- jobs ----------------------------------------------------------------------------------------------------

    def _served(self, method: str) -> ServedMethod:
        served = self.methods.get(method) if isinstance(method, str) else None
        if served is None:
            raise ServiceError(f"unknown method {method!r}; this server offers {', '.join(self.methods)}")
        return served

    def _queue_room(self) -> None:
        queued = sum(job.state is JobState.QUEUED for job in self._jobs.values())
        if queued >= self.config.max_queued:
            raise ServiceError(f"the queue is full ({queued} jobs waiting); try again later", 429)

    def submit(self, request: JobRequest) -> Job:
        """Check ``request`` in full and queue it.

        Raises:
            ServiceError: with the HTTP status for the client: 413 (too large), 422 (not an image, no face, a
                parameter the method does not take...), 429 (the queue is full).
        """
        if self._closing.is_set():
            raise ServiceError("the server is shutting down", 503)
        served = self._served(request.method)
        with self._lock:
            self._queue_room()  # before the expensive checks
        faces, files, params = request.faces, request.files, dict(request.params)
        limit = self.config.max_faces
        if len(faces) > limit or (served.conditioned and not faces):
            low = 1 if served.conditioned else 0
            raise ServiceError(f"{served.title} takes {low} to {limit} face photos, got {len(faces)}")
        for upload in [*faces, *files.values()]:
            self.check_image(upload)
        score = params.pop("score", False)
        if not isinstance(score, bool):
            raise ServiceError(f"score: expected true or false, got {score!r}")
        try:
            generation = served.job(params, [u.data for u in faces], {k: u.data for k, u in files.items()})
            served.hook("check")(generation)
        except (RequestError, IdfusionError, ValueError) as error:
            raise ServiceError(str(error), getattr(error, "status", 422)) from error
        warnings = []
        if served.conditioned:
            for upload in faces:
                report = self.inspect_face(served.name, upload, generation.photo_face_index)
                if not report.ok:
                    raise ServiceError(report.message, 422)
                if report.count > 1:
                    warnings.append(report.message)
        with self._lock:
            self._queue_room()
            job_id = uuid.uuid4().hex
            folder = self.out_dir / job_id
            folder.mkdir()  # a new uuid: never an existing folder
            job = Job(job_id, served.name, folder, generation, score=score, warnings=warnings)
            self._jobs[job_id] = job
            self._pending.append(job)
            self._changed.notify_all()
        logger.info("job %s queued (%s)", job_id, served.name)
        return job

    def get(self, job_id: str) -> Job:
        """The job's record; 400 for a malformed id, 404 for an unknown one."""
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise ServiceError("not a job id (32 hexadecimal digits)", 400)
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ServiceError(f"no job {job_id} on this server", 404)
        return job

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def statuses(self) -> list[dict[str, Any]]:
        """Every remembered job's status, taken at one moment (states change under the same lock)."""
        with self._lock:
            return [job.status() for job in self._jobs.values()]

    def wait(self, job_id: str, timeout: float) -> Job:
        """The job once it has finished, or after ``timeout`` seconds, whichever comes first."""
        job = self.get(job_id)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while not job.state.finished and not self._closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 1.0))
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or a running one at its next sampling step; 409 when it has finished."""
        job = self.get(job_id)
        with self._lock:
            if job.state.finished:
                raise ServiceError(f"job {job_id} has already finished ({job.state.value})", 409)
            job.cancel_requested.set()
            if job.state is JobState.QUEUED:
                self._pending.remove(job)
                self._finish(job, JobState.CANCELLED)
            else:
                job.phase = "cancelling"
        logger.info("job %s: cancel requested", job_id)
        return job

    def file_path(self, job_id: str, name: str) -> Path:
        """The path of one of the job's result files: only names the job wrote, only inside its own folder."""
        job = self.get(job_id)
        if not isinstance(name, str) or not FILE_NAME.fullmatch(name):
            raise ServiceError("not a result file name", 400)
        if name not in job.files:
            raise ServiceError(f"job {job_id} has no file {name}", 404)
        folder = job.folder.resolve()
        path = (folder / name).resolve()
        if path.parent != folder or not path.is_file():
            raise ServiceError(f"job {job_id} has no file {name}", 404)
        return path

    def metadata(self, job_id: str) -> list[dict[str, Any]]:
        """Each image's embedded metadata, read back from its PNG."""
        from ..outputs import read_generation_metadata

        job = self.get(job_id)
        return [{"image": n, "metadata": read_generation_metadata(self.file_path(job_id, n))} for n in job.images]

    def metadata_file(self, job_id: str) -> Path:
        """``metadata.json`` in the job's folder (written once): every image's metadata, for downloads."""
        from ..atomic import atomic_write_bytes

        job = self.get(job_id)
        path = job.folder / "metadata.json"
        if not path.is_file():
            text = json.dumps(self.metadata(job_id), indent=1, ensure_ascii=False, default=str)
            atomic_write_bytes(path, text.encode("utf-8"))
        return path

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running and stop the workers."""
        self._closing.set()
        with self._lock:
            for job in self._pending:
                job.cancel_requested.set()
                self._finish(job, JobState.CANCELLED)
            self._pending.clear()
            self._changed.notify_all()
        for worker in self._workers:
            worker.join(timeout)

    # ---- the workers ---------------------------------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._changed:
            while not self._pending and not self._closing.is_set():
                self._changed.wait()
            if self._closing.is_set():
                return None
            job = self._pending.pop(0)
            job.state, job.phase, job.started = JobState.RUNNING, "loading", time.time()
            return job

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                self._run(job)
            except Exception:  # never lose a worker, whatever a job does
                logger.exception("job %s: unexpected failure outside the job", job.id)
                with self._lock:
                    if not job.state.finished:
                        self._finish(job, JobState.FAILED, error="internal error while finishing the job")

    def _run(self, job: Job) -> None:
        from ..jobs import save_results

        served = self.methods[job.method]

        def progress(step: int, steps: int) -> None:
            job.step, job.steps = step, steps
            if job.phase != "cancelling":
                job.phase = "sampling"

        def should_cancel() -> bool:
            return job.cancel_requested.is_set() or self._closing.is_set()

        generation = job.generation
        try:
            result = served.hook("run")(
                generation, self.settings, cache=self.cache, progress=progress, should_cancel=should_cancel
            )
            job.phase = "saving"
            paths = save_results(result, job.folder, served.name, sheet=True)
            count = len(result.images)
            images, sheet = [p.name for p in paths[:count]], next((p.name for p in paths[count:]), None)
            scores = self._scores(generation, result.images) if job.score else None
        except JobCancelled:
            with self._lock:
                self._finish(job, JobState.CANCELLED)
            logger.info("job %s cancelled", job.id)
            return
        except Exception as error:  # the job fails; the server does not
            message = error_message(error)
            if message.startswith("internal error"):
                logger.exception("job %s failed", job.id)
            else:
                logger.info("job %s failed: %s", job.id, message)
            with self._lock:
                self._finish(job, JobState.FAILED, error=message)
            return
        with self._lock:
            job.images, job.sheet, job.scores = images, sheet, scores
            self._finish(job, JobState.DONE)
        logger.info("job %s done: %s", job.id, ", ".join(images))

    def _finish(self, job: Job, state: JobState, *, error: str | None = None) -> None:
        """Record the end of ``job`` (the caller holds ``_lock``) and forget the oldest finished jobs."""
        job.state, job.phase, job.error, job.finished = state, state.value, error, time.time()
        job.generation = None  # the uploads' bytes are not needed any more
        finished = [key for key, item in self._jobs.items() if item.state.finished]
        for key in finished[: max(0, len(finished) - self.config.max_jobs_kept)]:
            del self._jobs[key]
        self._changed.notify_all()

    # ---- the world judge -----------------------------------------------------------------------------------------

    def _scores(self, generation: GenerationJob, images: Sequence[Any]) -> dict[str, Any]:
        """The world judge's identity score of each image: the cosine similarity of its largest face to the mean
        reference face (same person above the judge's threshold), ``None`` where it finds no world face."""
        from ..faces import FaceAnalyzer

        with self._judge_lock:
            if self._judge is None:
                self._judge = FaceAnalyzer("world", "world-judge", crops=())
            judge = self._judge

            def embedding(image: Any) -> np.ndarray | None:
                try:
                    face = judge.analyze(np.asarray(image), select="largest")[0]
                except (FaceError, ImageError):
                    return None
                return face.embedding / np.linalg.norm(face.embedding)

            references = [e for e in (embedding(_decoded(f)) for f in generation.faces) if e is not None]
            threshold = judge.recognizer.threshold
            if not references:
                return {
                    "scores": [None] * len(images),
                    "threshold": threshold,
                    "note": "no world face in the references",
                }
            reference = np.mean(references, axis=0)
            reference /= np.linalg.norm(reference)
            outputs = [embedding(image) for image in images]
        scores = [None if e is None else round(float(e @ reference), 4) for e in outputs]
        return {"scores": scores, "threshold": threshold, "note": None}


def _decoded(data: Any) -> Any:
    from ..images import load_image

    return load_image(data).array


def _crop(image: np.ndarray, box: Sequence[float], margin: float = 0.35) -> np.ndarray:
    """A square crop around ``box`` with ``margin`` of its size on each side, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    height, width = image.shape[:2]
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    right, bottom = int(min(width, cx + side / 2)), int(min(height, cy + side / 2))
    return image[top:bottom, left:right] if right > left and bottom > top else image
