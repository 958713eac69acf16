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


class CallsAllowlistedClass:
    """A pickle that *calls* an allowlisted layer class with its own arguments (REDUCE): weights_only would run
    the constructor, and constructors read files or download (ultralytics' TorchVision layer fetches weights)."""

    def __reduce__(self):
        from ultralytics.nn.modules.conv import Conv

        return (Conv, (3, 8, 3))


class CallsAutoBackend:
    """AutoBackend is an nn.Module under ultralytics.nn whose constructor unpickles another file freely."""

    def __reduce__(self):
        from ultralytics.nn.autobackend import AutoBackend

        return (AutoBackend, ("inner.pt",))


def test_a_checkpoint_calling_an_allowlisted_class_is_refused(tmp_path: Path):
    path = tmp_path / "calls.pt"
    torch.save({"model": CallsAllowlistedClass()}, path)
    with pytest.raises(
        UnsafeCheckpoint, match=r"calls.pt: refused, it would call .*ultralytics\.nn\.modules\.conv\.Conv"
    ):
        safe_load_ultralytics(path)


def test_a_checkpoint_naming_autobackend_is_refused(tmp_path: Path):
    path = tmp_path / "backend.pt"
    torch.save({"model": CallsAutoBackend()}, path)
    with pytest.raises(UnsafeCheckpoint, match=r"backend.pt: refused.*ultralytics\.nn\.autobackend\.AutoBackend"):
        safe_load_ultralytics(path)
