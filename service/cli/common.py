"""What several ``detseg`` commands share: settings from their flags, and the flags that name models."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from service.client import Client, Region, RequestFailed
from service.config import Settings
from service.errors import ConfigurationError

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


def number(
    kind: type[int] | type[float],
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> Callable[[str], float]:
    """An argparse ``type``: a ``kind`` (int or float) between ``low`` and ``high``, each bound included unless
    open. argparse prints the flag and why (exit 2), as for any malformed flag."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        above_low = value > low if open_low else value >= low
        below_high = value < high if open_high or high == math.inf else value <= high
        if not (above_low and below_high):  # NaN is neither; inf only below an infinite bound, never reached
            bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high or high == math.inf else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value

    return parse


def waiting_for(target: str) -> Callable[[RequestFailed, float], None]:
    """A client's ``on_retry`` for a command: says once on stderr that ``target`` does not answer yet and that the
    call is retried until its deadline (``--timeout``), so a wrong address is not a silent wait."""
    said = False

    def notice(error: RequestFailed, wait_s: float) -> None:
        nonlocal said
        if not said:
            said = True
            print(
                f"detseg: {target} does not answer yet ({error.message}); retrying until the deadline (--timeout)",
                file=sys.stderr,
                flush=True,
            )

    return notice


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """How a client command reaches a server that requires TLS, mutual TLS or a bearer token (Settings tls_cert,
    tls_client_ca, auth_tokens_file); see ``connection``."""
    g = p.add_argument_group("connection (a server with TLS or tokens)")
    g.add_argument("--tls", action="store_true", help="TLS, trusting the system's root certificates")
    g.add_argument("--tls-ca", type=Path, help="TLS, trusting this CA certificate (PEM) instead")
    g.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS, with --tls-key")
    g.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    g.add_argument("--token-file", type=Path, help="a file whose first line is the bearer token to send")


def connection(args: argparse.Namespace) -> dict[str, Any]:
    """``Client`` keywords (credentials, token) from ``add_connection_flags``' flags; ConfigurationError for a client
    certificate without its key (or the reverse), or an empty token file; OSError (naming it) for a file that cannot
    be read. No flag: a plaintext channel, no token."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together (a client certificate and its key)")
    options: dict[str, Any] = {}
    if args.tls or args.tls_ca or args.tls_cert:
        options["credentials"] = grpc.ssl_channel_credentials(
            args.tls_ca.read_bytes() if args.tls_ca else None,
            args.tls_key.read_bytes() if args.tls_key else None,
            args.tls_cert.read_bytes() if args.tls_cert else None,
        )
    if args.token_file:
        lines = [line.strip() for line in args.token_file.read_text().splitlines()]
        token = next((line for line in lines if line and not line.startswith("#")), "")
        if not token:
            raise ConfigurationError(f"{args.token_file}: no token in it (its first line not empty nor a # comment)")
        options["token"] = token
    return options


def target_client(args: argparse.Namespace) -> Client:
    """The client of a command's ``--target``: its ``--timeout`` as the deadline, retrying a server that does not
    answer yet (and saying so), over the connection its flags ask for."""
    return Client(args.target, timeout=args.timeout, on_retry=waiting_for(args.target), **connection(args))


def connects(args: argparse.Namespace) -> bool:
    """Whether any of ``add_connection_flags``' flags was given."""
    return bool(args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.token_file)


# A box on the command line (`detseg segment --box`, `detseg track --box`), as its help says.
BOX_FORM = "x0,y0,x1,y1[,label] (or x0,y0,x1,y1:label)"


def numbers(text: str, count: int, form: str) -> list[float]:
    """The first ``count`` comma-separated numbers of ``text``; argparse's error naming ``form`` otherwise."""
    parts = text.split(",")
    try:
        if len(parts) < count:
            raise ValueError
        return [float(v) for v in parts[:count]]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}") from None


def box_and_label(text: str, form: str = BOX_FORM) -> tuple[tuple[float, float, float, float], str]:
    """``x0,y0,x1,y1[,label]`` (the label: everything after the fourth comma, commas and colons included) or
    ``x0,y0,x1,y1:label``: the box and the label. (``segment`` and ``track`` each read one form of two, and refused
    labels the other took.)"""
    parts = text.split(",", 4)
    if len(parts) == 4 and ":" in parts[3]:
        last, label = parts[3].split(":", 1)
        text = ",".join([*parts[:3], last])
    else:
        label = parts[4] if len(parts) == 5 else ""
    x0, y0, x1, y1 = numbers(text, 4, form)
    return (x0, y0, x1, y1), label


def box_region(text: str) -> Region:
    """A ``--box`` (``BOX_FORM``) as a region prompt."""
    box, label = box_and_label(text)
    return Region(box=box, label=label)
