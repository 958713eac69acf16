"""The ``detseg eval`` report: figures.json (every figure), report.md, a self-contained report.html (plots
inlined as PNG data URIs) and the plots as PNG files beside them."""

from __future__ import annotations

import base64
import contextlib
import html
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

PLOTS = ("class_iou", "slice_iou", "iou_histogram", "pr_curves", "noc_curve", "review_tradeoff")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@contextlib.contextmanager
def _pyplot() -> Iterator[Any]:
    """matplotlib's pyplot (Agg) with TeX-like math off: a class name or slice value with two "$" (a price band) was
    read as math and failed the whole report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False}):
        yield plt


def write_plots(figures: dict[str, Any], out: Path) -> dict[str, Path]:
    """The plots as PNGs in ``out``; returns name → path."""
    with _pyplot() as plt:
        return _plots(plt, figures, out)


def _plots(plt: Any, figures: dict[str, Any], out: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)

    classes = figures["per_class"]
    names = list(classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 3.6))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [classes[n]["mean_mask_iou"] or 0 for n in names], 0.4, label="mean mask IoU (matched)")
    ax.bar(x + 0.2, [classes[n]["recall"] or 0 for n in names], 0.4, label="recall @ IoU 0.5")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("Per class, at the operating threshold")
    ax.legend(loc="lower right", fontsize=8)
    save(fig, "class_iou")

    slices = figures["per_slice"]
    labels, ious, recalls = [], [], []
    for attribute, values in slices.items():
        for value, f in values.items():
            labels.append(f"{attribute}={value}\n({f['images']} img)")
            ious.append(f["mean_mask_iou"] or 0)
            recalls.append(f["recall"] or 0)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels) + 2), 3.8))
    if labels:
        x = np.arange(len(labels))
        ax.bar(x - 0.2, ious, 0.4, label="mean mask IoU (matched)")
        ax.bar(x + 0.2, recalls, 0.4, label="recall @ IoU 0.5")
        ax.set_xticks(x, labels, fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "the dataset has no slice attributes", ha="center", va="center")
    ax.set_ylim(0, 1.05)
    ax.set_title("Per slice")
    save(fig, "slice_iou")

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(figures["matched_mask_ious"], bins=[i / 40 for i in range(41)], color="#4477aa")
    ax.set_xlabel("mask IoU of matched instances")
    ax.set_ylabel("instances")
    ax.set_title("Mask IoU histogram")
    save(fig, "iou_histogram")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    curves = figures.get("pr_curves") or {}
    recall = curves.get("recall", [])
    for name, precision in curves.items():
        if name == "recall":
            continue
        p = np.array(precision)
        if (p > -1).any():
            ax.plot(recall, np.where(p < 0, np.nan, p), label=f"{name} (AP50 {figures['ap50_per_class'][name]:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_title("Mask precision–recall, IoU 0.5")
    ax.legend(fontsize=7, loc="lower left")
    save(fig, "pr_curves")

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    noc = figures.get("noc") or {}
    curve = noc.get("mean_iou_per_click") or []
    if curve:
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3)
        for t in (0.85, 0.90):
            ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(1, len(curve) + 1, 2))
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Simulated annotator ({noc.get('instances', 0)} instances)")
    save(fig, "noc_curve")

    fig, ax = plt.subplots(figsize=(6, 4.4))
    for rule, curve in (figures.get("review_curves") or {}).items():
        ax.plot(curve["load"], curve["error_recall"], linewidth=1, alpha=0.7, label=f"{rule}: threshold swept 0..1")
    silent = []
    for rule, row in figures["review"].items():
        if not row["flagged"] or row["error_recall"] is None:
            silent.append(rule)
            continue
        ax.scatter(row["load"], row["error_recall"], s=30)
        ax.annotate(rule, (row["load"], row["error_recall"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if silent:
        ax.text(0.98, 0.03, "flagged nothing: " + ", ".join(silent), ha="right", fontsize=7, transform=ax.transAxes)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("share of instances sent to review (load)")
    ax.set_ylabel("share of errors caught")
    ax.set_title("Review rules: load vs errors caught (dots: the rules as set)")
    if figures.get("review_curves"):
        ax.legend(fontsize=7, loc="center right")
    save(fig, "review_tradeoff")
    return paths


def _tables(figures: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table the report shows."""
    o = figures["overall"]
    summary = [
        ["mask AP / AP50", f"{_fmt(figures['mask_ap'])} / {_fmt(figures['mask_ap50'])}"],
        ["box AP / AP50", f"{_fmt(figures['box_ap'])} / {_fmt(figures['box_ap50'])}"],
        ["recall @ IoU 0.5 (score >= operating threshold)", _fmt(o["recall"])],
        ["mean mask IoU of matched instances", _fmt(o["mean_mask_iou"])],
        ["false positives per image", _fmt(o["false_positives_per_image"])],
        ["share of instances flagged for review", _fmt(o["flagged_share"])],
    ]
    noc = figures.get("noc") or {}
    if noc.get("instances"):
        summary += [
            [
                f"NoC@{t} (mean clicks; share never reaching it)",
                f"{_fmt(noc[f'noc@{t}'], 2)} ({_fmt(noc[f'failed@{t}'])})",
            ]
            for t in (85, 90)
        ]
    head = ["", "ground truth", "predictions", "recall", "mean mask IoU", "FP / image", "flagged"]

    def row(name: str, f: dict[str, Any]) -> list[str]:
        return [
            name,
            str(f["ground_truth"]),
            str(f["predictions"]),
            _fmt(f["recall"]),
            _fmt(f["mean_mask_iou"]),
            _fmt(f["false_positives_per_image"]),
            _fmt(f["flagged_share"]),
        ]

    per_class = [[*row(n, f), _fmt(figures["ap50_per_class"].get(n))] for n, f in figures["per_class"].items()]
    per_slice = [
        row(f"{a}={v} ({f['images']} img)", f) for a, vs in figures["per_slice"].items() for v, f in vs.items()
    ]
    review = [
        [
            rule,
            str(r["flagged"]),
            _fmt(r["load"]),
            f"{r['errors_caught']} / {r['errors']}",
            _fmt(r["error_recall"]),
            _fmt(r["flag_precision"]),
            _fmt(r["recall_if_dropped"]),
        ]
        for rule, r in figures["review"].items()
    ]
    failed = [[f["file_name"], str(f["image_id"]), f["error"]] for f in figures.get("failed_images", [])]
    return [
        ("Summary", ["figure", "value"], summary),
        *(
            [("Failed images (each counts as an image with no predictions)", ["file", "id", "error"], failed)]
            if failed
            else []
        ),
        ("Per class", [*head, "mask AP50"], per_class),
        ("Per slice", head, per_slice),
        (
            f"Review rules (error: unmatched, or matched with mask IoU < {figures['good_iou']})",
            ["rule", "flagged", "load", "errors caught", "error recall", "flag precision", "recall if dropped"],
            review,
        ),
    ]


def write_report(figures: dict[str, Any], out: Path, title: str) -> dict[str, Path]:
    """figures.json, report.md, report.html and the PNGs in ``out``; returns name → path."""
    out.mkdir(parents=True, exist_ok=True)
    paths = write_plots(figures, out)
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    intro = (
        f"{figures['images']} images, {figures['ground_truth']} ground-truth instances, prompt "
        f"`{figures.get('prompt', '?')}`, operating threshold {figures['operating_threshold']}."
    )
    if figures.get("failed_images"):
        intro += f" {len(figures['failed_images'])} image(s) failed: listed below, counted as empty."
    _write_documents(out, "report", title, intro, _tables(figures), paths)
    return {"json": out / "figures.json", "markdown": out / "report.md", "html": out / "report.html", **paths}


# The figures a before/after comparison lists, in order, with whether higher is better.
COMPARED = (
    ("mask_ap50", True),
    ("mask_ap", True),
    ("box_ap50", True),
    ("box_ap", True),
    ("matched_mask_iou", True),
    ("recall", True),
    ("false_positives_per_image", False),
    ("noc@85", False),
    ("noc@90", False),
)


def write_comparison(before: dict[str, Any], after: dict[str, Any], out: Path, title: str) -> dict[str, Path]:
    """``comparison.md`` / ``comparison.html`` (and the per-slice delta plot) in ``out`` from two sets of summary
    figures keyed by dataset ("holdout", "original"): each figure before, after and the change; AP50 per class; recall
    and matched mask IoU per slice. Returns name → path."""
    out.mkdir(parents=True, exist_ok=True)
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    for dataset in after:
        b, a = before.get(dataset, {}), after[dataset]
        rows = [[name, _fmt(b.get(name)), _fmt(a.get(name)), _delta(b.get(name), a.get(name))] for name, _ in COMPARED]
        tables.append((f"{dataset}: overall", ["figure", "before", "after", "change"], rows))
        classes = a.get("ap50_per_class", {})
        rows = [
            [c, _fmt(b.get("ap50_per_class", {}).get(c)), _fmt(v), _delta(b.get("ap50_per_class", {}).get(c), v)]
            for c, v in classes.items()
        ]
        tables.append((f"{dataset}: mask AP50 per class", ["class", "before", "after", "change"], rows))
        rows = []
        for attribute, values in a.get("per_slice", {}).items():
            for value, f in values.items():
                old = b.get("per_slice", {}).get(attribute, {}).get(value, {})
                for name in ("recall", "mean_mask_iou"):
                    rows.append(
                        [
                            f"{attribute}={value}",
                            name,
                            _fmt(old.get(name)),
                            _fmt(f[name]),
                            _delta(old.get(name), f[name]),
                        ]
                    )
        tables.append((f"{dataset}: per slice", ["slice", "figure", "before", "after", "change"], rows))
    paths = {"slice_deltas": _slice_delta_plot(before, after, out / "slice_deltas.png")}
    intro = "Before: the base models; after: the adapted ones; both through the service (`detseg eval`)."
    _write_documents(out, "comparison", title, intro, tables, paths)
    return {"markdown": out / "comparison.md", "html": out / "comparison.html", **paths}


def _delta(before: Any, after: Any) -> str:
    if not isinstance(before, int | float) or not isinstance(after, int | float):
        return "–"
    return f"{after - before:+.3f}"


def _slice_delta_plot(before: dict[str, Any], after: dict[str, Any], path: Path) -> Path:
    """Change of recall and matched mask IoU per slice, one panel per dataset."""
    with _pyplot() as plt:
        return _slice_delta(plt, before, after, path)


def _slice_delta(plt: Any, before: dict[str, Any], after: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(after), figsize=(6 * len(after), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], after, strict=True):
        labels, d_recall, d_iou = [], [], []
        for attribute, values in after[dataset].get("per_slice", {}).items():
            for value, f in values.items():
                old = before.get(dataset, {}).get("per_slice", {}).get(attribute, {}).get(value, {})
                labels.append(f"{attribute}={value}")
                d_recall.append((f["recall"] or 0) - (old.get("recall") or 0))
                d_iou.append((f["mean_mask_iou"] or 0) - (old.get("mean_mask_iou") or 0))
        x = np.arange(len(labels))
        ax.bar(x - 0.2, d_recall, 0.4, label="recall")
        ax.bar(x + 0.2, d_iou, 0.4, label="matched mask IoU")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{dataset}: change per slice (after − before)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md_cell(text: str) -> str:
    """A markdown table cell showing ``text`` as written: a class name's "<b>" or line break is text, not markup or a
    new row."""
    return " ".join(html.escape(text, quote=False).splitlines()).replace("|", "\\|")


def _write_documents(
    out: Path,
    stem: str,
    title: str,
    intro: str,
    tables: list[tuple[str, list[str], list[list[str]]]],
    paths: dict[str, Path],
) -> None:
    """``<stem>.md`` (plots linked) and a self-contained ``<stem>.html`` (plots inlined) in ``out``."""
    md = [f"# {title}", "", intro, ""]
    for name, head, rows in tables:
        md += [f"## {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows] + [""]
    md += [f"![{name}]({p.name})" for name, p in paths.items()]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,"
        "th:first-child{text-align:left}img{max-width:100%}</style>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>",
    ]
    for name, head, rows in tables:
        parts.append(f"<h2>{html.escape(name)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head))
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    for name, p in paths.items():
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(name)}</h3><img alt='{name}' src='data:image/png;base64,{data}'>")
    (out / f"{stem}.html").write_text("\n".join(parts))
