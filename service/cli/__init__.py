"""The ``detseg`` command: serve, segment and track (clients of a running server), models, export, triton, eval,
label, adapt, eval-track, verify, keygen.

One module per family of commands; each has ``register(subparsers)``, which adds its commands with their
handlers, and the handlers. Modules import what they use at their top, save the modules that load torch (the
server's, ``service.app``, ``service.api.server`` and ``service.supervisor``; ``service.models.profiles`` and
``service.models.triton_repo``, through ``service.models.testing``; ``service.adaptation.run``): the handlers of
``serve``, ``eval`` and ``label`` (in-process servers), ``export``, ``triton up``, ``models`` and ``adapt`` import
those, so that ``detseg --help`` and the client commands start without torch (test_startup).
"""

from __future__ import annotations

import argparse
import sys

from service.cli import adapt, dataset, eval_track, models, segment, serve, track, triton, verify
from service.client import RequestFailed
from service.errors import DetsegError
from service.startup import block_telemetry

# In the order `detseg --help` lists their commands.
FAMILIES = (serve, segment, track, triton, dataset, adapt, eval_track, verify, models)


def main(argv: list[str] | None = None) -> int:
    block_telemetry()  # before any command imports onnxruntime: it reads its switch at import (service.startup)
    parser = build_parser()
    args = parser.parse_args(argv)
    # The command line as typed, for `serve`'s re-execution under its allocator: only when running as the program
    # (argv None), never for in-process callers such as tests.
    args.reexec_argv = sys.argv[1:] if argv is None else None
    args.argv = sys.argv[1:] if argv is None else list(argv)  # as given, e.g. for a model card's command
    try:
        return int(args.func(args) or 0)
    except DetsegError as e:
        print(f"detseg: {e}", file=sys.stderr)
        return 2
    except RequestFailed as e:  # the server's own message (never a traceback)
        print(f"detseg: the server answered {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file named on the command line that cannot be read or written
        if e.filename is None:
            raise
        print(f"detseg: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detseg", description="Open-vocabulary detect-then-segment over gRPC.")
    sub = p.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
    return p
