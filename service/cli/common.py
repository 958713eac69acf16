"""What several ``detseg`` commands share: settings from their flags, and the flags that name models."""

from __future__ import annotations

import argparse

from service.config import Settings

# The flags of ``add_model_flags``, as Settings field names.
MODEL_FLAGS = ("models", "detector", "segmenter", "adapted", "cache_dir", "offline")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="profile (as for serve)")
    p.add_argument("--detector")
    p.add_argument("--segmenter")
    p.add_argument("--adapted", help="a folder written by `detseg adapt`: serve its models (and version)")
    p.add_argument("--cache-dir")
    p.add_argument("--offline", action="store_const", const=True)


def settings_from(args: argparse.Namespace, names: tuple[str, ...]) -> Settings:
    """Settings with the flags ``names`` (None: not given) over DETSEG_* env, the --config file and defaults."""
    overrides = {n: getattr(args, n, None) for n in names}
    return Settings.from_environ(overrides, getattr(args, "config", None))
