"""Free text → the detector's classes: an exact class name first, else the nearest class by sentence embedding.

Class-name embeddings are computed once per vocabulary; text embeddings are kept per string in a bounded LRU,
so a repeated prompt costs a dictionary lookup. Similarities are cosines of L2-normalised embeddings.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from service.errors import InvalidInput

Embed = Callable[[Sequence[str]], Awaitable[np.ndarray]]  # texts → (N, D) float32, rows L2-normalised
_VOCABULARIES_KEPT = 8


@dataclasses.dataclass(frozen=True)
class TextMatch:
    """How text ``text_index`` of a request is answered: by class ``class_id`` of the detector."""

    text_index: int
    text: str
    class_id: int
    class_name: str
    similarity: float  # cosine in [-1, 1]; 1.0 when exact
    exact: bool  # the text is a class name (normalised)


def normalise_class_name(name: str) -> str:
    """Case, runs of spaces, "_" and "-" do not distinguish class names."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


class VocabularyMatcher:
    """Maps texts to classes of a vocabulary (see module docstring). One per server; safe across requests."""

    def __init__(self, embed: Embed, threshold: float, cache_entries: int) -> None:
        self._embed = embed
        self.threshold = threshold
        self._cache_entries = cache_entries
        self._texts: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._vocabularies: collections.OrderedDict[tuple[str, ...], np.ndarray] = collections.OrderedDict()
        self.embedded = 0  # texts embedded so far (cache misses), for tests and metrics

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
            similarities = await self._text_embeddings([texts[i] for i in pending]) @ names.T
        matches = []
        for i, text in enumerate(texts):
            cid = exact[i]
            if cid is not None:
                matches.append(TextMatch(i, text, cid, vocabulary[cid], 1.0, True))
                continue
            row = similarities[pending.index(i)]
            best = int(row.argmax())
            if row[best] < self.threshold:
                nearest = ", ".join(f"{vocabulary[k]} {row[k]:.2f}" for k in np.argsort(-row)[:3])
                raise InvalidInput(
                    f"texts[{i}]: {text[:64]!r} matches none of the detector's classes (nearest: {nearest}; "
                    f"a match needs cosine similarity {self.threshold:.2f})"
                )
            matches.append(TextMatch(i, text, best, vocabulary[best], float(row[best]), False))
        return matches

    async def _vocabulary_embeddings(self, vocabulary: tuple[str, ...]) -> np.ndarray:
        cached = self._vocabularies.get(vocabulary)
        if cached is None:
            cached = await self._embed([normalise_class_name(v) for v in vocabulary])
            self._vocabularies[vocabulary] = cached
            while len(self._vocabularies) > _VOCABULARIES_KEPT:
                self._vocabularies.popitem(last=False)
        self._vocabularies.move_to_end(vocabulary)
        return cached

    async def _text_embeddings(self, texts: list[str]) -> np.ndarray:
        """(len(texts), D): cached rows, the others embedded in one call (kept locally: a concurrent request may
        evict entries while this one awaits the encoder)."""
        found = {t: self._texts[t] for t in texts if t in self._texts}
        for text in found:
            self._texts.move_to_end(text)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            for text, vector in zip(missing, await self._embed(missing), strict=True):
                found[text] = self._texts[text] = vector
            self.embedded += len(missing)
            while len(self._texts) > self._cache_entries:
                self._texts.popitem(last=False)
        return np.stack([found[t] for t in texts])
