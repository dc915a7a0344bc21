"""A real, throwaway PostgreSQL for tests, from Debian's ``postgresql`` package.

``Postgres`` runs ``initdb -A trust`` in a temporary folder, then ``pg_ctl start`` on a
free port on 127.0.0.1 with its unix socket inside that folder, and ``pg_ctl stop -m
immediate`` plus removal of the folder at the end. initdb refuses to run as root, and
tests and CI run as root: then every server command runs as the ``postgres`` user
(``runuser``), and the folder is handed to it. ``binaries()`` is None when the package
is not installed; the fixture skips only then.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.broker import free_port

_names = itertools.count()

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # newest first
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30
SERVER_USER = "postgres"


def binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding initdb and pg_ctl, or None."""
    for bin_dir in BIN_DIRS:
        if os.access(bin_dir / "initdb", os.X_OK) and os.access(bin_dir / "pg_ctl", os.X_OK):
            return bin_dir
    return None


class Postgres:
    """A started PostgreSQL cluster; ``url`` is its ``postgresql://`` URL (user postgres,
    no password, database ``postgres``). Use as a context manager."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "postgres.log"
        self._as_root = os.geteuid() == 0
        self.url = f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/postgres"
        self._started = False

    def __enter__(self) -> Postgres:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.sockets.mkdir()
        if self._as_root:
            user = pwd.getpwnam(SERVER_USER)
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", SERVER_USER,
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        self._pg_start()
        self._started = True

    def _pg_start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=50"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", str(START_TIMEOUT_S), "start",
        )  # fmt: skip

    def pause(self) -> None:
        """Stop the server, keeping its data (a database outage); :meth:`resume` ends it."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-m", "fast", "-w",
            "-t", str(STOP_TIMEOUT_S), "stop",
        )  # fmt: skip

    def resume(self) -> None:
        """Start the server again after :meth:`pause`, on the same port."""
        self._pg_start()

    def new_database(self) -> str:
        """A new, empty database on this server; its URL (postgresql://…)."""
        import sqlalchemy as sa  # the server extra: only tests that use a database

        name = f"t{next(_names)}_{int(time.time() * 1000)}"
        admin = sa.create_engine(self.url.replace("postgresql://", "postgresql+psycopg://"))
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        """Stop the server (if started) and remove its folder; safe to call twice."""
        if self._started:
            self._started = False
            self._run(
                "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w",
                "-t", str(STOP_TIMEOUT_S), "stop", check=False,
            )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        argv = [str(self.bin_dir / tool), *args]
        if self._as_root:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        done = subprocess.run(
            argv,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 30,
            check=False,
        )
        if check and done.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{log[-2000:]}"
            )
