"""Paraphrases for evaluating the open-vocabulary demo's text side (issue 20): phrases that are never trained on.

Each phrase names what it truly describes in the attribute world (``service.shapes.attributes``) as
(size, colour, shape), None = any; its ground truth is every instance matching all three, as for the trained
phrase levels of ``service.training.evaluate_open``.

``EVALUATION_PARAPHRASES`` was written before any text-side training and must never be trained on: a training
script for the text side has to refuse to start if any of its phrases, or any word of ``EVALUATION_WORDS``,
appears in its training set. What the phrases share with the detector's training phrases, and what they do not:

- ``EVALUATION_WORDS``, the descriptive words below, are **never in any training phrase**: colour words
  (scarlet, blood-red, tangerine, golden, emerald, grass-green, azure, cerulean, lavender, amethyst, snow-white,
  pearl, jet-black, onyx), shape words and descriptions (round, ball, three-sided, six-sided, five-pointed,
  four-cornered, "with four equal sides") and size words (tiny, giant, enormous, miniature).
- Templates and function words (object, something, figure, "that is", "in the picture", "painted", plurals)
  are not in the training phrases either, but common words (a, the, an, shape) are.
- Compounds reuse parts that training has in other compounds: "three-sided" / "six-sided" beside training's
  "four-sided", "three-cornered" and "six-cornered"; "blood-red", "grass-green", "snow-white" and "jet-black"
  contain the canonical colour word itself. Those are weaker claims than "scarlet" or "round", and are
  reported per phrase.
- The canonical words themselves (red, circle, small, ...) appear in word-order paraphrases ("a star that is
  red"): the detector was trained on those words, in other orders.
- ``HELD_OUT_PARAPHRASES`` name the three colour-shape combinations never rendered in training ("emerald star").
"""

from __future__ import annotations

import re

# text → (size, colour, shape); None = any. Grouped by what changes against a trained phrase.
EVALUATION_PARAPHRASES: dict[str, tuple[str | None, str | None, str | None]] = {
    # colour words never trained, with a trained shape word
    "scarlet star": (None, "red", "star"),
    "a blood-red hexagon": (None, "red", "hexagon"),
    "tangerine circle": (None, "orange", "circle"),
    "golden triangle": (None, "yellow", "triangle"),
    "golden square": (None, "yellow", "square"),
    "emerald circle": (None, "green", "circle"),
    "grass-green triangle": (None, "green", "triangle"),
    "azure square": (None, "blue", "square"),
    "cerulean star": (None, "blue", "star"),
    "lavender circle": (None, "purple", "circle"),
    "amethyst triangle": (None, "purple", "triangle"),
    "snow-white hexagon": (None, "white", "hexagon"),
    "pearl square": (None, "white", "square"),
    "jet-black circle": (None, "black", "circle"),
    "onyx star": (None, "black", "star"),
    # shape words and descriptions never trained
    "a round object": (None, None, "circle"),
    "something round": (None, None, "circle"),
    "a red ball": (None, "red", "circle"),
    "three-sided shape": (None, None, "triangle"),
    "a yellow three-sided shape": (None, "yellow", "triangle"),
    "six-sided shape": (None, None, "hexagon"),
    "a white six-sided figure": (None, "white", "hexagon"),
    "five-pointed shape": (None, None, "star"),
    "an orange five-pointed figure": (None, "orange", "star"),
    "four-cornered shape": (None, None, "square"),
    "a blue shape with four equal sides": (None, "blue", "square"),
    # size words never trained
    "tiny blue circle": ("small", "blue", "circle"),
    "giant red star": ("large", "red", "star"),
    "enormous hexagon": ("large", None, "hexagon"),
    "miniature triangle": ("small", None, "triangle"),
    "a giant emerald circle": ("large", "green", "circle"),
    # a colour alone, in words never trained
    "something scarlet": (None, "red", None),
    "an azure object": (None, "blue", None),
    "golden things": (None, "yellow", None),
    "lavender shapes": (None, "purple", None),
    # trained words in orders and frames never trained
    "a star that is red": (None, "red", "star"),
    "the circle painted blue": (None, "blue", "circle"),
    "hexagon, black": (None, "black", "hexagon"),
    "the purple triangle in the picture": (None, "purple", "triangle"),
    "stars": (None, None, "star"),
}

# Paraphrases of the held-out colour-shape combinations (never rendered in training), reported on their own.
HELD_OUT_PARAPHRASES: dict[str, tuple[str | None, str | None, str | None]] = {
    "emerald star": (None, "green", "star"),
    "lavender hexagon": (None, "purple", "hexagon"),
    "tangerine square": (None, "orange", "square"),
}

# Descriptive words of the paraphrases above that no text-side training phrase may contain.
EVALUATION_WORDS: tuple[str, ...] = (
    "scarlet", "blood", "tangerine", "golden", "emerald", "grass", "azure", "cerulean", "lavender", "amethyst",
    "snow", "pearl", "jet", "onyx", "round", "ball", "three-sided", "six-sided", "five-pointed", "pointed",
    "four-cornered", "equal", "sides", "tiny", "giant", "enormous", "miniature", "object", "something", "things",
    "figure", "painted", "picture",
)  # fmt: skip


def words(text: str) -> set[str]:
    """Lower-case words of a phrase, each hyphenated compound both whole and split ("six-sided", "six", "sided")."""
    out: set[str] = set()
    for token in re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower()):
        out.add(token)
        out.update(token.split("-"))
    return out
