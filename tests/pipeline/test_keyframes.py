"""Multi-keyframe planning: windows, keyframe positions, frame picks, validation (DESIGN.md section 3)."""

from __future__ import annotations

import itertools
import random

import pytest

from tooncrafter.keyframes import (
    FRAME_MULTIPLIERS,
    FramePick,
    FrameSource,
    check_keyframe_lengths,
    frame_picks,
    inbetween_frames,
    keyframe_positions,
    plan_clip,
    plan_windows,
)


def check_picks(picks: list[FramePick], num_keyframes: int, num_frames: int, positions: list[int]) -> None:
    """The invariants every default (T-frame) plan must satisfy."""
    last = num_frames - 1
    assert len(picks) == num_frames
    assert all(0 <= w < num_keyframes - 1 and 0 <= f <= last for w, f in picks)
    # monotone: windows never go back, frames strictly increase inside a window
    for (w0, f0), (w1, f1) in zip(picks, picks[1:]):
        assert w1 == w0 and f1 > f0 or w1 == w0 + 1 and f1 == 0 or (w1, f1) == (num_keyframes - 2, last)
    # each keyframe appears exactly once, at its position: keyframe i is (i, 0) or (i-1, T-1)
    for k in range(num_keyframes):
        sources = {(k, 0), (k - 1, last)}
        hits = [out for out, pick in enumerate(picks) if tuple(pick) in sources]
        assert hits == [positions[k]], (k, hits, positions)
    assert picks[0] == (0, 0) and picks[-1] == (num_keyframes - 2, last)


# ---------------------------------------------------------------------------------------------------------------
# Two keyframes: the official pipeline
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [4, 8, 16, 32])
def test_two_keyframes_are_the_identity(num_frames):
    identity = [(0, f) for f in range(num_frames)]
    assert frame_picks(2, num_frames) == identity
    assert frame_picks(2, num_frames, keep_all=True) == identity
    assert frame_picks(2, num_frames, [1, num_frames - 1]) == identity  # lengths cannot change the math
    assert keyframe_positions(2, num_frames, [num_frames - 1, 1]) == [0, num_frames - 1]
    assert plan_windows(2) == [(0, 1)]


# ---------------------------------------------------------------------------------------------------------------
# Three and four keyframes
# ---------------------------------------------------------------------------------------------------------------


def test_three_keyframes_equal_runs_16_frames():
    assert plan_windows(3) == [(0, 1), (1, 2)]
    positions = keyframe_positions(3, 16)
    assert positions == [0, 8, 15]  # 7.5 rounds half up to 8
    picks = frame_picks(3, 16)
    # transition 0: 8 output frames from window 0 at stride 15/8; transition 1: 7 frames at stride 15/7
    assert picks[:8] == [(0, f) for f in (0, 2, 4, 6, 8, 9, 11, 13)]
    assert picks[8:15] == [(1, f) for f in (0, 2, 4, 6, 9, 11, 13)]
    assert picks[15] == (1, 15)
    check_picks(picks, 3, 16, positions)


def test_three_keyframes_with_lengths_16_frames():
    # runs 6,5,5: centres 3, 8.5, 13.5 -> p = round(15 * (0, 5.5, 10.5) / 10.5) = 0, round(7.857) = 8, 15
    assert keyframe_positions(3, 16, [6, 5, 5]) == [0, 8, 15]
    # runs 2,12,2: centres 1, 8, 15 -> exactly in the middle
    assert keyframe_positions(3, 16, [2, 12, 2]) == [0, 8, 15]
    # runs 12,2,2: centres 6, 13, 15 -> 15 * 7/9 = 11.67 -> 12
    assert keyframe_positions(3, 16, [12, 2, 2]) == [0, 12, 15]
    # runs 1,1,14: centres 0.5, 1.5, 9 -> 15 * 1/8.5 = 1.76 -> 2
    assert keyframe_positions(3, 16, [1, 1, 14]) == [0, 2, 15]
    for lengths in ([6, 5, 5], [2, 12, 2], [12, 2, 2], [1, 1, 14], [14, 1, 1]):
        positions = keyframe_positions(3, 16, lengths)
        check_picks(frame_picks(3, 16, lengths), 3, 16, positions)


def test_four_keyframes_with_and_without_lengths():
    assert plan_windows(4) == [(0, 1), (1, 2), (2, 3)]
    assert keyframe_positions(4, 16) == [0, 5, 10, 15]
    picks = frame_picks(4, 16)
    # each transition spans 5 output frames of its window at stride 3
    assert picks == [(w, f) for w in range(3) for f in (0, 3, 6, 9, 12)] + [(2, 15)]
    check_picks(picks, 4, 16, [0, 5, 10, 15])
    # runs 4,4,4,4 are equal runs
    assert keyframe_positions(4, 16, [4, 4, 4, 4]) == [0, 5, 10, 15]
    # runs 1,7,7,1: centres 0.5, 4.5, 11.5, 15.5 -> 15 * (4, 11) / 15 = 4, 11
    assert keyframe_positions(4, 16, [1, 7, 7, 1]) == [0, 4, 11, 15]
    check_picks(frame_picks(4, 16, [1, 7, 7, 1]), 4, 16, [0, 4, 11, 15])
    # with T = 8 (the tiny fixture model): positions 0, round(7/3)=2, round(14/3)=5, 7
    assert keyframe_positions(4, 8) == [0, 2, 5, 7]
    check_picks(frame_picks(4, 8), 4, 8, [0, 2, 5, 7])


def test_as_many_keyframes_as_frames_picks_only_keyframes():
    picks = frame_picks(8, 8)
    assert picks == [(w, 0) for w in range(7)] + [(6, 7)]


def test_keep_all_counts_and_order():
    for n, t in [(2, 16), (3, 16), (4, 8), (16, 16), (5, 32)]:
        picks = frame_picks(n, t, keep_all=True)
        assert len(picks) == (n - 1) * (t - 1) + 1
        assert picks == [(w, f) for w in range(n - 1) for f in range(t - 1)] + [(n - 2, t - 1)]
        check_keyframes_once(picks, n, t, [i * (t - 1) for i in range(n)])
    # lengths are validated but do not matter with keep_all
    assert frame_picks(3, 16, [6, 5, 5], keep_all=True) == frame_picks(3, 16, keep_all=True)
    with pytest.raises(ValueError):
        frame_picks(3, 16, [6, 5, 4], keep_all=True)


def check_keyframes_once(picks: list[FramePick], num_keyframes: int, num_frames: int, positions: list[int]) -> None:
    last = num_frames - 1
    for k in range(num_keyframes):
        hits = [out for out, p in enumerate(picks) if tuple(p) in {(k, 0), (k - 1, last)}]
        assert hits == [positions[k]]


# ---------------------------------------------------------------------------------------------------------------
# Validation messages
# ---------------------------------------------------------------------------------------------------------------


def test_validation_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"has 2 entries but there are 3 keyframes \(one length per keyframe\)"):
        check_keyframe_lengths([8, 8], 3, 16)
    with pytest.raises(ValueError, match="every entry must be >= 1"):
        check_keyframe_lengths([16, 0, 0], 3, 16)
    with pytest.raises(ValueError, match="every entry must be >= 1"):
        check_keyframe_lengths([17, -1], 2, 16)
    with pytest.raises(ValueError, match="must sum to the model's frame count 16, got 15"):
        check_keyframe_lengths([5, 5, 5], 3, 16)
    with pytest.raises(ValueError, match="must sum to the model's frame count 8, got 16"):
        check_keyframe_lengths([8, 8], 2, 8)
    with pytest.raises(ValueError, match="list of integers"):
        check_keyframe_lengths([8.0, 8.0], 2, 16)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="list of integers"):
        check_keyframe_lengths([True, 15], 2, 16)
    check_keyframe_lengths([6, 5, 5], 3, 16)  # valid: no error
    # the planning functions validate too
    with pytest.raises(ValueError, match="sum to the model's frame count 16"):
        keyframe_positions(3, 16, [5, 5, 5])
    with pytest.raises(ValueError, match="one length per keyframe"):
        frame_picks(3, 16, [8, 8])


def test_count_errors():
    with pytest.raises(ValueError, match="at least 2 keyframes, got 1"):
        plan_windows(1)
    with pytest.raises(ValueError, match="at least 2 keyframes, got 1"):
        keyframe_positions(1, 16)
    with pytest.raises(ValueError, match="17 keyframes cannot each get their own frame in a 16-frame output"):
        frame_picks(17, 16)
    with pytest.raises(ValueError, match="at least 2 frames, got 1"):
        frame_picks(2, 1)


# ---------------------------------------------------------------------------------------------------------------
# Property-style sweeps
# ---------------------------------------------------------------------------------------------------------------


def random_lengths(rng: random.Random, num_keyframes: int, num_frames: int) -> list[int]:
    """A random composition of num_frames into num_keyframes parts >= 1."""
    cuts = sorted(rng.sample(range(1, num_frames), num_keyframes - 1))
    bounds = [0, *cuts, num_frames]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def test_invariants_over_many_plans():
    rng = random.Random(20240601)
    checked = 0
    for num_frames in range(4, 33):
        for num_keyframes in range(2, min(16, num_frames) + 1):
            options: list[list[int] | None] = [None]
            options += [random_lengths(rng, num_keyframes, num_frames) for _ in range(4)]
            # extreme runs: all mass on the first / last / a middle keyframe
            big = num_frames - (num_keyframes - 1)
            options.append([big] + [1] * (num_keyframes - 1))
            options.append([1] * (num_keyframes - 1) + [big])
            options.append([1] * (num_keyframes // 2) + [big] + [1] * (num_keyframes - 1 - num_keyframes // 2))
            for lengths in options:
                positions = keyframe_positions(num_keyframes, num_frames, lengths)
                assert len(positions) == num_keyframes
                assert positions[0] == 0 and positions[-1] == num_frames - 1
                assert all(b > a for a, b in zip(positions, positions[1:])), (num_frames, lengths, positions)
                picks = frame_picks(num_keyframes, num_frames, lengths)
                check_picks(picks, num_keyframes, num_frames, positions)
                # even stride inside each transition: pick j of transition i is round(j (T-1) / gap)
                for i, (a, b) in enumerate(zip(positions, positions[1:])):
                    gap = b - a
                    expected = [int(j * (num_frames - 1) / gap + 0.5 + 1e-9) for j in range(gap)]
                    assert [f for _, f in picks[a:b]] == expected
                    assert all(w == i for w, _ in picks[a:b])
                keep = frame_picks(num_keyframes, num_frames, lengths, keep_all=True)
                assert len(keep) == (num_keyframes - 1) * (num_frames - 1) + 1
                checked += 1
    assert checked > 1500


def test_positions_follow_run_centres_exhaustively_for_small_cases():
    """Every composition for small T: positions are the rounded, scaled run centres."""
    for num_frames in range(4, 11):
        for num_keyframes in range(2, num_frames + 1):
            for cuts in itertools.combinations(range(1, num_frames), num_keyframes - 1):
                bounds = [0, *cuts, num_frames]
                lengths = [b - a for a, b in zip(bounds, bounds[1:])]
                centres = [a + n / 2 for a, n in zip(bounds, lengths)]
                span = centres[-1] - centres[0]
                expected = [int((num_frames - 1) * (c - centres[0]) / span + 0.5 + 1e-9) for c in centres]
                assert keyframe_positions(num_keyframes, num_frames, lengths) == expected, lengths


# ---------------------------------------------------------------------------------------------------------------
# Loops and frame multipliers (extension inputs)
# ---------------------------------------------------------------------------------------------------------------


def test_loop_adds_the_wrap_around_window_and_drops_the_repeated_first_frame():
    assert plan_windows(2, loop=True) == [(0, 1), (1, 0)]
    assert plan_windows(4, loop=True) == [(0, 1), (1, 2), (2, 3), (3, 0)]
    # equal runs around a 16-frame cycle: keyframe i on round(i * 16 / N)
    assert keyframe_positions(2, 16, loop=True) == [0, 8]
    assert keyframe_positions(3, 16, loop=True) == [0, 5, 11]
    assert keyframe_positions(3, 16, [6, 5, 5], loop=True) == [0, 6, 11]  # centres 3, 8.5, 13.5 from keyframe 1's
    # two run centres on a cycle are always half of it apart: lengths cannot move two keyframes here either
    assert all(keyframe_positions(2, 16, [n, 16 - n], loop=True) == [0, 8] for n in range(1, 16))
    assert keyframe_positions(3, 16, [2, 2, 12], loop=True) == [0, 2, 9]
    picks = frame_picks(2, 16, loop=True)
    assert len(picks) == 16 and picks[0] == (0, 0) and picks[8] == (1, 0)
    assert picks[-1].window == 1 and picks[-1].frame < 15  # ends inside last -> first, before keyframe 0 again
    assert (1, 15) not in picks


def test_loop_invariants_over_many_plans():
    rng = random.Random(7)
    for num_frames in range(4, 25):
        for num_keyframes in range(2, min(16, num_frames) + 1):
            for lengths in [None] + [random_lengths(rng, num_keyframes, num_frames) for _ in range(3)]:
                positions = keyframe_positions(num_keyframes, num_frames, lengths, loop=True)
                assert positions[0] == 0 and positions[-1] <= num_frames - 1
                assert all(b > a for a, b in itertools.pairwise(positions))
                picks = frame_picks(num_keyframes, num_frames, lengths, loop=True)
                assert len(picks) == num_frames
                # keyframe k appears exactly once, at its position, as the first frame of window k
                for k, p in enumerate(positions):
                    assert picks[p] == (k, 0)
                    assert [i for i, pick in enumerate(picks) if pick in ((k, 0), ((k - 1) % num_keyframes, num_frames - 1))] == [p]
                keep = frame_picks(num_keyframes, num_frames, lengths, keep_all=True, loop=True)
                assert len(keep) == num_keyframes * (num_frames - 1)
                assert keep[-1] == (num_keyframes - 1, num_frames - 2)


def test_inbetween_frames_are_evenly_spaced_and_never_an_end():
    assert inbetween_frames(16, 1) == []
    assert inbetween_frames(16, 2) == [8]  # 7.5 rounds half up
    assert inbetween_frames(16, 4) == [4, 8, 11]  # 3.75, 7.5, 11.25
    assert inbetween_frames(8, 4) == [2, 4, 5]
    for num_frames in range(5, 33):
        for m in (2, 4):
            frames = inbetween_frames(num_frames, m)
            assert len(set(frames)) == m - 1 and all(0 < f < num_frames - 1 for f in frames)
    with pytest.raises(ValueError, match="1, 2, 4"):
        inbetween_frames(16, 3)
    with pytest.raises(ValueError, match="fewer than 3"):
        inbetween_frames(4, 4)


@pytest.mark.parametrize("num_keyframes", [2, 3])
@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("keep_all", [False, True])
def test_plan_clip_frame_counts_and_sources(num_keyframes, loop, keep_all):
    num_frames = 16
    first = len(frame_picks(num_keyframes, num_frames, keep_all=keep_all, loop=loop))
    for m in FRAME_MULTIPLIERS:
        plan = plan_clip(num_keyframes, num_frames, keep_all=keep_all, loop=loop, multiplier=m)
        assert plan.num_output_frames == (first * m if loop else (first - 1) * m + 1)
        assert plan.windows == plan_windows(num_keyframes, loop)
        assert len(plan.inbetween_windows) == (0 if m == 1 else first if loop else first - 1)
        # every m-th frame is the first pass's frame, in order: the keyframes stay where they were
        assert [tuple(s) for s in plan.sources[::m]] == [(0, *pick) for pick in plan.picks]
        between = inbetween_frames(num_frames, m)
        for g, source in enumerate(plan.sources):
            if g % m:
                assert source == FrameSource(1, g // m, between[g % m - 1])
        if loop and m > 1:
            assert plan.inbetween_windows[-1] == (first - 1, 0)  # the wrap-around pair of generated frames
