"""Alembic's environment for the state database: run by coordinator/state/migrate.py on a
connection it opened (inside its transaction and lock); no alembic.ini, no logging setup."""

from alembic import context

from coordinator.state.migrate import VERSION_TABLE
from coordinator.state.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
