"""The worker: takes queued jobs one at a time and turns each into a stored video and a result.

One worker per GPU. It loads the generator once (the process owner passes a factory), then loops:
requeue jobs whose worker died, claim the oldest queued job, fetch and decode its keyframes, run
the generator (`generator(request, on_step=...)`, see `generation.Generator`) with a callback
after every denoising step that logs it (`step 12/50`) and stops the job once it was cancelled,
encode the mp4, store it, and write the result (fal's output, or the error to replay). It runs
in its own thread (`start()`) or in the foreground (`run_forever()`), never on the event loop. While a job runs, a heartbeat thread renews its lease, so a long model step does not look
like a dead worker.

Many workers (one per GPU, on any number of machines) can share one job store. Each claim carries
a lease token: the heartbeat, the final `complete` and a graceful `release` are fenced on it, so a
worker that lost its lease (it stalled past `LEASE_S`, and another worker took the job over) stops
at its next step and its result is dropped, never written over the new one. Cancels requested
through any API process reach the worker through the job's `cancel_requested` flag, read between
steps at most every `CANCEL_POLL_S`.

Error results (replayed by the result endpoint, the status shows COMPLETED with `error`):
    422  a keyframe or sketch URL cannot be fetched or decoded, keyframe_lengths (or sketch frames, the
         frame multiplier) do not fit the model, sketches sent to a worker without sketch weights
    400  cancelled (error_type request_cancelled)
    503  out of GPU memory        500  anything else ("Internal Server Error")
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tooncrafter.generation import (
    BatchingGenerator,
    GenerationCancelled,
    GenerationRequest,
    Generator,
    SketchGuidanceUnavailable,
    random_seed,
)
from tooncrafter.logs import request_id_var
from tooncrafter.media.images import decode_image, image_size
from tooncrafter.schema import (
    ContractError,
    File,
    ToonCrafterInput,
    ToonCrafterOutput,
    check_request_fits_model,
    describe_error,
)
from tooncrafter.service.background import BackgroundLoop
from tooncrafter.service.gpu_memory import generator_device, gpu_memory
from tooncrafter.service.inputs import FetchLimits, InputError, fetch_input
from tooncrafter.service.jobs import (
    CANCELLED_OUTCOME,
    Job,
    JobOutcome,
    JobStore,
    WorkerReport,
    field_error_body,
)
from tooncrafter.service.storage.base import UPLOAD_KEY_PREFIX, Storage, public_file_url
from tooncrafter.service.stored_inputs import StoredInputMissing, load_input
from tooncrafter.settings import Settings

logger = logging.getLogger(__name__)

GeneratorFactory = Callable[[Settings], Generator]


def default_generator_factory(settings: Settings) -> Generator:
    """The real pipeline from the settings' checkpoint, device and dtype (imported here: torch is heavy)."""
    from tooncrafter.pipeline import ToonCrafterPipeline

    return ToonCrafterPipeline.from_pretrained(
        settings.checkpoint, device=settings.device, dtype=settings.dtype, offload=settings.offload, compile=settings.compile,
        sketch_checkpoint=settings.sketch_checkpoint,
    )


class _ShuttingDown(Exception):
    """The worker is stopping mid-job: the job goes back to the queue for the next worker."""


class _LeaseLost(Exception):
    """Another worker owns the job now (our lease expired): stop, write nothing."""


class JobFailed(Exception):
    """A job ends with this HTTP error (code + fal-style body) instead of an output."""

    def __init__(self, status_code: int, body: dict[str, Any], error: str, error_type: str | None = None) -> None:
        super().__init__(error)
        self.outcome = JobOutcome(status_code=status_code, body=body, error=error, error_type=error_type)


def field_error(loc: list[Any], message: str, error_type: str = "value_error") -> JobFailed:
    """A job's 422 naming the field."""
    body = field_error_body(loc, message, error_type)
    return JobFailed(422, body, body["message"], None)


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class _Heartbeat:
    """Renews a job's lease every `period_s` in a daemon thread; `lost` turns True if the lease was taken."""

    def __init__(
        self, store: JobStore, job_id: str, worker_id: str, lease_s: float, period_s: float, lease_token: str | None = None
    ) -> None:
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(store, job_id, worker_id, lease_s, period_s, lease_token),
            name="tooncrafter-heartbeat",
            daemon=True,
        )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(
        self, store: JobStore, job_id: str, worker_id: str, lease_s: float, period_s: float, lease_token: str | None
    ) -> None:
        while not self._stop.wait(period_s):
            try:
                if not store.heartbeat(job_id, worker_id, lease_s, lease_token):
                    self.lost = True
                    return
            except Exception:
                logger.exception("heartbeat for job %s failed", job_id)


class _CheckIn(BackgroundLoop):
    """Tells the job store every `period_s` that a worker is alive, with what it measured (`report`,
    for /metrics; `notify` sends a fresh one at once), and that it left when it stops.

    A thread of its own, so that a long model step never makes a busy worker look dead to /health."""

    thread_name = "tooncrafter-worker-check-in"

    def __init__(
        self, store: JobStore, worker_id: str, period_s: float, report: Callable[[], WorkerReport] | None = None
    ) -> None:
        super().__init__()
        self.store = store
        self.worker_id = worker_id
        self.period_s = period_s
        self.report = report

    def run_forever(self) -> None:
        hostname = socket.gethostname()
        while not self._stop.is_set():
            report = None
            try:
                report = self.report() if self.report is not None else None
            except Exception as exc:  # noqa: BLE001 - a failed measurement must not make the worker look dead
                logger.warning("worker report for /metrics failed: %s", exc)
            try:
                self.store.worker_check_in(self.worker_id, hostname, report=report)
            except Exception as exc:
                logger.warning("worker check-in failed: %s", exc)
            self._wake.wait(self.period_s)
            self._wake.clear()
        try:
            self.store.worker_check_out(self.worker_id)
        except Exception as exc:
            logger.warning("worker check-out failed: %s", exc)


@dataclass
class _JobRun:
    """One running job's own state: a worker runs several at once when `worker_batch_size` > 1."""

    job: Job
    batch: BatchingGenerator | None = None
    """The generator whose batch this job is a member of, until its generation is over."""
    heartbeat: _Heartbeat | None = None
    cancel_checked_at: float = 0.0
    cancel_seen: bool = False

    def leave_batch(self) -> None:
        """Once, when this job's generation has returned or will not run: the batch stops waiting for it."""
        if self.batch is not None:
            self.batch.leave_batch()
            self.batch = None


class Worker(BackgroundLoop):
    """Runs jobs from `store` with the generator `generator_factory(settings)` builds (once).

    Embedded in `tooncrafter serve` it runs in a daemon thread (`start`); `stop` ends it after the
    current step, and a job in progress goes back to the queue."""

    thread_name = "tooncrafter-worker"

    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        settings: Settings,
        generator_factory: GeneratorFactory = default_generator_factory,
        *,
        on_complete: Callable[[], None] | None = None,
        worker_id: str | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.storage = storage
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._factory = generator_factory
        self._on_complete = on_complete
        self._generator: Generator | None = None
        self._last_purge = 0.0
        self.load_error: BaseException | None = None
        self._draining = threading.Event()
        self._hand_back_at: float | None = None
        self.ready = threading.Event()
        self._check_in: _CheckIn | None = None
        self.steps_per_second: float | None = None
        """Denoising steps per second of the running (else the last) job, counting its conditioning."""

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def drain(self, grace_s: float) -> None:
        """Take no new job; let the running one finish within `grace_s`, past that hand it back to the
        queue after its current step (SIGTERM to `tooncrafter worker`: nothing lost, nothing run twice)."""
        self._hand_back_at = time.monotonic() + grace_s
        self._draining.set()
        self._wake.set()

    def load(self) -> None:
        """Build the generator (the model) once. Errors reach the caller: a process exits on them."""
        if self._generator is None:
            self._generator = self._factory(self.settings)

    def run_forever(self) -> None:
        """Load the generator (unless `load` did), check in as alive, then take jobs until `stop()`."""
        try:
            self.load()
        except Exception as exc:
            self.load_error = exc
            logger.error("the worker could not load the model, so it runs no job: %s", exc)
            return
        finally:
            self.ready.set()
        logger.info("worker %s ready", self.worker_id)
        check_in = self._check_in = _CheckIn(self.store, self.worker_id, self.settings.worker_checkin_s, self.report)
        check_in.start()
        try:
            while not self._stop.is_set() and not self._draining.is_set():
                try:
                    ran = self.run_once()
                except Exception:
                    logger.exception("worker loop failed; retrying")
                    ran = False
                if not ran:
                    self._wake.wait(self.settings.worker_poll_s)
                    self._wake.clear()
        finally:
            check_in.stop()

    def report(self) -> WorkerReport:
        """What the check-in sends for /metrics: the step rate and, on a CUDA device, the GPU memory."""
        memory = gpu_memory(generator_device(self._generator, self.settings.device))
        if memory is None:
            return WorkerReport(steps_per_second=self.steps_per_second)
        return WorkerReport(
            steps_per_second=self.steps_per_second,
            gpu_memory_allocated_bytes=memory.allocated_bytes,
            gpu_memory_reserved_bytes=memory.reserved_bytes,
            gpu_memory_peak_bytes=memory.peak_bytes,
        )

    # --- one job ------------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Housekeeping, then run the queued jobs there are, up to `worker_batch_size` at once; True if any ran."""
        self._housekeeping()
        jobs = self._claim_jobs()
        if not jobs:
            return False
        if len(jobs) == 1:
            self._run_job(jobs[0])
        else:
            self._run_batch(jobs)
        if self._check_in is not None:
            self._check_in.notify()  # the job's step rate and GPU peak reach /metrics now
        return True

    def _housekeeping(self) -> None:
        self.store.requeue_expired(self.settings.max_attempts)
        self.store.expire_start_deadlines()
        now = time.monotonic()
        if now - self._last_purge >= self.settings.purge_interval_s:
            self._last_purge = now
            self.purge()

    def purge(self) -> None:
        """Delete results older than their retention period with their files (outputs, stored inputs),
        then uploads and abandoned multipart parts older than theirs."""
        for key in self.store.purge_expired(self.settings.result_retention_s):
            try:
                self.storage.delete(key)
            except Exception:
                logger.exception("could not delete expired file %s", key)
        try:
            self.storage.purge(UPLOAD_KEY_PREFIX, time.time() - self.settings.upload_retention_s)
        except Exception:
            logger.exception("could not delete expired uploads")

    def _claim_jobs(self) -> list[Job]:
        """As many queued jobs as this worker runs together (one unless its generator batches)."""
        limit = self.settings.worker_batch_size if isinstance(self._generator, BatchingGenerator) else 1
        jobs: list[Job] = []
        while len(jobs) < limit and not self._draining.is_set():
            job = self.store.claim(self.worker_id, self.settings.lease_s)
            if job is None:
                break
            jobs.append(job)
        return jobs

    def _run_batch(self, jobs: list[Job]) -> None:
        """Run claimed jobs concurrently as one batch of the generator: their UNet calls merge each step,
        everything else (inputs, cancel, lease, result) stays each job's own."""
        generator = self._generator
        assert isinstance(generator, BatchingGenerator)
        logger.info("running %d jobs as one batch", len(jobs))
        generator.join_batch(len(jobs))  # every member before any starts, so none runs its steps alone
        threads = [
            threading.Thread(target=self._run_job, args=(job, generator), name=f"tooncrafter-job-{job.id[:8]}", daemon=True)
            for job in jobs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _run_job(self, job: Job, batch: BatchingGenerator | None = None) -> None:
        token = request_id_var.set(job.id)  # every log line of this job carries its request id
        run = _JobRun(job, batch)
        try:
            self._run_claimed_job(run)
        finally:
            run.leave_batch()
            request_id_var.reset(token)

    def _run_claimed_job(self, run: _JobRun) -> None:
        job = run.job
        logger.info("job %s: started (attempt %d)", job.id, job.attempts)
        started = time.perf_counter()
        with _Heartbeat(
            self.store, job.id, self.worker_id, self.settings.lease_s, self.settings.resolved_heartbeat_s, job.lease_token
        ) as heartbeat:
            run.heartbeat = heartbeat
            try:
                outcome = self._execute(run, started)
            except _ShuttingDown:
                self.store.release(job.id, self.worker_id, job.lease_token)
                logger.info("job %s: worker stopping, request requeued", job.id)
                return
            except _LeaseLost:
                logger.warning("job %s: lease lost (another worker took the job over); stopped", job.id)
                return
            except GenerationCancelled:
                self.store.add_log(job.id, "Request cancelled", "WARN")
                outcome = CANCELLED_OUTCOME
            except JobFailed as failure:
                self.store.add_log(job.id, failure.outcome.error or "Request failed", "ERROR")
                outcome = failure.outcome
            except Exception as exc:
                logger.exception("job %s failed", job.id)
                self.store.add_log(job.id, f"{type(exc).__name__}: {exc}", "ERROR")
                if _is_out_of_memory(exc):
                    outcome = JobOutcome(503, {"detail": "CUDA error: out of memory"}, "CUDA error: out of memory", None)
                else:
                    outcome = JobOutcome(500, {"detail": "Internal Server Error"}, "Internal Server Error", None)
            if heartbeat.lost:
                logger.warning("job %s: lease lost while running; result dropped", job.id)
                self._drop_files(outcome)
                return
        if self.store.complete(job.id, outcome, worker_id=self.worker_id, lease_token=job.lease_token):
            logger.info("job %s: completed with HTTP %d", job.id, outcome.status_code)
            if self._on_complete is not None:
                self._on_complete()
        else:
            self._drop_files(outcome)

    def _drop_files(self, outcome: JobOutcome) -> None:
        for key in outcome.file_keys:
            self.storage.delete(key)

    def _cancelled(self, run: _JobRun) -> bool:
        """Between steps: stop for shutdown or a lost lease; True once a cancel was requested (any process),
        read from the store at most every `cancel_poll_s`."""
        if self._stop.is_set() or (self._hand_back_at is not None and time.monotonic() >= self._hand_back_at):
            raise _ShuttingDown()
        if run.heartbeat is not None and run.heartbeat.lost:
            raise _LeaseLost()
        now = time.monotonic()
        if not run.cancel_seen and now - run.cancel_checked_at >= self.settings.cancel_poll_s:
            run.cancel_checked_at = now
            run.cancel_seen = self.store.is_cancel_requested(run.job.id)
        return run.cancel_seen

    def _execute(self, run: _JobRun, started: float) -> JobOutcome:
        assert self._generator is not None
        job = run.job
        try:
            params = ToonCrafterInput.model_validate(load_input(self.storage, job))
        except StoredInputMissing as exc:
            raise JobFailed(500, {"detail": str(exc)}, str(exc), "input_missing") from exc
        except ValidationError as exc:  # validated at submit; only an older server's row lands here
            first = exc.errors()[0]
            raise field_error(list(first["loc"]), describe_error(first), first["type"]) from exc
        try:
            check_request_fits_model(params, self._generator.num_frames)
        except ContractError as exc:
            raise field_error([exc.field], str(exc)) from exc
        if self._cancelled(run):
            raise GenerationCancelled()

        self.store.add_log(job.id, f"Loading {len(params.keyframe_image_urls)} keyframes")
        keyframes = self._load_keyframes(job, params.keyframe_image_urls)
        sketch_urls = [sketch.url for sketch in params.sketch_image_urls or ()]
        sketches = self._load_keyframes(job, sketch_urls, field="sketch_image_urls", noun="sketch") if sketch_urls else []
        seed = params.seed if params.seed is not None else random_seed()
        self.store.add_log(job.id, f"Generating with seed {seed}")

        generating_since = last_step_at = time.perf_counter()

        def on_step(step: int, total: int) -> None:
            """After every denoising step: the log line and the step's time (metrics), then stop if asked
            to (cancel, shutdown, lost lease). Step 1's time includes the conditioning before it."""
            nonlocal last_step_at
            now = time.perf_counter()
            self.store.add_step(job.id, step, total, now - last_step_at)
            last_step_at = now
            self.steps_per_second = step / max(now - generating_since, 1e-9)
            if self._cancelled(run):
                raise GenerationCancelled(f"cancelled after step {step} of {total}")

        try:
            result = self._generator(GenerationRequest.from_input(params, keyframes, seed, sketches), on_step=on_step)
        except SketchGuidanceUnavailable as exc:
            logger.error("job %s: sketch guidance is unavailable: %s", job.id, exc)
            raise field_error(
                ["sketch_image_urls"],
                "this server cannot use sketches (its sketch encoder weights or line extraction are not installed); "
                "send the request without sketch_image_urls, or ask the operator (TOONCRAFTER_SKETCH_CHECKPOINT)",
            ) from exc
        finally:
            run.leave_batch()  # the video encoding and upload below need no batch

        from tooncrafter.media.video import (
            encode_video,  # PyAV: loaded by processes that make videos only
        )

        self.store.add_log(job.id, f"Encoding {len(result.frames)} frames at {params.fps} fps")
        video = encode_video(result.frames, params.fps, format="mp4")
        stored = self.storage.put(video, content_type="video/mp4", file_name="output.mp4")
        output = ToonCrafterOutput(
            video=File(
                url=public_file_url(job.base_url, stored.key),
                content_type="video/mp4",
                file_name=stored.file_name,
                file_size=stored.size,
            ),
            seed=result.seed,
        )
        inference_time = time.perf_counter() - started
        self.store.add_log(job.id, f"Done in {inference_time:.2f} s")
        return JobOutcome(
            status_code=200, body=output.model_dump(mode="json"), inference_time=inference_time, file_keys=[stored.key]
        )

    def _load_keyframes(self, job: Job, urls: list[str], *, field: str = "keyframe_image_urls", noun: str = "keyframe") -> list:
        """Fetch every keyframe (or every sketch of `field`) concurrently and decode it; a bad one is a 422 naming
        its index. The pixel budget holds for each list."""
        limits = FetchLimits(
            max_bytes=self.settings.input_max_bytes,
            timeout_s=self.settings.input_timeout_s,
            max_redirects=self.settings.input_max_redirects,
            allow_private=self.settings.allow_private_urls,
        )
        own = [job.base_url] + ([self.settings.public_url] if self.settings.public_url else [])

        async def fetch_all() -> list[bytes | BaseException]:
            tasks = [fetch_input(url, limits=limits, storage=self.storage, own_base_urls=own) for url in urls]
            return await asyncio.gather(*tasks, return_exceptions=True)

        fetched = asyncio.run(fetch_all())
        for index, data in enumerate(fetched):
            if isinstance(data, InputError):
                raise field_error([field, index], f"could not load {noun} {index}: {data}")
            if isinstance(data, BaseException):
                raise data
        total = 0
        for index, data in enumerate(fetched):  # the request's pixel budget, from the headers, before decoding any
            try:
                width, height = image_size(data)
            except ValueError as exc:
                raise field_error([field, index], f"{noun} {index} is not a usable image: {exc}") from exc
            total += width * height
            if total > self.settings.request_max_pixels:
                raise field_error(
                    [field],
                    f"the {noun} images have more than {self.settings.request_max_pixels} pixels together "
                    f"(TOONCRAFTER_REQUEST_MAX_PIXELS); send smaller images (each is resized to the model's size anyway)",
                )
        images = []
        for index, data in enumerate(fetched):
            try:
                images.append(decode_image(data))
            except ValueError as exc:
                raise field_error([field, index], f"{noun} {index} is not a usable image: {exc}") from exc
        return images
