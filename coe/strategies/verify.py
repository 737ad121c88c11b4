"""Verifiers a cascade trusts over log-probabilities: code runs the examples its prompt gives, in the sandbox;
a numeric answer must agree with a second sample."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from coe.sandbox import Sandbox, SandboxUnavailableError
from coe.scoring import _NUMBER, code_program, extract_number

_DEF = re.compile(r"^\s*def\s+([A-Za-z_]\w*)\s*\(", re.MULTILINE)
_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[^\n]*\n(.*?)```", re.DOTALL)
_ARROW = re.compile(r"\s*(?:==>|=>|->|==|➞|should return|returns|is)\s*")


@dataclass(frozen=True)
class Verdict:
    """A verifier's result: passed (True/False) and what it checked."""

    passed: bool
    detail: str


def _balanced_call(text: str, start: int) -> int | None:
    """End index of the parenthesised argument list opening at text[start] == '('."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _is_expr(src: str) -> bool:
    try:
        compile(src, "<example>", "eval")
        return True
    except (SyntaxError, ValueError):
        return False


def code_examples(query: str, max_examples: int = 20) -> tuple[str | None, str, list[tuple[str, str]]]:
    """(entry point, the prompt's code, [(call, expected)]) from a code request: doctest lines (`>>> f(x)` then the
    expected value) and example lines such as `f(x) ==> y`, `f(x) == y`, `f(x) -> y`, `f(x) should return y`."""
    code = next((b for b in _FENCE.findall(query) if _DEF.search(b)), query)
    names = _DEF.findall(code)
    if not names:
        return None, "", []
    entry = names[-1]
    out: list[tuple[str, str]] = []
    lines = code.splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith(">>>") and entry + "(" in s:
            call = s[3:].strip()
            expected = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if expected and not expected.startswith(">>>") and _is_expr(call) and _is_expr(expected):
                out.append((call, expected))
            continue
        at = s.find(entry + "(")
        if at < 0 or s.lstrip().startswith("def "):
            continue
        end = _balanced_call(s, at + len(entry))
        if end is None:
            continue
        call, rest = s[at:end], s[end:]
        m = _ARROW.match(rest)
        if not m:
            continue
        expected = rest[m.end():].strip().rstrip(".,;")
        if expected and _is_expr(call) and _is_expr(expected):
            out.append((call, expected))
    return entry, code, out[:max_examples]


def verify_code(sandbox: Sandbox, query: str, answer: str) -> Verdict | None:
    """Run the request's own examples against the answer's code in the sandbox; None when the request gives no
    runnable examples (or the machine cannot sandbox code: then no verdict, never a failure)."""
    entry, prefix, examples = code_examples(query)
    if entry is None or not examples:
        return None
    tests = "\n".join(f"assert ({call}) == ({expected}), {f'example {i + 1}'!r}"
                      for i, (call, expected) in enumerate(examples))
    token = secrets.token_hex(16)
    main, solution = code_program(answer, tests, {"prefix": prefix, "entry_point": entry}, token)
    try:
        res = sandbox.run(main, files={"solution.py": solution})
    except SandboxUnavailableError:
        return None
    ok = res.ok and token in res.stdout
    if ok:
        return Verdict(True, f"code: {len(examples)} examples from the prompt pass")
    why = "timed out" if res.timed_out else (res.stderr.strip().splitlines() or ["failed"])[-1][:160]
    return Verdict(False, f"code: the prompt's examples fail ({why})")


def math_applies(query: str, answer: str) -> bool:
    """A numeric question (two numbers or more) whose answer states a final number."""
    return len(_NUMBER.findall(query)) >= 2 and extract_number(answer) is not None


def verify_math(first: str, second: str) -> Verdict:
    """Two samples agree on the final number."""
    a, b = extract_number(first), extract_number(second)
    if a is None or b is None:
        return Verdict(False, "math: a sample states no final number")
    same = abs(a - b) <= 1e-6 * max(1.0, abs(a))
    return Verdict(same, f"math: two samples {'agree' if same else 'disagree'} ({a:g} vs {b:g})")
