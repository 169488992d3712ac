"""API keys: who is calling, and which requests they may see.

fal's clients send `Authorization: Key <key>` or `Key <key_id>:<key_secret>` (the pair is one
configured key, written `id:secret` in `API_KEYS`), and `fal auth login` users send
`Bearer <token>` (compared like a key). With keys configured, a missing or unknown key is a 401
and each key sees only its own requests: another key's request id answers 404, as if it did not
exist. With no keys configured the API is open (meant for loopback) and everyone shares one owner.

Owners are stored as a SHA-256 of the key, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import HTTPException

from tooncrafter.settings import Settings

OPEN_OWNER = ""


def credential_from_header(value: str | None) -> str | None:
    """The secret in `Key <k>`, `Key <id>:<secret>` or `Bearer <t>`; None when absent or malformed."""
    if not value:
        return None
    scheme, _, credential = value.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() not in ("key", "bearer") or not credential:
        return None
    return credential


def owner_of(credential: str) -> str:
    return hashlib.sha256(credential.encode("utf-8")).hexdigest()


def authenticate(settings: Settings, authorization: str | None) -> str:
    """The owner id of the caller; raises 401 when keys are configured and this one is not among them."""
    if not settings.auth_enabled:
        return OPEN_OWNER
    credential = credential_from_header(authorization)
    if credential is None:
        raise HTTPException(
            status_code=401,
            detail="Missing credentials: send 'Authorization: Key <your key>'",
            headers={"WWW-Authenticate": "Key"},
        )
    # compare against every key so the time taken does not tell which prefix matched
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(credential.encode("utf-8"), key.encode("utf-8"))
    if not matched:
        raise HTTPException(status_code=401, detail="Invalid API key", headers={"WWW-Authenticate": "Key"})
    return owner_of(credential)
