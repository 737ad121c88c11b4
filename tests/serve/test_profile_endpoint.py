"""`coe profile --endpoint`: the experts of a running coe, pinned by name, with the caller's API key."""

from __future__ import annotations

import json
import os
from pathlib import Path

from coe.cli import main
from router_models.profile import load_profile, matrix_rows


def test_profile_against_a_running_coe(coe_url: str, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    suite = tmp_path / "mini.jsonl"
    suite.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Translate to French: {w}", "reference": r,
                                         "scorer": "chrf"}) + "\n"
                             for i, (w, r) in enumerate([("Good night.", "Bonne nuit."), ("Yes.", "Oui.")])))
    out = tmp_path / "prof"
    args = ["profile", "--config", "cpu-default", "--suite", f"mini:{suite}", "--out", str(out), "--endpoint",
            coe_url, "--experts", "translation", "general", "--concurrency", "2", "--no-progress"]
    assert main([*args, "--api-key", "not-a-key"]) == 1  # refused by the service before anything is asked
    assert "GET /v1/models answered HTTP 401" in capsys.readouterr().err
    assert not (out / "profile.json").exists()
    assert main([*args, "--api-key", os.environ["COE_ADMIN_KEY"]]) == 0
    assert "4 answers asked, 0 already there" in capsys.readouterr().out
    meta, _, answers = load_profile(out)
    assert meta["mode"] == f"endpoint {coe_url}"
    for name in ("translation", "general"):
        assert len(answers[name]) == 2
        for a in answers[name].values():
            assert a["completion_tokens"] > 0 and 0.0 <= a["score"] <= 1.0 and a["latency_s"] > 0
    assert len(matrix_rows(out)) == 2
    assert main([*args, "--api-key", os.environ["COE_ADMIN_KEY"]]) == 0
    assert "0 answers asked, 4 already there" in capsys.readouterr().out
