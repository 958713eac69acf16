"""The tracking evaluation (``detseg eval-track``): its metric plumbing gives trackeval's own figures the values a
hand-made case derives (a perfect tracker, one that swaps two ids half-way); occlusions and re-identification are
read from the ground truth; the no-memory baseline's association; and the whole harness against the test-profile
server (seeded random weights: figures in range, not quality)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.client import Client
from service.evaluation import track_metrics as tm
from service.evaluation.tracking import IouTracker, TrackOptions, evaluate_tracking, seeds_of, write_report

H, W, T = 60, 80, 10


def _box(x0: int, y0: int, x1: int, y1: int) -> dict:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return tm.rle(mask)


# Two objects over T frames, apart from each other: A moves right, B down.
A = [_box(5 + t, 5, 20 + t, 20) for t in range(T)]
B = [_box(40, 30 + t // 2, 60, 45 + t // 2) for t in range(T)]
GT = [[(1, A[t]), (2, B[t])] for t in range(T)]


def _data(gt: list, tracker: list, ignore: list | None = None) -> dict:
    return tm.sequence_data(gt, tracker, (H, W), ignore)


def _figures(tracker: list) -> dict:
    return tm.summary(tm.evaluate_sequence(_data(GT, tracker)))


def test_a_perfect_tracker_scores_one_everywhere_whatever_its_ids() -> None:
    f = _figures([[(7, A[t]), (9, B[t])] for t in range(T)])
    for name in ("hota", "deta", "assa", "loca", "mota", "idf1", "j_and_f"):
        assert f[name] == pytest.approx(1.0), name
    assert (f["idsw"], f["frag"], f["frames"], f["gt_dets"], f["tracker_dets"]) == (0, 0, T, 2 * T, 2 * T)


def test_ids_swapped_half_way_cost_what_the_definitions_derive() -> None:
    """Ids 7 and 9 swap objects after frame 4. CLEAR: both objects switch once (IDSW 2), MOTA = 1 - 2/20. Identity:
    the best one-to-one id assignment keeps half of each object (IDF1 0.5). HOTA: every detection matches (DetA 1),
    each match's association IoU is 5 / (5 + 5 + 5) (AssA 1/3), HOTA = sqrt(1/3). J&F: each object's best single id
    covers it on half the frames, exactly (J 0.5, F 0.5)."""
    f = _figures([[(7, A[t]), (9, B[t])] if t < 5 else [(9, A[t]), (7, B[t])] for t in range(T)])
    assert f["idsw"] == 2 and f["idsw_per_100_frames"] == pytest.approx(20.0)
    assert f["mota"] == pytest.approx(1 - 2 / 20)
    assert f["idf1"] == pytest.approx(0.5)
    assert f["deta"] == pytest.approx(1.0) and f["assa"] == pytest.approx(1 / 3)
    assert f["hota"] == pytest.approx(math.sqrt(1 / 3))
    assert (f["j_mean"], f["f_mean"], f["j_and_f"]) == pytest.approx((0.5, 0.5, 0.5))


def test_videos_pool_by_trackeval_combine_sequences() -> None:
    perfect = tm.evaluate_sequence(_data(GT, [[(1, A[t]), (2, B[t])] for t in range(T)]))
    missing_b = tm.evaluate_sequence(_data(GT, [[(1, A[t])] for t in range(T)]))
    f = tm.summary(tm.combine([perfect, missing_b]))
    assert f["frames"] == 2 * T and f["gt_dets"] == 4 * T and f["tracker_dets"] == 3 * T
    assert f["mota"] == pytest.approx(1 - T / (4 * T))  # B's T misses
    assert f["idf1"] == pytest.approx(2 * 3 * T / (4 * T + 3 * T))


def test_a_video_with_no_ground_truth_object_has_no_j_and_f_and_pools_without_one() -> None:
    """trackeval's J&F is NaN on a video with no ground-truth object (the pooled J&F was NaN then, and the report's
    JSON held a bare NaN), and raises IndexError when the tracker answered two ids or more there."""
    perfect = tm.evaluate_sequence(_data(GT, [[(1, A[t]), (2, B[t])] for t in range(T)]))
    empty = [[] for _ in range(T)]
    for tracker in (empty, [[(1, A[t]), (2, B[t])] for t in range(T)]):  # nothing answered; two false tracks
        alone = tm.evaluate_sequence(_data(empty, tracker))
        assert "JAndF" not in alone and tm.summary(alone)["j_and_f"] is None
        pooled = tm.summary(tm.combine([perfect, alone]))
        assert pooled["j_and_f"] == pytest.approx(1.0)
        assert json.loads(json.dumps(pooled, allow_nan=False)) == pooled
    assert tm.summary(tm.combine([tm.evaluate_sequence(_data(empty, empty))]))["j_and_f"] is None


def test_an_object_not_scored_on_a_frame_is_an_ignore_region_there() -> None:
    """B is too hidden to score on frames 0-4: neither a miss, nor, where a tracker follows it, a false positive (its
    mask lies inside the ignore region); a tracker mask elsewhere is a false positive all the same."""
    gt = [[(1, A[t]), (2, B[t])] if t >= 5 else [(1, A[t])] for t in range(T)]
    ignore = [[B[t]] if t < 5 else [] for t in range(T)]
    stray = _box(0, 50, 10, 60)
    f = tm.summary(tm.evaluate_sequence(_data(gt, [[(7, A[t]), (9, B[t])] for t in range(T)], ignore)))
    assert (f["hota"], f["idf1"], f["mota"], f["gt_dets"], f["tracker_dets"]) == (1.0, 1.0, 1.0, 15, 15)
    f = tm.summary(tm.evaluate_sequence(_data(gt, [[(7, A[t]), (9, stray)] for t in range(T)], ignore)))
    assert f["tracker_dets"] == 2 * T and f["idp"] == pytest.approx(0.5) and f["idr"] == pytest.approx(10 / 15)


def test_a_full_occlusion_is_an_unscored_spell_inside_the_frame_wholly_hidden_at_least_once() -> None:
    scored = [{1, 2, 3}, {1, 2, 3}, {2}, {2}, {1, 2}, {1, 3}, {1}, {1, 2}, {3}]
    present = [{1, 2, 3}, {1, 2, 3}, {1, 2, 3}, {1, 2, 3}, {1, 2, 3}, {1, 2, 3}, {1, 3}, {1, 2, 3}, {3}]
    hidden = [set(), set(), {1, 3}, {1}, set(), {2}, set(), set(), set()]
    # 1: wholly hidden on 2-3 (an occlusion); 2: off the frame on 6 (not one); 3: unscored on 2-4 and wholly hidden
    # on 2 (an occlusion), then unscored on 6-7 but never wholly hidden (not one)
    assert tm.find_occlusions(scored, present, hidden) == [
        tm.Occlusion(1, 1, 4), tm.Occlusion(3, 1, 5)
    ]  # fmt: skip


def test_reidentification_reads_the_ids_before_and_after_an_occlusion() -> None:
    gt = [[(1, A[t])] if t not in (3, 4) else [] for t in range(T)]
    occlusion = tm.Occlusion(1, 2, 5)
    same = [[(7, A[t])] if t not in (3, 4) else [] for t in range(T)]
    new = [[(7 if t < 3 else 8, A[t])] if t not in (3, 4) else [] for t in range(T)]
    late = [[(7, A[t])] if t < 3 or t > 7 else [] for t in range(T)]  # back on frame 8
    outcomes = [tm.reidentify(gt, p, [occlusion], window=3)[0] for p in (same, new, late, [[]] * T)]
    assert [e.outcome for e in outcomes] == ["same_id", "new_id", "not_recovered", "untracked"]
    assert tm.reid_summary(outcomes) == {
        "occlusions": 4, "same_id": 1, "new_id": 1, "not_recovered": 1, "untracked": 1, "reid_rate": 1 / 3,
    }  # fmt: skip
    assert tm.reidentify(gt, late, [occlusion], window=4)[0].after_frame == 8
    switched = tm.evaluate_sequence(tm.occluded_data(gt, new, (H, W), None, {1}), j_and_f=False)
    assert switched["CLEAR"]["IDSW"] == 1


def test_the_baseline_keeps_ids_by_overlap_and_ends_tracks_unmatched_for_lost_after_frames() -> None:
    tracker = IouTracker(min_iou=0.3, lost_after=2)
    assert tracker.update([A[0], B[0]]) == [1, 2]
    assert tracker.update([B[1], A[1]]) == [2, 1]  # by overlap, not by order
    assert tracker.update([A[2]]) == [1]  # B unmatched once: kept
    assert tracker.update([A[3], B[3]]) == [1, 2]
    assert tracker.update([A[4]]) == [1]
    assert tracker.update([A[5]]) == [1]  # B unmatched twice: ended
    assert tracker.update([A[6], B[6]]) == [1, 3]
    assert tracker.update([_box(60, 0, 80, 10)]) == [4]  # overlapping nothing: a new id


@pytest.mark.slow
def test_the_harness_runs_both_methods_against_a_server_and_writes_a_report_that_parses(  # type: ignore[no-untyped-def]
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = TrackOptions(
        classes=("person", "car"), score_threshold=0.01, detect_every=2, lost_after=3, max_objects=2
    )  # random weights find many objects at any threshold: two keep the test short
    seeds = seeds_of("val", 2)
    with Client(server.target, timeout=300) as client:
        figures = evaluate_tracking(client, seeds, frames=4, width=160, height=120, options=options)
    assert figures["config"]["methods"] == ["track", "baseline"] and figures["config"]["server"]["profile"] == "test"
    assert figures["gt"]["videos"] == 2 and figures["gt"]["frames"] == 8 and figures["gt"]["tracks"] > 0
    assert [v["seed"] for v in figures["videos"]] == seeds and figures["failed_frames"] == 0
    for method in ("track", "baseline"):
        rows = [figures["combined"][method], *(v["methods"][method] for v in figures["videos"])]
        for f in rows:
            for name in ("hota", "deta", "assa", "idf1", "idp", "idr", "j_and_f", "j_mean", "f_mean"):
                assert 0.0 <= f[name] <= 1.0, (method, name, f[name])
            assert f["mota"] <= 1.0 and f["idsw"] >= 0 and f["fps"] > 0 and f["frames"] in (4, 8)
    assert [t["figure"] for t in figures["targets"]] == ["hota", "idf1", "idsw_per_100_frames", "j_and_f"]

    write_report(figures, tmp_path / "r" / "tracking.json", tmp_path / "r" / "TRACKING.md", "harness test")
    assert json.loads((tmp_path / "r" / "tracking.json").read_text())["combined"].keys() == {"track", "baseline"}
    md = (tmp_path / "r" / "TRACKING.md").read_text()
    assert md.startswith("# harness test") and "## Through occlusions" in md and "| HOTA |" in md

    out = tmp_path / "cli"
    argv = ["eval-track", "--target", server.target, "--videos", "1", "--frames", "2", "--size", "160x120"]
    argv += ["--class", "person", "--max-objects", "1", "--no-baseline", "--out", str(out)]
    assert main(argv) == 0
    assert "Targets (track, all videos pooled)" in capsys.readouterr().out
    cli_figures = json.loads((out / "tracking.json").read_text())
    assert cli_figures["config"]["methods"] == ["track"] and cli_figures["config"]["options"]["classes"] == ["person"]
    assert (out / "TRACKING.md").is_file()
