"""Schema migrations of the index (Alembic), run by `Index` at start-up.

`upgrade(engine)` brings a database to the newest revision in `versions/`:

- at head already (every start but the first after an upgrade): one cheap version query;
- new database: every revision from 0001_initial on;
- created before migrations (by `metadata.create_all`: tables, no `alembic_version`): adopted,
  0001_initial creates only the tables it lacks and records the database at 0001 (a stamp, which
  also repairs a deployment from before some table), then the later revisions run.

Concurrent first starts are serialised: PostgreSQL by a transaction-level advisory lock around
the whole upgrade (DDL is transactional there), SQLite by one `BEGIN IMMEDIATE` transaction
(the write lock; the others wait on the busy timeout and then find the database at head).

No alembic.ini: `config()` builds the Alembic configuration in code. A schema change is a new
file in `versions/` whose `down_revision` is the previous head, written by hand or with

    python -m dicom_node.migrations revision -m "jobs: stage leases" --rev-id 0002_job_stages

(`--autogenerate` diffs `dicom_node.index.metadata` against the database named by
DICOM_NODE_DATABASE_URL, which must be at the previous head). Revision IDs are at most 32
characters (the `alembic_version` column). tests/dicom_node/test_migrations.py fails while
`dicom_node.index.metadata` and the migrated schema differ.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(__file__).resolve().parent
INITIAL_REVISION = "0001_initial"
# pg_advisory_xact_lock key (per database): "dicom_m" in ASCII.
_PG_LOCK_KEY = 0x6469636F6D5F6D


def config(connection: Connection | None = None) -> Config:
    """The Alembic configuration of the index; `connection`, if given, is the one env.py migrates."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION).replace("%", "%%"))
    cfg.set_main_option("file_template", "%%(rev)s")  # versions/<revision id>.py
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def head_revisions() -> frozenset[str]:
    from alembic.script import ScriptDirectory

    return frozenset(ScriptDirectory.from_config(config()).get_heads())


def current_revisions(conn: Connection) -> frozenset[str]:
    from alembic.runtime.migration import MigrationContext

    return frozenset(MigrationContext.configure(conn).get_current_heads())


def upgrade(engine: Engine) -> None:
    """Migrate the database behind `engine` to head (a no-op when it is there already)."""
    heads = head_revisions()
    with engine.connect() as conn:
        if current_revisions(conn) == heads:
            return
    if engine.dialect.name == "sqlite":
        _upgrade_sqlite(engine)
    else:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            _upgrade_locked(conn, heads)


def _upgrade_sqlite(engine: Engine) -> None:
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        saved = driver.isolation_level
        # The driver's own implicit BEGIN off (it would leave DDL outside the transaction):
        # the upgrade runs in the one transaction begun here, which holds the write lock.
        driver.isolation_level = None
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            _upgrade_locked(conn, head_revisions())
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            driver.isolation_level = saved


def _upgrade_locked(conn: Connection, heads: frozenset[str]) -> None:
    from alembic import command

    current = current_revisions(conn)  # again: another process may have migrated meanwhile
    if current == heads:
        return
    unknown = current - _known_revisions()
    if unknown:
        raise RuntimeError(
            f"the index is at revision {', '.join(sorted(unknown))}, which this version of "
            f"dicom-node does not know (its newest is {', '.join(sorted(heads))}): "
            "a newer version migrated it; run that version"
        )
    if not current and set(inspect(conn).get_table_names()) - {"alembic_version"}:
        log.info("index: adopting a database created before migrations (at %s from now on)", INITIAL_REVISION)
    log.info("index: migrating from %s to %s", ", ".join(sorted(current)) or "empty", ", ".join(sorted(heads)))
    command.upgrade(config(conn), "head")


@lru_cache(maxsize=1)
def _known_revisions() -> frozenset[str]:
    from alembic.script import ScriptDirectory

    return frozenset(script.revision for script in ScriptDirectory.from_config(config()).walk_revisions())
