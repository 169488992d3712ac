"""The KL autoencoder with the dual-reference video decoder matches the official code on the fixture set.

Parity tensors and sizes come from the fixture directory (`TOONCRAFTER_PARITY_FIXTURES`, default tiny_a); the
key layout is checked against the full 512 model's state-dict listing.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from tooncrafter.fixtures import FixtureSet, compare
from tooncrafter.model.attention import (
    math_attention,
    sdpa_attention,
    set_attention_function,
)
from tooncrafter.model.checkpoint import (
    PREFIXES,
    component_state_dict,
    load_into,
    read_state_dict,
)
from tooncrafter.model.config import builtin_config
from tooncrafter.model.vae import AutoencoderDualRef
from tooncrafter.model.vae_blocks import FUSION_HEADS, ReferenceFusionAttention

STATE_DICT_LISTING = Path(__file__).resolve().parents[3] / "shared" / "reference" / "tooncrafter_512_state_dict.json.gz"
BATCH_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vae(fixture_set: FixtureSet) -> AutoencoderDualRef:
    with torch.device("meta"):
        model = AutoencoderDualRef(fixture_set.config.vae)
    state = component_state_dict(read_state_dict(fixture_set.checkpoint_path), "vae")
    return load_into(model, state, "vae")


@pytest.fixture(scope="module")
def keyframes(fixture_set: FixtureSet) -> torch.Tensor:
    return torch.cat([fixture_set["pipe_keyframe_1"], fixture_set["pipe_keyframe_2"]])


@pytest.fixture(scope="module")
def references(vae: AutoencoderDualRef, keyframes: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return vae.reference_context(vae.encode(keyframes).hidden_states, num_frames=2)


def _decode_z(fixture_set: FixtureSet) -> torch.Tensor:
    return fixture_set["vae_dec_z"] / fixture_set.config.diffusion.scale_factor


@torch.no_grad()
def test_encode_matches_official(vae: AutoencoderDualRef, fixture_set: FixtureSet, keyframes: torch.Tensor) -> None:
    scale = fixture_set.config.diffusion.scale_factor
    posterior = vae.encode(keyframes)
    assert len(posterior.hidden_states) == len(fixture_set.config.vae.ch_mult) + 1
    ours = {
        "vae_enc_moments": posterior.moments,
        "vae_enc_mean": posterior.mean,
        "vae_enc_logvar_clamped": posterior.logvar,
        "vae_enc_std": posterior.std,
        "vae_enc_z_scaled": scale * posterior.sample(fixture_set["vae_enc_noise"]),
        "vae_enc_z_mode_scaled": scale * posterior.mode(),
    }
    ours.update({f"vae_enc_hidden_{i}": h for i, h in enumerate(posterior.hidden_states)})
    results = [compare(name, value, fixture_set[name]) for name, value in ours.items() if fixture_set.has(name)]
    assert len(results) >= 7, "the fixture set stores no VAE encode tensors"
    failed = [r for r in results if not r.passed]
    assert not failed, failed


@torch.no_grad()
def test_decode_matches_official(vae: AutoencoderDualRef, fixture_set: FixtureSet, references: list[torch.Tensor]) -> None:
    video = vae.decode(_decode_z(fixture_set), references, chunk_frames=fixture_set.config.unet.temporal_length)
    result = compare("vae_dec_out", video, fixture_set["vae_dec_out"])
    assert result.passed, result


@torch.no_grad()
def test_references_matter(vae: AutoencoderDualRef, fixture_set: FixtureSet, references: list[torch.Tensor]) -> None:
    """Swapping the two keyframes' references changes the decode (the refinements really use them)."""
    z = _decode_z(fixture_set)
    swapped = [ref.flip(2) for ref in references]
    difference = (vae.decode(z, references) - vae.decode(z, swapped)).abs().max()
    assert difference > 1e-2


def test_builtin_vae_has_the_official_keys_and_shapes() -> None:
    listing = json.loads(gzip.decompress(STATE_DICT_LISTING.read_bytes()))
    prefix = PREFIXES["vae"]
    official = {e["key"][len(prefix) :]: tuple(e["shape"]) for e in listing["keys"] if e["key"].startswith(prefix)}
    with torch.device("meta"):
        model = AutoencoderDualRef(builtin_config().vae)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(official)) == []
    assert sorted(set(official) - set(ours)) == []
    assert {k: s for k, s in ours.items() if official[k] != s} == {}


@torch.no_grad()
def test_encoder_is_per_frame(vae: AutoencoderDualRef, keyframes: torch.Tensor) -> None:
    batched = vae.encode(keyframes)
    singles = [vae.encode(keyframes[i : i + 1]) for i in range(keyframes.shape[0])]
    pairs = [(batched.moments, torch.cat([s.moments for s in singles]))]
    pairs += [(h, torch.cat([s.hidden_states[i] for s in singles])) for i, h in enumerate(batched.hidden_states)]
    for together, alone in pairs:
        assert (together - alone).abs().max() <= BATCH_TOLERANCE


@torch.no_grad()
def test_attention_chunks_do_not_change_the_decode(
    vae: AutoencoderDualRef, fixture_set: FixtureSet, references: list[torch.Tensor]
) -> None:
    z = _decode_z(fixture_set)
    try:
        vae.set_attention_chunk(None)
        whole = vae.decode(z, references)
        vae.set_attention_chunk(1)
        chunked = vae.decode(z, references)
        set_attention_function(vae, math_attention)
        plain = vae.decode(z, references)
    finally:
        vae.set_attention_chunk(1)
        set_attention_function(vae, sdpa_attention)
    assert (whole - chunked).abs().max() <= BATCH_TOLERANCE
    assert (whole - plain).abs().max() <= BATCH_TOLERANCE


@torch.no_grad()
def test_fusion_attention_goes_through_attention_fn(
    vae: AutoencoderDualRef, fixture_set: FixtureSet, references: list[torch.Tensor]
) -> None:
    calls: list[tuple[int, int, int]] = []

    def spy(q, k, v, heads, scale=None):
        calls.append((q.shape[1], k.shape[1], heads))
        return sdpa_attention(q, k, v, heads, scale)

    fusions = [m for m in vae.decoder.modules() if isinstance(m, ReferenceFusionAttention)]
    assert fusions
    try:
        for module in fusions:
            module.attention_fn = spy
            module.chunk_frames = 2
        vae.decode(_decode_z(fixture_set), references)
    finally:
        for module in fusions:
            module.attention_fn = sdpa_attention
            module.chunk_frames = 1
    frames = fixture_set["vae_dec_z"].shape[2]
    assert len(calls) == len(fusions) * -(-frames // 2)
    # each call: the h*w queries of at most 2 frames against the 2*h*w tokens of both references, in the module's heads
    assert all(q_len in (k_len // 2, k_len) for q_len, k_len, _ in calls)
    assert {heads for _, _, heads in calls} == {FUSION_HEADS}


@torch.no_grad()
def test_decode_chunks_each_get_both_references(
    vae: AutoencoderDualRef, fixture_set: FixtureSet, references: list[torch.Tensor]
) -> None:
    """Decoding in chunks equals decoding each chunk alone with the same references (the official chunking)."""
    z = _decode_z(fixture_set)
    half = max(1, z.shape[2] // 2)
    chunked = vae.decode(z, references, chunk_frames=half)
    separate = torch.cat([vae.decode(z[:, :, :half], references), vae.decode(z[:, :, half:], references)], dim=2)
    assert chunked.shape == (z.shape[0], fixture_set.config.vae.out_ch, z.shape[2], *fixture_set["vae_dec_out"].shape[-2:])
    assert (chunked - separate).abs().max() <= BATCH_TOLERANCE


def test_decode_refuses_wrong_references(vae: AutoencoderDualRef, fixture_set: FixtureSet, references: list[torch.Tensor]) -> None:
    z = _decode_z(fixture_set)
    with pytest.raises(ValueError, match="reference tensors"):
        vae.decode(z, references[:-1])
    with pytest.raises(ValueError, match="first and last keyframe"):
        vae.decode(z, [ref[:, :, :1] for ref in references])
