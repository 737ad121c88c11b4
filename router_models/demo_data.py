"""A labelled routing set for the CPU demo experts (general, code, translation), built from templates.

The scores are by construction (what each demo expert is built for), not measured answers: the CPU
models are too small for a benchmark to separate them. It lets `coe-auto` on a laptop run the same
trained RouterDC router as production, and the serve tests exercise it. Real deployments train on
measured scores (`coe router train --data ...`).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

CODE_TASKS = [
    "reverses a linked list", "checks whether a string is a palindrome", "merges two sorted lists",
    "parses a CSV file and sums a column", "returns the n-th Fibonacci number", "removes duplicates from a list",
    "validates an email address with a regular expression", "computes the median of a list",
    "flattens a nested list", "counts word frequencies in a text", "implements binary search",
    "reads a JSON file and prints its keys", "retries an HTTP request with exponential backoff",
    "finds the longest common prefix of strings", "converts a Roman numeral to an integer",
    "implements an LRU cache", "sorts a dictionary by value", "checks if a number is prime",
    "transposes a matrix", "debounces a function call",
]
CODE_LANGS = ["Python", "JavaScript", "Go", "Rust", "TypeScript"]
CODE_TEMPLATES = [
    "Write a {lang} function that {task}.", "How do I write code in {lang} that {task}?",
    "Fix the bug in my {lang} function that {task}; it raises an exception on empty input.",
    "Explain, with a {lang} code example, a function that {task}.",
]
CODE_EXTRA = [
    "Why does my JavaScript promise never resolve?", "Write a SQL query that returns the top 5 customers by revenue.",
    "What does `git rebase -i` do?", "Write a bash script that renames all .txt files to .md.",
    "How do I fix 'TypeError: NoneType object is not subscriptable' in Python?",
    "Write a Dockerfile for a Flask app.", "What is the time complexity of quicksort?",
    "Refactor this Python loop into a list comprehension: for x in xs: if x > 0: out.append(x*2)",
]
SQL_TASKS = [
    "counts orders per customer", "returns the top 5 customers by revenue", "finds duplicate email addresses",
    "joins orders with customers", "computes the average salary per department", "deletes rows older than a year",
]
SHELL_TASKS = [
    "renames all .log files to .txt", "counts the lines in every .py file", "backs up a folder to a tar.gz archive",
    "finds the 10 largest files in a directory", "kills every process listening on port 8080",
]
CODE_TEMPLATES_MORE = ["Write a SQL query that {sql}.", "Write a bash script that {sh}."]
GENERAL_TOPICS = [
    "why the sky is blue", "how vaccines work", "the causes of the French Revolution", "how a bill becomes law",
    "what inflation is", "how photosynthesis works", "the difference between weather and climate",
    "why we dream", "how compound interest works", "the rules of chess", "how airplanes stay in the air",
    "what a black hole is", "the history of the Roman Empire", "how to grow tomatoes", "the benefits of exercise",
    "how the stock market works", "what causes earthquakes", "how to write a good resume",
    "the plot of Hamlet", "how the heart pumps blood",
]
GENERAL_TEMPLATES = [
    "Explain {topic}.", "Can you tell me about {topic}?", "Give me a short summary of {topic}.",
    "I'm curious: {topic} - what should I know?",
]
GENERAL_EXTRA = [
    "What is the capital of Australia?", "Give me three tips for sleeping better.",
    "Write a short friendly email inviting my team to lunch.", "What are the pros and cons of electric cars?",
    "A train travels 120 km in 1.5 hours. What is its average speed?", "What should I cook for dinner tonight?",
    "How many days are there in a leap year?", "Recommend a good book about history.",
    "If I have 3 apples and buy 5 more, how many do I have?", "What's a polite way to decline a meeting?",
]
MATH_TEMPLATES = [
    "A {vehicle} travels {d} km in {h} hours. What is its average speed?",
    "If I have {a} {fruit} and buy {b} more, how many do I have?",
    "What is {p} percent of {n}?",
    "A {item} costs {n} dollars and is {p} percent off. What do I pay?",
    "I save {a} dollars a week. How much do I have after {b} weeks?",
]
MATH_FILL = {"vehicle": ["train", "car", "cyclist", "bus"], "d": ["60", "120", "180", "250"], "h": ["2", "3", "1.5"],
             "a": ["3", "7", "12", "25"], "b": ["4", "5", "9", "10"], "fruit": ["apples", "oranges", "pears"],
             "p": ["10", "15", "25", "40"], "n": ["80", "120", "60", "200"], "item": ["shirt", "book", "lamp"]}
CHAT_TEMPLATES = [
    "Write a short friendly email {purpose}.", "What should I {activity}?", "Give me a short tip for {skill}.",
    "What are three good habits for {goal}?",
]
CHAT_FILL = {"purpose": ["inviting my team to lunch", "thanking a colleague", "asking for a day off",
                         "welcoming a new teammate"],
             "activity": ["cook for dinner tonight", "read next", "do this weekend", "pack for a beach trip"],
             "skill": ["public speaking", "time management", "learning to swim", "taking better photos"],
             "goal": ["staying healthy", "sleeping better", "saving money", "studying"]}
SENTENCES = [
    "Good morning, how are you?", "Where is the train station?", "I would like a cup of coffee, please.",
    "The meeting has been moved to Thursday.", "Thank you for your help.", "How much does this cost?",
    "My flight was delayed by two hours.", "Can you recommend a good restaurant nearby?",
    "The weather is beautiful today.", "Please send me the report by Friday.", "I love learning new languages.",
    "Where can I buy a ticket?", "The museum opens at nine o'clock.", "We are looking forward to your visit.",
    "Happy birthday to my best friend.",
]
LANGS = ["French", "German", "Spanish", "Italian", "Portuguese"]
TRANSLATION_TEMPLATES = [
    "Translate \"{s}\" into {lang}.", "How do you say \"{s}\" in {lang}?", "Translate to {lang}: {s}",
    "What is \"{s}\" in {lang}?",
]

# Expected quality of each demo expert on each kind of query (by construction, see the module docstring).
# The generalist is a fair second on code and a weak translator; the specialists are poor outside their field.
# The gaps (0.1-0.3 code -> general, by task difficulty below) are what a raised t can trade: under load, code
# requests move to the cheaper generalist, easiest first; translation and chat requests already sit on their
# cheapest good expert.
DEMO_SCORES = {
    "code": {"code": 0.9, "general": 0.7, "translation": 0.05},
    "general": {"code": 0.6, "general": 0.8, "translation": 0.1},
    "translation": {"code": 0.05, "general": 0.5, "translation": 0.9},
}
# The generalist's score on a code query by the task's difficulty level (0 easy .. 2 hard): raising t moves
# the easy programming tasks to the generalist first.
CODE_GENERAL_BY_LEVEL = {0: 0.8, 1: 0.7, 2: 0.6}
# Bump with any change above or in how the demo router is trained (3: int8 encoder; 4: int8 encodes each text
# alone; 5: the encoder runs int8 in ONNX Runtime); cpu-default's artifact path carries it.
DEMO_VERSION = 5


def _filled(templates: list[str], fill: dict[str, list[str]], rng: random.Random, n: int) -> list[str]:
    """`n` distinct-ish sentences from templates with random fillers."""
    out = set()
    for _ in range(n * 3):
        t = rng.choice(templates)
        out.add(t.format(**{k: rng.choice(v) for k, v in fill.items()}))
        if len(out) >= n:
            break
    return sorted(out)


def demo_routing_set(per_kind: int = 200, seed: int = 0) -> list[dict[str, object]]:
    """`per_kind` queries of each kind, as RouterDC-format rows {"question", "scores"}."""
    rng = random.Random(seed)
    code = [(t.format(lang=lang, task=task), CODE_TASKS.index(task) % 3) for t, lang, task in
            itertools.product(CODE_TEMPLATES, CODE_LANGS, CODE_TASKS)]
    code += [(t.format(sql=q, sh=sh), 0 if t.startswith("Write a SQL") else 1)
             for t, q, sh in itertools.product(CODE_TEMPLATES_MORE, SQL_TASKS, SHELL_TASKS)]
    pools: dict[str, list[tuple[str, int]]] = {
        "code": code,
        "general": [(t.format(topic=topic), 0) for t, topic in itertools.product(GENERAL_TEMPLATES, GENERAL_TOPICS)]
        + [(q, 0) for q in _filled(MATH_TEMPLATES, MATH_FILL, rng, 200) + _filled(CHAT_TEMPLATES, CHAT_FILL, rng, 200)],
        "translation": [(t.format(s=s, lang=lang), 0) for t, s, lang in
                        itertools.product(TRANSLATION_TEMPLATES, SENTENCES, LANGS)],
    }
    extras = {"code": [(q, 1) for q in CODE_EXTRA], "general": [(q, 0) for q in GENERAL_EXTRA], "translation": []}
    rows: list[dict[str, object]] = []
    for kind, pool in pools.items():
        picked = list(extras[kind]) + rng.sample(pool, min(per_kind - len(extras[kind]), len(pool)))
        for q, level in picked:
            scores = dict(DEMO_SCORES[kind])
            if kind == "code":  # the generalist copes with easy programming tasks, less with hard ones
                scores["general"] = CODE_GENERAL_BY_LEVEL[level]
            rows.append({"question": q, "scores": scores})
    rng.shuffle(rows)
    return rows


def write_demo_routing_set(path: str | Path, per_kind: int = 200, seed: int = 0) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(demo_routing_set(per_kind, seed), indent=1))
    return p
