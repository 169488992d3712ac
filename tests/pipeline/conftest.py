"""Fixtures of the pipeline tests: the pipeline on the fixture set's checkpoint."""

from __future__ import annotations

import pytest

from tooncrafter.model.checkpoint import read_state_dict
from tooncrafter.model.loader import load_components
from tooncrafter.pipeline import ToonCrafterPipeline


@pytest.fixture(scope="module")
def pipeline(fixture_set) -> ToonCrafterPipeline:
    components = load_components(fixture_set.config, read_state_dict(fixture_set.checkpoint_path))
    if not components.has_clip:
        pytest.skip("the fixture checkpoint has no CLIP towers: the pipeline needs them")
    return ToonCrafterPipeline(components)
