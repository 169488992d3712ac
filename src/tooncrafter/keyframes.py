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

Rounding is "half up" (floor(x + 1/2)) on exact fractions, so a plan never depends on float error.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple, Sequence


class FramePick(NamedTuple):
    """One output frame: frame `frame` (0..T-1) of pair window `window` (0..N-2)."""

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


def plan_windows(num_keyframes: int) -> list[tuple[int, int]]:
    """One window per adjacent pair: [(0, 1), (1, 2), ..., (N-2, N-1)] (keyframe indices)."""
    if num_keyframes < 2:
        raise ValueError(f"need at least 2 keyframes, got {num_keyframes}")
    return [(i, i + 1) for i in range(num_keyframes - 1)]


def keyframe_positions(num_keyframes: int, num_frames: int, lengths: Sequence[int] | None = None) -> list[int]:
    """Output frame of each keyframe in the T-frame output: strictly increasing, first 0, last T-1.

    p_i = round_half_up((T-1) * (c_i - c_1) / (c_N - c_1)), c_i = l_1 + ... + l_{i-1} + l_i / 2 the
    centre of run i (runs l_i = `lengths`, or all equal when None). Consecutive centres are at least
    1 apart and the span c_N - c_1 is at most T-1, so rounded positions never collide.
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
    span = centres[-1] - centres[0]
    return [_round_half_up((num_frames - 1) * (c - centres[0]) / span) for c in centres]


def frame_picks(
    num_keyframes: int,
    num_frames: int,
    lengths: Sequence[int] | None = None,
    keep_all: bool = False,
) -> list[FramePick]:
    """Which window frame fills each output frame, in output order.

    Default: T picks. Transition i (window i) covers output frames p_i .. p_{i+1}-1 with window
    frames round_half_up(j * (T-1) / (p_{i+1} - p_i)) for j = 0 .. p_{i+1}-p_i-1 (so frame 0, the
    keyframe, first, and never frame T-1, which is the next window's frame 0); the last output frame
    is window N-2's frame T-1, the last keyframe.
    `keep_all=True`: every frame of every window, each shared keyframe once: (N-1)*(T-1)+1 picks.
    """
    _check_counts(num_keyframes, num_frames)
    if lengths is not None:
        check_keyframe_lengths(lengths, num_keyframes, num_frames)
    last = num_frames - 1
    windows = num_keyframes - 1
    if keep_all:
        picks = [FramePick(w, f) for w in range(windows) for f in range(last)]
    else:
        positions = keyframe_positions(num_keyframes, num_frames, lengths)
        picks = []
        for w in range(windows):
            gap = positions[w + 1] - positions[w]
            picks.extend(FramePick(w, _round_half_up(Fraction(j * last, gap))) for j in range(gap))
    picks.append(FramePick(windows - 1, last))
    return picks
