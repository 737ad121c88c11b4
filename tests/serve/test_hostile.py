"""Hostile and broken input over HTTP: each gets its documented 4xx within a second, and the service still answers.

The same table as tests/unit/test_protocol.py's, sent through the real proxy and ingress, plus what only HTTP can
send (a 100 MB body, raw invalid UTF-8, a Content-Length that lies).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.serve import api

pytestmark = pytest.mark.serve

MSG = [{"role": "user", "content": "hi"}]


def _body(**kw: object) -> bytes:
    return json.dumps({"model": "general", "messages": MSG, "max_tokens": 2, **kw}).encode()


CASES = [
    ("1 KB over the body limit", b'{"model": "general", "pad": "' + b"a" * (4_000_000 + 1024) + b'"}', 413),
    ("100 MB body", b'{"model": "general", "pad": "' + b"a" * 100_000_000 + b'"}', 413),
    ("nesting 10,000 deep", b"[" * 10_000 + b"]" * 10_000, 400),
    ("invalid UTF-8", b'{"model": "general", "messages": [{"role": "user", "content": "\xc3\x28"}]}', 400),
    ("lone surrogate", _body(messages=[{"role": "user", "content": "a\ud800"}]), 400),
    ("NUL", _body(messages=[{"role": "user", "content": "a\u0000"}]), 400),
    ("control characters", _body(messages=[{"role": "user", "content": "\u001b[31mred"}]), 400),
    ("10,000 messages", _body(messages=MSG * 10_000), 400),
    ("1 MB stop string", _body(stop="x" * 1_000_000), 400),
    ("negative max_tokens", _body(max_tokens=-5), 400),
    ("enormous max_tokens", _body(max_tokens=10**18), 400),
    ("negative temperature", _body(temperature=-1), 400),
    ("enormous temperature", _body(temperature=1e308), 400),
    ("negative top_p", _body(top_p=-0.5), 400),
    ("enormous seed", _body(seed=10**30), 400),
    ("negative seed", _body(seed=-1), 400),
    ("wrong types", _body(messages="hello", max_tokens="many"), 400),
    ("unknown role", _body(messages=[{"role": "root", "content": "x"}]), 400),
    ("empty strings", _body(model="", messages=[{"role": "user", "content": ""}]), 400),
    ("duplicate keys", b'{"model": "general", "model": "code", "messages": [{"role": "user", "content": "x"}]}', 400),
    ("logprobs", _body(logprobs=True, top_logprobs=3), 400),
    ("tools", _body(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400),
    ("NaN", b'{"model": "general", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400),
    ("a number beyond a float", b'{"model": "general", "messages": [{"role": "user", "content": "x"}], '
                                b'"temperature": 1e999}', 400),
    ("a duplicate key that is a lone surrogate", b'{"a\\ud800": 1, "a\\ud800": 2}', 400),
    ("a content part type with a lone surrogate",
     _body(messages=[{"role": "user", "content": [{"type": "x\ud800"}]}]), 400),
]


@pytest.mark.parametrize(("what", "raw", "status"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gets_its_4xx_fast_and_the_service_survives(coe_url: str, what: str, raw: bytes,
                                                                   status: int) -> None:
    t0 = time.monotonic()
    r = api.post(f"{coe_url}/v1/chat/completions", content=raw, timeout=30,
                 headers={"content-type": "application/json"})
    took = time.monotonic() - t0
    assert r.status_code == status, (what, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["request_id"] == r.headers["x-request-id"]
    print(f"hostile input '{what}': {r.status_code} in {took * 1e3:.0f} ms")
    # Measured: 31-75 ms each. The 100 MB body's time includes the client's own upload (297 ms here alone; 1.3 s
    # on this 2-core box with a second test session running): the server's early answer is shown by the 1 TB
    # Content-Length test below.
    assert took < (2.0 if len(raw) > 10_000_000 else 1.0), (what, took)
    ok = api.post(f"{coe_url}/v1/chat/completions", timeout=60, json=json.loads(_body()))
    assert ok.status_code == 200


def test_drop_params_drops_and_says_so(coe_url: str) -> None:
    r = api.post(f"{coe_url}/v1/chat/completions", timeout=60,
                 json=json.loads(_body(logprobs=True, presence_penalty=0.5, drop_params=True)))
    assert r.status_code == 200 and r.headers["x-coe-dropped-params"] == "logprobs,presence_penalty"


def test_a_huge_content_length_is_refused_before_the_body_is_read(coe_url: str) -> None:
    """Headers announce 1 TB and only 2 bytes follow: the answer is 413 at once, not a wait for the rest."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(coe_url)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.hostname}\r\n"
            f"Authorization: {api.auth()['authorization']}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000000000\r\n\r\n{}")
    t0 = time.monotonic()
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(head.encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"413", status_line
    assert time.monotonic() - t0 < 2.0
