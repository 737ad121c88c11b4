"""The code sandbox (coe/sandbox.py) on real processes: each escape it must refuse is its own test."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from coe.sandbox import Sandbox, SandboxLimits

@pytest.fixture(autouse=True, scope="module")
def _bubblewrap() -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap (bwrap) is not installed: scripts/test installs it when run as root; otherwise "
                    "apt-get install bubblewrap")


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(cpu_s=2, wall_s=6, memory_mb=512, processes=16))


def test_runs_code_and_returns_its_output(sandbox: Sandbox) -> None:
    r = sandbox.run("import sys\nprint(sum(range(10)))\nsys.exit(3)")
    assert r.stdout.strip() == "45" and r.returncode == 3 and not r.ok


def test_cannot_write_outside_its_directory(sandbox: Sandbox, tmp_path: Path) -> None:
    target = Path(__file__).resolve().parent / "sandbox_was_here.txt"
    parent_tmp = tmp_path / "x.txt"
    script = "\n".join(
        f"try:\n    open({str(p)!r}, 'w').write('x')\n    print('WROTE', {str(p)!r})\nexcept OSError as e:\n    print('refused', e.errno)"
        for p in (target, parent_tmp, Path("/etc/coe-sandbox-test"), Path.home() / "coe-sandbox-test")
    ) + "\nopen('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())"
    r = sandbox.run(script)
    assert "WROTE" not in r.stdout, r.stdout
    assert r.stdout.count("refused") == 4 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    for p in (target, parent_tmp, Path("/etc/coe-sandbox-test"), Path.home() / "coe-sandbox-test"):
        assert not p.exists()


def test_cannot_open_a_socket_to_the_host_or_the_outside(sandbox: Sandbox) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)
    port = server.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    r = sandbox.run(
        "import socket\n"
        f"for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
        "    try:\n        socket.create_connection(addr, timeout=2)\n        print('CONNECTED', addr)\n"
        "    except OSError as e:\n        print('refused', addr, e.errno)\n")
    server.close()
    t.join(6)
    assert "CONNECTED" not in r.stdout and r.stdout.count("refused") == 3, r.stdout + r.stderr
    assert not accepted, "the sandbox reached a socket the parent listens on"


def test_a_fork_bomb_is_contained(sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    r = sandbox.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert r.timed_out and not r.ok
    assert time.monotonic() - t0 < 15
    time.sleep(0.5)
    left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith("main.py")
            and "/work/main.py" in _cmdline(p)]
    assert not left, f"processes of the sandbox outlived it: {left}"


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_a_memory_bomb_fails_inside_the_sandbox(sandbox: Sandbox) -> None:
    r = sandbox.run("x = bytearray(3 << 30)\nprint('ALLOCATED')")
    assert "ALLOCATED" not in r.stdout and not r.ok
    assert "MemoryError" in r.stderr


def test_an_infinite_loop_is_killed_at_its_time_limit(sandbox: Sandbox) -> None:
    r = sandbox.run("while True:\n    pass\n")
    assert r.timed_out and not r.ok
    assert r.wall_s < sandbox.limits.cpu_s + 3
    sleeper = sandbox.run("import time\ntime.sleep(60)")  # no CPU used: the wall-clock limit ends it
    assert sleeper.timed_out and sleeper.wall_s < sandbox.limits.wall_s + 3


def test_the_parents_environment_is_not_visible(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COE_SANDBOX_TEST_SECRET", "hunter2")
    r = sandbox.run("import os\nprint(os.environ.get('COE_SANDBOX_TEST_SECRET'))\nprint(sorted(os.environ))")
    assert "hunter2" not in r.stdout and r.stdout.startswith("None")
    assert "COE_ADMIN_KEY" not in r.stdout


def test_nothing_is_left_behind(sandbox: Sandbox) -> None:
    """The program arrives by descriptor and writes to tmpfs: the host's temp folder is untouched."""
    before = set(os.listdir(tempfile.gettempdir()))
    r = sandbox.run("import os\nos.makedirs('d/e')\nopen('d/e/big.bin', 'wb').write(b'0' * 1000)\nos.chmod('d', 0o500)")
    assert r.ok, r.stderr
    assert set(os.listdir(tempfile.gettempdir())) - before == set()


def test_missing_bubblewrap_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from coe.sandbox import SandboxUnavailableError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        Sandbox()


def test_bwrap_itself_shows_no_secret_and_no_host_socket_is_reachable(sandbox: Sandbox, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """PID 1 of the namespace is bwrap: its environment is empty too; host Unix sockets are not mounted."""
    monkeypatch.setenv("COE_SANDBOX_TEST_SECRET", "hunter2")
    sock_path = tmp_path / "host.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen(1)
    os.chmod(tmp_path, 0o755)
    os.chmod(sock_path, 0o777)
    r = sandbox.run(
        "import glob, os, socket\n"
        "for pid in ['1', 'self']:\n"
        "    try:\n        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n        print(pid, 'refused', e.errno)\n"
        f"s = socket.socket(socket.AF_UNIX)\n"
        f"try:\n    s.connect({str(sock_path)!r})\n    print('CONNECTED')\nexcept OSError as e:\n    print('refused', e.errno)\n"
        "print(sorted(os.listdir('/')))\n"
        "print([p for p in ('/home', '/root', '/etc', '/run', '/var', '/work/main.py') if os.path.exists(p)])\n")
    server.close()
    assert r.ok, r.stderr
    assert "hunter2" not in r.stdout and "CONNECTED" not in r.stdout, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "['/work/main.py']", r.stdout


def test_output_flood_and_tmpfs_fill_are_capped(sandbox: Sandbox) -> None:
    flood = sandbox.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    assert not flood.ok and len(flood.stdout) <= sandbox.limits.output_bytes
    fill = sandbox.run("n = 0\ntry:\n    while True:\n        open(f'/tmp/f{n}', 'wb').write(b'0' * (1 << 20))\n"
                       "        n += 1\nexcept OSError as e:\n    print('stopped', n, e.errno)\n")
    assert fill.stdout.startswith("stopped") and int(fill.stdout.split()[1]) <= sandbox.limits.tmpfs_mb


def test_files_are_importable_next_to_the_program(sandbox: Sandbox) -> None:
    r = sandbox.run("import solution\nprint(solution.f(2))", files={"solution.py": "def f(x):\n    return x * 21\n"})
    assert r.ok and r.stdout.strip() == "42"
    with pytest.raises(ValueError, match="plain names"):
        sandbox.run("pass", files={"../x.py": ""})
