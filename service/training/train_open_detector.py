"""Regenerates the demo open-vocabulary detector: ultralytics YOLOE-11n trained from scratch on text phrases of
the attribute shapes world (``service.shapes.attributes``), with all-MiniLM-L6-v2 text features.

    python -m service.training.train_open_detector --work /tmp/shapes-yoloe [--hours 0.65]

Never imported by the serving path. What it does:

1. Renders the attribute world (train and val splits; held-out colour–shape combinations never appear) as a
   YOLO dataset whose label ids are the 80 fine classes "size colour shape" (``FINE_NAMES``).
2. Writes ultralytics' text-embedding cache, ``text_embeddings_minilm-512_seed0.pt`` beside the train images:
   {phrase: (512,) float32} = all-MiniLM-L6-v2 (L2-normalised, 384-d) @ ``minilm_projection(0)``, i.e. exactly
   what ``ClassTextEncoder("minilm-512:seed0")`` gives at serving time (the raw features before the head's
   ``get_tpe``, as ultralytics' ``generate_text_embeddings(..., without_reprta=True)`` stores them). The stock
   ``YOLOETrainerFromScratch`` reads it instead of loading MobileCLIP, so training runs offline.
3. Trains ``yoloe-11n.yaml`` from random init with ``text_model = "minilm-512:seed0"`` (so detseg's loader
   builds the same text encoder), per image with one phrase level drawn at random (``LEVELS``):
   every phrase of that level is a class of the image (present ones positive, the rest negative), padded to
   80 texts with phrases of other levels that name nothing in the image (hard negatives). Within a level the
   phrases are mutually exclusive, so each box has exactly one true phrase, which is what ultralytics'
   one-class-per-box loss can express; ultralytics' own ``RandomLoadText`` would pad with phrases that may be
   true of a box (e.g. "circle" beside "red circle") and train them as negatives.
4. Trains the exemplar encoder (the head's SAVPE) with everything else frozen, ultralytics' visual-prompt recipe
   (``YOLOEVPTrainer``, ``freeze`` = every layer but ``savpe``; batch-norm statistics frozen with them): each
   training image's colour + shape categories present become its classes, each category's prompt the union of
   its boxes (``LoadVisualPrompt``), classification loss only. Text-prompted outputs stay bit-identical.
5. Copies ``last.pt`` (fp16, optimizer stripped) to ``shapes-yoloe.pt`` beside this file.

``--stage visual --start F`` runs step 4 alone on a text-trained checkpoint with a fresh, seeded SAVPE.
``--stage text --start F`` fine-tunes a text-trained checkpoint (``FINE_TUNE``). ``--recolour`` shows the
colour-free levels' images grey or hue-turned (``recolour``). The shipped file: stage 1, stage 2 from its output,
two ``--stage text --recolour`` fine-tunes, then stage 2 again (the command chain in SHAPES_YOLOE.md).

Ultralytics' YOLOE validator would load MobileCLIP for its class names: the validator here takes the same
MiniLM features instead (ultralytics val on the 100 val scenes, fine classes, after the last epoch only).
Ultralytics' ``select_device`` sets torch to cpu_count - 1 threads; a callback sets ``--threads`` back.
Figures: ``python -m service.training.evaluate_open`` (see SHAPES_YOLOE.md).
"""

from __future__ import annotations

import argparse
import colorsys
import os
import random
import shutil
import time
from copy import copy
from pathlib import Path
from typing import Any

import numpy as np

from service.shapes.attributes import (
    FINE_CLASSES,
    FINE_NAMES,
    HELD_OUT,
    PALETTE,
    attribute_scenes,
    is_held_out,
    yolo_fine_label_lines,
)
from service.training import train_detector

HERE = Path(__file__).parent
TRAIN_IMAGES, VAL_IMAGES = 2000, 100
SEED = 0
PROJECTION_SEED = 0
TEXT_MODEL = f"minilm-512:seed{PROJECTION_SEED}"  # service.models.text.PROJECTED_MINILM + seed
ARCHITECTURE = "yoloe-11n.yaml"
MAX_TEXTS = 80  # texts per training image (ultralytics caps YOLOE's training nc at 80)
COMMON: dict[str, Any] = dict(
    train_detector.COMMON,  # the closed detector's seeded CPU settings, then this model's own
    val=False,
    imgsz=256,
    epochs=100,
    optimizer="SGD",
    lr0=0.01,
    nbs=16,
    close_mosaic=3,
    warmup_epochs=2,
    # colour words must stay true under augmentation: milder saturation/value jitter than the defaults
    # (0.7 / 0.4); the size word must stay true under scale jitter (default 0.5 would overlap the two ranges).
    hsv_h=0.01,
    hsv_s=0.3,
    hsv_v=0.25,
    scale=0.2,
)  # epochs: re-planned by ultralytics' `time` mode


# --stage text --start: a fine-tune, so no restart at the from-scratch learning rate
FINE_TUNE: dict[str, Any] = dict(lr0=0.002, warmup_epochs=0.5)

# The visual stage trains one fresh module: AdamW as ultralytics' own visual-prompt recipe uses it.
VISUAL: dict[str, Any] = dict(optimizer="AdamW", lr0=0.002, weight_decay=0.025, momentum=0.9)


def phrase(level: str, size: str, colour: str, shape: str) -> str:
    """The phrase of a (size, colour, shape) object at a phrase level."""
    return {
        "colour+shape": f"{colour} {shape}",
        "size+colour+shape": f"{size} {colour} {shape}",
        "shape": shape,
        "colour": f"{colour} shape",
        "size+shape": f"{size} {shape}",
    }[level]


# Phrase levels and how often an image is trained at each. Colour + shape (the main figure) most often; the
# others teach the parts (a colour alone, a shape alone, a size) that held-out combinations are made of.
LEVELS: dict[str, float] = {
    "colour+shape": 0.4,
    "size+colour+shape": 0.25,
    "shape": 0.15,
    "colour": 0.1,
    "size+shape": 0.1,
}


def level_phrases(level: str) -> list[str]:
    """Every phrase of a level, without those that name a held-out colour–shape combination."""
    out = {
        phrase(level, s, c, k)
        for s, c, k in FINE_CLASSES
        if level in ("shape", "colour", "size+shape") or not is_held_out(c, k)
    }
    return sorted(out)


# Phrase levels that name no colour: their images are shown in other colours (half of them in grey, half with
# every hue turned by one random angle), so that shape words are learned from outlines and not from the colours
# each shape came in. Without it a held-out pair (a purple hexagon, never rendered) was read as "circle" and
# "purple circle" (its bare "hexagon" scored 0.25 against 0.80 on red and blue hexagons): hexagon features of
# purple were never trained. No phrase of these levels is made false by a colour change; a turn that would bring
# a shape within HELD_OUT_HUE of its held-out colour's hue is drawn again, so held-out pairs stay unrendered.
COLOUR_FREE_LEVELS = ("shape", "size+shape")
GREY_SHARE = 0.5  # of colour-free images: grey; the rest hue-turned
HELD_OUT_HUE = 30.0  # degrees

ALL_PHRASES = sorted({p for level in LEVELS for p in level_phrases(level)})


class PhraseSampler:
    """Ultralytics transform (in RandomLoadText's place): fine class ids → one phrase level's texts.

    labels["cls"] (n, 1) FINE_CLASSES ids in, labels["cls"] (n, 1) indices into labels["texts"] (``max_texts``
    phrases) out. Uses ``random`` (seeded by ultralytics), like RandomLoadText."""

    def __init__(self, max_texts: int, recolour: bool = False) -> None:
        self.max_texts = max_texts
        self.recolour = recolour
        self.levels = list(LEVELS)
        self.weights = [LEVELS[level] for level in self.levels]
        self.phrases = {level: level_phrases(level) for level in self.levels}

    def __call__(self, labels: dict[str, Any]) -> dict[str, Any]:
        level = random.choices(self.levels, self.weights)[0]
        fine = [FINE_CLASSES[int(c)] for c in np.asarray(labels.pop("cls")).reshape(-1)]
        if self.recolour and level in COLOUR_FREE_LEVELS:
            labels["img"] = recolour(labels["img"], fine)
        texts = list(self.phrases[level])
        true_anywhere = {phrase(lv, *f) for lv in self.levels for f in fine}
        pool = [p for p in ALL_PHRASES if p not in true_anywhere and p not in texts]
        texts += random.sample(pool, k=min(len(pool), self.max_texts - len(texts)))
        index = {p: i for i, p in enumerate(texts)}
        labels["cls"] = np.array([[index[phrase(level, *f)]] for f in fine], dtype=np.float32).reshape(-1, 1)
        labels["texts"] = texts
        return labels


def grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 BGR (ultralytics' order) → its luma (ITU-R 601) in all three channels. Not
    ``cv2.cvtColor(BGR2GRAY)``: its fixed-point rounding differs by 1 on 20,721 of the 16,777,216 colours, and the
    shipped fine-tunes were trained on these pixels (their recipe reproduces only with them)."""
    luma = image.astype(np.float32) @ np.array([0.114, 0.587, 0.299], dtype=np.float32)
    return np.repeat(np.clip(luma + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def hue_of(colour: str) -> float | None:
    """A palette colour's hue in degrees; None when achromatic (white, black)."""
    h, s, _ = colorsys.rgb_to_hsv(*(v / 255 for v in PALETTE[colour]))
    return h * 360 if s > 0.25 else None


def hue_turn(fine: list[tuple[str, str, str]], tries: int = 20) -> float | None:
    """A random hue turn (degrees) that takes no shape of ``fine`` (size, colour, shape) to within HELD_OUT_HUE
    of the hue of a colour it is held out in; None when ``tries`` draws found none."""
    for _ in range(tries):
        turn = random.uniform(0, 360)
        if not any(
            (hue := hue_of(c)) is not None
            and (held := hue_of(hc)) is not None
            and min(d := (hue + turn - held) % 360, 360 - d) < HELD_OUT_HUE
            for _, c, k in fine
            for hc, hk in HELD_OUT
            if hk == k
        ):
            return turn
    return None


def recolour(image: np.ndarray, fine: list[tuple[str, str, str]]) -> np.ndarray:
    """A colour-free level's image: grey (GREY_SHARE), else every hue turned by ``hue_turn``."""
    import cv2

    turn = None if random.random() < GREY_SHARE else hue_turn(fine)
    if turn is None:
        return grey(image)
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)  # OpenCV hue: 0..179, 2 degrees a step
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(turn / 2)) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


class ExemplarSampler:
    """Ultralytics transform for the visual-prompt stage: fine class ids → colour + shape categories.

    labels["cls"] (n, 1) FINE_CLASSES ids in; out: indices into the sorted colour + shape phrases present
    (continuous from 0, as ``LoadVisualPrompt`` expects: one visual prompt per index), those phrases first in
    labels["texts"]. An exemplar of a red star should find every red star, large or small."""

    def __call__(self, labels: dict[str, Any]) -> dict[str, Any]:
        fine = [FINE_CLASSES[int(c)] for c in np.asarray(labels.pop("cls")).reshape(-1)]
        names = [phrase("colour+shape", *f) for f in fine]
        texts = sorted(set(names))
        index = {p: i for i, p in enumerate(texts)}
        labels["cls"] = np.array([[index[n]] for n in names], dtype=np.float32).reshape(-1, 1)
        # the trainer stacks every image's text features, so all images need as many texts; visual prompts take
        # the texts' place in this stage, so the padding is never used
        labels["texts"] = texts + [p for p in ALL_PHRASES if p not in index][: MAX_TEXTS - len(texts)]
        return labels


def phrase_features(texts: list[str]) -> np.ndarray:
    """(N, 512) float32: what detseg's ClassTextEncoder for TEXT_MODEL gives for ``texts``."""
    from service.models.text import ClassTextEncoder, SentenceEncoder

    global _ENCODER
    if _ENCODER is None:
        _ENCODER = ClassTextEncoder.for_detector(TEXT_MODEL, SentenceEncoder.load())
    return _ENCODER.encode(texts).astype(np.float32)


_ENCODER: Any = None


def write_dataset(root: Path) -> Path:
    """Images, fine labels and data.yaml (names = FINE_NAMES) for train and val; returns data.yaml."""
    from PIL import Image

    for split, count in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for scene in attribute_scenes(split, count):
            stem = f"{scene.seed:08d}"
            Image.fromarray(scene.image).save(root / "images" / split / f"{stem}.png")
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(yolo_fine_label_lines(scene)) + "\n")
    data = root / "data.yaml"
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(FINE_NAMES))
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data


def write_text_cache(folder: Path) -> Path:
    """ultralytics' YOLOE text-embedding cache for ALL_PHRASES: {phrase: (512,) float32 tensor}."""
    import torch

    path = folder / f"text_embeddings_{TEXT_MODEL.replace(':', '_').replace('/', '_')}.pt"
    features = torch.from_numpy(phrase_features(ALL_PHRASES))
    torch.save(dict(zip(ALL_PHRASES, features, strict=True)), path)
    return path


def make_trainer_class(visual: bool = False, recolour: bool = False) -> type:
    """YOLOETrainerFromScratch with the phrase dataset, MiniLM text features and a MiniLM validator; with
    ``visual``, the visual-prompt stage: colour + shape categories and their box prompts (``LoadVisualPrompt``);
    ``recolour``: colour-free levels' images recoloured (``recolour``)."""
    import torch
    from ultralytics.data.augment import LoadVisualPrompt
    from ultralytics.data.dataset import YOLOMultiModalDataset
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.models.yolo.yoloe import YOLOETrainerFromScratch
    from ultralytics.models.yolo.yoloe.val import YOLOEDetectValidator
    from ultralytics.utils import colorstr
    from ultralytics.utils.torch_utils import unwrap_model

    class PhraseDataset(YOLOMultiModalDataset):
        @property
        def category_names(self) -> set[str]:  # the texts the trainer looks up in its embedding cache
            return set(ALL_PHRASES)

        def build_text_transforms(self, transforms: Any, max_samples: int) -> Any:
            if self.augment:
                transforms.insert(-1, ExemplarSampler() if visual else PhraseSampler(MAX_TEXTS, recolour))
                if visual:  # after Format: reads its normalised boxes
                    transforms.append(LoadVisualPrompt())
            return transforms

    class PhraseValidator(YOLOEDetectValidator):
        def get_model(self, model: Any = None, trainer: Any = None, refer_data: Any = None, load_vp: bool = False):
            model = BaseValidator.get_model(self, model, trainer)
            names = [str(n) for n in self.dataloader.dataset.data["names"].values()]
            with torch.no_grad():
                feats = torch.from_numpy(phrase_features(names))[None].to(next(model.parameters()).device)
                model.set_classes(names, model.model[-1].get_tpe(feats))
            return model

    class PhraseTrainer(YOLOETrainerFromScratch):
        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
            model = super().get_model(cfg, weights, verbose)
            model.text_model = TEXT_MODEL
            return model

        def build_dataset(self, img_path: Any, mode: str = "train", batch: int | None = None) -> Any:
            if mode != "train":
                return super().build_dataset(img_path, mode, batch)
            (path,) = img_path
            stride = max(int(unwrap_model(self.model).stride.max()), 32)  # type: ignore[arg-type, operator]
            dataset = PhraseDataset(
                img_path=path,
                imgsz=self.args.imgsz,
                batch_size=batch,
                augment=True,
                hyp=self.args,
                rect=False,
                cache=self.args.cache or None,
                single_cls=False,
                stride=stride,
                pad=0.0,
                prefix=colorstr("train: "),
                task="detect",
                classes=None,
                data=self.training_data[path],
                fraction=1.0,
            )
            self.set_text_embeddings([dataset], batch)  # reads the cache file write_text_cache wrote
            return dataset

        def get_validator(self) -> Any:
            return PhraseValidator(
                self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks
            )

        def validate(self) -> tuple[dict[str, Any], float]:
            if visual:  # ultralytics' validator cannot score visual prompts from the val set; figures: evaluate_open
                return {}, 0.0
            return super().validate()

        def final_eval(self) -> None:  # ultralytics would re-validate best.pt via MobileCLIP; figures: evaluate_open
            pass

    return PhraseTrainer


def drop_visual_prompt_encoder(path: Path) -> None:
    """Removes the head's exemplar encoder (SAVPE) from a checkpoint: only text prompts were trained, so it holds
    its random initial weights; without it detseg answers exemplars with FAILED_PRECONDITION instead of noise."""
    import torch

    from service.models.loading import safe_load_ultralytics

    ckpt = safe_load_ultralytics(path)
    head = (ckpt.get("ema") or ckpt["model"]).model[-1]
    head.savpe = None
    torch.save(ckpt, path)


def visual_start(text_weights: Path, out: Path) -> Path:
    """A text-trained checkpoint with a fresh SAVPE (seeded ``SEED``) in its head, for the visual stage."""
    import torch
    from ultralytics.nn.tasks import YOLOEModel

    from service.models.loading import safe_load_ultralytics

    ckpt = safe_load_ultralytics(text_weights)
    model = ckpt.get("ema") or ckpt["model"]
    if model.model[-1].savpe is None:  # the shipped file: SAVPE was removed after the text stage
        torch.manual_seed(SEED)
        fresh: Any = YOLOEModel(ARCHITECTURE, verbose=False).model
        model.model[-1].savpe = fresh[-1].savpe.to(next(model.parameters()).dtype)
    ckpt["model"], ckpt["ema"] = model, None
    torch.save(ckpt, out)
    return out


def frozen_except_savpe(architecture: str) -> list[str]:
    """ultralytics ``freeze`` for the visual-prompt stage: every layer, and every head part but ``savpe``."""
    from ultralytics.nn.tasks import YOLOEModel

    layers: Any = YOLOEModel(architecture, verbose=False).model
    head = len(layers) - 1
    return [str(i) for i in range(head)] + [f"{head}.{n}" for n, _ in layers[-1].named_children() if n != "savpe"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch dir for the dataset and runs")
    parser.add_argument("--stage", choices=("all", "text", "visual"), default="all")
    parser.add_argument("--hours", type=float, default=0.65, help="text stage wall-time budget (ultralytics `time`)")
    parser.add_argument("--visual-hours", type=float, default=0.06, help="visual-prompt stage wall-time budget")
    parser.add_argument(
        "--start",
        type=Path,
        help="a text-trained checkpoint (--stage visual starts from it; --stage text fine-tunes it)",
    )
    parser.add_argument(
        "--recolour",
        action="store_true",
        help="show colour-free phrase levels' images in grey or turned hues (the shipped file's fine-tunes)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads while training")
    parser.add_argument("--out", type=Path, default=HERE / "shapes-yoloe.pt")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # OpenMP threads sleep instead of spinning while they wait: on a shared 2-core machine, spinning threads
    # made steps 2-7x slower whenever another process took a core (measured); read when torch loads, below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch
    from ultralytics import YOLOE
    from ultralytics.utils.torch_utils import strip_optimizer

    start = time.time()
    data = args.work / "data" / "data.yaml"
    if not data.exists():  # deterministic, so a previous run's copy is the same dataset
        data = write_dataset(args.work / "data")
    cache = write_text_cache(args.work / "data" / "images")
    print(f"dataset and {cache.name} ({len(ALL_PHRASES)} phrases) ready in {time.time() - start:.0f}s", flush=True)
    splits = {"train": {"yolo_data": [str(data)]}, "val": {"yolo_data": [str(data)]}}
    runs = args.work / "runs"

    def train(model: Any, name: str, **kwargs: Any) -> Path:
        if args.threads:
            model.add_callback("on_train_start", lambda trainer: torch.set_num_threads(args.threads))
        model.train(data=splits, project=str(runs), name=name, **COMMON | kwargs)
        weights = runs / name / "weights" / "last.pt"
        strip_optimizer(str(weights))
        return weights

    weights = args.start
    if args.stage in ("all", "text"):
        if args.start is not None and args.stage == "text":  # fine-tune a text-trained checkpoint
            model, name, extra = YOLOE(str(args.start)), "yoloe-ft", FINE_TUNE
        else:
            model, name, extra = YOLOE(ARCHITECTURE), "yoloe", {}
        trainer = make_trainer_class(recolour=args.recolour)
        weights = train(model, name, trainer=trainer, time=args.hours, **extra)
        print(f"text stage done at {time.time() - start:.0f}s", flush=True)
    if args.stage in ("all", "visual"):
        if weights is None:
            parser.error("--stage visual needs --start")
        begin = visual_start(weights, args.work / "visual-start.pt")
        weights = train(
            YOLOE(str(begin)),
            "yoloe-vp",
            trainer=make_trainer_class(visual=True),
            time=args.visual_hours,
            freeze=frozen_except_savpe(ARCHITECTURE),
            warmup_epochs=0,
            close_mosaic=0,
            **VISUAL,
        )
        print(f"visual stage done at {time.time() - start:.0f}s", flush=True)
    shutil.copyfile(weights, args.out)
    if args.stage == "text":  # untrained SAVPE: exemplars are refused instead of answered with noise
        drop_visual_prompt_encoder(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); total {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
