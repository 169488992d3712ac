"""Batching across requests: the UNet calls of requests that run at the same time become one call.

Each request keeps its whole pipeline run -- its own generator and seeds, its own conditioning and decode, its
own progress callback and cancellation -- in its own thread. Only the network that runs every step is shared:
`UNetBatcher` stands in for the UNet, and while several requests are members of a batch, a UNet call waits
until every member has made its call (or left the batch), runs them as one call on the concatenated rows, and
hands each caller its rows back. A bigger batch uses the hardware better (a GPU most of all; on CPU the deep
levels' GEMMs read each weight once for all rows), and a member that finishes, fails or is cancelled simply
leaves: the others go on without it.

Calls merge when everything but the batch dimension agrees (shapes, dtype, which optional inputs are given);
other calls of the same round run on their own, so merging never changes what a request computes beyond the
float summation order of a larger batch.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn


@dataclass(eq=False)  # compared by identity: `call in pending`
class _Call:
    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    fs: torch.Tensor | None
    sketch_residuals: Sequence[torch.Tensor] | None
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False
    batch: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch = self.x.shape[0]

    def signature(self) -> tuple[Any, ...]:
        """What must agree for two calls to share one UNet call."""
        residuals = None if self.sketch_residuals is None else tuple(r.shape[1:] for r in self.sketch_residuals)
        return (
            tuple(self.x.shape[1:]), self.x.dtype, self.x.device, tuple(self.context.shape[1:]),
            self.fs is None, residuals,
        )

    def rows(self, value: torch.Tensor | None) -> torch.Tensor | None:
        """A per-row input broadcast to this call's batch (a single timestep or fs value is allowed)."""
        if value is None:
            return None
        return value.reshape(-1).expand(self.batch) if value.numel() == 1 else value


class UNetBatcher:
    """A callable with the UNet's signature that merges the concurrent calls of a batch's members."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self._lock = threading.Condition()
        self._members = 0
        self._pending: list[_Call] = []
        self.merged_calls = 0  # UNet calls that served more than one request (for tests and logs)

    @property
    def members(self) -> int:
        """Requests in the batch now."""
        return self._members

    def join(self, count: int = 1) -> None:
        """`count` requests become members: their UNet calls wait for each other's calls of the same round.

        Join all of a batch's requests before any of them starts, so none runs a step without the others."""
        with self._lock:
            self._members += count

    def leave(self) -> None:
        """A member is done (finished, failed or cancelled): the others no longer wait for it."""
        with self._lock:
            self._members -= 1
            self._lock.notify_all()  # the members still waiting may now be complete

    @contextlib.contextmanager
    def member(self) -> Iterator[None]:
        """One request's run as a member (`join` on entry, `leave` on exit)."""
        self.join()
        try:
            yield
        finally:
            self.leave()

    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        fs: torch.Tensor | None = None,
        sketch_residuals: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        with self._lock:
            alone = self._members <= 1 and not self._pending
        if alone:
            return self.unet(x, timesteps, context, fs, sketch_residuals=sketch_residuals)
        call = _Call(x, timesteps, context, fs, sketch_residuals)
        with self._lock:
            self._pending.append(call)
            self._lock.notify_all()
            while not call.done:
                if call in self._pending and len(self._pending) >= self._members:
                    round_calls, self._pending = self._pending, []
                    break
                self._lock.wait()
            else:
                return self._outcome(call)
        self._run_round(round_calls)
        return self._outcome(call)

    @staticmethod
    def _outcome(call: _Call) -> torch.Tensor:
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _run_round(self, calls: list[_Call]) -> None:
        """Run one round (outside the lock): compatible calls together, then wake their callers."""
        groups: dict[tuple[Any, ...], list[_Call]] = {}
        for call in calls:
            groups.setdefault(call.signature(), []).append(call)
        try:
            for group in groups.values():
                try:
                    self._run_group(group)
                except BaseException as exc:  # every caller of the group sees the error, as it would alone
                    for call in group:
                        call.error = exc
        finally:
            with self._lock:
                for call in calls:
                    call.done = True
                self._lock.notify_all()

    def _run_group(self, group: list[_Call]) -> None:
        if len(group) == 1:
            call = group[0]
            call.result = self.unet(call.x, call.timesteps, call.context, call.fs, sketch_residuals=call.sketch_residuals)
            return
        first = group[0]
        residuals = None
        if first.sketch_residuals is not None:
            residuals = [torch.cat([c.sketch_residuals[i] for c in group]) for i in range(len(first.sketch_residuals))]
        fs = None if first.fs is None else torch.cat([c.rows(c.fs) for c in group])
        out = self.unet(
            torch.cat([c.x for c in group]), torch.cat([c.rows(c.timesteps) for c in group]),
            torch.cat([c.context for c in group]), fs, sketch_residuals=residuals,
        )
        self.merged_calls += 1
        for call, rows in zip(group, out.split([c.batch for c in group])):
            call.result = rows
