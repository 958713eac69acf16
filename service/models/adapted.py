"""An adapted model set (``detseg adapt``'s output folder): its card, and the weights the server loads from it.

The folder holds ``adapted.json`` (the card), the adapted detector and segmenter files it names, the evaluation
report and ``detseg-manifest.json`` (the signed manifest over all of them; ``detseg verify <folder>``). The server
reads only the card and the two weights files, and refuses a file whose sha256 is not the card's.

Card (``schema`` CARD_SCHEMA), the fields the server reads:

- ``version``: the set's version string (ListModels' and every response's ``ModelInfo.version``);
- ``detector`` / ``segmenter``: ``file`` (relative to the folder), ``name``, ``architecture`` (ultralytics yaml or
  sam2 config), ``overrides`` (sam2 hydra overrides; segmenter), ``sha256``;
- ``segmenter.encoder_changed``: whether the image encoder was adapted (a base tracker whose image encoder is the
  base segmenter's then no longer fits);
- ``base``: the base models' ``{role, name, version, sha256}``.

The rest (data sha256, command, recipe, metrics before and after) is for people and ``detseg verify``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from service.errors import ModelUnavailable

CARD_NAME = "adapted.json"
CARD_SCHEMA = "detseg.adapted/v1"


@dataclasses.dataclass(frozen=True)
class AdaptedModel:
    """One adapted weights file as the card names it; ``path`` absolute."""

    name: str
    architecture: str
    path: Path
    sha256: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AdaptedSet:
    version: str
    detector: AdaptedModel
    segmenter: AdaptedModel
    encoder_changed: bool
    base_segmenter_sha256: str
    card: dict[str, Any]
    # The default score threshold the base detector was calibrated to answer at (None: it names none), which the
    # card's figures were measured at and a server of the folder answers at unless its settings name one.
    score_threshold: float | None = None


def read_adapted(folder: Path) -> AdaptedSet:
    """Reads ``folder``'s card. Raises ModelUnavailable naming what is wrong (no card, a field missing, a file
    missing or outside the folder). The files' sha256 are checked by the caller, as for every weights file."""
    folder = Path(folder)
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise ModelUnavailable(f"{folder}: no {CARD_NAME} (not a folder written by `detseg adapt`)")
    try:
        card = json.loads(card_path.read_text())
        if card.get("schema") != CARD_SCHEMA:
            raise ModelUnavailable(f"{card_path}: schema {card.get('schema')!r}, expected {CARD_SCHEMA!r}")
        models = {role: _model(folder, card[role], role) for role in ("detector", "segmenter")}
        base_segmenter = next(b["sha256"] for b in card["base"] if b["role"] == "segmenter")
        return AdaptedSet(
            version=str(card["version"]),
            detector=models["detector"],
            segmenter=models["segmenter"],
            encoder_changed=bool(card["segmenter"]["encoder_changed"]),
            base_segmenter_sha256=str(base_segmenter),
            card=card,
            score_threshold=None if card.get("score_threshold") is None else float(card["score_threshold"]),
        )
    except (KeyError, TypeError, StopIteration, ValueError) as e:
        raise ModelUnavailable(f"{card_path}: not a valid adaptation card ({type(e).__name__}: {e})") from None


def _model(folder: Path, entry: dict[str, Any], role: str) -> AdaptedModel:
    name = Path(str(entry["file"]))
    path = (folder / name).resolve()
    if name.is_absolute() or ".." in name.parts or not path.is_relative_to(folder.resolve()):
        raise ModelUnavailable(f"{folder / CARD_NAME}: the {role} file {str(name)!r} is not inside the folder")
    if not path.is_file():
        raise ModelUnavailable(f"{folder}: the {role} file {name} named by {CARD_NAME} is missing")
    return AdaptedModel(
        name=str(entry["name"]),
        architecture=str(entry["architecture"]),
        path=path,
        sha256=str(entry["sha256"]),
        overrides=tuple(str(o) for o in entry.get("overrides", ())),
    )
