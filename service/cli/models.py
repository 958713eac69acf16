"""``detseg models``: the model profiles and the catalog's weights (cached or not), or a running server's models."""

from __future__ import annotations

import argparse

from service.cli.common import add_connection_flags, connection, settings_from
from service.client import Client, RetryPolicy
from service.config import Settings
from service.models.catalog import CATALOG
from service.proto.detseg.v1 import detseg_pb2 as pb


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser(
        "models", help="list the model profiles and the catalog's weights (cached or not), or a server's models"
    )
    m.add_argument("--target", help="ask a running server (ListModels) instead of the local catalog")
    m.add_argument("--cache-dir")
    add_connection_flags(m)
    m.set_defaults(func=models)


def models(args: argparse.Namespace) -> int:
    if args.target:
        return _server_models(args)
    # Imported here: it loads torch (see the package's docstring).
    from service.models.profiles import PROFILE_SUMMARIES

    settings = settings_from(args, ("cache_dir",))
    print(f"profiles (serve --models; default {Settings().models}):")
    width = max(map(len, PROFILE_SUMMARIES))
    for name, summary in PROFILE_SUMMARIES.items():
        print(f"  {name:<{width}}  {summary}")
    print(f"catalog weights, cache {settings.cache_dir}:")
    for entry in CATALOG.values():
        cached = "cached" if (settings.cache_dir / entry.filename).exists() else "-"
        print(f"  {entry.name:<24} {entry.role:<10} {entry.size_bytes / 1e6:7.1f} MB  {cached:<7} {entry.url}")
        print(f"  {'':<24} sha256 {entry.sha256}")  # what a file fetched by hand must match
    return 0


def _server_models(args: argparse.Namespace) -> int:
    # One call with a 30 s deadline (no retries of UNAVAILABLE): a wrong --target fails at once.
    with Client(args.target, timeout=30, retry=RetryPolicy(max_attempts=1), **connection(args)) as client:
        response = client.list_models()
    print(f"profile {response.profile}, backend {response.backend}")
    for m in response.models:
        print(f"  {pb.ModelRole.Name(m.role)}: {m.name} ({m.architecture}) sha256 {m.weights_sha256}")
        if m.vocabulary:
            shown = ", ".join(m.vocabulary[:_SHOWN_CLASSES])
            more = f", ... ({len(m.vocabulary) - _SHOWN_CLASSES} more: ListModels has them all)"
            print(f"    {len(m.vocabulary)} classes: {shown}{more if len(m.vocabulary) > _SHOWN_CLASSES else ''}")
    return 0


_SHOWN_CLASSES = 40  # a closed detector's vocabulary, as far as a terminal shows it (COCO's 80: the first 40)
