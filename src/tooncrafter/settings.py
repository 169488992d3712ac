"""Settings for the CLI, the HTTP service and the workers: one place, read from the environment.

Every name is read from an environment variable with the prefix `TOONCRAFTER_` (for example
`TOONCRAFTER_API_KEYS=k1,k2`). The process owner (CLI main, the app factory, a test) builds a
`Settings` and passes it down. There is deliberately no module-level instance.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/tooncrafter`, else `~/.local/share/tooncrafter`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tooncrafter"


class Settings(BaseSettings):
    """Everything a deployment can change without touching code."""

    model_config = SettingsConfigDict(env_prefix="TOONCRAFTER_", extra="ignore", validate_default=True)

    # --- model -------------------------------------------------------------------------------
    checkpoint: str | None = Field(
        None, description="Checkpoint file or directory; absent = the Hugging Face repo Doubiiu/ToonCrafter."
    )
    device: str | None = Field(
        None, description="torch device ('cpu', 'cuda', 'cuda:1', ...); absent or 'auto' = cuda if available, else cpu."
    )
    dtype: Literal["auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"] | None = Field(
        None, description="Weights/activations dtype; absent or 'auto' = float16 on GPU, float32 on CPU."
    )
    sketch_checkpoint: str | None = Field(
        None,
        description="The sketch encoder's weights (sketch_encoder.ckpt or a .safetensors of its keys, or a directory "
        "holding one), read by a worker on its first request with sketches; absent = Doubiiu/ToonCrafter's "
        "sketch_encoder.ckpt from the Hugging Face hub.",
    )
    offload: bool = Field(False, description="Keep idle components (CLIP, VAE) on the CPU between uses.")
    compile: bool = Field(False, description="torch.compile the UNet at load time.")

    # --- where state lives ---------------------------------------------------------------------
    data_dir: Path = Field(default_factory=default_data_dir, description="Root of the default database and files.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; absent = sqlite file <data_dir>/jobs.sqlite3 (postgresql+psycopg://... to scale out)."
    )
    storage_url: str | None = Field(None, description="file:///dir or s3://bucket/prefix; absent = file://<data_dir>/files.")
    s3_endpoint_url: str | None = Field(None, description="Endpoint of an S3-compatible store (MinIO, R2, ...).")
    s3_region: str | None = Field(None, description="Region of the S3 bucket; absent = boto3's usual lookup (AWS_DEFAULT_REGION, ~/.aws/config).")
    upload_secret: SecretStr | None = Field(
        None,
        description="HMAC key that signs upload tokens, shared by every API process; absent = one generated once and kept in the database.",
    )

    # --- the HTTP API --------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated accepted keys (`Key <k>`, `Key id:secret`, `Bearer <k>`); empty = open (loopback only).",
    )
    public_url: str | None = Field(
        None, description="Base URL the API puts in the URLs it returns (https://api.example.com); absent = from the request."
    )
    endpoint_id: str = Field("fal-ai/toon-crafter", description="The `owner/alias` this server answers to.")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"], description="Allowed CORS origins.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "::1"],
        description="Without PUBLIC_URL, the URLs the API returns are built from the request's Host, which must be "
        "one of these (comma list; '*.example.com' matches subdomains, '*' anything); any other Host is a 400.",
    )
    sse_keepalive_s: float = Field(15.0, gt=0, description="Seconds between `: ping` comments on status streams.")
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token that GET /metrics (Prometheus) requires, apart from the API keys: a scraper "
        "sends `Authorization: Bearer <token>`; absent = /metrics answers 404.",
    )
    max_streams_per_key: int = Field(
        8,
        ge=1,
        description="Open event streams (status streams and streaming runs) per API key and API process; "
        "past it a new stream is a 429 until one ends.",
    )
    log_format: Literal["text", "json"] = Field("text", description="Log lines as plain text or one JSON object per line.")

    # --- connection and request limits of the embedded server (`tooncrafter serve`) -------------
    max_connections: int = Field(
        4096, ge=1, description="Open connections at most; past it a new connection gets a 503 and is closed."
    )
    request_header_timeout_s: float = Field(
        10.0, gt=0, description="A request's headers must arrive within this time, or the connection is closed."
    )
    request_body_timeout_s: float = Field(
        300.0, gt=0, description="A request's body must arrive within this time once its headers are in."
    )
    keep_alive_s: float = Field(5.0, gt=0, description="An idle kept-alive connection is closed after this time.")
    max_request_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest request body (JSON) outside the upload routes; larger is a 413."
    )

    # --- inputs (keyframe URLs) ----------------------------------------------------------------
    allow_private_urls: bool = Field(False, description="Allow input/webhook URLs on private, loopback or link-local addresses.")
    input_max_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest accepted input file.")
    input_timeout_s: float = Field(30.0, gt=0, description="Time limit for fetching one input URL.")
    input_max_redirects: int = Field(5, ge=0, description="Redirects followed when fetching an input URL.")
    request_max_pixels: int = Field(
        64_000_000,
        gt=0,
        description="Pixels of all keyframes of one request together (each is resized to the model's size; "
        "this bounds the memory one request can take while decoding).",
    )
    max_upload_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Largest file accepted by the upload endpoint.")
    input_inline_max_bytes: int = Field(
        16 * 1024,
        ge=0,
        description="A request's input (JSON) larger than this is stored as a file in the storage backend and the "
        "job row keeps its key, so status reads never carry it (0 = always a file).",
    )

    # --- jobs and workers ----------------------------------------------------------------------
    result_retention_s: float = Field(
        24 * 3600.0, gt=0, description="How long finished requests (result, logs, output files) are kept."
    )
    upload_retention_s: float = Field(
        24 * 3600.0,
        gt=0,
        description="How long uploaded files (and parts of multipart uploads never completed) are kept.",
    )
    lease_s: float = Field(60.0, gt=0, description="A running job whose worker has not renewed its lease for this long is requeued.")
    heartbeat_s: float | None = Field(None, gt=0, description="Lease renewal period; absent = lease_s / 3.")
    max_attempts: int = Field(3, ge=1, description="Runs of one job (lease expiries included) before it fails for good.")
    worker_poll_s: float = Field(0.5, gt=0, description="How often an idle worker looks for queued jobs.")
    cancel_poll_s: float = Field(
        0.5, ge=0, description="A running job reads its cancel flag from the database at most this often (checked between steps)."
    )
    purge_interval_s: float = Field(60.0, gt=0, description="How often expired results and uploads are deleted.")
    worker_grace_s: float = Field(
        300.0,
        ge=0,
        description="On SIGTERM a worker takes no new job and gives the running one this long to finish; "
        "past it the job goes back to the queue after its current step.",
    )
    worker_batch_size: int = Field(
        1,
        ge=1,
        le=64,
        description="Queued jobs a worker runs at once as one batch: their UNet calls merge into one per step "
        "(more throughput, more memory: each job's activations are held together). 1 = one job at a time.",
    )
    worker_alive_s: float = Field(
        30.0,
        gt=0,
        description="A worker not seen for this long counts as gone (workers check in every third of it); "
        "/health answers 503 while no worker has been seen within it.",
    )

    # --- webhooks ------------------------------------------------------------------------------
    webhook_max_attempts: int = Field(10, ge=1, description="Deliveries tried per webhook (fal: 10 over about 2 h).")
    webhook_base_delay_s: float = Field(15.0, gt=0, description="Delay before the 2nd try; doubles after each failure.")
    webhook_max_delay_s: float = Field(3600.0, gt=0, description="Upper bound of one retry delay.")
    webhook_timeout_s: float = Field(15.0, gt=0, description="Time limit of one webhook POST.")

    @field_validator("api_keys", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("endpoint_id")
    @classmethod
    def _two_segments(cls, value: str) -> str:
        parts = value.strip("/").split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"endpoint_id must be 'owner/alias', got {value!r}")
        return "/".join(parts)

    @property
    def resolved_database_url(self) -> str:
        """`database_url`, or the SQLite file in `data_dir`."""
        return self.database_url or f"sqlite:///{self.data_dir / 'jobs.sqlite3'}"

    @property
    def resolved_storage_url(self) -> str:
        """`storage_url`, or `file://<data_dir>/files`; an s3:// URL carries `s3_endpoint_url`/`s3_region` as query."""
        url = self.storage_url or f"file://{(self.data_dir / 'files').resolve()}"
        if url.startswith("s3://") and "?" not in url:
            query = {k: v for k, v in (("endpoint_url", self.s3_endpoint_url), ("region", self.s3_region)) if v}
            if query:
                from urllib.parse import urlencode

                url = f"{url}?{urlencode(query)}"
        return url

    @property
    def resolved_heartbeat_s(self) -> float:
        return self.heartbeat_s or self.lease_s / 3

    @property
    def worker_checkin_s(self) -> float:
        return self.worker_alive_s / 3

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
