"""TLS (``wss://``) served by the daemon's own loop: echo, the CLI client, refusals, timeouts, certificate reload."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from wstools import connect

from selectws.config import ConfigError, parse_config

TIMEOUT = 10.0
MIB = 1 << 20


# ============================================================================================ certificates
def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1: ``(cert.pem, key.pem)`` under ``directory``."""
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("needs the cryptography package or the openssl command to make a certificate")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-addext",
             "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "1", "-keyout", str(key_path), "-out",
             str(cert_path)],
            check=True, capture_output=True,
        )
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def client_context(*cafiles: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for cafile in cafiles:
        ctx.load_verify_locations(cafile=str(cafile))
    return ctx


def wss(daemon, path: str = "/echo") -> str:
    return f"wss://localhost:{daemon.port}{path}"


def peer_cert(ws) -> bytes:
    der = ws.socket.getpeercert(binary_form=True)
    assert der
    return der


def der_of(cert_path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert_path.read_text())


TLS_TOML = """
[timeouts]
handshake = 1.0

[tls]
cert = "server.pem"
key = "server.key"
"""


@pytest.fixture(scope="module")
def tls_daemon(module_start_daemon):
    """One daemon on wss:// with a relative cert path (resolved against the config file's folder)."""
    make_cert(module_start_daemon.tmp, "server")
    # debug: failed TLS handshakes other than certificate alerts are logged at debug (selectws/server/refusals.py)
    return module_start_daemon(TLS_TOML, extra_args=("--log-level", "debug"))


@pytest.fixture(scope="module")
def server_cert(tls_daemon, module_start_daemon) -> Path:
    return module_start_daemon.tmp / "server.pem"


# ============================================================================================ echo
def test_listening_line_says_tls(tls_daemon):
    assert tls_daemon.logs(event="listening")[0]["tls"] is True
    assert tls_daemon.logs(event="tls certificate loaded")


def test_echo_text_binary_and_a_mebibyte_over_wss(tls_daemon, server_cert):
    with connect(wss(tls_daemon), ssl=client_context(server_cert), max_size=None) as ws:
        assert ws.socket.selected_alpn_protocol() in (None, "http/1.1")
        assert peer_cert(ws) == der_of(server_cert)
        ws.send("hello over TLS")
        assert ws.recv(timeout=TIMEOUT) == "hello over TLS"
        ws.send(b"\x00\xffbinary")
        assert ws.recv(timeout=TIMEOUT) == b"\x00\xffbinary"
        big = bytes(range(256)) * (MIB // 256)
        ws.send(big)
        assert ws.recv(timeout=TIMEOUT) == big
        text = "é" * (MIB // 2)
        for _ in range(3):  # several in flight: the server must keep reading records the selector never saw
            ws.send(text)
        for _ in range(3):
            assert ws.recv(timeout=TIMEOUT) == text


def test_a_slow_reader_gets_every_byte_in_order(tls_daemon, server_cert):
    """Output piles up while TLS waits for the socket: retried writes plus appended output must stay intact."""
    import threading

    messages = [os.urandom(MIB - 64) for _ in range(8)]  # incompressible: permessage-deflate must not shrink it
    received: list[bytes] = []
    # max_queue=1: the library's reader thread stops reading too, so the server's socket really fills up.
    with connect(wss(tls_daemon), ssl=client_context(server_cert), max_size=None, max_queue=1) as ws:

        def read_later() -> None:
            time.sleep(1.0)  # let the server's writes block on a full socket first
            for _ in messages:
                received.append(ws.recv(timeout=TIMEOUT))

        reader = threading.Thread(target=read_later)
        reader.start()
        for message in messages:
            ws.send(message)
        reader.join(30)
    assert received == messages


def test_many_small_messages_back_to_back(tls_daemon, server_cert):
    with connect(wss(tls_daemon), ssl=client_context(server_cert)) as ws:
        for i in range(500):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=TIMEOUT) for _ in range(500)] == [f"m{i}" for i in range(500)]


def test_static_and_ops_endpoints_over_https(tls_daemon, server_cert):
    import http.client

    conn = http.client.HTTPSConnection("localhost", tls_daemon.port, timeout=TIMEOUT,
                                       context=client_context(server_cert))
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200
        response.read()
    finally:
        conn.close()


def test_alpn_http_1_1_and_tls_1_3(tls_daemon, server_cert):
    ctx = client_context(server_cert)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", tls_daemon.port), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"  # never h2: this port speaks HTTP/1.1 only
        assert tls.version() == "TLSv1.3"


def test_cli_connect_wss_with_cafile(tls_daemon, server_cert):
    result = subprocess.run(
        [*_cli(), "connect", wss(tls_daemon), "--cafile", str(server_cert), "--once"], input="hi\n",
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi\n"


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "selectws"]


def test_untrusted_certificate_is_refused_by_the_cli(tls_daemon):
    result = subprocess.run([*_cli(), "connect", wss(tls_daemon), "--once"], input="hi\n", capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0
    assert "not trusted" in result.stderr


# ============================================================================================ refusals
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_client_is_refused(tls_daemon, server_cert):
    ctx = client_context(server_cert)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL 3 speak TLS 1.1 at all, so the server is the one saying no
    except ssl.SSLError:
        pass
    before = len(tls_daemon.logs(event="tls handshake failed", reason="UNSUPPORTED_PROTOCOL"))
    with socket.create_connection(("127.0.0.1", tls_daemon.port), timeout=TIMEOUT) as raw, \
            pytest.raises((ssl.SSLError, ConnectionError)):
        ctx.wrap_socket(raw, server_hostname="localhost")
    tls_daemon.wait_for(
        lambda r: len(tls_daemon.logs(event="tls handshake failed", reason="UNSUPPORTED_PROTOCOL")) > before,
        timeout=TIMEOUT,
    )
    _still_serving(tls_daemon, server_cert)


def _still_serving(daemon, cert: Path) -> None:
    with connect(wss(daemon), ssl=client_context(cert)) as ws:
        ws.send("still here")
        assert ws.recv(timeout=TIMEOUT) == "still here"


def test_plain_http_and_ws_to_the_tls_port_fail_cleanly(tls_daemon, server_cert):
    with connect(wss(tls_daemon), ssl=client_context(server_cert)) as ws:
        with socket.create_connection(("127.0.0.1", tls_daemon.port), timeout=TIMEOUT) as raw:
            raw.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            try:
                answer = raw.recv(4096)
            except ConnectionResetError:
                answer = b""
            assert not answer.startswith(b"HTTP/")  # no plaintext answer leaks; the connection just ends
        tls_daemon.wait_for(event="tls handshake failed", reason="plain HTTP sent to the TLS port", timeout=TIMEOUT)
        with pytest.raises(Exception):  # noqa: B017 - whatever the library makes of a TLS alert or a reset
            connect(f"ws://127.0.0.1:{tls_daemon.port}/echo").close()
        ws.send("unaffected")
        assert ws.recv(timeout=TIMEOUT) == "unaffected"


def test_tcp_without_a_tls_handshake_is_cut_at_the_handshake_timeout(tls_daemon, server_cert):
    before = len(tls_daemon.logs(event="tls handshake failed", reason="handshake timeout"))
    with socket.create_connection(("127.0.0.1", tls_daemon.port), timeout=TIMEOUT) as raw:
        start = time.monotonic()
        try:
            assert raw.recv(1) == b""
        except ConnectionResetError:
            pass
        waited = time.monotonic() - start
    assert 0.5 < waited < 5.0, waited  # [timeouts] handshake = 1.0
    tls_daemon.wait_for(
        lambda r: len(tls_daemon.logs(event="tls handshake failed", reason="handshake timeout")) > before,
        timeout=TIMEOUT,
    )
    _still_serving(tls_daemon, server_cert)


def test_a_stalled_handshake_does_not_block_others(tls_daemon, server_cert):
    with socket.create_connection(("127.0.0.1", tls_daemon.port), timeout=TIMEOUT) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello, then nothing
        _still_serving(tls_daemon, server_cert)


# ============================================================================================ reload
def test_sighup_loads_a_new_certificate_for_new_connections(start_daemon, tmp_path):
    old_cert, old_key = make_cert(tmp_path, "old")
    new_cert, new_key = make_cert(tmp_path, "new")
    shutil.copy(old_cert, tmp_path / "server.pem")
    shutil.copy(old_key, tmp_path / "server.key")
    d = start_daemon(TLS_TOML, allow_errors=True)  # the bad reload at the end logs an error
    trust = client_context(old_cert, new_cert)
    with connect(wss(d), ssl=trust) as old:
        assert peer_cert(old) == der_of(old_cert)

        shutil.copy(new_cert, tmp_path / "server.pem")
        shutil.copy(new_key, tmp_path / "server.key")
        d.signal(signal.SIGHUP)
        d.wait_for(event="configuration reloaded", timeout=TIMEOUT)
        with connect(wss(d), ssl=trust) as fresh:
            assert peer_cert(fresh) == der_of(new_cert)
            fresh.send("new cert")
            assert fresh.recv(timeout=TIMEOUT) == "new cert"
        old.send("old connection, old cert")
        assert old.recv(timeout=TIMEOUT) == "old connection, old cert"
        assert peer_cert(old) == der_of(old_cert)

        (tmp_path / "server.pem").write_text("not a certificate\n")
        d.signal(signal.SIGHUP)
        failed = d.wait_for(event="reload failed; keeping the running configuration", timeout=TIMEOUT)
        assert failed["key"] == "tls.cert"
        assert "server.pem" in failed["error"]
        with connect(wss(d), ssl=trust) as fresh:
            assert peer_cert(fresh) == der_of(new_cert)  # the running certificate stays
        old.send("still open")
        assert old.recv(timeout=TIMEOUT) == "still open"


# ============================================================================================ client certificates
def test_client_certificates_when_ca_is_set(start_daemon, tmp_path):
    make_cert(tmp_path, "server")
    client_cert, client_key = make_cert(tmp_path, "client")
    d = start_daemon(TLS_TOML + 'ca = "client.pem"\n')
    with_cert = client_context(tmp_path / "server.pem")
    with_cert.load_cert_chain(client_cert, client_key)
    with connect(wss(d), ssl=with_cert) as ws:
        ws.send("mutual")
        assert ws.recv(timeout=TIMEOUT) == "mutual"
    # TLS 1.3: the client may finish its side before the server's alert arrives; then the upgrade fails instead.
    with pytest.raises(Exception), connect(wss(d), ssl=client_context(tmp_path / "server.pem")) as ws:  # noqa: B017
        ws.send("no cert")
        ws.recv(timeout=TIMEOUT)
    failed = d.wait_for(event="tls handshake failed", timeout=TIMEOUT)
    assert "CERTIFICATE" in failed["reason"].upper(), failed


# ============================================================================================ configuration
@pytest.mark.parametrize(
    ("tls", "key"),
    [({"cert": "a.pem"}, "tls.key"), ({"key": "a.key"}, "tls.cert"), ({"min_version": "1.1"}, "tls.min_version"),
     ({"ca": "ca.pem"}, "tls.ca")],
)
def test_tls_config_errors_name_the_key(tls, key):
    with pytest.raises(ConfigError) as info:
        parse_config({"tls": tls})
    assert info.value.key == key


def test_missing_certificate_exits_1_naming_the_key_and_file(cli, tmp_path, write_config):
    make_cert(tmp_path, "server")
    path = write_config('[tls]\ncert = "missing.pem"\nkey = "server.key"\n')
    result = cli("serve", "--config", str(path), "--port", "0", "--log-format", "json", timeout=30)
    assert result.returncode == 1
    assert "tls.cert" in result.stderr and "missing.pem" in result.stderr
    assert '"listening"' not in result.stderr
    checked = cli("check-config", str(path))
    assert checked.returncode == 2
    assert "tls.cert" in checked.stderr and "missing.pem" in checked.stderr


def test_key_that_does_not_match_is_reported(cli, tmp_path, write_config):
    make_cert(tmp_path, "server")
    make_cert(tmp_path, "other")
    path = write_config('[tls]\ncert = "server.pem"\nkey = "other.key"\n')
    checked = cli("check-config", str(path))
    assert checked.returncode == 2
    assert "tls.key" in checked.stderr
    good = write_config('[tls]\ncert = "server.pem"\nkey = "server.key"\n')
    assert cli("check-config", str(good)).returncode == 0
