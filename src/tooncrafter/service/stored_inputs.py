"""Small rows: a large input document lives in the storage backend, and the job row keeps its key.

A submission's input can be tens of MiB (keyframes sent as data URIs). Kept in the job row, it
would be carried by every read of that row; here, an input whose JSON is over
`input_inline_max_bytes` is written at submit as a JSON file to the same storage as uploads and
outputs (`save_input`), the row keeps only the key (`input_key`), and only the worker that claims
the job reads the file back (`load_input`). Status, queue-position, SSE and result reads never
select the input (see `JobStore.get`), so their cost does not depend on its size. The retention
purge deletes the file with its job.
"""

from __future__ import annotations

import json
from typing import Any

from tooncrafter.service.jobs import Job
from tooncrafter.service.storage.base import Storage

INPUT_FILE_NAME = "input.json"


class StoredInputMissing(Exception):
    """A job's stored input file is gone (its storage was wiped or another deployment purged it)."""


def save_input(storage: Storage, document: dict[str, Any], *, inline_max_bytes: int) -> tuple[dict[str, Any] | None, str | None]:
    """(document, None) when it is small enough for the row, else (None, key of the file it was stored in)."""
    encoded = json.dumps(document).encode("utf-8")
    if len(encoded) <= inline_max_bytes:
        return document, None
    return None, storage.put(encoded, content_type="application/json", file_name=INPUT_FILE_NAME).key


def load_input(storage: Storage, job: Job) -> dict[str, Any]:
    """A claimed job's input document: from its row, or read back from storage."""
    if job.input_key is None:
        if job.input is None:
            raise ValueError(f"job {job.id} was read without its input (JobStore.get never selects it)")
        return job.input
    try:
        return json.loads(storage.read(job.input_key))
    except FileNotFoundError as exc:
        raise StoredInputMissing(f"the stored input of request {job.id} is missing") from exc
