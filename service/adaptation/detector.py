"""The detector adapted to a domain with ultralytics' own trainers.

- **Closed YOLO**: the start checkpoint is the base detector loaded safely (``safe_load_ultralytics``), with its
  head resized to the dataset's classes: a class whose name the base knows keeps its row of the classification
  head (so the old classes start from what they knew), a new class starts from the architecture's initialisation.
- **Open vocabulary (YOLOE)**: the head scores a box against text embeddings, so nothing is resized: the
  dataset's class names, embedded by the checkpoint's own text encoder (``ClassTextEncoder.for_detector`` of its
  ``text_model``, as detseg serves it), are the classes it trains with (ultralytics' ``YOLOETrainerFromScratch``
  with those embeddings in place of its MobileCLIP ones). The result stays open-vocabulary and keeps its text
  encoder: any class name or text can still be asked, and the dataset's names are what it learned on the domain.
  Its exemplar encoder (SAVPE) is not trained (text prompts only) and reads the adapted features.

ultralytics' trainer then fine-tunes every layer at the base's input size, validating on the held-out split after
each epoch, keeping the best epoch (its fitness: 0.1 mAP50 + 0.9 mAP50-95) and stopping after ``patience`` epochs
without gain or when the wall-time budget (its ``time`` mode) is spent. Where the recipe's precision resolves to
``bf16`` (``service.adaptation.precision``), the trained model's predictions are computed under bfloat16 autocast
and handed to ultralytics' loss as float32 (box coordinates in bfloat16 would be 2 px apart at 320); its weights,
validation and saved file are as ultralytics makes them.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from copy import copy
from pathlib import Path
from typing import Any

import torch

from service.adaptation import precision as precisions
from service.adaptation.recipes import DetectorRecipe
from service.models.loading import safe_load_ultralytics
from service.models.open_vocabulary import is_open_vocabulary, text_model_name
from service.models.text import ClassTextEncoder, SentenceEncoder
from service.printable import normalise_class_name


@dataclasses.dataclass(frozen=True)
class DetectorResult:
    epochs: int
    best_epoch: int
    seconds: float
    holdout_map50: float  # ultralytics' validator, best epoch, on the held-out split
    holdout_map50_95: float
    # closed: classes whose head rows came from the base, and the others; open vocabulary: the dataset's names the
    # base was trained with (its ``names``), and the others (any text could be asked of it before)
    kept_classes: tuple[str, ...]
    new_classes: tuple[str, ...]
    precision: str  # the number format it trained in: bf16 or fp32


def start_checkpoint(base: Path, names: Sequence[str], out: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Writes the training start for ``names`` (index = class id) from the base detector ``base``; returns (classes
    kept from the base, new classes)."""
    from ultralytics.nn.tasks import DetectionModel

    ckpt = safe_load_ultralytics(base)
    old = (ckpt.get("ema") or ckpt["model"]).float()
    if type(old).__name__ != "DetectionModel":
        raise ValueError(f"{base.name}: adaptation takes a closed-vocabulary YOLO detector, not a {type(old).__name__}")
    old_names = [old.names[k] for k in sorted(old.names)]
    old_index = {normalise_class_name(n): k for k, n in enumerate(old_names)}
    mapping = {k: old_index.get(normalise_class_name(n)) for k, n in enumerate(names)}
    torch.manual_seed(0)
    new = DetectionModel(old.yaml, nc=len(names), verbose=False)
    state, old_state = new.state_dict(), old.state_dict()
    # The classification outputs: each of the head's cv3 branches ends in a 1x1 conv with one output channel (row)
    # per class. Only those rows are classes: the branch's hidden layers are as wide as the class count when it
    # lies between the first feature width and 100 (80 classes on yolo11n's 64), and are copied whole.
    head = len(old.model) - 1
    class_convs = tuple(f"model.{head}.cv3.{i}.{len(branch) - 1}." for i, branch in enumerate(old.model[-1].cv3))
    for key, value in state.items():
        source = old_state.get(key)
        if source is None:
            continue
        class_rows = key.startswith(class_convs) and source.shape[0] == len(old_names)
        if class_rows and value.shape[1:] == source.shape[1:]:
            rows = value.clone()  # the base's row where it knows the name, the architecture's initialisation else
            for k, j in mapping.items():
                if j is not None:
                    rows[k] = source[j]
            state[key] = rows
        elif source.shape == value.shape:
            state[key] = source.clone()
    new.load_state_dict(state)
    new.names = dict(enumerate(names))  # type: ignore[assignment]
    new.args = getattr(old, "args", {})  # type: ignore[assignment]
    torch.save({"model": new.half(), "train_args": ckpt.get("train_args") or {}, "date": None, "version": None}, out)
    kept = tuple(n for k, n in enumerate(names) if mapping[k] is not None)
    return kept, tuple(n for k, n in enumerate(names) if mapping[k] is None)


def adapt_detector(
    base: Path,
    names: Sequence[str],
    data_yaml: Path,
    work: Path,
    imgsz: int,
    recipe: DetectorRecipe,
    progress: Callable[[float, str], None] = lambda fraction, text: None,
) -> tuple[Path, DetectorResult]:
    """Fine-tunes the base detector on ``data_yaml`` (``data.write_yolo``); returns the best weights (fp16,
    optimizer stripped, as ultralytics ships them) and what training did. Closed or open vocabulary by the base
    (module docstring)."""
    from ultralytics import YOLO, YOLOE
    from ultralytics.utils.torch_utils import strip_optimizer

    t = time.perf_counter()
    start = work / "start.pt"
    text_model = open_start_checkpoint(base, start)
    if text_model is None:
        kept, new = start_checkpoint(base, names, start)
        model: Any = YOLO(str(start))  # our own file, written just above from a safe load
        data: Any = str(data_yaml)
        trainer_class = None
    else:
        kept = _known_names(base, names)
        new = tuple(n for n in names if n not in kept)
        model = YOLOE(str(start))  # idem
        data = {"train": {"yolo_data": [str(data_yaml)]}, "val": {"yolo_data": [str(data_yaml)]}}
        trainer_class = open_trainer_class(text_model)
    threads = torch.get_num_threads()  # the stage's (``run.training_threads``)
    precision = precisions.resolve(recipe.precision)

    def on_train_start(trainer: Any) -> None:
        torch.set_num_threads(threads)  # ultralytics' select_device leaves one core idle
        if precision == "bf16":
            predict_in_bf16(trainer.model)

    def on_epoch_end(trainer: Any) -> None:
        progress(min(1.0, (time.perf_counter() - t) / (recipe.minutes * 60)), f"detector epoch {trainer.epoch + 1}")

    model.add_callback("on_train_start", on_train_start)
    model.add_callback("on_fit_epoch_end", on_epoch_end)
    model.train(
        data=data,
        trainer=trainer_class,
        project=str(work),
        name="detector",
        exist_ok=True,
        imgsz=imgsz,
        epochs=1000,  # re-planned by `time`
        time=recipe.minutes / 60,
        patience=recipe.patience,
        batch=recipe.batch,
        nbs=recipe.batch,
        optimizer="SGD",
        lr0=recipe.lr0,
        warmup_epochs=1,
        close_mosaic=recipe.close_mosaic,
        seed=recipe.seed,
        deterministic=True,
        workers=0,
        cache="ram",
        device="cpu",
        amp=False,
        plots=False,
        verbose=False,
    )
    trainer: Any = model.trainer
    best = Path(trainer.best) if Path(trainer.best).exists() else Path(trainer.last)
    out = work / "detector.pt"
    shutil.copyfile(best, out)
    strip_optimizer(str(out))
    stopper = getattr(trainer, "stopper", None)
    metrics = _best_metrics(Path(trainer.csv), getattr(stopper, "best_epoch", None))
    return out, DetectorResult(
        epochs=int(trainer.epoch) + 1,
        best_epoch=int(metrics.get("epoch", 0)),
        seconds=time.perf_counter() - t,
        holdout_map50=float(metrics.get("metrics/mAP50(B)", 0.0)),
        holdout_map50_95=float(metrics.get("metrics/mAP50-95(B)", 0.0)),
        kept_classes=kept,
        new_classes=new,
        precision=precision,
    )


def predict_in_bf16(model: Any) -> None:
    """The training model's ``predict`` (what its loss reads, ``BaseModel.loss``) runs under the CPU's bfloat16
    autocast, its outputs returned as float32 so that the loss is computed in float32. Only this instance changes
    (ultralytics' EMA copy, which validates and is saved, was made before training starts and keeps float32)."""
    predict = model.predict

    def predict_bf16(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = predict(*args, **kwargs)
        return _float32(out)

    model.predict = predict_bf16


def _float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, list | tuple):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


def open_start_checkpoint(base: Path, out: Path) -> str | None:
    """For an open-vocabulary base: writes its model (float32, no EMA or optimizer) to ``out`` for ultralytics'
    trainer and returns its text model's name; for a closed one: None, nothing written."""
    ckpt = safe_load_ultralytics(base)
    model = (ckpt.get("ema") or ckpt["model"]).float()
    if not is_open_vocabulary(model):
        return None
    if getattr(model.model[-1], "is_fused", False):
        raise ValueError(f"{base.name}: its class embeddings are fused into the head (a fixed vocabulary)")
    torch.save({"model": model, "train_args": ckpt.get("train_args") or {}, "date": None, "version": None}, out)
    return text_model_name(model)


def _known_names(base: Path, names: Sequence[str]) -> tuple[str, ...]:
    """The names an open-vocabulary base was trained with (its ``names``), among ``names``."""
    model = safe_load_ultralytics(base)["model"]
    known = {normalise_class_name(str(n)) for n in dict(getattr(model, "names", {}) or {}).values()}
    return tuple(n for n in names if normalise_class_name(n) in known)


def open_trainer_class(text_model: str) -> type:
    """ultralytics' ``YOLOETrainerFromScratch`` whose class texts are embedded by ``text_model`` (detseg's
    ``ClassTextEncoder``, the serving encoder) instead of MobileCLIP, in training and in validation; the trained
    model keeps ``text_model``. Nothing is downloaded."""
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.models.yolo.yoloe import YOLOETrainerFromScratch
    from ultralytics.models.yolo.yoloe.val import YOLOEDetectValidator

    encoder = ClassTextEncoder.for_detector(text_model, SentenceEncoder.load())

    def features(texts: Sequence[str]) -> torch.Tensor:
        """(N, D): the raw text features, before the head's ``get_tpe`` (ultralytics' ``without_reprta``)."""
        return torch.from_numpy(encoder.encode(list(texts)).astype("float32"))

    class TextValidator(YOLOEDetectValidator):
        def get_model(self, model: Any = None, trainer: Any = None, refer_data: Any = None, load_vp: bool = False):
            model = BaseValidator.get_model(self, model, trainer)
            names = [str(n) for n in self.dataloader.dataset.data["names"].values()]
            with torch.no_grad():
                feats = features(names)[None].to(next(model.parameters()).device)
                model.set_classes(names, model.model[-1].get_tpe(feats))
            return model

    class TextTrainer(YOLOETrainerFromScratch):
        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
            model = super().get_model(cfg, weights, verbose)
            model.text_model = text_model
            # the texts an image trains with (ultralytics' `nc` for YOLOE): the dataset's names; the base's own
            # count (80 for the demo's) is what its weights' transfer leaves here, and the loss would expect it
            head = model.model[-1]
            head.nc = min(int(self.data["nc"]), 80)
            head.no = head.nc + head.reg_max * 4
            return model

        def generate_text_embeddings(self, texts: list[str], batch: int, cache_dir: Path) -> dict[str, Any]:
            return dict(zip(texts, features(texts), strict=True))

        def get_validator(self) -> Any:
            return TextValidator(
                self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks
            )

        def final_eval(self) -> None:  # ultralytics would re-validate best.pt with MobileCLIP; `after` measures it
            pass

    return TextTrainer


def _best_metrics(csv: Path, best_epoch: int | None = None) -> dict[str, float]:
    """The row of ultralytics' results.csv of the epoch it kept as best.pt: ``best_epoch`` (its early stopper's, from
    0) when given, else the last row of the highest fitness (box mAP50-95 in this ultralytics: a later epoch that
    ties is saved again)."""
    import csv as csv_module

    if not csv.exists():
        return {}
    with csv.open() as f:
        rows = [
            {k.strip(): float(v) for k, v in row.items() if v not in (None, "")} for row in csv_module.DictReader(f)
        ]
    if not rows:
        return {}
    if best_epoch is not None:
        row = next((r for r in rows if r.get("epoch") == best_epoch + 1), None)
        if row is not None:
            return row
    best = max(r.get("metrics/mAP50-95(B)", 0) for r in rows)
    return [r for r in rows if r.get("metrics/mAP50-95(B)", 0) == best][-1]
