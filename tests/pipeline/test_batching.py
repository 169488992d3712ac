"""Batching across requests: one UNet call per step for all of them, each request as it would be alone."""

from __future__ import annotations

import threading

import numpy as np
import torch
from PIL import Image

from tooncrafter.batching import UNetBatcher
from tooncrafter.generation import GenerationCancelled, GenerationRequest
from tooncrafter.pipeline import ToonCrafterPipeline


def _request(seed: int, keyframes: int = 2, **options) -> GenerationRequest:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)) for _ in range(keyframes)]
    defaults = dict(keyframes=images, seed=seed, prompt=f"prompt {seed}", steps=3, cfg_scale=7.5, eta=1.0, motion_steps=10)
    return GenerationRequest(**{**defaults, **options})


def _assert_same_clip(batched: np.ndarray, alone: np.ndarray) -> None:
    """Equal up to the float summation order of a larger batch: at most one uint8 level, almost nowhere."""
    assert batched.shape == alone.shape
    diff = np.abs(batched.astype(np.int16) - alone.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_a_batch_merges_every_step_and_gives_each_request_its_own_clip(pipeline: ToonCrafterPipeline) -> None:
    requests = [_request(1), _request(2, eta=0.0), _request(3, keyframes=3)]  # own seeds, prompts, eta, windows
    alone = [pipeline(r).frames for r in requests]
    merged_before = pipeline._unet.merged_calls
    outcomes = pipeline.generate_batch(requests)
    assert pipeline._unet.merged_calls - merged_before == requests[0].steps  # one UNet call per step for all
    for outcome, expected in zip(outcomes, alone):
        _assert_same_clip(outcome.frames, expected)
    assert pipeline._unet.members == 0


def test_a_cancelled_request_leaves_and_the_others_finish(pipeline: ToonCrafterPipeline) -> None:
    requests = [_request(4), _request(5), _request(6, steps=5)]  # the last one runs on alone after the others

    def cancel_at_2(step: int, total: int) -> None:
        if step == 2:
            raise GenerationCancelled("cancelled by the test")

    outcomes = pipeline.generate_batch(requests, on_step=[None, cancel_at_2, None])
    assert isinstance(outcomes[1], GenerationCancelled)
    _assert_same_clip(outcomes[0].frames, pipeline(requests[0]).frames)
    _assert_same_clip(outcomes[2].frames, pipeline(requests[2]).frames)


def test_an_error_reaches_every_caller_of_the_merged_call_only() -> None:
    calls: list[int] = []

    def unet(x, timesteps, context, fs=None, sketch_residuals=None):
        calls.append(x.shape[0])
        if x.shape[1] == 3:
            raise RuntimeError("out of memory")
        return x * 2

    batcher = UNetBatcher(unet)
    batcher.join(3)
    results: dict[str, object] = {}

    def member(name: str, x: torch.Tensor) -> None:
        try:
            results[name] = batcher(x, torch.tensor([1]), torch.zeros(x.shape[0], 4, 8))
        except RuntimeError as exc:
            results[name] = exc
        finally:
            batcher.leave()

    threads = [
        threading.Thread(target=member, args=("a", torch.ones(2, 3))),
        threading.Thread(target=member, args=("b", torch.ones(1, 3))),
        threading.Thread(target=member, args=("c", torch.ones(1, 5))),  # another shape: its own call
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(calls) == [1, 3]  # a+b merged (3 rows), c alone
    assert isinstance(results["a"], RuntimeError) and isinstance(results["b"], RuntimeError)
    assert torch.equal(results["c"], torch.full((1, 5), 2.0))
    assert batcher.merged_calls == 0 and batcher.members == 0


def test_alone_the_batcher_is_the_unet_itself(pipeline: ToonCrafterPipeline) -> None:
    merged_before = pipeline._unet.merged_calls
    pipeline(_request(8))
    assert pipeline._unet.merged_calls == merged_before
