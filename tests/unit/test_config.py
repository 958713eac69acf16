from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.config import ALLOCATOR_NAMES, CONSTRAINTS, PROFILE_NAMES, Settings, setting_problems
from service.errors import ConfigurationError


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path):
    config = tmp_path / "detseg.yaml"
    config.write_text("port: 1111\nthreads: 3\nreflection: true\nmodels: test\n")
    env = {"DETSEG_PORT": "2222", "DETSEG_REFLECTION": "off", "UNRELATED": "x"}
    s = Settings.load({"port": 3333, "host": None}, env, config)
    assert (s.port, s.threads, s.reflection, s.models, s.host) == (3333, 3, False, "test", "127.0.0.1")


def test_unknown_setting_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="unknown setting"):
        Settings.load({"prot": 1})


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("file:batch_max_size: 0", "setting batch_max_size: 0 is less than the minimum of 1"),
        ("file:review_score_below: 7", "setting review_score_below: 7.0 is greater than the maximum of 1"),
        ("file:device: tpu", "setting device: 'tpu' does not match '^(cpu|cuda(:[0-9]+)?)$'"),
        ("file:backend: tensorrt", "setting backend: 'tensorrt' is not one of ['auto', 'torch', 'onnx'"),
        ("file:concept_imgsz: 1000", "setting concept_imgsz: 1000 is not a multiple of 14"),
        ("file:a: [", "config file {file}: not YAML (expected the node content, but found '<stream end>' at line 2"),
        ("file:- port", "config file {file} must hold a mapping of setting: value"),
        ("env:DETSEG_MAX_QUEUE=-1", "setting max_queue: -1 is less than the minimum of 0"),
        ("env:DETSEG_MAX_QUEUE=lots", "setting max_queue: invalid literal for int() with base 10: 'lots'"),
        ("env:DETSEG_OFFLINE=maybe", "setting offline: not a boolean: 'maybe'"),
        ("env:DETSEG_LOG_LEVEL=loud", "setting log_level: 'LOUD' is not one of ['DEBUG', 'INFO'"),
        ("env:DETSEG_REDIS_URL=redis-host:6379", "setting redis_url: must be empty or start with redis://"),
        ("env:DETSEG_DEFAULT_DEADLINE_SECONDS=nan", "setting default_deadline_seconds: not a finite number: 'nan'"),
        ("env:DETSEG_KEEPALIVE_SECONDS=inf", "setting keepalive_seconds: not a finite number: 'inf'"),
        ("file:text_match_threshold: .nan", "setting text_match_threshold: not a finite number: nan"),
        ("file:max_in_flight: 8.9", "setting max_in_flight: not a whole number: 8.9"),
        ("file:workers: true", "setting workers: True is not of type int"),
        ("file:models: [demo]", "setting models: ['demo'] is not of type str"),
        ("file:port: 7000\nhealth_port: 7000", "setting health_port: 7000 is the API's port; it needs its own"),
        ("env:DETSEG_METRICS_EXPORTER=prometheus\nDETSEG_METRICS_PORT=50051", "setting metrics_port: 50051 is the API"),
        ("file:track_max_objects: 200", "setting track_max_objects: 200 is above track_max_objects_limit (100)"),
        ("env:DETSEG_DEFAULT_MAX_INSTANCES=400", "setting default_max_instances: 400 is above max_instances (300)"),
    ],
)
def test_a_setting_out_of_its_range_is_refused_by_name(tmp_path: Path, source: str, says: str):
    """Refused when Settings is built, before anything starts (they were tracebacks, a server started with a
    negative cache, or a load-time message naming a request field: `options.review.score_below`)."""
    kind, text = source.split(":", 1)
    config = tmp_path / "detseg.yaml"
    config.write_text(text + "\n" if kind == "file" else "")
    env = dict(line.split("=", 1) for line in text.split("\n")) if kind == "env" else {}
    with pytest.raises(ConfigurationError) as e:
        Settings.load(env=env, config_file=config)
    assert str(e.value).startswith(says.format(file=config)), str(e.value)


def test_every_numeric_and_choice_setting_states_its_range():
    """A new number or choice among the settings must say what it may be (CONSTRAINTS); the choice lists are the ones
    the modules acting on them hold; lower-case log levels are levels."""
    from service.models.profiles import PROFILE_SUMMARIES
    from service.startup import ALLOCATORS

    numeric = {f.name for f in dataclasses.fields(Settings) if str(f.type) in {"int", "float", "float | None"}}
    assert numeric - set(CONSTRAINTS) == set()
    assert set(CONSTRAINTS) <= {f.name for f in dataclasses.fields(Settings)}
    assert list(ALLOCATOR_NAMES) == list(ALLOCATORS) and list(PROFILE_NAMES) == list(PROFILE_SUMMARIES)
    assert Settings.load(env={"DETSEG_LOG_LEVEL": "debug"}).log_level == "debug"
    assert setting_problems(Settings()) == []


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


def test_a_metrics_port_in_use_is_named(tmp_path: Path):
    """`metrics_exporter: prometheus` on a taken port stops the server with one line (it was an OSError traceback)."""
    import socket

    from service.telemetry import scrape_endpoint

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigurationError, match=f"metrics_port: cannot listen on 127.0.0.1:{port}: Address already"
        ):
            scrape_endpoint("127.0.0.1", port)


def test_the_shared_tier_takes_an_entry_of_the_largest_image_by_default():
    """A handle from EncodeImage works on every replica only if its entry is shared: the largest image allowed
    (max_image_pixels, RGB) with SAM 2's features at 1024² (image embedding 256x64x64 and high-res features 32x256x256
    and 64x128x128, float32) must fit redis_max_entry_bytes (64 MiB held images up to ~16 MP)."""
    s = Settings()
    features = 4 * (256 * 64 * 64 + 32 * 256 * 256 + 64 * 128 * 128)
    assert s.redis_max_entry_bytes >= 3 * s.max_image_pixels + features


def test_a_yaml_null_leaves_the_default_and_a_secret_is_not_printed(tmp_path: Path):
    """A setting written with no value ("detector:") became the string "None" (a checkpoint path, a TLS file, an OTLP
    endpoint named None); a Redis URL's password was printed in the refusal."""
    config = tmp_path / "detseg.yaml"
    config.write_text("detector:\ntls_cert: ~\notlp_endpoint:\nmax_in_flight: 8.0\n")
    s = Settings.load(config_file=config)
    default = Settings()
    assert (s.detector, s.tls_cert, s.otlp_endpoint) == (default.detector, default.tls_cert, default.otlp_endpoint)
    assert s.max_in_flight == 8
    with pytest.raises(ConfigurationError) as e:
        Settings.load(env={"DETSEG_REDIS_URL": "valkey://:hunter2@redis:6379/0"})
    assert "hunter2" not in str(e.value) and str(e.value).startswith("setting redis_url: must be empty")


def test_a_detseg_variable_that_names_no_setting_is_a_warning(monkeypatch, caplog):
    """DETSEG_THREDS=2 was ignored without a word (a config file's unknown keys are refused)."""
    monkeypatch.setenv("DETSEG_THREDS", "2")
    monkeypatch.setenv("DETSEG_THREADS", "1")
    with caplog.at_level("WARNING", logger="service.config"):
        settings = Settings.from_environ()
    assert settings.threads == 1
    assert [r.getMessage() for r in caplog.records] == [
        "ignored: DETSEG_THREDS names no setting (settings: DETSEG_ + a Settings field in upper case)"
    ]
