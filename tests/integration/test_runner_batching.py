"""Micro-batching in the embedded torch runner: concurrent requests share forward passes, answers unchanged."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from service.runners.factory import load_runner
from tests.conftest import metric_points

pytestmark = pytest.mark.slow  # concurrent forward passes


def requests_per_pass() -> dict[str, tuple[int, float]]:
    """The ``detseg.batch.requests`` histogram so far, per model: (passes, requests)."""
    return {str(p.attributes["model"]): (p.count, p.sum) for p in metric_points("detseg.batch.requests")}


def test_concurrent_encodes_and_detections_share_passes_and_match_solo_runs(settings):
    runner = load_runner(settings)  # its own runner: batch counters are not shared with other tests
    rng = np.random.default_rng(0)
    s, d = runner.segmenter.image_size, runner.detector.imgsz
    sam_inputs = [rng.standard_normal((1, 3, s, s), dtype=np.float32) for _ in range(5)]
    det_inputs = [rng.random((1, 3, d, d), dtype=np.float32) for _ in range(5)]

    async def main():
        solo = [await runner.encode(x) for x in sam_inputs]
        solo_det = [await runner.detect(x) for x in det_inputs]
        passes = runner.encode_batcher.batches, runner.detect_batcher.batches
        recorded = requests_per_pass()
        together = await asyncio.gather(*(runner.encode(x) for x in sam_inputs))
        together_det = await asyncio.gather(*(runner.detect(x) for x in det_inputs))
        passes = runner.encode_batcher.batches - passes[0], runner.detect_batcher.batches - passes[1]
        after = requests_per_pass()
        recorded = {m: (after[m][0] - recorded.get(m, (0, 0))[0], after[m][1] - recorded.get(m, (0, 0))[1])
                    for m in after}  # fmt: skip
        await runner.close()
        return solo, together, solo_det, together_det, passes, recorded

    solo, together, solo_det, together_det, passes, recorded = asyncio.run(main())
    expected = math.ceil(len(sam_inputs) / settings.batch_max_size)  # five callers, passes of up to batch_max_size
    assert passes == (expected, expected) and expected < len(sam_inputs)
    # The metric operators read the batch sizes from: each pass and the requests it served.
    assert recorded == {"encoder": (expected, len(sam_inputs)), "detector": (expected, len(det_inputs))}
    for a, b in zip(solo, together, strict=True):
        assert b.image_embed.shape[0] == 1
        np.testing.assert_allclose(b.image_embed, a.image_embed, atol=1e-4)
        for fa, fb in zip(a.high_res_feats, b.high_res_feats, strict=True):
            np.testing.assert_allclose(fb, fa, atol=1e-4)
    for a, b in zip(solo_det, together_det, strict=True):
        np.testing.assert_allclose(b.raw, a.raw, rtol=1e-4, atol=1e-2)
