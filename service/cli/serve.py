"""``detseg serve``: the gRPC API, with the models its flags, DETSEG_* env and the --config file name."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from service.cli.common import settings_from
from service.config import BACKENDS, PRECISIONS, Settings
from service.runners.factory import load_runner, resolve_backend
from service.startup import ALLOCATORS, configure_logging, configure_process, reexec_for_allocator

# serve's flags, as Settings field names.
SERVE_FLAGS = (
    "host",
    "port",
    "workers",
    "models",
    "detector",
    "segmenter",
    "adapted",
    "concept_model",
    "concept_imgsz",
    "backend",
    "triton_url",
    "threads",
    "cache_dir",
    "offline",
    "reflection",
    "log_level",
    "log_format",
    "allocator",
    "precision",
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="serve the gRPC API")
    d = Settings()  # the defaults the help states: they live in Settings only
    s.add_argument("--host", help=f"bind address (default {d.host}; 0.0.0.0 in containers)")
    s.add_argument("--port", type=int, help=f"port (default {d.port}; 0 = any free port)")
    s.add_argument(
        "--workers",
        type=int,
        help=f"server processes on the one port, each with its own models (default {d.workers}); handles cross "
        "workers through the shared tier (a redis-server started for them unless --config sets redis_url)",
    )
    s.add_argument("--models", help=f"model profile (default {d.models}); `detseg models` lists every profile")
    s.add_argument("--detector", help="detector: catalog name or checkpoint path (overrides the profile)")
    s.add_argument("--segmenter", help="segmenter: catalog name or checkpoint path (overrides the profile)")
    s.add_argument(
        "--adapted", help="a folder written by `detseg adapt`: serve its detector and segmenter, under its version"
    )
    s.add_argument(
        "--concept-model",
        help=f"answer texts with SAM 3: sam3 (catalog) or a sam3.pt path (default {d.concept_model or 'none'})",
    )
    s.add_argument("--concept-imgsz", type=int, help=f"SAM 3 input side, a multiple of 14 (default {d.concept_imgsz})")
    s.add_argument(
        "--backend",
        choices=BACKENDS,
        help="where models run: in-process torch, OpenVINO or ONNX Runtime, or a Triton server; auto: the fastest "
        f"in-process runtime for the device (default {d.backend}: {resolve_backend(d)} on this machine)",
    )
    s.add_argument("--triton-url", help=f"Triton gRPC endpoint for --backend triton (default {d.triton_url})")
    s.add_argument("--threads", type=int, help=f"torch threads (default {d.threads} = all cores)")
    s.add_argument("--cache-dir", help=f"weights cache (default {d.cache_dir})")
    s.add_argument("--offline", action="store_const", const=True, help="never download weights")
    s.add_argument("--no-reflection", dest="reflection", action="store_const", const=False, help="disable reflection")
    s.add_argument("--config", type=Path, help="YAML settings file (flags > DETSEG_* env > file > defaults)")
    s.add_argument("--log-level", help=f"DEBUG, INFO or WARNING (default {d.log_level})")
    s.add_argument(
        "--log-format", choices=("text", "json"), help=f"text, or json: one object per line (default {d.log_format})"
    )
    s.add_argument(
        "--allocator",
        choices=tuple(ALLOCATORS),
        help=f"tuned (glibc malloc keeps freed memory) or system (default {d.allocator})",
    )
    s.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="auto: the fastest variant that passed the quality gate (bf16 on CUDA, int8 encoder with --backend "
        f"openvino) | fp32 | int8 (default {d.precision})",
    )
    s.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    settings = settings_from(args, SERVE_FLAGS)
    if args.reexec_argv is not None:  # before importing the server's modules: the process is replaced
        reexec_for_allocator(settings.allocator, ["-m", "service.cli", *args.reexec_argv])
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from service.supervisor import run_workers  # the supervisor loads no model: its workers do

        return run_workers(settings)
    # The server's modules load torch: imported here, so that the other commands, the process that re-executes
    # itself and a supervisor start without it.
    from service.api.server import serve_forever
    from service.app import create_server, exit_if_loading

    configure_process(settings)  # before anything imports ultralytics (its switches are read at import)

    async def run() -> None:
        # The port opens at once (health NOT_SERVING); models load behind it. A load failure (e.g. missing
        # weights) stops the server and surfaces here as the DetsegError main() prints.
        server, port = await create_server(settings, lambda: load_runner(settings))
        logging.getLogger("detseg").info("listening on %s:%d; loading models", settings.host, port)
        await serve_forever(server, settings.grace_seconds)

    asyncio.run(run())
    exit_if_loading()
    return 0
