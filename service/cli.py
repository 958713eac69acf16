"""The ``detseg`` command: serve, segment (a client of a running server), models, export, triton."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.client import DEFAULT_TARGET, RequestFailed
from service.config import Settings
from service.errors import DetsegError
from service.evaluation.predict import Prompt
from service.labeling.run import FORMATS as LABEL_FORMATS
from service.runners.factory import BACKENDS, PRECISIONS, resolve_backend
from service.startup import ALLOCATORS, block_telemetry


def main(argv: list[str] | None = None) -> int:
    block_telemetry()  # before any command imports onnxruntime: it reads its switch at import (service.startup)
    parser = _parser()
    args = parser.parse_args(argv)
    # The command line as typed, for `serve`'s re-execution under its allocator: only when running as the program
    # (argv None), never for in-process callers such as tests.
    args.reexec_argv = sys.argv[1:] if argv is None else None
    try:
        return int(args.func(args) or 0)
    except DetsegError as e:
        print(f"detseg: {e}", file=sys.stderr)
        return 2
    except RequestFailed as e:  # the server's own message (never a traceback)
        print(f"detseg: the server answered {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detseg", description="Open-vocabulary detect-then-segment over gRPC.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the gRPC API")
    d = Settings()  # the defaults the help states: they live in Settings only
    s.add_argument("--host", help=f"bind address (default {d.host}; 0.0.0.0 in containers)")
    s.add_argument("--port", type=int, help=f"port (default {d.port}; 0 = any free port)")
    s.add_argument("--models", help=f"model profile (default {d.models}); `detseg models` lists every profile")
    s.add_argument("--detector", help="detector: catalog name or checkpoint path (overrides the profile)")
    s.add_argument("--segmenter", help="segmenter: catalog name or checkpoint path (overrides the profile)")
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
    s.set_defaults(func=_serve)

    g = sub.add_parser("segment", help="send an image to a running server; print labeled instances")
    g.add_argument("image", type=Path)
    g.add_argument("--classes", default="", help="comma-separated class names (default: every class)")
    g.add_argument("--text", action="append", default=[], help="free-text prompt, e.g. 'round shape' (repeatable)")
    g.add_argument("--box", action="append", default=[], help="x0,y0,x1,y1[,label] region prompt (repeatable)")
    g.add_argument(
        "--exemplar",
        action="append",
        default=[],
        help="x0,y0,x1,y1[,label][@reference.jpg]: find more of this object (open-vocabulary detectors; repeatable)",
    )
    g.add_argument("--score-threshold", type=float)
    g.add_argument("--max-instances", type=int)
    g.add_argument("--target", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET})")
    g.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--out", type=Path, help="write an overlay PNG here")
    g.set_defaults(func=_segment)

    e = sub.add_parser("export", help="export the profile's models to ONNX + Triton configs, each checked vs torch")
    _model_flags(e)
    e.add_argument("--out", type=Path, help="model repository (default model_repository): <out>/<role>/...")
    e.set_defaults(func=_export)

    t = sub.add_parser("triton", help="a local Triton server (the one nvidia-pytriton bundles) on 127.0.0.1")
    tsub = t.add_subparsers(dest="triton_command", required=True)
    up = tsub.add_parser("up", help="export the profile's models if needed, start tritonserver, wait until ready")
    _model_flags(up)
    up.add_argument("--repository", type=Path, help="model repository (default model_repository)")
    up.add_argument("--port", type=int, default=8001, help="gRPC port (default 8001)")
    up.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    up.add_argument("--metrics-port", type=int, help="metrics port (default 8002)")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the models")
    up.set_defaults(func=_triton_up)
    down = tsub.add_parser("down", help="stop the server `triton up` started")
    down.add_argument("--cache-dir")
    down.set_defaults(func=_triton_down)
    st = tsub.add_parser("status", help="is it running, and are its models ready")
    st.add_argument("--cache-dir")
    st.set_defaults(func=_triton_status)

    v = sub.add_parser("eval", help="a COCO dataset through the service: AP, IoU per class and slice, NoC, report")
    v.add_argument("annotations", type=Path, help="COCO instance-segmentation JSON")
    v.add_argument("--images", type=Path, help="folder the file_names are relative to (default: beside the JSON)")
    v.add_argument("--slices", type=Path, help="JSON: file_name (or image id) -> {attribute: value}")
    v.add_argument("--prompt", choices=[k.value for k in Prompt], default=Prompt.CLASSES.value, help="default classes")
    v.add_argument("--out", type=Path, default=Path("eval-report"), help="report folder (default eval-report)")
    v.add_argument("--limit", type=int, help="the first N images only")
    v.add_argument("--score-threshold", type=float, default=0.05, help="asked of the server (low, for AP)")
    v.add_argument("--operating-threshold", type=float, help="score instances are kept at (default: server's)")
    v.add_argument("--noc-instances", type=int, default=100, help="instances the simulated annotator clicks on")
    _client_flags(v)
    v.set_defaults(func=_eval)

    lab = sub.add_parser("label", help="pre-label a folder of images through the service; COCO/YOLO/CVAT/LS exports")
    lab.add_argument("folder", type=Path, help="images (JPEG, PNG, WebP; searched recursively)")
    lab.add_argument("--out", type=Path, required=True, help="records, errors, exports/ (re-runs resume here)")
    lab.add_argument("--classes", default="", help="comma-separated class names")
    lab.add_argument("--text", action="append", default=[], help="free-text prompt (repeatable)")
    lab.add_argument("--score-threshold", type=float)
    lab.add_argument("--formats", default=",".join(LABEL_FORMATS), help=f"default {','.join(LABEL_FORMATS)}")
    lab.add_argument("--image-url-prefix", default="/data/local-files/?d=", help="Label Studio image URL prefix")
    lab.add_argument("--signing-key", type=Path, help="Ed25519 private key (PEM) that signs the manifest")
    lab.add_argument("--no-progress", dest="progress", action="store_false")
    _client_flags(lab)
    lab.set_defaults(func=_label)

    ver = sub.add_parser("verify", help="check a provenance manifest: signature, files, and weights' sha256")
    ver.add_argument("manifest", type=Path, help="detseg-manifest.json, or the folder holding it")
    ver.add_argument("--weights", type=Path, action="append", default=[], help="a weights file to check (repeatable)")
    ver.add_argument("--public-key", type=Path, action="append", default=[], help="trusted key (PEM; repeatable)")
    ver.add_argument("--allow-unsigned", action="store_true", help="accept a manifest without a signature")
    ver.set_defaults(func=_verify)

    kg = sub.add_parser("keygen", help="write an Ed25519 signing key (PEM, 0600) and its public key (.pub)")
    kg.add_argument("path", type=Path)
    kg.set_defaults(func=_keygen)

    m = sub.add_parser(
        "models", help="list the model profiles and the catalog's weights (cached or not), or a server's models"
    )
    m.add_argument("--target", help="ask a running server (ListModels) instead of the local catalog")
    m.add_argument("--cache-dir")
    m.set_defaults(func=_models)
    return p


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="profile (as for serve)")
    p.add_argument("--detector")
    p.add_argument("--segmenter")
    p.add_argument("--cache-dir")
    p.add_argument("--offline", action="store_const", const=True)


def _client_flags(p: argparse.ArgumentParser) -> None:
    """--target, or the models of a server started in this process (as serve would load them)."""
    p.add_argument("--target", help="a running server; default: start one in this process with --models")
    _model_flags(p)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request deadline in seconds")


@contextlib.contextmanager
def _service(args: argparse.Namespace) -> Iterator[str]:
    """The target to talk to: --target, or an in-process server (free loopback port) for the model flags."""
    if args.target:
        yield args.target
        return
    from service.api.inprocess import InProcessServer

    settings = _settings(args, ("models", "detector", "segmenter", "cache_dir", "offline")).replace(
        host="127.0.0.1", port=0
    )
    with InProcessServer(settings) as server:
        server.wait_serving()
        yield server.target


def _eval(args: argparse.Namespace) -> int:
    from service.client import Client
    from service.evaluation.dataset import load_dataset
    from service.evaluation.run import run_eval

    dataset = load_dataset(args.annotations, args.images, args.slices)
    if args.limit:
        dataset = dataset.limit(args.limit)
    with _service(args) as target, Client(target, timeout=args.timeout) as client:
        figures = run_eval(
            client, dataset, args.out, prompt=Prompt(args.prompt), score_threshold=args.score_threshold,
            operating_threshold=args.operating_threshold, noc_instances=args.noc_instances,
            title=f"detseg eval: {args.annotations.name}",
        )  # fmt: skip
    o, noc = figures["overall"], figures["noc"]
    print(
        f"{figures['images']} images: mask AP {figures['mask_ap']:.3f} AP50 {figures['mask_ap50']:.3f}, box AP "
        f"{figures['box_ap']:.3f} AP50 {figures['box_ap50']:.3f}; recall {o['recall']}, mean mask IoU "
        f"{o['mean_mask_iou']}, FP/image {o['false_positives_per_image']}; NoC@85 {noc.get('noc@85')}, NoC@90 "
        f"{noc.get('noc@90')}"
    )
    print(f"report: {args.out / 'report.html'}")
    return 0


def _label(args: argparse.Namespace) -> int:
    from service.client import Client, RequestFailed
    from service.labeling.run import Prompts, check_formats, check_prompts, label_folder

    prompts = Prompts(
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()), texts=tuple(args.text),
        score_threshold=args.score_threshold,
    )  # fmt: skip
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        check_prompts(prompts)  # InvalidInput (a DetsegError: reported by main) before any server starts
        check_formats(formats)
        with _service(args) as target, Client(target, timeout=args.timeout) as client:
            summary = label_folder(
                client, args.folder, args.out, prompts, formats=formats, image_url_prefix=args.image_url_prefix,
                signing_key=args.signing_key, progress=args.progress,
            )  # fmt: skip
    except (RequestFailed, ValueError) as e:
        print(f"detseg label: {e}", file=sys.stderr)
        return 2
    print(
        f"{summary.images} images: {summary.labeled_now} labeled now, {summary.skipped} already done, "
        f"{summary.failed} failed (see {args.out / 'errors.jsonl'}); {summary.instances} instances, "
        f"{summary.flagged} flagged for review"
    )
    for name, path in summary.exports.items():
        print(f"  {name:<13} {path}")
    return 1 if summary.failed else 0


def _verify(args: argparse.Namespace) -> int:
    """An export folder's manifest, or a saved response (`detseg segment --json`) against its own manifest."""
    from service import provenance
    from service.provenance.response import verify_content

    keys = [provenance.load_public_key(k) for k in args.public_key]
    try:
        saved = _saved_response(args.manifest)
        if saved is not None:
            if saved.get("manifest") is None:
                raise provenance.VerificationFailed("the saved response carries no manifest")
            result = verify_content(
                saved["manifest"], saved["instances"], saved["image"]["sha256"], trusted_keys=keys,
                require_signature=not args.allow_unsigned,
            )  # fmt: skip
            _check_weights(result.manifest, args.weights)
            signed = f"signed by key {result.key_id}" if result.signed else "not signed"
            print(f"OK: {signed}; {len(saved['instances'])} instance(s) and the image match the manifest")
            return 0
        report = provenance.verify_path(
            args.manifest, trusted_keys=keys, weights=args.weights, require_signature=not args.allow_unsigned
        )
    except provenance.VerificationFailed as e:
        print(f"detseg verify: FAILED: {e}", file=sys.stderr)
        return 1
    signed = f"signed by key {report.key_id}" if report.signed else "not signed"
    print(f"OK: {signed}; {report.artifacts_checked} file(s) and {report.weights_checked} weights file(s) match")
    if report.unlisted:
        print(f"  {len(report.unlisted)} file(s) not covered (e.g. linked images: the manifest lists their sha256 as "
              f"inputs): {', '.join(report.unlisted[:3])}{' ...' if len(report.unlisted) > 3 else ''}")  # fmt: skip
    return 0


def _saved_response(path: Path) -> dict[str, Any] | None:
    """A `detseg segment --json` file's content, None for anything else (a manifest or an export folder)."""
    if path.is_dir():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) and "instances" in data and "image" in data else None


def _check_weights(manifest: dict[str, Any], weights: list[Path]) -> None:
    from service import provenance
    from service.provenance import file_sha256

    known = {m["weights_sha256"]: m["name"] for m in manifest["models"]}
    for w in weights:
        if file_sha256(w) not in known:
            raise provenance.VerificationFailed(
                f"{w.name}: sha256 matches none of the manifest's models ({', '.join(known.values())})"
            )


def _keygen(args: argparse.Namespace) -> int:
    from service import provenance

    path = provenance.generate_key(args.path)
    key = provenance.load_private_key(path)
    print(f"wrote {path} (private, 0600) and {path}.pub; key id {provenance.key_id(key.public_key())}")
    return 0


def _settings(args: argparse.Namespace, names: tuple[str, ...]) -> Settings:
    overrides = {n: getattr(args, n, None) for n in names}
    return Settings.from_environ(overrides, getattr(args, "config", None))


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(
        args,
        (
            "host",
            "port",
            "models",
            "detector",
            "segmenter",
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
        ),
    )
    from service.startup import configure_logging, configure_process, reexec_for_allocator

    if args.reexec_argv is not None:
        reexec_for_allocator(settings.allocator, ["-m", "service.cli", *args.reexec_argv])
    configure_logging(settings.log_level, settings.log_format)
    configure_process(settings)  # before anything imports ultralytics (its switches are read at import)
    from service.api.server import create_server, serve_forever
    from service.runners.factory import load_runner

    async def run() -> None:
        # The port opens at once (health NOT_SERVING); models load behind it. A load failure (e.g. missing
        # weights) stops the server and surfaces here as the DetsegError main() prints.
        server, port = await create_server(settings, lambda: load_runner(settings))
        logging.getLogger("detseg").info("listening on %s:%d; loading models", settings.host, port)
        await serve_forever(server, settings.grace_seconds)

    asyncio.run(run())
    return 0


def _segment(args: argparse.Namespace) -> int:
    from service.client import Client, Exemplar, Region, RequestFailed
    from service.provenance.response import instance_content

    data = args.image.read_bytes()
    regions = []
    for spec in args.box:
        parts = spec.split(",")
        regions.append(Region(box=_xyxy(parts), label=parts[4] if len(parts) > 4 else ""))
    exemplars = []
    for spec in args.exemplar:
        box_spec, _, reference = spec.partition("@")
        parts = box_spec.split(",")
        label = parts[4] if len(parts) > 4 else ""
        exemplars.append(Exemplar(_xyxy(parts), label, Path(reference).read_bytes() if reference else None))
    with Client(args.target, timeout=args.timeout) as client:
        try:
            result = client.segment(
                data,
                classes=[c.strip() for c in args.classes.split(",") if c.strip()],
                texts=args.text,
                regions=regions,
                exemplars=exemplars,
                score_threshold=args.score_threshold,
                max_instances=args.max_instances,
            )
        except RequestFailed as e:
            print(f"detseg: {e}", file=sys.stderr)
            return 1
    instances = [instance_content(i) for i in result.response.instances]
    if args.json:  # `detseg verify` checks this file against its manifest
        manifest = json.loads(result.response.provenance.manifest or "null")
        print(json.dumps({"image": _image_dict(result), "instances": instances, "manifest": manifest}, indent=2))
    else:
        info = result.response.image
        print(f"{info.width}x{info.height} {info.format}: {len(instances)} instance(s)")
        for n, i in enumerate(result.instances):
            box = ", ".join(f"{v:.1f}" for v in i.box)
            via = f"  (text {i.text!r}, similarity {i.similarity:.2f})" if i.text else ""
            print(
                f"{n:3d}  {i.label:<16} score {i.score:.3f}  box [{box}]  mask {i.area} px  "
                f"mask score {i.mask_score:.3f}{via}"
            )
    if args.out:
        from service.overlay import render_overlay

        args.out.write_bytes(render_overlay(data, instances))
        print(f"overlay written to {args.out}", file=sys.stderr)
    return 0


def _xyxy(parts: list[str]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in parts[:4])
    return x0, y0, x1, y1


def _image_dict(result: Any) -> dict[str, Any]:
    im = result.response.image
    return {
        "width": im.width,
        "height": im.height,
        "format": im.format,
        "sha256": im.sha256,
        "request_id": result.request_id,
        "profile": result.profile,
        "backend": result.response.provenance.backend,
    }


def _export(args: argparse.Namespace) -> int:
    from service.models.profiles import resolve_models
    from service.models.triton_repo import write_repository

    settings = _settings(args, ("models", "detector", "segmenter", "cache_dir", "offline"))
    out = args.out or settings.triton_repository
    models = resolve_models(settings)
    reports = write_repository(models, settings, out)
    print(f"profile {models.profile}: {models.detector.name} + {models.segmenter.name} -> {out}")
    for r in reports:
        size = r.path.stat().st_size / 1e6
        print(f"  {r.role:<20} {size:7.1f} MB  max |onnx - torch| = {r.max_abs_diff:.2e}")
    return 0


def _triton_state(settings: Settings) -> Path:
    return settings.cache_dir / "triton"


def _triton_up(args: argparse.Namespace) -> int:
    from service.models.profiles import resolve_models
    from service.models.triton_repo import ensure_repository
    from service.runners.triton_local import LocalTriton, read_state

    settings = _settings(args, ("models", "detector", "segmenter", "cache_dir", "offline"))
    state_dir = _triton_state(settings)
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
    try:
        server.wait_ready(args.timeout)
    except Exception:
        server.stop()
        raise
    server.save_state()
    print(f"Triton ready at {server.url} (log: {server.log_path}); serve with:")
    print(f"  detseg serve --backend triton --triton-url {server.url}")
    return 0


def _triton_down(args: argparse.Namespace) -> int:
    from service.runners.triton_local import stop_detached

    settings = _settings(args, ("cache_dir",))
    print("stopped" if stop_detached(_triton_state(settings)) else "no local Triton was running")
    return 0


def _triton_status(args: argparse.Namespace) -> int:
    from service.models.roles import MODEL_ROLES
    from service.runners.triton_local import read_state

    settings = _settings(args, ("cache_dir",))
    state = read_state(_triton_state(settings))
    if state is None:
        print("no local Triton (start one with `detseg triton up`)")
        return 1
    import tritonclient.grpc as grpcclient

    url = f"127.0.0.1:{state['grpc_port']}"
    client = grpcclient.InferenceServerClient(url)
    try:
        ready = {m: client.is_model_ready(m, client_timeout=2) for m in MODEL_ROLES}
        server_ready = client.is_server_ready(client_timeout=2)
    except Exception:
        print(f"pid {state['pid']}: not answering at {url}")
        return 1
    finally:
        client.close()
    health = "ready" if server_ready else "NOT ready"
    print(f"pid {state['pid']} at {url}: server {health}; repository {state['repository']}")
    for m, ok in ready.items():
        print(f"  {m:<20} {'ready' if ok else 'NOT ready'}")
    return 0 if server_ready and all(ready.values()) else 1


def _models(args: argparse.Namespace) -> int:
    if args.target:
        import grpc

        from service.proto.detseg.v1 import detseg_pb2 as pb
        from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc

        with grpc.insecure_channel(args.target) as channel:
            response = pb_grpc.SegmentationServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
        print(f"profile {response.profile}, backend {response.backend}")
        for m in response.models:
            vocab = f", {len(m.vocabulary)} classes" if m.vocabulary else ""
            print(f"  {pb.ModelRole.Name(m.role)}: {m.name} ({m.architecture}) sha256 {m.weights_sha256}{vocab}")
        return 0
    from service.models.catalog import CATALOG
    from service.models.profiles import PROFILE_SUMMARIES

    settings = _settings(args, ("cache_dir",))
    print(f"profiles (serve --models; default {Settings().models}):")
    width = max(map(len, PROFILE_SUMMARIES))
    for name, summary in PROFILE_SUMMARIES.items():
        print(f"  {name:<{width}}  {summary}")
    print(f"catalog weights, cache {settings.cache_dir}:")
    for entry in CATALOG.values():
        cached = "cached" if (settings.cache_dir / entry.filename).exists() else "-"
        print(f"  {entry.name:<24} {entry.role:<10} {entry.size_bytes / 1e6:7.1f} MB  {cached:<7} {entry.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
