"""selectws.server.tls_connection.build_context: every way a certificate can fail names the key and the file."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from selectws.config import ConfigError, TlsConfig
from selectws.transport.tls import build_context

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pems")
    for name in ("a", "b"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj",
             "/CN=localhost", "-days", "1", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem")],
            check=True, capture_output=True,
        )
    subprocess.run(["openssl", "pkey", "-in", str(d / "a.key"), "-aes256", "-passout", "pass:x", "-out",
                    str(d / "encrypted.key")], check=True, capture_output=True)
    return d


def test_good_pair_relative_to_base(pems: Path) -> None:
    ctx = build_context(TlsConfig(cert="a.pem", key="a.key"), str(pems))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert build_context(TlsConfig(cert="a.pem", key="a.key", min_version="1.3"), str(pems)).minimum_version == (
        ssl.TLSVersion.TLSv1_3
    )
    mtls = build_context(TlsConfig(cert=str(pems / "a.pem"), key=str(pems / "a.key"), ca="b.pem"), str(pems))
    assert mtls.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("cert", "key", "extra", "bad_key", "text"),
    [
        ("missing.pem", "a.key", {}, "tls.cert", "missing.pem"),
        ("a.pem", "missing.key", {}, "tls.key", "missing.key"),
        ("a.key", "a.key", {}, "tls.cert", "no PEM certificate"),
        ("a.pem", "a.pem", {}, "tls.key", "no PEM private key"),
        ("a.pem", "b.key", {}, "tls.key", "not the private key"),
        ("a.pem", "encrypted.key", {}, "tls.key", "encrypted"),
        ("a.pem", "a.key", {"ciphers": "NO-SUCH-CIPHER"}, "tls.ciphers", "NO-SUCH-CIPHER"),
        ("a.pem", "a.key", {"ca": "missing-ca.pem"}, "tls.ca", "missing-ca.pem"),
    ],
)
def test_errors_name_the_key(pems: Path, cert: str, key: str, extra: dict[str, str], bad_key: str,
                             text: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_context(TlsConfig(cert=cert, key=key, **extra), str(pems))
    assert info.value.key == bad_key
    assert text in info.value.reason
