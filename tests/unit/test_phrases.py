"""The phrase reader (``service.pipeline.phrases``) with the real all-MiniLM-L6-v2 and matplotlib's colour tables.

Readings are checked on words the evaluation paraphrases (``service.shapes.paraphrases``) do not use, so that these
tests say what the reader does in general; the paraphrase figures are measured through the server in
tests/integration/test_open_demo_quality.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from service.models.roles import ModelDescriptor, ModelRole
from service.models.tensors import DetectorSpec, SegmenterSpec
from service.models.text import SentenceEncoder
from service.pipeline.phrases import AttributeVocabulary, PhraseReader, colour_table, nearest_colour
from service.pipeline.shared_cache import ModelIdentity
from service.shapes.attributes import COLOURS, FINE_NAMES, HELD_OUT, PALETTE, SIZES
from service.shapes.paraphrases import EVALUATION_WORDS, words
from service.shapes.world import CLASSES
from service.training.train_open_detector import ALL_PHRASES, LEVELS, phrase


@pytest.fixture(scope="module")
def reader() -> PhraseReader:
    encoder = SentenceEncoder.load()

    async def embed(texts):
        return encoder.encode(texts)

    built = PhraseReader.for_vocabulary(FINE_NAMES, embed)
    assert built is not None
    return built


def read(reader: PhraseReader, *texts: str) -> list[str | None]:
    return [r.phrase for r in asyncio.run(reader.read(texts))]


# Colour, counting and other words none of the evaluation paraphrases holds.
DEVELOPMENT = {
    "crimson circle": "red circle",
    "a navy square": "blue square",
    "ivory hexagon": "white hexagon",
    "violet triangle": "purple triangle",
    "charcoal star": "black star",
    "sky blue circle": "blue circle",
    "a lime green square": "green square",
    "amber shapes": "orange shape",
    "a shape with 3 corners": "triangle",
    "an eight-sided shape": None,  # no octagon in the vocabulary: not read
    "a star with 5 points": "star",
    "the hexagonal one": "hexagon",
    "triangular shapes": "triangle",
    "little purple hexagon": "small purple hexagon",
    "huge circles": "large circle",
    "a big black square": "large black square",
}


def test_the_development_words_are_none_of_the_evaluation_words():
    assert not {w for text in DEVELOPMENT for w in words(text)} & set(EVALUATION_WORDS)


def test_words_outside_the_training_grammar_are_read_into_it(reader):
    assert dict(zip(DEVELOPMENT, read(reader, *DEVELOPMENT), strict=True)) == DEVELOPMENT


def test_every_trained_phrase_reads_as_itself(reader):
    """So trained-phrase figures are exactly those without a reader, and held-out combinations ("green star",
    never a training phrase) keep their own words."""
    held_out = [f"{c} {k}" for c, k in HELD_OUT] + [f"{s} {c} {k}" for s in SIZES for c, k in HELD_OUT]
    assert read(reader, *ALL_PHRASES, *held_out) == [*ALL_PHRASES, *held_out]


def test_every_reading_is_a_phrase_of_the_training_grammar(reader):
    grammar = {phrase(level, s, c, k) for level in LEVELS for s in SIZES for c in COLOURS for k in CLASSES}
    changed = [(t, r) for t, r in zip(DEVELOPMENT, read(reader, *DEVELOPMENT), strict=True) if r not in (t, None)]
    assert changed and all(r in grammar for _, r in changed)


def test_what_it_cannot_read_has_no_phrase_and_says_why(reader):
    """An unread word while a slot is missing may name it; two values for one slot are ambiguous; a word that is
    no colour, count or vocabulary word is not guessed. The server refuses these texts with the reason."""
    texts = ["a red dog", "dog", "a teal circle", "red or blue star", "large red", "grey circle", "big", "", "the"]
    readings = asyncio.run(reader.read(texts))
    assert [r.phrase for r in readings] == [None] * len(texts)
    assert [r.why for r in readings] == [
        "not words of the grammar: 'dog'",
        "not words of the grammar: 'dog'",
        "not words of the grammar: 'teal'",
        "two colours (blue, red): send each as its own text",
        "a size needs a shape",
        "not words of the grammar: 'grey'",
        "a size needs a shape",
        "no word of the grammar",
        "no word of the grammar",
    ]
    assert reader.grammar == (
        "'<size> <colour> <shape>' (sizes: small, large; colours: red, orange, yellow, green, blue, purple, white, "
        "black; shapes: circle, square, triangle, star, hexagon)"
    )


def test_unread_words_beside_a_colour_and_a_shape_are_ignored(reader):
    assert read(reader, "a crimson triangle on the table") == ["red triangle"]


def test_the_world_colours_are_called_by_their_own_names():
    """Every rendered palette colour, taken through the reader's colour rule, names itself."""
    table = colour_table()
    palette = {c: table[c] for c in COLOURS}
    assert {c: nearest_colour(tuple(v / 255 for v in PALETTE[c]), palette) for c in COLOURS} == {c: c for c in COLOURS}


def test_only_an_attribute_vocabulary_gets_a_reader():
    table = colour_table()
    assert AttributeVocabulary.of(FINE_NAMES, table) == AttributeVocabulary(SIZES, COLOURS, CLASSES)
    assert AttributeVocabulary.of(["person", "bicycle", "car"], table) is None
    assert AttributeVocabulary.of(["small red circle", "person"], table) is None
    assert AttributeVocabulary.of(["small fast car"], table) is None


def test_shared_detector_outputs_are_keyed_by_the_reader_too(reader):
    """Replicas with and without a reader never share detector outputs (a text's detections depend on it); the
    segmenter's features they do share."""
    detector = ModelDescriptor(
        ModelRole.DETECTOR, "shapes-yoloe", "yoloe-11n.yaml", "shapes-1", "a" * 64, 256, FINE_NAMES, True
    )
    segmenter = ModelDescriptor(ModelRole.SEGMENTER, "shapes-sam2-mini", "sam2.1_hiera_t", "shapes-1", "b" * 64, 256)
    runner = SimpleNamespace(
        models=[detector, segmenter],
        backend="torch",
        detector=DetectorSpec(FINE_NAMES, 256, 32, 512),
        segmenter=SegmenterSpec(256),
    )
    plain, read = ModelIdentity.of(runner), ModelIdentity.of(runner, reader)
    assert plain.segmenter == read.segmenter and plain.detector != read.detector


def test_a_negation_is_refused_not_read_as_its_opposite(reader):
    """Negations are English stop words, which the reader skips: "a star that is not red" read as "red star" and was
    answered with red stars."""
    texts = ["a star that is not red", "no red star", "a star without red", "any star except red ones"]
    texts += ["non-red star", "a star which isn't red"]
    readings = asyncio.run(reader.read(texts))
    assert [r.phrase for r in readings] == [None] * len(texts)
    assert all(r.why.startswith("a negation (") for r in readings)


def test_words_of_other_scripts_are_words(reader):
    """Only [a-z] made words: "赤い star" lost its colour word and was answered as "star" (every star); full-width
    letters vanished too."""
    assert read(reader, "ｒｅｄ star") == ["red star"]
    readings = asyncio.run(reader.read(["赤い star", "rød star"]))
    assert [r.phrase for r in readings] == [None, None]
    assert [r.why for r in readings] == ["not words of the grammar: '赤い'", "not words of the grammar: 'rød'"]


def test_a_count_that_names_no_shape_is_refused(reader):
    """ "red 6-pointed star" read as the 5-pointed red star: the count was dropped."""
    readings = asyncio.run(reader.read(["red 6-pointed star", "a 7-sided shape"]))
    assert [r.why for r in readings] == ["no shape of the grammar has 6 pointed", "no shape of the grammar has 7 sided"]
    assert read(reader, "red 5-pointed shape", "blue 6-sided shape") == ["red star", "blue hexagon"]


def test_a_concurrent_request_evicting_the_word_memory_changes_no_reading(monkeypatch):
    """A request waiting for the encoder to learn a new word had its known words read from the bounded memory after
    the wait: another request's new words evicted "tiny" meanwhile, and "tiny red star" was read "red star"."""
    from service.pipeline import phrases

    encoder = SentenceEncoder.load()
    gate = asyncio.Event()

    async def embed(texts):
        if "wobbly" in texts:
            await gate.wait()  # the encoder busy with this request's new word
        return encoder.encode(texts)

    monkeypatch.setattr(phrases, "_WORDS_KEPT", 4)
    reader = PhraseReader.for_vocabulary(FINE_NAMES, embed)
    assert reader is not None

    async def race() -> list[str | None]:
        assert [r.phrase for r in await reader.read(["tiny red star"])] == ["small red star"]  # "tiny" learned
        waiting = asyncio.ensure_future(reader.read(["tiny red star", "wobbly"]))
        await asyncio.sleep(0.05)
        await reader.read(["alpha beta gamma delta epsilon"])  # five new words: "tiny" evicted
        gate.set()
        return [r.phrase for r in await waiting]

    assert asyncio.run(race())[0] == "small red star"
