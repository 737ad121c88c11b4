"""Scorers: how good an answer is against a reference, 0.0-1.0.

Built in: `exact` (normalised exact match against one or several references), `number` (the final number,
GSM8K's extraction rules), `choice` (the option letter), `chrf` (sacrebleu's chrF), `regex` (the reference is a
pattern that must match), `code_tests` (the answer's code passes the reference's tests in the sandbox).
Custom scorers: a package registers `name = "module:function"` under the entry-point group `coe.scorers`, or
a suite names `"module:function"` directly; the function is `(answer: str, reference, meta: dict) -> float`.
"""

from __future__ import annotations

import importlib
import re
import secrets
import string
import unicodedata
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from coe.errors import InvalidRequestError
from coe.sandbox import Sandbox, SandboxLimits

ScoreFn = Callable[[str, Any, dict[str, Any]], float]
# Bump when a built-in scorer's rule changes: `coe profile` then rescores the answers it already has.
SCORER_VERSION = 2
BUILTIN = ("exact", "number", "choice", "chrf", "regex", "code_tests")
ENTRY_POINT_GROUP = "coe.scorers"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_PUNCT = set(string.punctuation) | {"¿", "¡", "«", "»", "“", "”", "’", "‘"}


def normalize(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (SQuAD's rule)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _answer_candidates(answer: str) -> list[str]:
    """The whole answer, its first line, and both without a leading 'Answer:' / 'The answer is'."""
    text = answer.strip()
    out = [text, text.splitlines()[0] if text else ""]
    for c in list(out):
        m = re.match(r"^\s*(?:final answer|answer|the answer is)\s*[:\-]?\s*(.+)$", c, re.IGNORECASE | re.DOTALL)
        if m:
            out.append(m.group(1))
    return out


def score_exact(answer: str, reference: Any, meta: dict[str, Any]) -> float:
    """1 when the normalised answer (or its first line) equals a normalised reference."""
    refs = reference if isinstance(reference, list) else [reference]
    wanted = {normalize(str(r)) for r in refs}
    return float(any(normalize(c) in wanted for c in _answer_candidates(answer)))


def _to_float(token: str) -> float | None:
    token = token.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(token)
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    """The final answer's number: after '####', else the last number of the sentence after the last
    'answer is' / 'answer:', else the last number. Commas count as thousands separators only in groups of three."""
    text = text.replace("**", "")
    if "####" in text:
        text = text.split("####")[-1]
    else:
        m = list(re.finditer(r"answer\s*(?:is|:)\s*", text, re.IGNORECASE))
        if m:
            tail = re.split(r"\.\s|\n", text[m[-1].end():], maxsplit=1)[0]
            nums = _NUMBER.findall(tail)
            if nums:
                return _to_float(nums[-1])
    nums = _NUMBER.findall(text)
    return _to_float(nums[-1]) if nums else None


def score_number(answer: str, reference: Any, meta: dict[str, Any]) -> float:
    """1 when the answer's final number equals the reference number."""
    want = extract_number(str(reference)) if not isinstance(reference, int | float) else float(reference)
    got = extract_number(answer)
    if want is None or got is None:
        return 0.0
    return float(abs(got - want) <= 1e-6 * max(1.0, abs(want)))


def extract_choice(answer: str, letters: str = "ABCDEFGH") -> str | None:
    """The option letter an answer picks: the last 'answer is X' / 'answer: X', else a leading 'X', 'X)', 'X.',
    '(X)', else 'option X', else a lone '(X)' or 'X)'. Markdown bold and \\boxed{} are ignored; letters are
    upper case (a lower-case 'a' is a word)."""
    text = re.sub(r"\\boxed\{([^}]*)\}", r"\1", answer.replace("**", "").replace("$", "")).strip()
    cls = f"[{letters}]"
    found = re.findall(rf"(?i:answer)\s*(?:(?i:is)\s*|:\s*)(?:(?i:option)\s*)?\(?({cls})\b", text)
    if found:
        return found[-1]
    for pattern in (rf"^\(?({cls})(?:[\).:]|\s*$)", rf"\b(?i:option)\s*\(?({cls})\b", rf"\(({cls})\)",
                    rf"\b({cls})\)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def score_choice(answer: str, reference: Any, meta: dict[str, Any]) -> float:
    return float(extract_choice(answer) == str(reference).strip().upper())


def score_chrf(answer: str, reference: Any, meta: dict[str, Any]) -> float:
    """chrF (sacrebleu, default settings: character 6-grams, beta 2) / 100."""
    from sacrebleu.metrics import CHRF

    refs = reference if isinstance(reference, list) else [reference]
    return CHRF().sentence_score(answer.strip(), [str(r) for r in refs]).score / 100.0


def score_regex(answer: str, reference: Any, meta: dict[str, Any]) -> float:
    try:
        return float(re.search(str(reference), answer) is not None)
    except re.error as err:
        raise InvalidRequestError(f"regex reference {reference!r} does not compile: {err}") from None


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The code in an answer: the fenced block that defines `entry_point`, else the first Python block, else
    the answer itself (a bare completion)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer)]
    if not blocks:  # a bare completion, perhaps with a stray closing fence
        return re.sub(r"\n?```\s*$", "\n", answer)
    if entry_point:
        for _, body in blocks:
            if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", body, re.MULTILINE):
                return body
    for lang, body in blocks:
        if lang in ("python", "py", "python3", ""):
            return body
    return blocks[0][1]


def code_program(answer: str, tests: str, meta: dict[str, Any], token: str = "") -> tuple[str, str]:
    """(main.py, solution.py) for the sandbox.

    solution.py holds `meta.prefix` (HumanEval's prompt: imports, signature, docstring) and the answer's code.
    An answer that defines `meta.entry_point` itself replaces the prompt's stub (the later definition wins); one
    that does not is a body that continues the prompt. main.py imports it as a module (so an answer's
    `if __name__ == "__main__"` or `unittest.main()` does not run), then runs the tests and prints `token`:
    exiting early (sys.exit(0) at import) does not pass.
    """
    prefix = str(meta.get("prefix", ""))
    entry = meta.get("entry_point")
    code = extract_code(answer, entry)
    defines = bool(entry) and re.search(rf"^\s*def\s+{re.escape(str(entry))}\s*\(", code, re.MULTILINE)
    solution = f"{prefix}\n    pass\n\n{code}" if defines and prefix else prefix + code
    check = f"\ncheck({entry})\n" if entry and re.search(r"^def check\(", tests, re.MULTILINE) else "\n"
    main = ("import sys\ntry:\n    from solution import *\nexcept SystemExit:\n    sys.exit(3)\n"
            f"{'import solution' + chr(10) + f'{entry} = solution.{entry}' + chr(10) if entry else ''}"
            f"\n{tests}{check}\nprint({token!r})\n")
    return main, solution


class Scorers:
    """Resolves scorer names; owns the sandbox the code scorer runs in (created on first use)."""

    def __init__(self, sandbox_limits: SandboxLimits | None = None) -> None:
        self._limits = sandbox_limits or SandboxLimits()
        self._sandbox: Sandbox | None = None
        self._cache: dict[str, ScoreFn] = {}

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(self._limits)
        return self._sandbox

    def score_code(self, answer: str, reference: Any, meta: dict[str, Any]) -> float:
        """1 when the tests pass against the answer's code in the sandbox: exit 0 within the limits, and the
        run reached its end (a random token printed after the tests)."""
        token = secrets.token_hex(16)
        main, solution = code_program(answer, str(reference), meta, token)
        res = self.sandbox.run(main, files={"solution.py": solution})
        return float(res.ok and token in res.stdout)

    def get(self, name: str) -> ScoreFn:
        """The scorer called `name`: built in, an entry point of group coe.scorers, or `module:function`."""
        if name in self._cache:
            return self._cache[name]
        fn: ScoreFn | None = {
            "exact": score_exact, "number": score_number, "choice": score_choice, "chrf": score_chrf,
            "regex": score_regex, "code_tests": self.score_code,
        }.get(name)
        if fn is None:
            eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
            if eps:
                fn = eps[0].load()
            elif ":" in name:
                module, _, attr = name.partition(":")
                try:
                    fn = getattr(importlib.import_module(module), attr)
                except (ImportError, AttributeError) as err:
                    raise InvalidRequestError(f"scorer '{name}' cannot be imported: {err}") from None
            else:
                raise InvalidRequestError(
                    f"unknown scorer '{name}': use one of {', '.join(BUILTIN)}, an entry point of group "
                    f"'{ENTRY_POINT_GROUP}', or 'module:function'")
        if not callable(fn):
            raise InvalidRequestError(f"scorer '{name}' is not callable")
        self._cache[name] = fn
        return fn

    def score(self, name: str, answer: str, reference: Any, meta: dict[str, Any]) -> float:
        value = float(self.get(name)(answer, reference, meta))
        if not 0.0 <= value <= 1.0:
            raise InvalidRequestError(f"scorer '{name}' returned {value}, outside 0-1")
        return value
