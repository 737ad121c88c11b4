"""Run untrusted Python (a model's code answer and its tests) in a sandbox.

Each run is a separate process under bubblewrap (`bwrap`, Debian package `bubblewrap`):
- new network namespace (no interface but a down loopback: nothing to connect to), new PID, IPC and UTS
  namespaces, killed with its parent;
- a minimal file system: `/usr` (and the `/bin`, `/lib*` links into it) and the Python installation read-only,
  fresh `/proc` and `/dev`, and nothing else of the host: no `/home`, `/root`, `/etc`, `/run`, `/var`, `/tmp`,
  hence no host Unix socket to connect to and no file to read secrets from;
- the working directory and `/tmp` are size-limited tmpfs mounts that vanish with the run; the program arrives
  through file descriptors, so nothing is written on the host;
- an empty environment, for the program and for bwrap itself (the namespace's PID 1 would show bwrap's);
- resource limits set before bwrap starts and inherited: CPU seconds, address space, file size, open files and
  processes (a fork bomb hits the process limit); a wall-clock limit kills the whole namespace; output is
  written to size-capped files, not buffered in this process;
- run as root, the sandbox drops to `nobody` (no capabilities, no new privileges) first: root is exempt from the
  process limit. Otherwise bwrap makes a user namespace and forbids nested ones.

Without `bwrap` (or where the kernel refuses the namespaces) the sandbox refuses to run
(:class:`SandboxUnavailableError`) rather than execute code unconfined: there is no seccomp-only fallback.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO

from coe.errors import CoeError

NOBODY = 65534


class SandboxUnavailableError(CoeError):
    """The machine cannot sandbox code (no bubblewrap, or no namespaces): never a score of 0."""

    status_code = 503
    error_type = "sandbox_unavailable"


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run."""

    cpu_s: int = 10
    wall_s: float = 20.0
    memory_mb: int = 1024
    processes: int = 32
    file_mb: int = 16
    tmpfs_mb: int = 64
    open_files: int = 64
    output_bytes: int = 64 * 1024


@dataclass(frozen=True)
class SandboxResult:
    """What a run did: exit status (bwrap reports a signal as 128 + its number), output, and whether a time
    limit ended it."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _interpreter() -> tuple[str, str]:
    """(the Python installation's folder, its binary relative to it).

    The sandbox mounts that folder read-only at /opt/python: a virtualenv's python links into an installation
    that may sit where `nobody` cannot go (pyenv under /root).
    """
    prefix = os.path.realpath(sys.base_prefix)
    binary = os.path.realpath(sys.executable)
    if not binary.startswith(prefix + os.sep):
        raise SandboxUnavailableError(f"python binary {binary} is not inside its installation {prefix}")
    return prefix, os.path.relpath(binary, prefix)


def _count_tasks(uid: int) -> int:
    """Threads of `uid` (RLIMIT_NPROC counts threads, not processes)."""
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{d}/task"))
            except OSError:
                pass
    return n


def _system_mounts() -> list[str]:
    """/usr read-only, and /bin, /sbin, /lib* as the links (merged /usr) or folders they are on this host."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


class Sandbox:
    """Runs Python source in a fresh bubblewrap sandbox per call."""

    def __init__(self, limits: SandboxLimits | None = None, bwrap: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        found = bwrap or shutil.which("bwrap")
        if not found:
            raise SandboxUnavailableError(
                "the code sandbox needs bubblewrap: apt-get install bubblewrap (or your distribution's package); "
                "coe never runs generated code without it")
        self.bwrap = found
        self.python_prefix, self.python_binary = _interpreter()
        self._checked = False

    def _preexec(self, as_root: bool) -> None:
        lim = self.limits
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (lim.memory_mb << 20, lim.memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_mb << 20, lim.file_mb << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim.open_files, lim.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # Counted per user, threads included: as root the code runs as nobody (who runs nothing else); a user's
        # sandbox leaves room for what that user already runs.
        nproc = lim.processes + (0 if as_root else _count_tasks(os.getuid()))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    def _argv(self, files: dict[str, int], info_fd: int, as_root: bool) -> list[str]:
        # Root: bwrap mounts as root (it can reach a Python installed under /root), then setpriv drops to nobody
        # with no capabilities: uid 0 is exempt from the process limit, nobody is not. Otherwise: bwrap makes
        # a user namespace (and forbids nested ones) and the code keeps the caller's uid.
        namespaces = (["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
                      if as_root else ["--unshare-all", "--unshare-user", "--disable-userns"])
        drop = (["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                 "--bounding-set=-all", "--no-new-privs"] if as_root else [])
        size = str(self.limits.tmpfs_mb << 20)
        argv = [
            self.bwrap,
            *_system_mounts(),
            "--ro-bind", self.python_prefix, "/opt/python",
            "--dev", "/dev",
            "--proc", "/proc",
            "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
            "--perms", "1777", "--size", size, "--tmpfs", "/work",
        ]
        for name, fd in files.items():
            argv += ["--perms", "0644", "--file", str(fd), f"/work/{name}"]
        return [
            *argv,
            "--chdir", "/work",
            *namespaces,
            "--die-with-parent",
            "--new-session",
            "--info-fd", str(info_fd),
            "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
            "--setenv", "HOME", "/work",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "LD_LIBRARY_PATH", "/opt/python/lib",
            "--", *drop, f"/opt/python/{self.python_binary}", "-E", "-s", "-B", "/work/main.py",
        ]

    def run(self, source: str, *, files: dict[str, str] | None = None) -> SandboxResult:
        """Run `source` as /work/main.py, next to `files` ({name: text}); its exit status and capped output.

        Raises :class:`SandboxUnavailableError` when bwrap could not set the sandbox up (never a result).
        """
        if not self._checked:
            self._check()
        return self._run(source, files or {})

    def _run(self, source: str, files: dict[str, str]) -> SandboxResult:
        as_root = os.geteuid() == 0
        named = {"main.py": source, **files}
        if any("/" in n or n.startswith(".") or not n for n in named):
            raise ValueError(f"sandbox file names must be plain names: {sorted(named)}")
        opened: list[IO[bytes]] = []
        try:
            fds: dict[str, int] = {}
            for name, text in named.items():
                f = tempfile.TemporaryFile()  # already unlinked: only the descriptor reaches bwrap
                f.write(text.encode())
                f.seek(0)
                opened.append(f)
                fds[name] = f.fileno()
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            opened += [out, err]
            info_r, info_w = os.pipe()
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(
                    self._argv(fds, info_w, as_root), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env={},
                    preexec_fn=lambda: self._preexec(as_root), cwd="/",  # noqa: PLW1509
                    pass_fds=(*fds.values(), info_w),
                )
            finally:
                os.close(info_w)
            timed_out = False
            try:
                proc.wait(timeout=self.limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill(proc)
                proc.wait()
            wall = time.monotonic() - t0
            with os.fdopen(info_r, "rb") as info:
                started = b"child-pid" in info.read()
            cap = self.limits.output_bytes
            out.seek(0)
            err.seek(0)
            stdout = out.read(cap).decode("utf-8", "replace")
            stderr = err.read(cap).decode("utf-8", "replace")
            if not started and not timed_out:
                raise SandboxUnavailableError(f"bubblewrap could not set up the sandbox (exit {proc.returncode}): "
                                              f"{stderr.strip()[-300:]}")
            rc = proc.returncode
            # RLIMIT_CPU sends SIGXCPU at the soft limit and SIGKILL at the hard one; bwrap reports 128 + signal.
            timed_out = timed_out or rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
            return SandboxResult(rc, stdout, stderr, timed_out, wall)
        finally:
            for f in opened:
                f.close()

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # bwrap and everything in its session; the PID namespace dies with it
        except ProcessLookupError:
            pass

    def _check(self) -> None:
        """One trial run: a kernel without namespaces is a clear error, not a 0 score on every item."""
        try:
            res = self._run("print('ok')", {})
        except SandboxUnavailableError as err:
            raise SandboxUnavailableError(
                f"{err.message}; bubblewrap needs unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1) or root") from None
        if res.stdout.strip() != "ok":
            raise SandboxUnavailableError(f"the sandbox's trial run failed (exit {res.returncode}): "
                                          f"{res.stderr.strip()[-300:]}")
        self._checked = True

