"""Multi-keyframe planning: which pair windows to sample and which of their frames make the output.

Plain Python (no torch), so the plan is testable on its own. The model was trained with exactly two
pinned frames (first and last) and its decoder takes exactly two reference images, so every window
it sees is a pair of adjacent keyframes (DESIGN.md section 3, "Multi-keyframe semantics"):

* N keyframes give N-1 windows, window i interpolating keyframe i -> keyframe i+1 over T model
  frames (window frame 0 is keyframe i, window frame T-1 is keyframe i+1).
* By default the output has T frames, as fal's contract says. Keyframe i lands on output frame
  p_i = round((T-1) * (c_i - c_1) / (c_N - c_1)), c_i the centre of its run when the runs of
  `keyframe_lengths` are laid end to end (equal runs when absent). Transition i fills output frames
  p_i .. p_{i+1}-1 with frames of window i taken at even stride, and the last output frame is the
  last keyframe. Every keyframe appears exactly once; no doubled or faded joins.
* `keep_all=True` keeps every frame of every window instead, the shared joins once:
  (N-1)*(T-1)+1 frames.
With two keyframes both modes are the identity (window 0, frames 0..T-1): exactly the official
pipeline, and `keyframe_lengths` cannot change anything there.

Extensions (each off by default, and then the plan is the one above):

* `loop=True` adds the wrap-around window N-1 -> 0, so a clip played on repeat has no jump. The
  T output frames are a cycle: the runs of `keyframe_lengths` are laid end to end around it,
  keyframe 0 on frame 0 and keyframe i on frame p_i = round((c_i - c_1) * T / L) (L the sum of the
  runs: T, or N for equal runs); the last transition ends just before frame T, which is frame 0
  again and is not repeated. With `keep_all`: N*(T-1) frames. Two centres on a cycle are always
  half of it apart, so with two keyframes `keyframe_lengths` changes nothing here either.
* `multiplier` m in {2, 4} (`plan_clip`): a second pass samples one window between every two
  adjacent frames of the first pass's output (and from its last frame back to its first when
  looping) and puts m-1 of its frames, evenly spaced, between them. The first pass's frames, the
  keyframes among them, stay exactly as they were: F first-pass frames give (F-1)*m+1 frames,
  or F*m when looping.

Rounding is "half up" (floor(x + 1/2)) on exact fractions, so a plan never depends on float error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

FRAME_MULTIPLIERS = (1, 2, 4)


class FramePick(NamedTuple):
    """One output frame: frame `frame` (0..T-1) of pair window `window` (0..N-2)."""

    window: int
    frame: int


class FrameSource(NamedTuple):
    """Where one frame of the final clip comes from: frame `frame` of window `window` of pass `stage`
    (0: the keyframe windows of `plan_windows`; 1: the in-between windows of `plan_clip`)."""

    stage: int
    window: int
    frame: int


def _round_half_up(x: Fraction) -> int:
    """floor(x + 1/2): ties go up (2.5 -> 3), unlike Python's round-half-even."""
    return (x + Fraction(1, 2)).__floor__()


def _check_counts(num_keyframes: int, num_frames: int) -> None:
    if num_keyframes < 2:
        raise ValueError(f"need at least 2 keyframes, got {num_keyframes}")
    if num_frames < 2:
        raise ValueError(f"the model must have at least 2 frames, got {num_frames}")
    if num_keyframes > num_frames:
        raise ValueError(
            f"{num_keyframes} keyframes cannot each get their own frame in a {num_frames}-frame output "
            f"(at most {num_frames} keyframes)"
        )


def check_keyframe_lengths(lengths: Sequence[int], num_keyframes: int, num_frames: int | None) -> None:
    """The `keyframe_lengths` rule: one integer >= 1 per keyframe, summing to the model's frame count T.

    Raises ValueError. `num_frames=None` checks what is known before a model is (the endpoint schema:
    a 422 before anything is queued); the sum is checked wherever T is known (`schema.check_fits_model`,
    the plan below). The messages do not name the field: the API prefixes `keyframe_lengths`, the CLI
    `--keyframe-lengths`.
    """
    if isinstance(lengths, (str, bytes)) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in lengths
    ):
        raise ValueError(f"must be a list of integers, got {lengths!r}")
    if len(lengths) != num_keyframes:
        raise ValueError(f"has {len(lengths)} entries but there are {num_keyframes} keyframes (one length per keyframe)")
    if any(n < 1 for n in lengths):
        raise ValueError("every entry must be >= 1")
    if num_frames is not None and sum(lengths) != num_frames:
        raise ValueError(f"must sum to the model's frame count {num_frames}, got {sum(lengths)}")


def plan_windows(num_keyframes: int, loop: bool = False) -> list[tuple[int, int]]:
    """One window per adjacent pair: [(0, 1), (1, 2), ..., (N-2, N-1)] (keyframe indices), and with
    `loop` the wrap-around pair (N-1, 0) last."""
    if num_keyframes < 2:
        raise ValueError(f"need at least 2 keyframes, got {num_keyframes}")
    return [(i, i + 1) for i in range(num_keyframes - 1)] + ([(num_keyframes - 1, 0)] if loop else [])


def keyframe_positions(
    num_keyframes: int, num_frames: int, lengths: Sequence[int] | None = None, loop: bool = False
) -> list[int]:
    """Output frame of each keyframe in the T-frame output: strictly increasing, first 0, last T-1.

    p_i = round_half_up((T-1) * (c_i - c_1) / (c_N - c_1)), c_i = l_1 + ... + l_{i-1} + l_i / 2 the
    centre of run i (runs l_i = `lengths`, or all equal when None). Consecutive centres are at least
    1 apart and the span c_N - c_1 is at most T-1, so rounded positions never collide.
    With `loop` the output is a cycle of T frames and p_i = round_half_up((c_i - c_1) * T / L), L the
    sum of the runs: the same rule around a circle, keyframe 0 on frame 0, the last keyframe at most
    on frame T-1 (its distance to frame T, keyframe 0 again, is (l_N + l_1) / 2 >= 1 run frames).
    """
    _check_counts(num_keyframes, num_frames)
    if lengths is None:
        lengths = [1] * num_keyframes  # equal runs; only ratios of centres matter
    else:
        check_keyframe_lengths(lengths, num_keyframes, num_frames)
    centres: list[Fraction] = []
    start = 0
    for n in lengths:
        centres.append(start + Fraction(n, 2))
        start += n
    if loop:
        return [_round_half_up((c - centres[0]) * num_frames / start) for c in centres]
    span = centres[-1] - centres[0]
    return [_round_half_up((num_frames - 1) * (c - centres[0]) / span) for c in centres]


def frame_picks(
    num_keyframes: int,
    num_frames: int,
    lengths: Sequence[int] | None = None,
    keep_all: bool = False,
    loop: bool = False,
) -> list[FramePick]:
    """Which window frame fills each output frame, in output order.

    Default: T picks. Transition i (window i) covers output frames p_i .. p_{i+1}-1 with window
    frames round_half_up(j * (T-1) / (p_{i+1} - p_i)) for j = 0 .. p_{i+1}-p_i-1 (so frame 0, the
    keyframe, first, and never frame T-1, which is the next window's frame 0); the last output frame
    is window N-2's frame T-1, the last keyframe.
    `keep_all=True`: every frame of every window, each shared keyframe once: (N-1)*(T-1)+1 picks.
    `loop=True`: the wrap-around window N-1 is the last transition, ending before output frame T
    (p_N = T); no final pick (window N-1's frame T-1 is keyframe 0, already frame 0): T picks, or
    N*(T-1) with `keep_all`.
    """
    _check_counts(num_keyframes, num_frames)
    if lengths is not None:
        check_keyframe_lengths(lengths, num_keyframes, num_frames)
    last = num_frames - 1
    windows = len(plan_windows(num_keyframes, loop))
    if keep_all:
        picks = [FramePick(w, f) for w in range(windows) for f in range(last)]
    else:
        positions = keyframe_positions(num_keyframes, num_frames, lengths, loop) + ([num_frames] if loop else [])
        picks = []
        for w in range(windows):
            gap = positions[w + 1] - positions[w]
            picks.extend(FramePick(w, _round_half_up(Fraction(j * last, gap))) for j in range(gap))
    if not loop:
        picks.append(FramePick(windows - 1, last))
    return picks


def inbetween_frames(num_frames: int, multiplier: int) -> list[int]:
    """The m-1 frames of an in-between window that go between its two ends: round_half_up(j (T-1) / m),
    j = 1 .. m-1, evenly spaced and never an end (needs m <= T-1)."""
    if multiplier not in FRAME_MULTIPLIERS:
        raise ValueError(f"frame_multiplier must be one of {', '.join(map(str, FRAME_MULTIPLIERS))}, got {multiplier}")
    if multiplier > 1 and multiplier > num_frames - 1:
        raise ValueError(f"a {num_frames}-frame model has only {num_frames - 2} frames between two ends, fewer than {multiplier - 1}")
    return [_round_half_up(Fraction(j * (num_frames - 1), multiplier)) for j in range(1, multiplier)]


@dataclass(frozen=True)
class ClipPlan:
    """Everything the pipeline samples for one request, and where each output frame comes from.

    `windows` pair keyframes (pass 0); `picks` are pass 0's output frames (F of them); `inbetween_windows`
    pair those F frames (pass 1; empty when the multiplier is 1); `sources` lists the final clip.
    """

    windows: list[tuple[int, int]]
    picks: list[FramePick]
    inbetween_windows: list[tuple[int, int]]
    sources: list[FrameSource]

    @property
    def num_output_frames(self) -> int:
        return len(self.sources)


def plan_clip(
    num_keyframes: int,
    num_frames: int,
    lengths: Sequence[int] | None = None,
    *,
    keep_all: bool = False,
    loop: bool = False,
    multiplier: int = 1,
) -> ClipPlan:
    """The whole request: the keyframe pass, and with `multiplier` m > 1 the in-between pass.

    Output frame g is pass 0's frame g when m == 1. Otherwise g = k*m + r: r == 0 is pass 0's frame k
    itself, else in-between window k's frame `inbetween_frames(T, m)[r-1]`; without loop the last
    output frame is pass 0's last frame.
    """
    windows = plan_windows(num_keyframes, loop)
    picks = frame_picks(num_keyframes, num_frames, lengths, keep_all=keep_all, loop=loop)
    between = inbetween_frames(num_frames, multiplier)
    first = [FrameSource(0, w, f) for w, f in picks]
    if multiplier == 1:
        return ClipPlan(windows, picks, [], first)
    pairs = plan_windows(len(picks), loop)
    sources: list[FrameSource] = []
    for k in range(len(pairs)):
        sources.append(first[k])
        sources.extend(FrameSource(1, k, f) for f in between)
    if not loop:
        sources.append(first[-1])
    return ClipPlan(windows, picks, pairs, sources)
