"""Checkpoints load without arbitrary unpickling: allowlisted ultralytics/torch modules only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from service.errors import ModelUnavailable, UnsafeCheckpoint
from service.models.loading import load_detector_module, safe_load_ultralytics


class Payload:
    """Unpickling this would run os.system: the loader must refuse before that happens."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/detseg-pwned",))


def test_checkpoint_naming_other_globals_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pt"
    marker = Path("/tmp/detseg-pwned")
    marker.unlink(missing_ok=True)
    torch.save({"model": Payload()}, path)
    with pytest.raises(UnsafeCheckpoint, match=r"evil.pt: refused.*(posix|os)\.system"):
        safe_load_ultralytics(path)
    assert not marker.exists()


def test_non_checkpoint_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelUnavailable, match="junk.pt: not a readable torch checkpoint"):
        safe_load_ultralytics(path)


def test_seeded_test_detector_loads_through_the_safe_path(settings):
    from service.models.testing import TEST_VOCABULARY, make_test_models

    det_path, _ = make_test_models(settings.cache_dir / "test-models")
    model = load_detector_module(det_path).module
    assert [model.names[i] for i in range(len(model.names))] == list(TEST_VOCABULARY)
    assert not model.training
