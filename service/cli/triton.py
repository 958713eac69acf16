"""``detseg export`` (the profile's models as a Triton model repository) and ``detseg triton up | down | status``
(a local Triton server on that repository, service.runners.triton_local)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from service.cli.common import MODEL_FLAGS, add_model_flags, number, settings_from
from service.config import Settings
from service.runners.triton_local import LocalTriton, read_state, server_status, stop_detached


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser("export", help="export the profile's models to ONNX + Triton configs, each checked vs torch")
    add_model_flags(e)
    e.add_argument("--out", type=Path, help="model repository (default model_repository): <out>/<role>/...")
    e.set_defaults(func=export)

    t = sub.add_parser("triton", help="a local Triton server (the one nvidia-pytriton bundles) on 127.0.0.1")
    tsub = t.add_subparsers(dest="triton_command", required=True)
    up = tsub.add_parser("up", help="export the profile's models if needed, start tritonserver, wait until ready")
    add_model_flags(up)
    up.add_argument("--repository", type=Path, help="model repository (default model_repository)")
    up.add_argument("--port", type=number(int, 1, 65535), default=8001, help="gRPC port (default 8001)")
    up.add_argument("--http-port", type=number(int, 1, 65535), help="HTTP port (default 8000)")
    up.add_argument("--metrics-port", type=number(int, 1, 65535), help="metrics port (default 8002)")
    up.add_argument(
        "--timeout", type=number(float, 0, open_low=True), default=300.0, help="seconds to wait for the models"
    )
    up.set_defaults(func=triton_up)
    down = tsub.add_parser("down", help="stop the server `triton up` started")
    down.add_argument("--cache-dir")
    down.set_defaults(func=triton_down)
    st = tsub.add_parser("status", help="is it running, and are its models ready")
    st.add_argument("--cache-dir")
    st.set_defaults(func=triton_status)


def export(args: argparse.Namespace) -> int:
    # Imported here, as in triton_up: these load torch (see the package's docstring).
    from service.models.profiles import resolve_models
    from service.models.triton_repo import export_repository

    settings = settings_from(args, MODEL_FLAGS)
    out = args.out or settings.triton_repository
    models = resolve_models(settings)
    reports = export_repository(models, settings, out)  # stamped: `triton up` serves it only if it is the same
    print(f"profile {models.profile}: {models.detector.name} + {models.segmenter.name} -> {out}")
    for r in reports:
        size = r.path.stat().st_size / 1e6
        print(f"  {r.role:<20} {size:7.1f} MB  max |onnx - torch| = {r.max_abs_diff:.2e}")
    return 0


def _state_dir(settings: Settings) -> Path:
    return settings.cache_dir / "triton"


def triton_up(args: argparse.Namespace) -> int:
    from service.models.profiles import resolve_models
    from service.models.triton_repo import ensure_repository

    settings = settings_from(args, MODEL_FLAGS)
    state_dir = _state_dir(settings)
    if read_state(state_dir):
        print("detseg: a local Triton is already up (`detseg triton down` first)", file=sys.stderr)
        return 1
    repository = args.repository or settings.triton_repository
    ensure_repository(resolve_models(settings), settings, repository)
    http_port = args.http_port or settings.triton_http_port
    server = LocalTriton(
        repository,
        state_dir,
        args.port,
        http_port,
        args.metrics_port or settings.triton_metrics_port,
        allocator=settings.allocator,
    )
    server.start()
    interrupted = signal.signal(signal.SIGTERM, _stop_waiting)
    try:  # stopped however the wait ends badly (Ctrl-C and SIGTERM too): it left an orphan no `down` could stop
        server.wait_ready(args.timeout)
    except BaseException:
        server.stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, interrupted)
    server.save_state()
    print(f"Triton ready at {server.url} (log: {server.log_path}); serve with:")
    print(f"  detseg serve --backend triton --triton-url {server.url}")
    return 0


def _stop_waiting(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def triton_down(args: argparse.Namespace) -> int:
    settings = settings_from(args, ("cache_dir",))
    print("stopped" if stop_detached(_state_dir(settings)) else "no local Triton was running")
    return 0


def triton_status(args: argparse.Namespace) -> int:
    settings = settings_from(args, ("cache_dir",))
    state = read_state(_state_dir(settings))
    if state is None:
        print("no local Triton (start one with `detseg triton up`)")
        return 1
    url = f"127.0.0.1:{state['grpc_port']}"
    status = server_status(url)
    if status is None:
        print(f"pid {state['pid']}: not answering at {url}")
        return 1
    health = "ready" if status.server_ready else "NOT ready"
    print(f"pid {state['pid']} at {url}: server {health}; repository {state['repository']}")
    for m in status.models:
        print(f"  {m.name:<20} {'ready' if m.ready else 'NOT ready'}")
    return 0 if status.server_ready and all(m.ready for m in status.models) else 1
