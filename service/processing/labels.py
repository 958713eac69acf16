"""Tables over OpenCV's label images (``cv2.connectedComponents``), computed without holding the GIL.

numpy's ``bincount`` and ``take`` hold the GIL while they run, so the mask pool's threads ran them one at a time
(two threads took twice one thread's time; at 12 MP x 200 noisy masks they were about a third of the stage's CPU
time); torch's ``bincount`` and ``index_select`` release it, and take about half numpy's time on one thread. Torch
loads on the first call, not with the module (the server opens its port before torch loads).
"""

from __future__ import annotations

import numpy as np


def label_areas(labels: np.ndarray, n: int) -> np.ndarray:
    """(h, w) int32 labels in [0, n), C-contiguous → (n,) int64 pixels of each label."""
    import torch

    return torch.bincount(torch.from_numpy(labels).view(-1), minlength=n).numpy()  # type: ignore[no-any-return]


def by_label(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """table (n,) bool, labels (h, w) int32 in [0, n), C-contiguous → (h, w) bool ``table[labels]``."""
    import torch

    picked = torch.index_select(torch.from_numpy(table), 0, torch.from_numpy(labels).view(-1))
    return picked.view(labels.shape).numpy()  # type: ignore[no-any-return]
