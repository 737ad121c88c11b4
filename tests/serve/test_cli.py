"""`coe status` and `coe chat` against the running service."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.serve


def _coe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coe.cli", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_status_lists_ready_experts(coe_url: str) -> None:
    r = _coe("status", "--url", coe_url)
    assert r.returncode == 0, r.stderr
    assert "READY" in r.stdout
    for name in ("general", "code", "translation"):
        assert name in r.stdout


def test_chat_streams_an_answer_with_the_expert(coe_url: str) -> None:
    r = _coe("chat", "Translate to French: good night", "--url", coe_url, "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[translation")
    assert len(r.stdout.splitlines()) >= 2


def test_chat_reports_errors_and_unreachable_service(coe_url: str) -> None:
    r = _coe("chat", "hi", "--url", coe_url, "--model", "nope")
    assert r.returncode == 1 and "404" in r.stderr
    r = _coe("status", "--url", "http://127.0.0.1:9")
    assert r.returncode == 1 and "not reachable" in r.stderr
