"""RouterDC training and the artifact, on a small synthetic routing task with the real encoder and FAISS.

Three specialists (code, math, french) each solve only their own domain; a cheap generalist solves
half of everything. A router that learns must send each held-out query to its specialist.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from coe.encoder import SentenceEncoder
from coe.errors import RouterArtifactError
from coe.routerdc import RouterDCRouter, decide, save_artifact
from router_models.data import RoutingData
from router_models.objectives import paper_accuracy
from router_models.train import TrainConfig, train_router

EXPERTS = ["code", "math", "french", "generalist"]
PRICES = {"code": 3.0, "math": 3.0, "french": 3.0, "generalist": 1.0}


def _questions() -> dict[str, list[str]]:
    code = [f"How do I {v} a {o} in {lang}?" for v, o, lang in itertools.product(
        ["sort", "reverse", "serialize", "parse"], ["list", "dictionary", "string"], ["Python", "JavaScript", "Rust"])]
    math = [f"What is {a} {op} {b}? Show the arithmetic." for a, op, b in itertools.product(
        [12, 37, 145, 9], ["plus", "times", "divided by"], [3, 8, 21])]
    french = [f"Translate into French: {s}" for s in [
        "the cat sleeps", "I like apples", "where is the station", "good morning friends", "the weather is cold",
        "my brother is tall", "we are going to the beach", "this book is long", "she sings well",
        "the bread is fresh", "open the window", "I lost my keys", "the garden is green", "he drinks coffee",
        "they play football", "the car is red", "I am tired today", "the museum is closed", "see you tomorrow",
        "the soup is hot", "my phone is broken", "we eat at noon", "the river is wide", "children like games",
        "the shop opens at nine", "my sister reads a lot", "the train is late", "I need a doctor",
        "the door is locked", "it is raining again", "the film was funny", "he writes letters",
        "the tea is too sweet", "our house is small", "I forgot my umbrella", "the dog barks at night"]]
    return {"code": code, "math": math, "french": french}


def _dataset() -> RoutingData:
    qs, rows = [], []
    for dom, items in _questions().items():
        for q in items:
            qs.append(q)
            rows.append([1.0 if e == dom else (0.5 if e == "generalist" else 0.0) for e in EXPERTS])
    return RoutingData(name="synthetic", questions=qs, experts=EXPERTS, scores=np.array(rows),
                       tasks=["gsm8k"] * len(qs))  # fraction rule: 0.5 counts as half


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[RoutingData, RouterDCRouter, Path, SentenceEncoder]:
    data = _dataset()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(data))
    cut = int(0.7 * len(data))
    enc = SentenceEncoder()
    model, _ = train_router(data.subset(idx[:cut]), enc, prices=PRICES, fallback_expert="generalist",
                            cfg=TrainConfig(epochs=30, batch_size=32, n_clusters=3), progress=False,
                            cache_dir=tmp_path_factory.mktemp("emb"))
    out = save_artifact(tmp_path_factory.mktemp("router") / "art", model)
    router = RouterDCRouter(out, encoder=enc)
    return data.subset(idx[cut:]), router, out, enc


def test_training_learns_beyond_random_and_best_single(trained) -> None:  # noqa: ANN001
    test, router, _, _ = trained
    chosen = np.array([EXPERTS.index(d.expert) for d in router.route_batch(test.questions, threshold=0.0)])
    acc = paper_accuracy(test.correct(), chosen)
    single = max(paper_accuracy(test.correct(), np.full(len(test), k)) for k in range(len(EXPERTS)))
    rand = float(np.nanmean(test.correct()) * 100)
    assert acc >= single + 25, (acc, single)
    assert acc >= rand + 25, (acc, rand)


def test_artifact_round_trip_gives_identical_decisions(trained) -> None:  # noqa: ANN001
    test, router, out, enc = trained
    again = RouterDCRouter(out, encoder=enc)
    a = router.route_batch(test.questions[:10])
    b = again.route_batch(test.questions[:10])
    assert [(x.expert, x.scores) for x in a] == [(y.expert, y.scores) for y in b]


def test_higher_threshold_never_picks_a_pricier_expert(trained) -> None:  # noqa: ANN001
    test, router, _, _ = trained
    prev = None
    for t in (0.0, 0.05, 0.2, 0.5, 1.0):
        cost = np.array([PRICES[d.expert] for d in router.route_batch(test.questions, threshold=t)])
        if prev is not None:
            assert (cost <= prev).all()
        prev = cost
    assert (prev == PRICES["generalist"]).all()  # t = 1 admits every expert: the cheapest wins


def test_out_of_distribution_goes_to_fallback(trained) -> None:  # noqa: ANN001
    _, router, _, enc = trained
    p = router.model.params
    far = "zzz"
    emb = enc.encode([far])
    nn = float(router.model.knn(emb)[1][0])
    p_old = p.ood_min_similarity
    try:
        p.ood_min_similarity = nn + 0.01  # the query is farther than the configured boundary
        d = decide(router.model, emb, 0.0)[0]
        assert d.expert == "generalist" and d.ood and d.reason.startswith("fallback:ood")
    finally:
        p.ood_min_similarity = p_old


def test_mismatched_or_corrupt_artifact_is_refused(trained, tmp_path: Path) -> None:  # noqa: ANN001
    _, _, out, enc = trained
    with pytest.raises(RouterArtifactError, match="trained for experts"):
        RouterDCRouter(out, encoder=enc, expected_experts=["general", "code", "translation"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(RouterArtifactError, match="corrupt"):
        RouterDCRouter(bad, encoder=enc)
    with pytest.raises(RouterArtifactError, match="not a router artifact"):
        RouterDCRouter(tmp_path / "missing", encoder=enc)


def test_encoder_check_goes_by_probe_embeddings_not_their_rounded_hash(trained, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    test, router, out, enc = trained
    art = tmp_path / "art"
    shutil.copytree(out, art)
    cfg = json.loads((art / "config.json").read_text())
    cfg["encoder_fingerprint"] = "0000000000000000"  # as if another CPU rounded one probe value the other way
    (art / "config.json").write_text(json.dumps(cfg))
    again = RouterDCRouter(art, encoder=enc)  # the probe embeddings agree: it serves
    assert [d.expert for d in again.route_batch(test.questions[:5])] == \
        [d.expert for d in router.route_batch(test.questions[:5])]
    arrays = dict(np.load(art / "weights.npz"))
    probe = arrays["encoder_probe"]
    assert probe.shape == (4, enc.dim)
    # A slightly different encoder (cosine ~0.999 on a probe: far more than any CPU difference) is refused.
    noise = np.random.default_rng(0).normal(size=probe.shape).astype(np.float32)
    bent = probe + 0.04 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    arrays["encoder_probe"] = bent / np.linalg.norm(bent, axis=1, keepdims=True)
    np.savez(art / "weights.npz", **arrays)
    with pytest.raises(RouterArtifactError, match=r"fingerprint .* \(probe cosine 0\.99"):
        RouterDCRouter(art, encoder=enc)
    # An artifact without probe embeddings (written before they were stored) is checked by the hash.
    del arrays["encoder_probe"]
    np.savez(art / "weights.npz", **arrays)
    with pytest.raises(RouterArtifactError, match="fingerprint"):
        RouterDCRouter(art, encoder=enc)
    shutil.copy(out / "config.json", art / "config.json")
    assert RouterDCRouter(art, encoder=enc).route_batch(test.questions[:1])[0].expert in EXPERTS


@pytest.mark.parametrize(("quantize", "min_mean_cos"), [("int8", 0.9), ("onnx-int8", 0.97)])
def test_int8_encoder_is_close_and_its_artifact_serves_only_with_it(trained, tmp_path: Path, quantize: str,  # noqa: ANN001
                                                                    min_mean_cos: float) -> None:
    test, _, _, enc = trained
    q8 = SentenceEncoder(quantize=quantize)  # type: ignore[arg-type]
    a, b = enc.encode(test.questions[:20]), q8.encode(test.questions[:20])
    cos = (a * b).sum(axis=1)
    assert cos.mean() > min_mean_cos, cos  # close to the float encoder ...
    assert cos.min() < 0.9999  # ... but really quantized (a different encoder, a different fingerprint)
    # A text's int8 embedding does not depend on what it is batched with (training encodes thousands at once,
    # the ingress one or a few): dynamic quantization would otherwise scale it with its neighbours.
    alone = np.concatenate([q8.encode([q]) for q in test.questions[:8]])
    np.testing.assert_allclose(q8.encode(test.questions[:8]), alone, atol=1e-6)
    np.testing.assert_allclose(q8.encode(test.questions[:8][::-1])[::-1], alone, atol=1e-6)
    assert not np.allclose(q8._forward(test.questions[:8]), alone, atol=1e-4)  # one padded pass would differ
    data = _dataset()
    model, _ = train_router(data, q8, prices=PRICES, fallback_expert="generalist",
                            cfg=TrainConfig(epochs=10, batch_size=32, n_clusters=3), progress=False,
                            cache_dir=tmp_path / "emb")
    out = save_artifact(tmp_path / "art8", model)
    assert json.loads((out / "config.json").read_text())["encoder_quantization"] == quantize
    # Loaded without an encoder, it builds the int8 one it was trained with: same fingerprint, it serves.
    router = RouterDCRouter(out)
    assert router.encoder.quantize == quantize
    assert router.route_batch(["Translate into French: the sun is warm"], threshold=0.0)[0].expert == "french"
    with pytest.raises(RouterArtifactError, match="fingerprint"):
        RouterDCRouter(out, encoder=enc)  # the float encoder is not what it was trained with
    with pytest.raises(Exception, match="unknown encoder quantization"):
        SentenceEncoder(quantize="int4")  # type: ignore[arg-type]


def test_onnx_encoder_is_exported_once_per_weights_and_a_corrupt_export_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from coe.encoder import transformer_layers
    from coe.errors import ModelLoadError

    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path))
    texts = ["How do I sort a list in Python?", "Translate into French: the cat sleeps"]
    first = SentenceEncoder(quantize="onnx-int8")
    files = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = SentenceEncoder(quantize="onnx-int8")  # a second replica reuses the export
    assert list((tmp_path / "onnx").glob("*.onnx")) == files and files[0].stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.encode(texts), again.encode(texts))
    # Other weights (a fine-tuned top block) are another model: another export, other embeddings.
    block = {f"5.{k}": v + 0.05 * torch.randn_like(v) if v.dtype.is_floating_point else v
             for k, v in transformer_layers(first.module)[5].state_dict().items()}
    tuned = SentenceEncoder(quantize="onnx-int8", top_layers=block)
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2
    assert (tuned.encode(texts) * first.encode(texts)).sum(1).min() < 0.999
    files[0].write_bytes(b"not an onnx model")
    with pytest.raises(ModelLoadError, match="could not load the ONNX encoder"):
        SentenceEncoder(quantize="onnx-int8")
    assert not files[0].exists()  # removed: the next start exports it again
    assert SentenceEncoder(quantize="onnx-int8").encode(texts).shape == (2, 384)


def test_finetuned_encoder_blocks_travel_with_the_artifact(trained, tmp_path: Path) -> None:  # noqa: ANN001
    import torch
    from safetensors.torch import save_file

    from coe.encoder import transformer_layers
    from coe.errors import ModelLoadError

    test, _, _, enc = trained
    # Stand-in for fine-tuned blocks: the top block's weights, perturbed.
    gen = torch.Generator().manual_seed(0)
    top = {f"5.{k}": v + 0.02 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
           for k, v in transformer_layers(enc.module)[5].state_dict().items()}
    tuned = SentenceEncoder(top_layers=top)
    a, b = enc.encode(test.questions[:10]), tuned.encode(test.questions[:10])
    assert (a * b).sum(1).max() < 0.9999  # really a different encoder
    model, _ = train_router(_dataset(), tuned, prices=PRICES, fallback_expert="generalist",
                            cfg=TrainConfig(epochs=5, batch_size=32, n_clusters=3, finetune_layers=0), progress=False,
                            cache_dir=tmp_path / "emb")
    model.encoder_top_layers, model.params.encoder_finetuned_layers = top, 1
    out = save_artifact(tmp_path / "art", model)
    assert (out / "encoder_top.safetensors").exists()
    router = RouterDCRouter(out)  # builds the packaged encoder with the artifact's blocks: fingerprint matches
    np.testing.assert_allclose(router.encoder.encode(test.questions[:10]), b, atol=1e-5)
    with pytest.raises(RouterArtifactError, match="fingerprint"):
        RouterDCRouter(out, encoder=enc)  # the plain encoder is not the one it was trained with
    # Re-saving a model without fine-tuned blocks into the same directory removes the stale file.
    model.encoder_top_layers, model.params.encoder_finetuned_layers = {}, 0
    save_artifact(out, model)
    assert not (out / "encoder_top.safetensors").exists()
    model.params.encoder_finetuned_layers = 1
    (out / "config.json").write_text(json.dumps(model.params.to_json()))
    with pytest.raises(RouterArtifactError, match="fine-tuned encoder blocks"):
        RouterDCRouter(out)
    save_file({"9.attention.self.query.weight": torch.zeros(1)}, str(out / "encoder_top.safetensors"))
    with pytest.raises(ModelLoadError, match="block 9 does not exist"):
        RouterDCRouter(out)


def test_training_with_encoder_finetuning_keeps_the_better_encoder_and_serves_it(tmp_path: Path) -> None:
    data = _dataset()
    model, report = train_router(data, SentenceEncoder(quantize="int8"), prices=PRICES, fallback_expert="generalist",
                                 cfg=TrainConfig(epochs=10, batch_size=32, n_clusters=3, finetune_layers=1,
                                                 finetune_epochs=1, finetune_min_queries=0, finetune_lr=5e-4),
                                 progress=False, cache_dir=tmp_path / "emb")
    kept = report["finetune_kept"] == 1.0
    assert kept == (report["finetune_val_router_acc_tuned"] > report["finetune_val_router_acc_frozen"])
    assert report["val_router_acc"] == max(report["finetune_val_router_acc_tuned"],
                                           report["finetune_val_router_acc_frozen"])
    assert bool(model.encoder_top_layers) == kept and model.params.encoder_finetuned_layers == (1 if kept else 0)
    out = save_artifact(tmp_path / "art", model)
    router = RouterDCRouter(out)  # whichever encoder won, the artifact rebuilds it (the fingerprint checks)
    assert router.route_batch(["Translate into French: the sun is warm"], threshold=0.0)[0].expert == "french"


def test_embedding_cache_gives_the_same_decisions_and_stays_bounded(trained) -> None:  # noqa: ANN001
    test, _, out, enc = trained
    plain = RouterDCRouter(out, encoder=enc)
    cached = RouterDCRouter(out, encoder=enc, cache_size=4)
    qs = test.questions[:6]
    assert not cached.is_cached(qs[0]) and not plain.is_cached(qs[0])
    first = cached.route_each(qs[:3], [0.0] * 3)
    assert all(cached.is_cached(q) for q in qs[:3])
    calls: list[int] = []
    real = enc.encode
    enc.encode = lambda texts, *a, **k: (calls.append(len(texts)), real(texts, *a, **k))[1]  # type: ignore[method-assign]
    try:
        again = cached.route_each(qs[:3], [0.0] * 3)  # all hits: no encoder pass
        assert calls == []
        mixed = cached.route_each(qs[:4], [0.0, 0.3, 0.0, 0.0])  # one miss: one pass for it alone
        assert calls == [1]
    finally:
        enc.encode = real  # type: ignore[method-assign]
    want = plain.route_each(qs[:4], [0.0, 0.3, 0.0, 0.0])
    assert [(d.expert, d.scores, d.reason) for d in first + again] == [
        (d.expert, d.scores, d.reason) for d in plain.route_each(qs[:3], [0.0] * 3) * 2]
    assert [(d.expert, d.reason, d.threshold) for d in mixed] == [(d.expert, d.reason, d.threshold) for d in want]
    cached.route_each(qs[4:6], [0.0, 0.0])  # 6 texts seen, 4 kept: the least recently used left
    assert sum(cached.is_cached(q) for q in qs) == 4 and not cached.is_cached(qs[0])
