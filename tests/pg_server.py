"""A throwaway PostgreSQL server for tests: initdb into a temporary folder, serve on 127.0.0.1 on
a free port with trust authentication, remove everything afterwards.

Needs the server binaries (Debian: ``apt-get install -y postgresql``). Without them the
``postgres_url`` fixture skips, unless ``GUARDRAIL_REQUIRE_POSTGRES=1`` is set (as in CI), where
a missing or broken PostgreSQL is a failure rather than a silent skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

SUPERUSER = "postgres"
INSTALL_HINT = "install the Debian package: apt-get install -y postgresql"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL can be started here; the message says why and how to get one."""


def find_binaries() -> Path:
    """The folder holding initdb and pg_ctl: PATH first, then the newest Debian install."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda folder: int(Path(folder).parent.name) if Path(folder).parent.name.isdigit()
        else 0,
    )
    for folder in reversed(candidates):
        if all(os.access(Path(folder, tool), os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(folder)
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
        f"/usr/lib/postgresql/*/bin; {INSTALL_HINT}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: then run it as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            "running as root and there is no 'postgres' system user to run the server as; "
            f"{INSTALL_HINT} (it creates the user)"
        ) from None


class PostgresServer:
    """One running server; ``url`` connects to its ``postgres`` database as superuser."""

    def __init__(self, binaries: Path, root: Path, port: int, user: pwd.struct_passwd | None):
        self.binaries = binaries
        self.root = root
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.log = root / "server.log"
        self.port = port
        self.user = user
        self.url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"

    def _run(self, *command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binaries / command[0]), *command[1:]],
            capture_output=True, text=True, timeout=timeout, check=False,
            user=self.user.pw_uid if self.user else None,
            group=self.user.pw_gid if self.user else None,
            # cwd must be readable by the server user (the test's cwd may not be).
            cwd=self.root,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
        )

    def start(self) -> None:
        result = self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-sync",
            "-E", "UTF8", "--locale=C", timeout=120,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {result.stderr.strip() or result.stdout}")
        options = " ".join((
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            f"-c unix_socket_directories={self.sockets}",
            # Throwaway data: durability only costs time here.
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
        ))
        result = self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
            "-o", options, timeout=90,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"pg_ctl start failed: {result.stderr.strip() or result.stdout.strip()}\n"
                f"{self.log_text()[-2000:]}"
            )
        self._wait_ready()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as connection:
                    connection.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(f"server did not accept connections: {exc}") from exc
                time.sleep(0.1)

    def stop(self) -> None:
        if self.data.exists():
            result = self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w",
                               timeout=60)
            if result.returncode != 0:
                self._kill()

    def _kill(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a server, yield it, stop it and delete its folder; raises PostgresUnavailable."""
    binaries = find_binaries()
    user = _server_user()
    # Not under pytest's tmp_path: that lives in a 0700 folder the server user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="guardrail-pg-"))
    server: PostgresServer | None = None
    try:
        (root / "sockets").mkdir()
        if user is not None:
            for path in (root, root / "sockets"):
                os.chown(path, user.pw_uid, user.pw_gid)
        # A free port can be taken between probe and bind by someone else: try a few.
        for attempt in range(3):
            server = PostgresServer(binaries, root, _free_port(), user)
            try:
                server.start()
                break
            except PostgresUnavailable:
                server.stop()
                if attempt == 2 or "could not bind" not in server.log_text():
                    raise
                shutil.rmtree(server.data, ignore_errors=True)
                server.log.unlink(missing_ok=True)
        assert server is not None
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a session-wide throwaway PostgreSQL (superuser, trust auth); skips without one."""
    try:
        context = running_postgres()
        server = context.__enter__()
    except PostgresUnavailable as exc:
        if os.environ.get("GUARDRAIL_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required but unavailable: {exc}")
        pytest.skip(f"no PostgreSQL for tests: {exc}")
    try:
        yield server.url
    finally:
        context.__exit__(None, None, None)
