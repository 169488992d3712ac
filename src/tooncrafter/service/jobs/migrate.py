"""Schema migrations (Alembic): applied on every open of the job store and by `tooncrafter db upgrade`,
serialised across processes by a deployment-wide lock."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import (
    Connection,
    Engine,
    inspect,
    text,
)

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BASELINE_REVISION = "0001"  # the schema of the first release, which made its tables with create_all
_PG_MIGRATION_LOCK = 7_362_291_047  # any constant: serialises migrations across processes


def _alembic_config(connection: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the deployment-wide migration lock.

    PostgreSQL: a transaction-scoped advisory lock (DDL is transactional there, so the whole
    upgrade commits or not at all). SQLite: an exclusive file lock next to the database file.
    """
    if engine.dialect.name == "sqlite":
        import fcntl

        lock_path = Path(f"{engine.url.database}.migrate.lock")
        with open(lock_path, "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                with engine.begin() as conn:
                    yield conn
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        yield conn


def migrate_engine(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision` (all migrations by default); safe to call from many processes at once.

    A database made by the first release (tables, no Alembic version) is stamped as the baseline
    first; a version row whose tables are gone (dropped by hand) is treated as an empty database.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with _migration_lock(engine) as conn:
        tables = set(inspect(conn).get_table_names())
        config = _alembic_config(conn)
        current = MigrationContext.configure(conn).get_current_revision()
        if "jobs" in tables and current is None:
            logger.info("stamping a pre-migration job store as revision %s", BASELINE_REVISION)
            command.stamp(config, BASELINE_REVISION)
        elif "jobs" not in tables and current is not None:
            logger.warning("the database has an Alembic version (%s) but no tables: migrating from scratch", current)
            conn.execute(text("DELETE FROM alembic_version"))
        command.upgrade(config, revision)
