"""Alembic environment for the job store.

The service runs migrations itself (`jobs.migrate_engine`, on every open and by `tooncrafter db
upgrade`) and hands its connection over in `config.attributes["connection"]`. Run from the
`alembic` command line instead (e.g. `alembic -x url=postgresql+psycopg://... history` with a
config whose `script_location` points here), the URL comes from `-x url=...` or the usual
TOONCRAFTER_ settings.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from tooncrafter.service.jobs.tables import metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url is None:
        from tooncrafter.settings import Settings

        url = Settings().resolved_database_url
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()
