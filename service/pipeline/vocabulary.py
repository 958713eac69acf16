"""Free text → what the detector answers it with.

- A closed-vocabulary detector: an exact class name first, else the nearest class by sentence embedding
  (``VocabularyMatcher``; class-name embeddings are computed once per vocabulary).
- An open-vocabulary detector takes the text itself as a class (``open_matches``).

Embeddings of strings are kept in bounded LRUs (``EmbeddingLRU``), so a repeated prompt costs a lookup.
Sentence-embedding similarities are cosines of L2-normalised embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from service.errors import InvalidInput
from service.pipeline.lru import LRU
from service.printable import normalise_class_name

Embed = Callable[[Sequence[str]], Awaitable[np.ndarray]]  # strings → (N, D) float32
EXACT, EMBEDDING, OPEN = "exact", "embedding", "open"  # how a text was matched
_VOCABULARIES_KEPT = 8


@dataclasses.dataclass(frozen=True)
class TextMatch:
    """How text ``text_index`` of a request is answered: by class ``class_id`` of the detection's vocabulary.

    kind: EXACT (the text is a class name), EMBEDDING (the nearest class name by sentence embedding) or OPEN
    (an open-vocabulary detector took the text itself); similarity: cosine in [-1, 1], 1.0 unless EMBEDDING;
    read_as: OPEN, the phrase the text was read as before it was embedded (``service.pipeline.phrases``), "" when
    it was embedded as sent.
    """

    text_index: int
    text: str
    class_id: int
    class_name: str
    similarity: float
    kind: str
    read_as: str = ""


class EmbeddingLRU:
    """Embeddings of strings by ``embed``, the last ``entries`` distinct strings kept (least recently used out)."""

    def __init__(self, embed: Embed, entries: int) -> None:
        self._embed = embed
        self._kept: LRU[str, np.ndarray] = LRU(entries)
        self.embedded = 0  # strings embedded so far (misses), for tests and metrics

    async def get(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D): kept rows, the others embedded in one call (held locally: a concurrent request may
        evict entries while this one awaits the encoder)."""
        found = {t: v for t in texts if (v := self._kept.get(t)) is not None}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            for text, vector in zip(missing, await self._embed(missing), strict=True):
                found[text] = vector
                self._kept.put(text, vector)
            self.embedded += len(missing)
        return np.stack([found[t] for t in texts])


class VocabularyMatcher:
    """Maps texts to classes of a closed vocabulary (see module docstring). One per server; safe across requests."""

    def __init__(self, embed: Embed, threshold: float, cache_entries: int) -> None:
        self._embed = embed
        self.threshold = threshold
        self.texts = EmbeddingLRU(embed, cache_entries)
        self._vocabularies: LRU[tuple[str, ...], np.ndarray] = LRU(_VOCABULARIES_KEPT)

    async def prepare(self, vocabulary: Sequence[str]) -> None:
        """Embeds the class names now (server warm-up), so the first text prompt pays only for itself."""
        await self._vocabulary_embeddings(tuple(vocabulary))

    async def match(self, texts: Sequence[str], vocabulary: Sequence[str]) -> list[TextMatch]:
        """One TextMatch per text, in order. Raises InvalidInput naming the first text below the threshold and
        the nearest classes with their similarities."""
        index = {normalise_class_name(v): i for i, v in enumerate(vocabulary)}
        exact = {i: index.get(normalise_class_name(t)) for i, t in enumerate(texts)}
        pending = [i for i, cid in exact.items() if cid is None]
        similarities = np.zeros((0, len(vocabulary)), np.float32)
        if pending:
            names = await self._vocabulary_embeddings(tuple(vocabulary))
            similarities = await self.texts.get([texts[i] for i in pending]) @ names.T
        matches = []
        for i, text in enumerate(texts):
            cid = exact[i]
            if cid is not None:
                matches.append(TextMatch(i, text, cid, vocabulary[cid], 1.0, EXACT))
                continue
            row = similarities[pending.index(i)]
            best = int(row.argmax())
            if row[best] < self.threshold:
                nearest = ", ".join(f"{vocabulary[k]} {row[k]:.2f}" for k in np.argsort(-row)[:3])
                raise InvalidInput(
                    f"texts[{i}]: {text[:64]!r} matches none of the detector's classes (nearest: {nearest}; "
                    f"a match needs cosine similarity {self.threshold:.2f})"
                )
            matches.append(TextMatch(i, text, best, vocabulary[best], float(row[best]), EMBEDDING))
        return matches

    async def _vocabulary_embeddings(self, vocabulary: tuple[str, ...]) -> np.ndarray:
        cached = self._vocabularies.get(vocabulary)
        if cached is None:
            cached = await self._embed([normalise_class_name(v) for v in vocabulary])
            self._vocabularies.put(vocabulary, cached)
        return cached


def request_vocabulary(classes: Sequence[str], texts: Sequence[str]) -> tuple[str, ...]:
    """An open-vocabulary detection's class names: the request's classes then its texts, each string once
    (first spelling kept; strings equal after ``normalise_class_name`` are one class)."""
    names: dict[str, str] = {}
    for name in (*classes, *texts):
        names.setdefault(normalise_class_name(name), name.strip())
    return tuple(names.values())


def open_matches(texts: Sequence[str], vocabulary: Sequence[str], readings: Sequence[str]) -> list[TextMatch]:
    """Each text answered by its own entry of a ``request_vocabulary``; ``readings``: what each vocabulary entry
    was embedded as (the entry itself when no phrase reader changed it)."""
    index = {normalise_class_name(v): i for i, v in enumerate(vocabulary)}
    out = []
    for i, text in enumerate(texts):
        cid = index[normalise_class_name(text)]
        # as the entry is embedded, whichever prompt spelled it ("Red Star" and "red star" are one entry)
        read_as = readings[cid] if normalise_class_name(readings[cid]) != normalise_class_name(vocabulary[cid]) else ""
        out.append(TextMatch(i, text, cid, vocabulary[cid], 1.0, OPEN, read_as))
    return out
