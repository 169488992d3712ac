"""Webhook signatures in fal's scheme, checked by a verifier written from fal's documented algorithm."""

from __future__ import annotations

import json
import time
from pathlib import Path

from helpers.fal_webhook_verifier import fal_verify
from helpers.service import make_settings

from tooncrafter.service.jobs import JobStore
from tooncrafter.service.webhook_signing import (
    Keyring,
    SigningKey,
    jwks,
    signature_headers,
)

BODY = json.dumps({"request_id": "r1", "status": "OK", "payload": {"seed": 7}}).encode()


def test_a_signed_delivery_verifies_and_forgeries_do_not() -> None:
    key = SigningKey.generate("k1")
    headers = signature_headers(key, "r1", "user-a", BODY)
    published = jwks([key])
    assert fal_verify(published, headers, BODY)
    assert not fal_verify(published, headers, BODY.replace(b"7", b"8"))  # tampered body
    assert not fal_verify(published, {**headers, "X-Fal-Webhook-User-Id": "user-b"}, BODY)  # another user
    forged = signature_headers(SigningKey.generate("k1"), "r1", "user-a", BODY)  # same kid, other key
    assert not fal_verify(published, forged, BODY)
    replayed = signature_headers(key, "r1", "user-a", BODY, now=time.time() - 301)
    assert not fal_verify(published, replayed, BODY)  # outside fal's 5-minute window
    assert not fal_verify(published, {k: v for k, v in headers.items() if "Signature" not in k}, BODY)


def test_jwks_is_the_okp_ed25519_shape_receivers_expect() -> None:
    (jwk,) = jwks([SigningKey.generate("k1")])["keys"]
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["kid"] == "k1" and jwk["alg"] == "EdDSA"
    assert "d" not in jwk  # never the private part


def test_keyring_is_shared_through_the_store_and_rotates_with_overlap(tmp_path: Path) -> None:
    url = make_settings(tmp_path).resolved_database_url
    store_a, store_b = JobStore(url), JobStore(url)
    try:
        ring_a, ring_b = Keyring(store_a, refresh_s=0), Keyring(store_b, refresh_s=0)
        first = ring_a.signing_key()
        assert ring_b.signing_key() == first  # another process signs with the same key
        old_delivery = signature_headers(first, "r1", "u", BODY)
        second = ring_b.rotate()
        assert ring_a.signing_key() == second
        published = jwks(ring_a.published())
        assert [k["kid"] for k in published["keys"]] == [second.kid, first.kid]
        assert fal_verify(published, old_delivery, BODY)  # signed before the rollover: still verifies
        assert fal_verify(published, signature_headers(ring_a.signing_key(), "r2", "u", BODY), BODY)
        third = ring_a.rotate()
        assert [k["kid"] for k in jwks(ring_b.published())["keys"]] == [third.kid, second.kid]
        assert not fal_verify(jwks(ring_b.published()), old_delivery, BODY)  # two rotations later: retired
    finally:
        store_a.close()
        store_b.close()


def test_the_cli_rotates_and_lists_the_keys(tmp_path: Path, monkeypatch, capsys) -> None:
    from tooncrafter.cli import main

    monkeypatch.setenv("TOONCRAFTER_DATA_DIR", str(tmp_path / "data"))
    assert main(["webhook-keys", "list"]) == 0
    (first,) = capsys.readouterr().out.splitlines()
    assert first.startswith("initial\tsigning")
    assert main(["webhook-keys", "rotate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    new_kid = lines[0].removeprefix("new signing key: ")
    assert lines[1:] == [f"{new_kid}\tsigning", "initial\tpublished (previous)"]
