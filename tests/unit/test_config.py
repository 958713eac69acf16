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
