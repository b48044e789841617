"""A hermetic PostgreSQL: its own data directory, port and socket, SCRAM authentication over TCP,
started as an unprivileged user (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


def find_bindir() -> Path:
    """The newest installed server's bin directory (Debian keeps them per major version)."""
    env = os.environ.get("PROCTOR_PG_BINDIR")
    candidates = [env] if env else sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                          key=lambda p: int(Path(p).parent.name), reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config and not env:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out:
            candidates.append(out)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists() and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb) found; install the postgresql package")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _runtime_user() -> pwd.struct_passwd | None:
    """Who runs the server: ourselves, unless we are root — then the `postgres` system user."""
    if os.geteuid() != 0:
        return None
    for name in (os.environ.get("PROCTOR_PG_USER", "postgres"), "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresUnavailable("running as root and no unprivileged user (postgres) to run PostgreSQL as")


@dataclass
class HermeticPostgres:
    superuser_password: str
    port: int = 0
    host: str = "127.0.0.1"
    auth: str = "scram-sha-256"
    ssl_cert: str | None = None
    ssl_key: str | None = None
    ssl_only: bool = False  # with a certificate: refuse TCP clients that do not use TLS (pg_hba `hostssl`)
    base_dir: str | None = None
    extra_conf: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.bindir = find_bindir()
        self.user = _runtime_user()
        self.dir = Path(self.base_dir) if self.base_dir else Path(tempfile.mkdtemp(prefix="proctor-pg-"))
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir / "run"
        self.log_file = self.dir / "postgres.log"
        self.superuser = "postgres"
        self.pid: int | None = None
        if not self.port:
            self.port = free_port(self.host)

    # lifecycle --------------------------------------------------------------------------------
    def _as_server_user(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def init(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # the server user must traverse it
        self.socket_dir.mkdir(exist_ok=True)
        self.socket_dir.chmod(0o700)
        self._own(self.dir)
        self._own(self.socket_dir)
        pwfile = self.dir / ".pw"
        pwfile.write_text(self.superuser_password + "\n")
        pwfile.chmod(0o600)
        self._own(pwfile)
        try:
            subprocess.run(
                [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.superuser,
                 "--pwfile", str(pwfile), "-A", self.auth, "--auth-local=trust", "-E", "UTF8",
                 "--locale=C", "--no-sync"],
                check=True, capture_output=True, text=True, cwd=str(self.dir), **self._as_server_user(),
            )
        except subprocess.CalledProcessError as exc:
            raise PostgresUnavailable(f"initdb failed: {exc.stderr.strip()[-500:]}") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        conf = [
            f"listen_addresses = '{self.host}'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.socket_dir}'",
            f"password_encryption = '{'md5' if self.auth == 'md5' else 'scram-sha-256'}'",
            "fsync = off",  # a throwaway cluster: durability is not what is tested here
            "synchronous_commit = off",
            "full_page_writes = off",
            "max_connections = 300",
            "shared_buffers = 128MB",
            *self.extra_conf,
        ]
        if self.ssl_cert and self.ssl_key:
            for src, name in ((self.ssl_cert, "server.crt"), (self.ssl_key, "server.key")):
                dst = self.data_dir / name
                shutil.copyfile(src, dst)
                dst.chmod(0o600)
                self._own(dst)
            conf += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
            if self.ssl_only:
                hba = self.data_dir / "pg_hba.conf"
                hba.write_text(re.sub(r"(?m)^host(?=\s)", "hostssl", hba.read_text()))
        with open(self.data_dir / "postgresql.auto.conf", "a") as fh:
            fh.write("\n".join(conf) + "\n")

    def start(self, timeout: float = 30.0) -> HermeticPostgres:
        if not self.data_dir.exists():
            self.init()
        self.log_file.touch()
        self._own(self.log_file)
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child process
        try:
            proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=str(self.dir), **self._as_server_user(),
            )
        finally:
            log.close()
        self.pid = proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PostgresUnavailable(f"postgres exited: {self.log_file.read_text()[-1000:]}")
            if self._accepting():
                return self
            time.sleep(0.05)
        self.stop()
        raise PostgresUnavailable(f"postgres did not start within {timeout}s: {self.log_file.read_text()[-1000:]}")

    def _accepting(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                pass
        except OSError:
            return False
        probe = subprocess.run([str(self.bindir / "pg_isready"), "-h", str(self.socket_dir), "-p", str(self.port),
                                "-U", self.superuser], capture_output=True, check=False)
        return probe.returncode == 0

    def stop(self, *, remove: bool = True, timeout: float = 20.0) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGINT)  # fast shutdown
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(self.pid):
                time.sleep(0.05)
            if _alive(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    # access -----------------------------------------------------------------------------------
    def psql(self, sql: str, *, database: str = "postgres", check: bool = True) -> str:
        """Run SQL as the superuser over the private socket (trust, local only)."""
        out = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.superuser, "-d", database, "-c", sql],
            capture_output=True, text=True, check=False,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout

    def dsn(self, user: str, password: str, database: str = "postgres") -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{database}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone once reaped.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True
