"""Where local infrastructure keeps its files, and the connection settings it publishes."""

from __future__ import annotations

from pathlib import Path

from pipeline.secret_files import write_secret
from pipeline.settings import Settings, read_env_file


def infra_env_path(settings: Settings) -> Path:
    """The file other commands read KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL from."""
    return settings.state_dir / "infra.env"


def publish(settings: Settings, **values: str | None) -> None:
    """Set (or, with None, remove) entries of the infra env file; readable by the owner only."""
    path = infra_env_path(settings)
    current = read_env_file(path)
    for name, value in values.items():
        if value is None:
            current.pop(name, None)
        else:
            current[name] = value
    if not current:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "# Written by `python -m pipeline infra up`; removed by `down`.\n" + "".join(
        f"{name}={value}\n" for name, value in sorted(current.items())
    )
    write_secret(path, body)  # DATABASE_URL carries the database's password


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def process_cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' when gone), to check a pid file still means our process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
