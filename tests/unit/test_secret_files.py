"""Secret files are 0600 from their first byte and their folders 0700 before anything goes in.

Every test runs under umask 0o000: a write with default permissions would show as 0666 (a
folder as 0777), so a file that was ever readable by others cannot pass unnoticed. Each byte
written is checked against the file's mode at the moment it is written.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from ops.infra import postgres as postgres_module
from ops.infra.postgres import LocalPostgres
from ops.infra.state import infra_env_path, publish
from pipeline.secret_files import private_dir, write_secret
from pipeline.settings import Settings


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture(autouse=True)
def open_umask():
    """The most permissive umask: only an explicit mode keeps a file private."""
    previous = os.umask(0o000)
    yield
    os.umask(previous)


@pytest.fixture
def writes(monkeypatch) -> list[tuple[str, int, int]]:
    """(path, its mode, its folder's mode) at every os.write: what each first byte met."""
    seen: list[tuple[str, int, int]] = []
    real_write = os.write

    def recording_write(fd: int, data) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        seen.append((path, stat.S_IMODE(os.fstat(fd).st_mode), mode(Path(path).parent)))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    return seen


def test_a_secret_is_0600_from_its_first_byte(tmp_path, writes):
    path = write_secret(tmp_path / "token", "s3cret\n")
    assert path == tmp_path / "token"
    assert path.read_text() == "s3cret\n"
    assert mode(path) == 0o600
    assert writes and all(m == 0o600 for _, m, _ in writes)
    assert [p.name for p in tmp_path.iterdir()] == ["token"]  # no temporary file left


def test_a_secret_replaces_a_wider_file_without_ever_widening_the_new_content(tmp_path, writes):
    path = tmp_path / "client.password"
    path.write_text("old")
    path.chmod(0o644)
    write_secret(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o600
    assert all(m == 0o600 for _, m, _ in writes)


def test_a_symlink_at_the_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "secret").symlink_to(victim)
    write_secret(tmp_path / "secret", "s3cret")
    assert victim.read_text() == "untouched"
    assert not (tmp_path / "secret").is_symlink() and mode(tmp_path / "secret") == 0o600


def test_a_private_dir_is_0700_new_or_old(tmp_path):
    assert mode(private_dir(tmp_path / "a" / "b")) == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    assert mode(private_dir(old)) == 0o700


def test_initdb_writes_both_passwords_0600_into_a_0700_folder_first(tmp_path, monkeypatch, writes):
    """What initdb finds when it starts: a private folder, both password files 0600, and
    nothing in the folder was ever written while it was open to others."""
    home = tmp_path / "pg"
    monkeypatch.setenv("PIPELINE_PG_DIR", str(home))
    cluster = LocalPostgres(Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path / "state")}), port=5999)
    cluster.as_root = False  # no chown to the postgres user in a unit test
    seen_by_initdb = {}

    def fake_tool(tool, *args, check):
        pwfile = Path(next(a for a in args if a.startswith("--pwfile=")).split("=", 1)[1])
        seen_by_initdb.update(home=mode(home), pwfile=mode(pwfile), client=mode(cluster.password_file),
                              password=pwfile.read_text())
        return postgres_module.subprocess.CompletedProcess([tool], 0, "", "")

    monkeypatch.setattr(cluster, "_run_tool", fake_tool)
    cluster._initdb()

    assert seen_by_initdb["home"] == 0o700
    assert seen_by_initdb["pwfile"] == seen_by_initdb["client"] == 0o600
    assert seen_by_initdb["password"] == cluster.password_file.read_text()
    assert not (home / ".initdb-password").exists()  # removed once initdb has read it
    assert {Path(p).parent for p, _, _ in writes} == {home}
    assert all((m, folder) == (0o600, 0o700) for _, m, folder in writes)  # the folder first


def test_infra_env_with_the_database_password_is_0600(tmp_path, writes):
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path / "state")})
    publish(settings, DATABASE_URL="postgresql+psycopg2://postgres:pw@127.0.0.1:5433/pipeline")
    assert mode(infra_env_path(settings)) == 0o600
    assert "pw@" in infra_env_path(settings).read_text()
    assert writes and all(m == 0o600 for _, m, _ in writes)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_the_test_apiservers_key_token_and_kubeconfig_are_0600(tmp_path, writes):
    pytest.importorskip("kubernetes")
    from devkit.kube.apiserver import ApiServer

    server = ApiServer(workdir=tmp_path)
    server._write_credentials()
    kubeconfig = server.kubeconfig("a-token", tmp_path / "clients" / "kubeconfig")
    for secret in (tmp_path / "sa.key", tmp_path / "tokens.csv", kubeconfig):
        assert mode(secret) == 0o600, secret
    assert {Path(p).name.split(".")[1] for p, _, _ in writes} >= {"sa", "tokens", "kubeconfig"}
    assert all(m == 0o600 for _, m, _ in writes)
