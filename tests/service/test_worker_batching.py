"""A worker with `worker_batch_size` > 1 runs queued jobs as one batch of the real pipeline: one UNet call per
step for all, and a job that fails, is cancelled or never reaches the model does not hold the others up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers.service import TINY_CHECKPOINT, make_settings, png_data_uri, tiny_pipeline_factory

from tooncrafter.generation import BatchingGenerator, GenerationRequest, GenerationResult, ProgressCallback
from tooncrafter.service.jobs.records import CANCELLED_OUTCOME
from tooncrafter.service.runtime import open_runtime

pytestmark = pytest.mark.skipif(not (TINY_CHECKPOINT / "model.ckpt").exists(), reason="tiny fixture checkpoint not available")
STEPS = 3


class CancellingPipeline:
    """The real pipeline; the job whose prompt is CANCEL asks for its own cancel at its first step."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.placement = pipeline.placement
        self.cancel: Any = None

    @property
    def num_frames(self) -> int:
        return self.pipeline.num_frames

    def join_batch(self, count: int) -> None:
        self.pipeline.join_batch(count)

    def leave_batch(self) -> None:
        self.pipeline.leave_batch()

    def __call__(self, request: GenerationRequest, *, on_step: ProgressCallback | None = None) -> GenerationResult:
        def step(index: int, total: int) -> None:
            if request.prompt == "CANCEL" and index == 1:
                self.cancel()
            if on_step is not None:
                on_step(index, total)

        return self.pipeline(request, on_step=step)


def _submit(runtime: Any, **body: Any) -> str:
    document = {"keyframe_image_urls": [png_data_uri(), png_data_uri((10, 200, 30))], "steps": STEPS, "seed": 1, **body}
    return runtime.store.submit(endpoint="fal-ai/toon-crafter", owner="", input=document, base_url="http://x").id


@pytest.mark.slow
def test_queued_jobs_run_as_one_batch_and_a_failing_or_cancelled_one_leaves(tmp_path: Path) -> None:
    pipeline = CancellingPipeline(tiny_pipeline_factory(None))
    assert isinstance(pipeline, BatchingGenerator)
    settings = make_settings(tmp_path, checkpoint=str(TINY_CHECKPOINT), worker_batch_size=4, cancel_poll_s=0)
    runtime = open_runtime(settings, generator_factory=lambda _settings: pipeline, start_worker=False)
    try:
        ok_a = _submit(runtime, seed=11, prompt="a")
        ok_b = _submit(runtime, seed=12, prompt="b", eta=0.0)
        cancelled = _submit(runtime, seed=13, prompt="CANCEL")
        broken = _submit(runtime, keyframe_image_urls=["data:image/png;base64,bm90IGFuIGltYWdl", png_data_uri()])
        extra = _submit(runtime, seed=14)  # past the batch size: the next round
        pipeline.cancel = lambda: runtime.store.request_cancel(cancelled)
        worker = runtime.worker
        worker.load()
        merged_before = pipeline.pipeline._unet.merged_calls

        assert worker.run_once()  # claims four, runs them together
        done = {job_id: runtime.store.get(job_id) for job_id in (ok_a, ok_b, cancelled, broken)}
        assert all(job.status == "COMPLETED" for job in done.values())
        assert done[ok_a].result_status_code == 200 and done[ok_b].result_status_code == 200
        assert done[broken].result_status_code == 422  # never reached the model, left the batch at once
        assert done[cancelled].error_type == CANCELLED_OUTCOME.error_type
        # three members reached the model; the merged calls: step 1 of all three, then the two that went on
        assert pipeline.pipeline._unet.merged_calls - merged_before == STEPS
        assert runtime.store.get(extra).status == "IN_QUEUE"
        assert pipeline.pipeline._unet.members == 0

        assert worker.run_once()  # alone now
        assert runtime.store.get(extra).result_status_code == 200
    finally:
        runtime.close()
