"""Fine-tune the sentence encoder's top transformer blocks with RouterDC's dual contrastive loss.

RouterDC fine-tunes its whole encoder on GPU; on CPU we train only the top blocks. The blocks below are run
once (as served: int8 when the router serves int8) and their output is cached, so an epoch costs only the
top blocks' forward and backward passes: about 160 s for two of MiniLM's six blocks over the 5,341
RouterDC training queries on 2 cores. Each epoch is scored on the validation split (routing by cosine to the
expert embeddings) for the progress display; `train_router` decides between the frozen and the fine-tuned
encoder by fitting the whole router on both and comparing their validation routing accuracy.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from coe.encoder import SentenceEncoder, transformer_layers
from router_models.objectives import dual_contrastive_loss, task_mean_accuracy

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """The fine-tuned blocks and the training curve."""

    final_layers: dict[str, Any]  # {"<block>.<param>": tensor} after the last epoch
    val_acc_frozen: float  # validation routing by cosine to the throwaway expert embeddings
    val_acc_per_epoch: list[float]
    loss_per_epoch: list[float]  # mean training loss


class _TopBlocks:
    """The top `n` blocks of a BERT-style encoder, fed with cached hidden states of the block below."""

    def __init__(self, model: Any, n: int) -> None:
        import torch

        layers = transformer_layers(model)
        if not 0 < n <= len(layers):
            raise ValueError(f"cannot fine-tune {n} blocks of an encoder with {len(layers)}")
        self.first = len(layers) - n
        self.blocks = torch.nn.ModuleList([copy.deepcopy(layers[i]) for i in range(self.first, len(layers))]).float()

    def __call__(self, hidden: Any, mask: Any) -> Any:
        """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM's pooling)."""
        import torch

        h = hidden.float()
        ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for block in self.blocks:
            out = block(h, attention_mask=ext)
            h = out[0] if isinstance(out, tuple) else out
        m = mask[..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1.0), dim=1)

    def state(self) -> dict[str, Any]:
        return {f"{self.first + i}.{k}": v.detach().clone()
                for i, b in enumerate(self.blocks) for k, v in b.state_dict().items()}


def _cache_hidden(encoder: SentenceEncoder, texts: list[str], rows: np.ndarray, first: int, batch_size: int,
                  progress: bool) -> list[tuple[np.ndarray, Any, Any]]:
    """(rows, hidden state entering block `first` as float16, attention mask) per length-sorted batch.

    Batched for speed: with int8 lower blocks these states differ slightly from each text's alone (see
    SentenceEncoder.encode), a small training-time noise; the router's embeddings come from the encoder itself.
    """
    import torch

    model = encoder.module
    tok = model.tokenizer
    lens = np.array([len(tok(texts[i], truncation=True, max_length=model.max_seq_length)["input_ids"])
                     for i in rows])
    order = rows[np.argsort(lens, kind="stable")]
    auto = model[0].auto_model
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(order), batch_size), desc="caching encoder states", disable=not progress,
                      unit="batch"):
            idx = order[i : i + batch_size]
            f = model.tokenize([texts[j] for j in idx])
            res = auto(input_ids=f["input_ids"], attention_mask=f["attention_mask"],
                       token_type_ids=f.get("token_type_ids"), output_hidden_states=True)
            out.append((idx, res.hidden_states[first].clone().half(), f["attention_mask"].clone()))
    return out


def finetune_top_layers(encoder: SentenceEncoder, texts: list[str], correct: np.ndarray, tasks: np.ndarray,
                        tr: np.ndarray, va: np.ndarray, *, n_layers: int, epochs: int, lr: float, cfg: Any,
                        progress: bool = True, batch_size: int = 64) -> FinetuneResult:
    """Train the top `n_layers` blocks of `encoder` (and throwaway expert embeddings) on rows `tr`.

    `encoder` is the one the router serves with (its lower blocks produce the cached states); the trained
    blocks start from its float weights. `cfg` is the router's TrainConfig (loss hyper-parameters, seed).
    """
    import faiss
    import torch


    torch.manual_seed(cfg.seed)
    float_model = SentenceEncoder(encoder.name, quantize="none").module
    top = _TopBlocks(float_model, n_layers)
    cache = _cache_hidden(encoder, texts, np.asarray(tr), top.first, batch_size, progress)
    val_cache = _cache_hidden(encoder, texts, np.asarray(va), top.first, batch_size, False)

    def embed(batches: list[tuple[np.ndarray, Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            rows = np.concatenate([b[0] for b in batches])
            return rows, torch.cat([top(h, m) for _, h, m in batches]).numpy()

    scores = torch.from_numpy(np.nan_to_num(correct, nan=-1.0)).float()
    informative = (scores.max(1).values - scores.min(1).values) > 1e-9
    rows0, emb0 = embed(cache)
    km = faiss.Kmeans(emb0.shape[1], min(cfg.n_clusters, len(rows0)), niter=25, seed=cfg.seed, spherical=True)
    km.train(np.ascontiguousarray(emb0))
    clusters = np.zeros(len(texts), dtype=np.int64)
    clusters[rows0] = km.index.search(np.ascontiguousarray(emb0), 1)[1][:, 0]
    cl = torch.from_numpy(clusters)
    gen = torch.Generator().manual_seed(cfg.seed)

    # Expert embeddings warm-started on the frozen features, so the first gradients into the encoder mean something.
    e = torch.nn.Parameter(torch.randn(scores.shape[1], emb0.shape[1], generator=gen) * 0.05)
    opt_e = torch.optim.AdamW([e], lr=cfg.lr)
    x0, r0 = torch.from_numpy(emb0), torch.from_numpy(rows0)
    for _ in range(20):
        perm = torch.randperm(len(r0), generator=gen)
        for i in range(0, len(perm), cfg.batch_size):
            j = perm[i : i + cfg.batch_size]
            loss = dual_contrastive_loss(x0[j], e, scores[r0[j]], cl[r0[j]], informative[r0[j]], cfg, gen)
            opt_e.zero_grad()
            loss.backward()
            opt_e.step()

    def val_acc() -> float:
        rows, emb = embed(val_cache)
        chosen = (emb @ torch.nn.functional.normalize(e.detach(), dim=1).numpy().T).argmax(1)
        return task_mean_accuracy(correct[rows], chosen, tasks[rows])

    frozen = val_acc()
    top.blocks.train()
    opt = torch.optim.AdamW([{"params": top.blocks.parameters(), "lr": lr}, {"params": [e], "lr": 1e-3}],
                            weight_decay=0.01)
    steps = max(1, epochs * len(cache))
    warmup = min(20, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps))
    rng = np.random.default_rng(cfg.seed)
    per_epoch: list[float] = []
    losses: list[float] = []
    bar = tqdm(range(epochs), desc=f"fine-tuning the encoder's top {n_layers} blocks", disable=not progress,
               unit="epoch")
    for _ in bar:
        total = 0.0
        for bi in rng.permutation(len(cache)):
            idx, h, m = cache[bi]
            ri = torch.from_numpy(idx)
            loss = dual_contrastive_loss(top(h, m), e, scores[ri], cl[ri], informative[ri], cfg, gen)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(top.blocks.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach())
        losses.append(total / len(cache))
        top.blocks.eval()
        per_epoch.append(val_acc())
        top.blocks.train()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", val_acc=f"{per_epoch[-1]:.2f}", frozen=f"{frozen:.2f}")
    logger.info("encoder fine-tuning: validation routing accuracy by cosine %.2f frozen, per epoch %s",
                frozen, [round(x, 2) for x in per_epoch])

    return FinetuneResult(top.state(), frozen, per_epoch, losses)
