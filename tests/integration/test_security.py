"""TLS, mutual TLS and bearer tokens on a real server, with certificates generated here (cryptography)."""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

import grpc
import pytest

from service.cli import main as cli_main
from service.client import Client, RequestFailed, RetryPolicy
from service.errors import ConfigurationError
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.shapes.dataset import write_coco_dataset
from tests.conftest import ServerThread, wait_serving

ONE_TRY = RetryPolicy(max_attempts=1)


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), name


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a client certificate of another CA."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("pki")

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def write(name, cert, k=None):
        (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if k is not None:
            pem = k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            (folder / f"{name}.key").write_bytes(pem)

    ca_key, other_ca_key = key(), key()
    ca, ca_name = _cert("detseg test CA", ca_key, None, ca_key, ca=True)
    other_ca, other_name = _cert("someone else's CA", other_ca_key, None, other_ca_key, ca=True)
    write("ca", ca)
    for name, issuer_key, issuer, kwargs in (
        ("server", ca_key, ca_name, {"server": True}),
        ("client", ca_key, ca_name, {}),
        ("stranger", other_ca_key, other_name, {}),
    ):
        k = key()
        cert, _ = _cert(name, issuer_key, issuer, k, **kwargs)
        write(name, cert, k)
    return folder


def _channel_credentials(pki: Path, client: str | None = None) -> grpc.ChannelCredentials:
    key = (pki / f"{client}.key").read_bytes() if client else None
    chain = (pki / f"{client}.crt").read_bytes() if client else None
    return grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(), key, chain)


def _start(settings, **security) -> ServerThread:
    return ServerThread(settings.replace(**security))


def _wait(srv, credentials=None):
    if credentials is None:
        with grpc.insecure_channel(srv.target) as channel:
            wait_serving(channel)
    else:
        with grpc.secure_channel(srv.target, credentials) as channel:
            wait_serving(channel)


def test_tls_serves_tls_clients_and_plaintext_clients_cannot_talk(settings, pki):
    srv = _start(settings, tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"))
    try:
        _wait(srv, _channel_credentials(pki))
        with Client(srv.target, credentials=_channel_credentials(pki)) as detseg:
            assert detseg.list_models().profile == "test"
        with Client(srv.target, retry=ONE_TRY, timeout=5) as plain, pytest.raises(RequestFailed) as err:
            plain.list_models()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_trusted_ca(settings, pki):
    srv = _start(settings, tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"),
                 tls_client_ca=str(pki / "ca.crt"))  # fmt: skip
    try:
        _wait(srv, _channel_credentials(pki, "client"))
        with Client(srv.target, credentials=_channel_credentials(pki, "client")) as detseg:
            assert detseg.list_models().profile == "test"
        for who in (None, "stranger"):
            credentials = _channel_credentials(pki, who)
            with (
                Client(srv.target, credentials=credentials, retry=ONE_TRY, timeout=5) as c,
                pytest.raises(RequestFailed) as err,
            ):
                c.list_models()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE, who
    finally:
        srv.stop()


def test_tokens_are_required_except_for_health(settings, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# one per line\nalpha-0123456789\n\nbeta-9876543210\n")
    srv = _start(settings, auth_tokens_file=str(tokens))
    try:
        _wait(srv)  # health needs no token
        for token in ("alpha-0123456789", "beta-9876543210"):
            with Client(srv.target, token=token) as detseg:
                assert detseg.list_models().profile == "test"
        for token, says in ((None, "missing"), ("alpha-0123456780", "not accepted"), ("", "missing")):
            with Client(srv.target, token=token, retry=ONE_TRY) as detseg, pytest.raises(RequestFailed) as err:
                detseg.list_models()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and says in err.value.message
            assert "alpha" not in err.value.message
        with grpc.insecure_channel(srv.target) as channel:  # streaming RPCs are refused the same way
            stub = pb_grpc.SegmentationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.StreamSegment(iter([pb.SegmentRequest()]), metadata=[("authorization", "Basic abc")]))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # An unknown method is refused as a known one (it was UNIMPLEMENTED: a caller without a token could list
            # the API); with a token it is UNIMPLEMENTED.
            unknown = channel.unary_unary("/detseg.v1.SegmentationService/NoSuchMethod")
            with pytest.raises(grpc.RpcError) as err:
                unknown(b"")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                unknown(b"", metadata=[("authorization", "Bearer alpha-0123456789")])
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        srv.stop()


def test_the_client_commands_reach_a_server_with_mutual_tls_and_tokens(settings, pki, tmp_path, capsys):
    """(The CLI had no way to: `detseg segment --target` to a secured server could only fail.)"""
    tokens, token = tmp_path / "tokens", tmp_path / "my-token"
    tokens.write_text("alpha-0123456789\n")
    token.write_text("# mine\nalpha-0123456789\n")
    srv = _start(settings, tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"),
                 tls_client_ca=str(pki / "ca.crt"), auth_tokens_file=str(tokens))  # fmt: skip
    image = Path(__file__).resolve().parents[2] / "service" / "models" / "demo" / "sample.jpg"
    secure = ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"), "--tls-key",
              str(pki / "client.key"), "--token-file", str(token)]  # fmt: skip
    try:
        _wait(srv, _channel_credentials(pki, "client"))
        assert cli_main(["models", "--target", srv.target, *secure]) == 0
        assert capsys.readouterr().out.startswith("profile test, backend ")
        assert cli_main(["segment", str(image), "--target", srv.target, "--json", *secure]) == 0
        assert '"instances"' in capsys.readouterr().out
        without_token = secure[:-2]
        assert cli_main(["models", "--target", srv.target, *without_token]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert cli_main(["models", "--target", srv.target, *secure[:4], "--token-file", str(token)]) == 2
        assert (
            capsys.readouterr().err
            == "detseg: --tls-cert and --tls-key go together (a client certificate and its key)\n"
        )
        annotations = write_coco_dataset(tmp_path / "data", "test", 1)
        assert cli_main(["eval", str(annotations), *secure]) == 2  # no --target: an in-process, plaintext server
        assert "reach a --target server" in capsys.readouterr().err
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("security", "says"),
    [
        ({"tls_cert": "/nonexistent/server.crt", "tls_key": "/nonexistent/server.key"}, "tls_key: cannot read"),
        ({"tls_cert": "x.crt"}, "give both"),
        ({"auth_tokens_file": "/nonexistent/tokens"}, "auth_tokens_file: cannot read"),
    ],
)
def test_unusable_security_settings_stop_the_server_at_start(settings, security, says):
    with pytest.raises(ConfigurationError, match=says):
        _start(settings, **security)


@pytest.mark.parametrize(
    ("files", "says"),
    [
        (("server.key", "server.key", None), r"tls_cert: \S+server.key holds no PEM certificate"),
        (("server.crt", "server.crt", None), r"tls_key: \S+server.crt holds no unencrypted PEM private key"),
        (("server.crt", "client.key", None), r"tls_key: \S+client.key is not the key of the certificate in"),
        (("server.crt", "server.key", "server.key"), r"tls_client_ca: \S+server.key holds no PEM certificate"),
    ],
)
def test_tls_files_that_are_not_what_they_should_be_are_named_at_start(settings, pki, files, says):
    """(Before: gRPC failed to bind the port, no file named, or every handshake failed later.)"""
    cert, key, ca = files
    security = {"tls_cert": str(pki / cert), "tls_key": str(pki / key)}
    with pytest.raises(ConfigurationError, match=says):
        _start(settings, **security, **({"tls_client_ca": str(pki / ca)} if ca else {}))


def test_with_tls_a_plaintext_health_port_answers_probes_and_nothing_else(settings, pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        health_port = s.getsockname()[1]
    srv = _start(settings, tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"), health_port=health_port)
    try:
        _wait(srv, _channel_credentials(pki))
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="detseg.v1.SegmentationService"), timeout=10
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.SegmentationServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the API is on the TLS port only
    finally:
        srv.stop()
