"""Tables over label images off the GIL (service.processing.labels) give numpy's bincount and take exactly."""

from __future__ import annotations

import cv2
import numpy as np

from service.processing.labels import by_label, label_areas


def test_areas_and_lookups_equal_numpys_on_opencvs_labels() -> None:
    rng = np.random.default_rng(4)
    for shape in ((1, 1), (7, 300), (513, 257)):
        mask = (cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), 1.5) > 0).view(np.uint8)
        n, labels = cv2.connectedComponents(np.ascontiguousarray(mask), connectivity=8)
        areas = label_areas(labels, n + 3)  # minlength beyond the labels: zeros
        np.testing.assert_array_equal(areas, np.bincount(labels.ravel(), minlength=n + 3))
        assert areas.dtype == np.int64
        table = rng.random(n) > 0.5
        picked = by_label(table, labels)
        assert picked.dtype == bool and picked.shape == shape and picked.flags.writeable
        np.testing.assert_array_equal(picked, np.take(table, labels))
