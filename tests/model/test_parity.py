"""Every stage of the fixture set in TOONCRAFTER_PARITY_FIXTURES matches the official numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tooncrafter.parity import ParityReport, format_report, run_parity


@pytest.fixture(scope="module")
def report(fixture_set) -> ParityReport:
    return run_parity(fixture_set.directory)


def test_every_stage_is_within_tolerance(report: ParityReport) -> None:
    failures = [r for r in report.rows if not r.passed and not r.skipped]
    assert not failures, format_report(failures)


def test_every_fixture_output_is_checked_or_skipped_with_a_reason(report: ParityReport, fixture_set) -> None:
    covered = {r.name for r in report.rows}
    inputs = {
        "unet_x_noisy", "unet_c_concat", "unet_timesteps", "unet_context", "unet_fs", "vae_enc_noise", "vae_dec_z",
        "resampler_in", "preproc_src_uint8_hwc", "pipe_x_T", "pipe_vae_posterior_noise", "pipe_fs",
    }
    expected = {k for k in fixture_set.tensors if k not in inputs and not k.endswith("_noise")}
    assert expected - covered == set()


def test_module_and_pipeline_stages_actually_ran(report: ParityReport) -> None:
    ran = {r.name for r in report.rows if not r.skipped}
    assert {"unet_out", "vae_dec_out", "resampler_out"} <= ran
    assert any(name.endswith("video_out") for name in ran)


def test_cli_prints_a_table_and_dumps_fixture_names(fixture_set, tmp_path: Path) -> None:
    dump = tmp_path / "ours.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "tooncrafter.cli", "parity", str(fixture_set.directory), "--dump", str(dump)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "unet_out" in proc.stdout and "over" in proc.stdout
    dumped = load_file(str(dump))
    assert "unet_out" in dumped and dumped["unet_out"].shape == fixture_set["unet_out"].shape
    assert set(dumped) <= set(fixture_set.tensors)


def test_cli_exits_1_when_a_stage_is_off(fixture_set, tmp_path: Path) -> None:
    """Corrupt one reference tensor in a copy of the fixture set: parity must fail loudly."""
    import shutil

    from safetensors.torch import save_file

    copy = tmp_path / "fixtures"
    shutil.copytree(fixture_set.directory, copy)
    tensors = dict(fixture_set.tensors)
    tensors["resampler_out"] = tensors["resampler_out"] + 1.0
    save_file(tensors, str(copy / "fixtures.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-m", "tooncrafter.cli", "parity", str(copy)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "resampler_out" in proc.stdout
