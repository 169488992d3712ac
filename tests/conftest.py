"""Shared fixtures: the reference fixture set named by TOONCRAFTER_PARITY_FIXTURES (default tiny_a)."""

from __future__ import annotations

import pytest
import torch

from tooncrafter.fixtures import FixtureSet, fixtures_dir_from_env


def pytest_configure(config: pytest.Config) -> None:
    # Parity numbers in reference/README section 9 were measured with 2 threads.
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def fixture_set() -> FixtureSet:
    directory = fixtures_dir_from_env()
    if not (directory / "fixtures.safetensors").is_file():
        pytest.skip(f"no fixture set at {directory} (set TOONCRAFTER_PARITY_FIXTURES)")
    return FixtureSet.load(directory)
