"""Transport security and caller authentication, from Settings.

- TLS: ``tls_cert`` + ``tls_key`` (PEM files) make the port a TLS port; with ``tls_client_ca`` too, clients must
  present a certificate signed by that CA (mutual TLS). ``server_credentials`` builds them.
- Tokens: with ``auth_tokens_file`` (one token per line, blank lines and ``#`` comments ignored), every RPC but
  the standard health service must carry ``authorization: Bearer <token>``; tokens are compared in constant
  time (``hmac.compare_digest``) against every configured one. Missing or wrong → UNAUTHENTICATED, before the
  servicer runs, with a message that says which (never the token).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from service.config import Settings
from service.errors import ConfigurationError

EXEMPT_PREFIXES = (f"/{health.SERVICE_NAME}/",)  # probes (Kubernetes, load balancers) carry no token


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigurationError(f"{what}: cannot read {path} ({e.strerror})") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials for the port, or None for a plaintext port."""
    if not (settings.tls_cert or settings.tls_key or settings.tls_client_ca):
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ConfigurationError("tls_cert and tls_key: give both (PEM files) to serve TLS")
    key, cert = _read(settings.tls_key, "tls_key"), _read(settings.tls_cert, "tls_cert")
    ca = _read(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    _check_pem(key, cert, ca, settings)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _check_pem(key: bytes, cert: bytes, ca: bytes | None, settings: Settings) -> None:
    """ConfigurationError naming the file that is not what TLS needs (gRPC would only fail to bind the port, or
    fail every handshake): PEM certificates, an unencrypted PEM private key, the key of the first certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError:
        raise ConfigurationError(f"tls_cert: {settings.tls_cert} holds no PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:  # TypeError: encrypted (gRPC cannot ask for a password)
        raise ConfigurationError(f"tls_key: {settings.tls_key} holds no unencrypted PEM private key ({e})") from None
    if private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise ConfigurationError(
            f"tls_key: {settings.tls_key} is not the key of the certificate in {settings.tls_cert}"
        )
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise ConfigurationError(f"tls_client_ca: {settings.tls_client_ca} holds no PEM certificate") from None


def load_tokens(settings: Settings) -> tuple[bytes, ...]:
    """The accepted tokens (empty: authentication off)."""
    if not settings.auth_tokens_file:
        return ()
    lines = _read(settings.auth_tokens_file, "auth_tokens_file").decode("utf-8", "replace").splitlines()
    tokens = tuple(t.strip().encode() for t in lines if t.strip() and not t.strip().startswith("#"))
    if not tokens:
        raise ConfigurationError("auth_tokens_file: holds no token")
    return tokens


class TokenAuth(grpc.aio.ServerInterceptor):
    """Rejects RPCs without a valid bearer token with UNAUTHENTICATED (health exempt)."""

    def __init__(self, tokens: tuple[bytes, ...]) -> None:
        self._tokens = tokens

    def _check(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
        """None when authorised, else what is wrong (for the caller)."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "authorization: missing; send 'authorization: Bearer <token>' metadata"
        value = values[0] if isinstance(values[0], bytes) else values[0].encode()
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return "authorization: expected 'Bearer <token>'"
        ok = False
        for known in self._tokens:  # every token compared, each in constant time
            ok |= hmac.compare_digest(token.strip(), known)
        return None if ok else "authorization: token not accepted"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method.startswith(EXEMPT_PREFIXES):
            return handler
        problem = self._check(details.invocation_metadata)  # type: ignore[arg-type]
        if problem is None:
            return handler
        # An unknown method is refused as a known one is: UNIMPLEMENTED would tell a caller without a token which
        # methods exist.
        return _refusing(handler or grpc.unary_unary_rpc_method_handler(_unknown), problem)


def _unknown(request: Any, context: grpc.aio.ServicerContext) -> None:  # never called: _refusing aborts first
    raise NotImplementedError


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that aborts with UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler must be

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
