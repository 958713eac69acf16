from __future__ import annotations

from pathlib import Path

import pytest

from service.config import Settings


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path):
    config = tmp_path / "detseg.yaml"
    config.write_text("port: 1111\nthreads: 3\nreflection: true\nmodels: test\n")
    env = {"DETSEG_PORT": "2222", "DETSEG_REFLECTION": "off", "UNRELATED": "x"}
    s = Settings.load({"port": 3333, "host": None}, env, config)
    assert (s.port, s.threads, s.reflection, s.models, s.host) == (3333, 3, False, "test", "127.0.0.1")


def test_unknown_setting_is_an_error(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown setting"):
        Settings.load({"prot": 1})


def test_the_default_score_threshold_is_the_profiles_calibrated_one_unless_set(tmp_path: Path):
    """Unset (None, or "" / "none" from a file or the environment), a request's default score threshold is the one
    the served profile's detector was calibrated at (demo-open), else 0.25; a value set by the operator wins."""
    from service.app import request_limits
    from service.models.catalog import PROFILE_SCORE_THRESHOLDS

    calibrated = PROFILE_SCORE_THRESHOLDS["demo-open"]
    assert calibrated != 0.25
    unset = Settings()
    assert unset.default_score_threshold is None
    assert request_limits(unset, "demo-open").default_score_threshold == calibrated
    assert request_limits(unset, "test-open").default_score_threshold == 0.25
    assert request_limits(unset, "custom").default_score_threshold == 0.25
    for env in ({"DETSEG_DEFAULT_SCORE_THRESHOLD": ""}, {"DETSEG_DEFAULT_SCORE_THRESHOLD": "None"}):
        assert Settings.load(env=env).default_score_threshold is None
    config = tmp_path / "detseg.yaml"
    config.write_text("default_score_threshold: 0.25\n")
    chosen = Settings.load(config_file=config)
    assert request_limits(chosen, "demo-open").default_score_threshold == 0.25
    assert Settings.load(env={"DETSEG_DEFAULT_SCORE_THRESHOLD": "0.5"}).request_score_threshold(calibrated) == 0.5
