"""Free text → the phrase grammar an attribute detector was trained on ("scarlet star" → "red star").

A detector trained on "<size> <colour> <shape>" phrases (the demo's ``shapes-yoloe.pt``: its class names are the
80 phrases "small red circle" …) answers the words it was trained with well and other words poorly: its text
side is a sentence encoder (all-MiniLM-L6-v2) behind a fixed projection, and MiniLM hardly places "cerulean" near
"blue" or "round" near "circle". ``PhraseReader`` reads a text into the detector's own words before it is
embedded, and says why of every text it cannot read (the server refuses those):

- **Colour names** — any of matplotlib's colour tables (the XKCD colour survey's 949 names, preferred, and CSS's
  148): the name's RGB is taken to the vocabulary colour of nearest hue ("cerulean" #0485d1 → blue), or by
  lightness when it is achromatic ("snow" → white). Names up to three words ("grass green"); a name holding a
  vocabulary colour is that colour ("blood red" → red). Names the tables lack are not read ("onyx").
- **Counting** — "<n>-sided", "<n> sides", "<n>-cornered", "<n> edges", "<n> angles" name the polygon with n
  sides among the vocabulary's shapes (triangle 3, square 4, hexagon 6); "<n>-pointed" / "<n> points" the
  5-pointed star. Numbers as words or digits.
- **Other words** — the vocabulary's own words (and plurals); otherwise a word whose sentence embedding is near one
  vocabulary shape or size word and clearly nearer it than any other ("hexagonal" → hexagon, "tiny" → small).
  English stop words and the grammar's generic noun ("shape") carry no slot.
- **The result** is the grammar's phrase of what was read: "<size> <colour> <shape>", "<colour> <shape>",
  "<size> <shape>", "<shape>" or "<colour> shape". Unread words beside a colour and a shape are ignored ("a white
  six-sided figure" → white hexagon).
- **What it cannot read** has no phrase (``Reading.phrase`` None, ``Reading.why`` says what stopped it): two
  values for one slot ("red or blue star"), an unread word while the colour or the shape is missing ("pearl
  square", "a red ball", "dog": the unread word may name it; words of any script are words, "红色的 star"), a
  negation ("a star that is not red", "non-red star": the grammar has none, and read without it the text says
  the opposite), a count that names no shape ("6-pointed star"), or no phrase of the grammar ("large red"). The
  server refuses such a text (INVALID_ARGUMENT naming it): embedded as sent, a text outside the grammar the
  detector was trained on is answered with whatever its words happen to score, e.g. "something round" with
  small yellow squares at 0.67 (measured on the demo's test scenes), which is a wrong answer and not an error.

The reader is chosen by the detector's vocabulary (``PhraseReader.for_vocabulary``): a detector whose class names
are not all "<size> <colour> <shape>" phrases with colour words from the tables gets none. The figures (paraphrase
set of ``service.shapes.paraphrases``, never trained on) are in ``service/models/demo/SHAPES_YOLOE.md``.
"""

from __future__ import annotations

import colorsys
import dataclasses
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from matplotlib import colors as mpl_colors

from service.pipeline.lru import LRU
from service.pipeline.vocabulary import Embed

# Names this reader in the shared cache's detector identity and in each TextMatch (bump when readings change).
READER = "attribute-phrases/2"
GENERIC_NOUN = "shape"  # the training grammar's noun for "any shape" ("red shape")
NUMBERS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten".split())}
SIDE_WORDS = frozenset("side sided sides edge edged edges corner cornered corners angle angled angles".split())
POINT_WORDS = frozenset("point pointed points pointy".split())
# Words that turn what follows into its opposite or an exception (several are English stop words, which the reader
# otherwise skips): the grammar cannot say "not red", and reading the text without them answers the opposite.
NEGATIONS = frozenset(
    "not no nor non never neither none nothing without except excluding but unlike "
    "isn aren wasn weren don doesn didn hasn haven hadn cannot".split()
)
SIDES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
POINTS = {"star": 5}
# A word is read as a shape or size word by sentence embedding when its cosine to the nearest one is at least
# this and exceeds the runner-up's by MARGIN (measured: "hexagonal"–hexagon 0.85, "tiny"–small 0.91,
# "giant"–large 0.68 vs small 0.59; "round"–circle 0.56 stays unread).
SIMILAR = {"shape": 0.7, "size": 0.65}
MARGIN = 0.05
HUE_LIMIT = 40 / 360  # a chromatic colour name farther than this in hue from every vocabulary colour is unread
_WORDS_KEPT = 4096


def colour_table() -> dict[str, tuple[float, float, float]]:
    """Colour name (lower case, words separated by spaces) → RGB in [0, 1]: CSS's names, then the XKCD
    survey's over them."""
    table = {name.lower(): mpl_colors.to_rgb(value) for name, value in mpl_colors.CSS4_COLORS.items()}
    for name, value in mpl_colors.XKCD_COLORS.items():
        table[name.removeprefix("xkcd:").lower()] = mpl_colors.to_rgb(value)
    return table


def nearest_colour(rgb: tuple[float, float, float], palette: dict[str, tuple[float, float, float]]) -> str | None:
    """The palette colour a colour of RGB ``rgb`` is called by: by lightness when it is achromatic (saturation
    under 0.25: white above value 0.75, black under 0.35, grey between is None), black when very dark (value
    under 0.2), else the chromatic palette colour of nearest hue (None beyond HUE_LIMIT)."""
    hue, saturation, value = colorsys.rgb_to_hsv(*rgb)
    achromatic = {k: v for k, v in palette.items() if colorsys.rgb_to_hsv(*v)[1] < 0.25}
    if value < 0.2 or saturation < 0.25:
        lightness = "white" if value > 0.75 and saturation < 0.25 else "black" if value < 0.35 else None
        return next((k for k, v in achromatic.items() if lightness and _tone(v) == lightness), None)
    best, distance = None, 1.0
    for name, ref in palette.items():
        if name in achromatic:
            continue
        d = abs(hue - colorsys.rgb_to_hsv(*ref)[0]) % 1.0
        if min(d, 1 - d) < distance:
            best, distance = name, min(d, 1 - d)
    return best if distance <= HUE_LIMIT else None


def _tone(rgb: tuple[float, float, float]) -> str:
    return "white" if colorsys.rgb_to_hsv(*rgb)[2] > 0.5 else "black"


@dataclasses.dataclass(frozen=True)
class AttributeVocabulary:
    """The words of a "<size> <colour> <shape>" vocabulary, in the order of first use."""

    sizes: tuple[str, ...]
    colours: tuple[str, ...]
    shapes: tuple[str, ...]

    @classmethod
    def of(cls, names: Sequence[str], table: dict[str, tuple[float, float, float]]) -> AttributeVocabulary | None:
        """The vocabulary of class names that are all "<size> <colour> <shape>" with colour words in ``table``;
        None otherwise."""
        parts = [name.lower().split() for name in names]
        if not parts or any(len(p) != 3 or p[1] not in table for p in parts):
            return None
        return cls(*(tuple(dict.fromkeys(p[i] for p in parts)) for i in range(3)))


@dataclasses.dataclass(frozen=True)
class Reading:
    """A text read into the grammar: ``phrase``, its words in the grammar (None when it cannot be read), and then
    ``why``: what stopped it, for the error."""

    phrase: str | None
    why: str = ""


class PhraseReader:
    """Reads texts into an attribute vocabulary's grammar (module docstring). Safe across requests."""

    name = READER

    def __init__(self, vocabulary: AttributeVocabulary, table: dict[str, tuple[float, float, float]], embed: Embed):
        self.vocabulary = vocabulary
        palette = {c: table[c] for c in vocabulary.colours}
        self._colours = {name: c for name, rgb in table.items() if (c := nearest_colour(rgb, palette)) is not None}
        self._colours.update({c: c for c in vocabulary.colours})
        self._longest_colour = max(len(name.split()) for name in self._colours)
        self._embed = embed
        self._slot_words = {"shape": vocabulary.shapes, "size": vocabulary.sizes}
        self._slot_vectors: dict[str, np.ndarray] = {}
        self._words: LRU[str, tuple[str, str]] = LRU(_WORDS_KEPT)  # word → (slot, vocabulary word); ("", "") none
        # scikit-learn's English stop words, imported by the reader that uses them: importing scikit-learn takes
        # ~1.3 s, which every server's start-up paid before (readers exist for attribute vocabularies only).
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        self._stop_words = ENGLISH_STOP_WORDS

    @classmethod
    def for_vocabulary(cls, names: Sequence[str], embed: Embed) -> PhraseReader | None:
        """A reader for a detector with class names ``names``, or None when they are not an attribute
        vocabulary. ``embed``: the server's sentence encoder, for words the tables and counting do not read."""
        table = colour_table()
        vocabulary = AttributeVocabulary.of(names, table)
        return None if vocabulary is None else cls(vocabulary, table, embed)

    @property
    def grammar(self) -> str:
        """The grammar in words, for errors: "'<size> <colour> <shape>' (sizes: small, large; colours: …)"."""
        v = self.vocabulary
        return (
            f"'<size> <colour> <shape>' (sizes: {', '.join(v.sizes)}; colours: {', '.join(v.colours)}; "
            f"shapes: {', '.join(v.shapes)})"
        )

    async def read(self, texts: Sequence[str]) -> list[Reading]:
        """Each text's phrase in the vocabulary's grammar (``Reading.phrase`` None when it cannot be read)."""
        tokens = [_tokens(t) for t in texts]
        learned = await self._learn([w for ts in tokens for w in ts])
        return [self._read(ts, learned) for ts in tokens]

    async def _learn(self, words: Sequence[str]) -> dict[str, tuple[str, str]]:
        """The slot of each of ``words`` that neither the tables, counting nor the vocabulary read: remembered, or by
        sentence embedding (then remembered). Returned, held for this request: a concurrent request may evict
        entries from the bounded memory while this one awaits the encoder (another's 4,096 new words made a word
        known here unread, and changed or refused this request's reading)."""
        slots: dict[str, tuple[str, str]] = {}
        unknown = []
        for w in dict.fromkeys(words):
            if self._plain(w) or w in NUMBERS or w.isdigit() or w in self._colours:
                continue
            if _singular(w, self.vocabulary) is not None:
                continue
            known = self._words.get(w)
            if known is None:
                unknown.append(w)
            else:
                slots[w] = known
        if not unknown:
            return slots
        if not self._slot_vectors:
            for slot, words_of_slot in self._slot_words.items():
                self._slot_vectors[slot] = await self._embed(list(words_of_slot))
        vectors = await self._embed(unknown)
        for word, vector in zip(unknown, vectors, strict=True):
            best, best_similarity = ("", ""), -1.0
            for slot, slot_vectors in self._slot_vectors.items():
                similarity = slot_vectors @ vector
                order = np.argsort(-similarity)
                top = float(similarity[order[0]])
                runner_up = float(similarity[order[1]]) if len(order) > 1 else -1.0
                if top >= SIMILAR[slot] and top - runner_up >= MARGIN and top > best_similarity:
                    best, best_similarity = (slot, self._slot_words[slot][int(order[0])]), top
            self._words.put(word, best)
            slots[word] = best
        return slots

    def _plain(self, word: str) -> bool:
        return word in self._stop_words or word in (GENERIC_NOUN, GENERIC_NOUN + "s", GENERIC_NOUN + "d")

    def _read(self, tokens: list[str], learned: dict[str, tuple[str, str]]) -> Reading:
        """``tokens`` read in the grammar; ``learned``: ``_learn``'s slots of the request's words."""
        negation = next((t for t in tokens if t in NEGATIONS), None)
        if negation is not None:
            return Reading(None, f"a negation ({negation!r}): the grammar has none; send what to find")
        found: dict[str, set[str]] = {"size": set(), "colour": set(), "shape": set()}
        used = [False] * len(tokens)
        for n in range(self._longest_colour, 0, -1):  # colour names, longest first
            for i in range(len(tokens) - n + 1):
                name = " ".join(tokens[i : i + n])
                if any(used[i : i + n]) or name not in self._colours or (n == 1 and self._plain(name)):
                    continue
                own = [t for t in tokens[i : i + n] if t in self.vocabulary.colours]
                found["colour"].add(own[0] if own else self._colours[name])
                used[i : i + n] = [True] * n
        for i, token in enumerate(tokens):  # counting: "<n> sides", "<n>-pointed"
            count = NUMBERS.get(token, int(token) if token.isdigit() else None)
            if count is None:
                continue
            for j in range(i + 1, min(i + 4, len(tokens))):
                if tokens[j] not in SIDE_WORDS | POINT_WORDS:
                    continue
                named = _shape_by_count(count, tokens[j], self.vocabulary.shapes)
                if named is None:
                    return Reading(None, f"no shape of the grammar has {count} {tokens[j]}")
                found["shape"].add(named)
                used[i] = used[j] = True
                break
        unread: list[str] = []
        for i, token in enumerate(tokens):
            if used[i] or self._plain(token) or token in NUMBERS or token.isdigit():
                continue
            word = _singular(token, self.vocabulary)
            if word is not None:
                found["size" if word in self.vocabulary.sizes else "shape"].add(word)
                continue
            slot = learned.get(token)
            if slot is None or not slot[0]:  # not read
                unread.append(token)
            else:
                found[slot[0]].add(slot[1])
        for kind, values in found.items():
            if len(values) > 1:
                return Reading(None, f"two {kind}s ({', '.join(sorted(values))}): send each as its own text")
        size, colour, shape = (next(iter(found[k]), None) for k in ("size", "colour", "shape"))
        if unread and not (colour and shape):
            return Reading(None, f"not words of the grammar: {', '.join(map(repr, unread))}")
        if shape:
            return Reading(" ".join(w for w in (size, colour, shape) if w))
        if colour and not size:
            return Reading(f"{colour} {GENERIC_NOUN}")
        if not (size or colour):
            return Reading(None, "no word of the grammar")
        return Reading(None, "a size needs a shape")


def _tokens(text: str) -> list[str]:
    """Lower-case words (of any script, full-width letters as their plain forms) and numbers; hyphenated compounds
    split ("blood-red" → blood, red)."""
    return re.findall(r"[^\W\d_]+|\d+", unicodedata.normalize("NFKC", text).lower())


def _singular(word: str, vocabulary: AttributeVocabulary) -> str | None:
    """The vocabulary's shape or size word ``word`` is, or its plural is ("stars" → star); else None."""
    for candidate in (word, word[:-1] if word.endswith("s") else None, word[:-2] if word.endswith("es") else None):
        if candidate and (candidate in vocabulary.shapes or candidate in vocabulary.sizes):
            return candidate
    return None


def _shape_by_count(count: int, word: str, shapes: Sequence[str]) -> str | None:
    """The shape "<count> <word>" names among ``shapes`` ("3 sides" → triangle, "5 points" → star), or None."""
    table = SIDES if word in SIDE_WORDS else POINTS if word in POINT_WORDS else {}
    return next((s for s in shapes if table.get(s) == count), None)
