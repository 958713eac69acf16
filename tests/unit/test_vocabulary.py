"""Free text → classes with the real all-MiniLM-L6-v2 (offline): synonyms map, unrelated words are refused."""

from __future__ import annotations

import asyncio
import re

import pytest
import yaml

from service.errors import InvalidInput
from service.models.text import SHA256, SentenceEncoder
from service.pipeline.vocabulary import VocabularyMatcher
from service.shapes.world import CLASSES as SHAPES
from tests.conftest import ultralytics_asset

THRESHOLD = 0.5  # Settings.text_match_threshold's default


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder.load()


@pytest.fixture(scope="module")
def coco() -> tuple[str, ...]:
    path = ultralytics_asset("bus.jpg").parents[1] / "cfg" / "datasets" / "coco.yaml"
    names = yaml.safe_load(path.read_text())["names"]
    return tuple(names[i] for i in range(len(names)))


def _matcher(encoder: SentenceEncoder, cache_entries: int = 64) -> VocabularyMatcher:
    async def embed(texts):
        return encoder.encode(texts)

    return VocabularyMatcher(embed, THRESHOLD, cache_entries)


def test_the_packaged_weights_are_the_pinned_ones_and_embeddings_are_unit_vectors(encoder):
    vectors = encoder.encode(["a red car", "a dog"])
    assert encoder.info.sha256 == SHA256 and vectors.shape == (2, 384) and vectors.dtype.name == "float32"
    assert abs(float((vectors**2).sum(axis=1).max()) - 1.0) < 1e-5


@pytest.mark.parametrize(
    ("text", "expected"),
    [("automobile", "car"), ("pedestrian", "person"), ("puppy", "dog"), ("kitty", "cat"), ("aeroplane", "airplane"),
     ("lorry", "truck"), ("Traffic_Light", "traffic light")],
)  # fmt: skip
def test_synonyms_map_to_coco_classes(encoder, coco, text, expected):
    (match,) = asyncio.run(_matcher(encoder).match([text], coco))
    assert match.class_name == expected
    assert (match.kind == "exact") == (text == "Traffic_Light") and match.similarity >= THRESHOLD


@pytest.mark.parametrize(
    ("text", "expected"), [("round shape", "circle"), ("five-pointed star", "star"), ("six-sided polygon", "hexagon")]
)
def test_descriptions_map_to_the_demo_shapes(encoder, text, expected):
    (match,) = asyncio.run(_matcher(encoder).match([text], SHAPES))
    assert match.class_name == expected and match.kind == "embedding"


@pytest.mark.parametrize("text", ["quantum chromodynamics", "banana bread recipe", "tax return"])
def test_unrelated_text_is_refused_with_the_nearest_classes(encoder, text):
    with pytest.raises(InvalidInput) as err:
        asyncio.run(_matcher(encoder).match(["circle", text], SHAPES))
    message = str(err.value)
    assert message.startswith(f"texts[1]: {text!r} matches none of the detector's classes (nearest: ")
    assert re.search(r"nearest: (\w+ -?\d\.\d\d, ){2}\w+ -?\d\.\d\d; a match needs cosine similarity 0\.50\)$", message)


def test_each_distinct_text_is_embedded_once_and_the_cache_is_bounded(encoder, coco):
    matcher = _matcher(encoder, cache_entries=2)

    async def main():
        await matcher.prepare(coco)
        await matcher.match(["automobile", "puppy", "automobile"], coco)
        first = matcher.texts.embedded
        await matcher.match(["puppy"], coco)  # cached
        second = matcher.texts.embedded
        await matcher.match(["kitty", "lorry"], coco)  # two more: automobile and puppy are evicted
        third = matcher.texts.embedded
        await matcher.match(["automobile"], coco)
        return first, second, third, matcher.texts.embedded

    assert asyncio.run(main()) == (2, 2, 4, 5)
