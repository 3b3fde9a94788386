"""Alembic environment of the index.

Run by `dicom_node.migrations.upgrade` with the connection to migrate in
`config.attributes["connection"]` (inside the caller's transaction), or by
`python -m dicom_node.migrations ...` with the database named by the `sqlalchemy.url` option
or DICOM_NODE_DATABASE_URL (the node's setting).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from dicom_node.index import metadata

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from dicom_node.config import load_settings

    return load_settings().database_url


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        # SQLite alters most things by copying the table: autogenerate writes batch operations.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():  # `upgrade --sql`: the DDL for a DBA to run
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    _migrate(config.attributes["connection"])
else:
    engine = create_engine(_url())
    try:
        with engine.connect() as connection:
            _migrate(connection)
    finally:
        engine.dispose()
