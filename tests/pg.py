"""A throwaway PostgreSQL for the tests: Debian's `postgresql` package (scripts/bootstrap-postgres),
a cluster initialised in a temp directory with initdb, started with pg_ctl on a free loopback
port as the `postgres` user, and always stopped and removed (shared/ENVIRONMENT.md "PostgreSQL 15").

`PostgresCluster.database()` makes a fresh, empty database and returns its URL, so a
session-scoped cluster serves every test a database of its own.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "fleet"  # the cluster's superuser (trust authentication, loopback only)
START_TIMEOUT_S = 60.0


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (15 or later), or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    return (
        Path(found[-1]).parent if found and int(Path(found[-1]).parent.parent.name) >= 15 else None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="sf-pg-"))
        self.data = self.dir / "data"
        self.port = 0
        self._names = itertools.count(1)
        self._as_root = (
            os.geteuid() == 0
        )  # initdb refuses root: run it as the package's postgres user

    def _run(
        self, *argv: str, check: bool = True, timeout: float = START_TIMEOUT_S
    ) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if self._as_root:
            cmd = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(_quote(a) for a in cmd)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)

    def start(self) -> PostgresCluster:
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            USER,
            "-E",
            "UTF8",
        )
        self.port = _free_port()
        # -w: pg_ctl waits for the server to accept connections (its own readiness check);
        # a port taken meanwhile fails the start, and we try another.
        for _ in range(3):
            out = self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.dir / "log"),
                "-o",
                f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                "-w",
                "-t",
                str(int(START_TIMEOUT_S)),
                "start",
                check=False,
            )
            if out.returncode == 0:
                break
            self.port = _free_port()
        else:
            raise RuntimeError(
                f"PostgreSQL did not start in {self.dir}: {out.stderr[-2000:]}\n{self._log()}"
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            ready = subprocess.run(
                [
                    str(self.bindir / "pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    USER,
                    "-d",
                    "postgres",
                    "-t",
                    "5",
                ],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL on port {self.port} not ready in {START_TIMEOUT_S:.0f}s\n{self._log()}"
                )
            time.sleep(0.1)  # the poll interval of a readiness loop with a deadline

    def _log(self) -> str:
        try:
            return (self.dir / "log").read_text()[-2000:]
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        subprocess.run(
            [
                str(self.bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                USER,
                name,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return self.url(name)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                    check=False,
                )
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_) -> None:
        self.stop()


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
