"""Settings from the environment, and `serve`'s loopback rule."""

from __future__ import annotations

import pytest

from tooncrafter.service import server
from tooncrafter.settings import Settings


def test_env_names_and_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("TOONCRAFTER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TOONCRAFTER_API_KEYS", "k1, id:secret ,")
    monkeypatch.setenv("TOONCRAFTER_ALLOW_PRIVATE_URLS", "true")
    monkeypatch.setenv("TOONCRAFTER_PUBLIC_URL", "https://api.example.test/")
    monkeypatch.setenv("TOONCRAFTER_CHECKPOINT", "/models/tc")
    monkeypatch.setenv("TOONCRAFTER_DEVICE", "cuda:1")
    monkeypatch.setenv("TOONCRAFTER_DTYPE", "bfloat16")
    monkeypatch.setenv("TOONCRAFTER_SKETCH_CHECKPOINT", "/models/sketch_encoder.ckpt")
    settings = Settings()
    assert settings.sketch_checkpoint == "/models/sketch_encoder.ckpt"
    assert settings.api_keys == ["k1", "id:secret"] and settings.auth_enabled
    assert settings.allow_private_urls and settings.public_url == "https://api.example.test"
    assert (settings.checkpoint, settings.device, settings.dtype) == ("/models/tc", "cuda:1", "bfloat16")
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    assert settings.resolved_storage_url == f"file://{tmp_path.resolve() / 'files'}"
    monkeypatch.setenv("TOONCRAFTER_DATABASE_URL", "postgresql+psycopg://u@db/tc")
    monkeypatch.setenv("TOONCRAFTER_STORAGE_URL", "s3://bucket/prefix")
    settings = Settings()
    assert settings.resolved_database_url == "postgresql+psycopg://u@db/tc"
    assert settings.resolved_storage_url == "s3://bucket/prefix"


def test_empty_keys_mean_open_and_bad_values_fail(monkeypatch, tmp_path):
    monkeypatch.setenv("TOONCRAFTER_API_KEYS", "")
    assert not Settings(data_dir=tmp_path).auth_enabled
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, endpoint_id="just-one-part")
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, dtype="float8")


@pytest.mark.parametrize(
    "keys,host,allow_open,expected",
    [([], "0.0.0.0", False, "127.0.0.1"), ([], "0.0.0.0", True, "0.0.0.0"), (["k"], "0.0.0.0", False, "0.0.0.0"), ([], "::1", False, "::1")],
)
def test_serve_binds_loopback_without_keys(monkeypatch, tmp_path, keys, host, allow_open, expected):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    server.serve(Settings(data_dir=tmp_path, api_keys=keys), host=host, port=1234, with_worker=False, allow_open=allow_open)
    assert seen["host"] == expected and seen["port"] == 1234


LIMIT_SETTINGS = [
    "max_connections", "request_header_timeout_s", "request_body_timeout_s", "keep_alive_s", "max_request_bytes",
    "max_upload_bytes", "api_keys", "max_streams_per_key", "input_inline_max_bytes", "input_max_bytes", "input_timeout_s",
    "input_max_redirects", "allow_private_urls", "webhook_max_attempts", "webhook_timeout_s", "public_url", "allowed_hosts",
    "request_max_pixels", "result_retention_s", "upload_retention_s", "purge_interval_s",
]


def test_the_readme_security_table_names_every_limit_and_only_real_settings():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("**Security limits**", 1)[1].split("\n\n", 1)[0]
    named = {name.lower() for name in re.findall(r"`([A-Z][A-Z0-9_]*[A-Z0-9])`", table)}
    assert named - set(Settings.model_fields) == set(), "the table names settings that do not exist"
    assert set(LIMIT_SETTINGS) - named == set(), "limits missing from the README's security table"
