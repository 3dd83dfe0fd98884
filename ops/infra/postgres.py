"""A PostgreSQL cluster of the project's own, run with Debian's initdb/pg_ctl.

Debian's server refuses to run as root, and sessions and CI run as root: there every server
tool runs as the ``postgres`` user and the data lives where that user can reach it.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InfraError
from ops.infra.state import port_open
from pipeline.secret_files import private_dir, write_secret
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DATABASE = "pipeline"
USER = "postgres"
_START_TIMEOUT = 60


@dataclass(frozen=True)
class PostgresStatus:
    running: bool
    pid: int | None
    port: int
    data_dir: Path


class LocalPostgres:
    """initdb (once), start, stop and status of the project's own PostgreSQL cluster."""

    def __init__(self, settings: Settings, port: int = 5433) -> None:
        self.port = port
        self.as_root = os.geteuid() == 0
        # Root's home is closed to the postgres user, so as root the cluster lives under
        # /var/lib, one folder per port so that test clusters never touch a developer's.
        default_home = (Path(f"/var/lib/image-pipeline/postgres-{port}") if self.as_root
                        else settings.state_dir / f"postgres-{port}")
        self.home = Path(os.environ.get("PIPELINE_PG_DIR") or default_home)
        self.data_dir = self.home / "data"
        self.log_file = self.home / "server.log"
        # Kept with the cluster, not the state folder: the cluster outlives any one state
        # folder (CI makes a new one per run), and its password must stay with it.
        self.password_file = self.home / "client.password"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{USER}:{self._password()}@{HOST}:{self.port}/{DATABASE}"

    def status(self) -> PostgresStatus:
        """Read the server's own pid file; running means ``pg_ctl status`` says so."""
        if not (self.data_dir / "PG_VERSION").exists():
            return PostgresStatus(False, None, self.port, self.data_dir)
        result = self._run_tool("pg_ctl", "status", "-D", str(self.data_dir), check=False)
        pid = None
        if result.returncode == 0:
            pid_line = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            pid = int(pid_line)
        return PostgresStatus(pid is not None, pid, self.port, self.data_dir)

    def start(self) -> bool:
        """initdb when new, start unless running, create the database; True if started now."""
        if self.status().running:
            self._ensure_database()
            return False
        if port_open(HOST, self.port):
            raise InfraError(
                f"port {self.port} on {HOST} is taken by another process; choose another with "
                "--postgres-port or set DATABASE_URL to that server"
            )
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        options = f"-p {self.port} -k {self.home} -c listen_addresses={HOST} -c max_connections=200"
        result = self._run_tool(
            "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
            "-t", str(_START_TIMEOUT), "-o", options, check=False,
        )
        if result.returncode != 0:
            raise InfraError(f"PostgreSQL did not start: {result.stderr.strip()[-300:]}; see {self.log_file}")
        self._ensure_database()
        return True

    def stop(self) -> bool:
        """Stop the cluster (fast shutdown); True if it was running."""
        if not self.status().running:
            return False
        result = self._run_tool("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", check=False)
        if result.returncode != 0:
            raise InfraError(f"PostgreSQL did not stop: {result.stderr.strip()[-300:]}")
        return True

    def _initdb(self) -> None:
        password = secrets.token_urlsafe(18)
        # The folder is private before the password goes in, and both password files are
        # 0600 from their first byte: no moment in which another user could read them.
        private_dir(self.home)
        write_secret(self.password_file, password)
        pwfile = write_secret(self.home / ".initdb-password", password)
        if self.as_root:
            user = pwd.getpwnam("postgres")
            for path in (self.home, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        try:
            result = self._run_tool(
                "initdb", "-D", str(self.data_dir), "-U", USER, "--auth=scram-sha-256",
                f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", check=False,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise InfraError(f"initdb failed: {result.stderr.strip()[-300:]}")

    def _ensure_database(self) -> None:
        import psycopg2

        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                conn = psycopg2.connect(host=HOST, port=self.port, user=USER,
                                        password=self._password(), dbname="postgres")
                break
            except psycopg2.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise InfraError(f"PostgreSQL on port {self.port} refuses clients: {exc}") from exc
                time.sleep(0.2)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cursor.fetchone() is None:
                    cursor.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            conn.close()

    def _password(self) -> str:
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            raise InfraError(
                f"{self.password_file} is missing, so the cluster in {self.data_dir} cannot be "
                f"used; remove {self.home} to start afresh, or set PIPELINE_PG_DIR"
            ) from None

    def _run_tool(self, tool: str, *args: str, check: bool) -> subprocess.CompletedProcess:
        command = [str(_bin_dir() / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, cwd="/")


def _bin_dir() -> Path:
    configured = os.environ.get("PG_BIN_DIR")
    if configured:
        return Path(configured)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise InfraError(
        "PostgreSQL server tools (initdb, pg_ctl) not found: apt-get install postgresql, "
        "set PG_BIN_DIR, or set DATABASE_URL to an existing server"
    )
