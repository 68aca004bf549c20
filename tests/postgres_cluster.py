"""A throwaway PostgreSQL cluster for tests: Debian's `postgresql` binaries, initdb in a temp dir,
listening on 127.0.0.1 at a free port, stopped and removed after.

initdb refuses to run as root (CI and the development machines run as root): there it runs as the
unprivileged `postgres` user the Debian package creates, through runuser, in a directory owned by it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from .sidecar_process import free_port


def postgres_bin() -> Optional[Path]:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    def __init__(self):
        self.bin = postgres_bin()
        self.port = free_port()
        self.directory: Optional[Path] = None
        self.user: Optional[str] = None  # run as this user (root cannot run initdb)

    def why_not(self) -> Optional[str]:
        """Why a cluster cannot start here, or None."""
        if self.bin is None:
            return "PostgreSQL is not installed (Debian: apt-get install postgresql; scripts/setup.sh does it)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and no unprivileged 'postgres' user exists to run initdb"
            if shutil.which("runuser") is None:
                return "running as root and runuser (util-linux) is missing"
            self.user = "postgres"
        return None

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def start(self) -> "PostgresCluster":
        reason = self.why_not()
        if reason:
            raise RuntimeError(reason)
        self.directory = Path(tempfile.mkdtemp(prefix="logscore-pg-"))  # not under pytest's root-only tmp
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        data = self.directory / "data"
        result = self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.strip()[-500:]}")
        self.server_start()
        return self

    def server_start(self) -> None:
        options = (f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        result = self._run("pg_ctl", "-D", str(self.directory / "data"), "-o", options,
                           "-l", str(self.directory / "server.log"), "-w", "-t", "30", "start")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stderr.strip()[-500:]}\n{self.server_log()}")

    def server_stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", "fast", "-w", "-t", "30", "stop")

    def server_log(self) -> str:
        try:
            return (self.directory / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.directory is None:
            return
        try:
            self.server_stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def wait_ready(self, timeout: float = 20.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
