"""TLS and mutual TLS against a real daemon, with certificates made by openssl."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from managerd_client import AuthenticationFailed, ConnectFailed, connect

from conftest import Daemon, wait_until

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, text=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _openssl(
        "req", "-x509", *EC_KEY, "-nodes", "-days", "2",
        "-keyout", str(key), "-out", str(crt), "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return crt, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], san: str, client: bool = False) -> Path:
    key, csr, crt = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
    ext = d / f"{name}.ext"
    usage = "clientAuth" if client else "serverAuth"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
    _openssl(
        "req", *EC_KEY, "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-out", str(crt), "-extfile", str(ext),
    )  # fmt: skip
    return crt


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "ca")
    other = _ca(d, "otherca")
    return {
        "ca": ca[0],
        "other_ca": other[0],
        "server": _leaf(d, "server", ca, "IP:127.0.0.1"),
        "server_key": d / "server.key",
        "wrong_host": _leaf(d, "wronghost", ca, "DNS:elsewhere.example"),
        "wrong_host_key": d / "wronghost.key",
        "client": _leaf(d, "client", ca, "DNS:client", client=True),
        "client_key": d / "client.key",
    }


def _tls_daemon(
    tmp: Path, pki: dict[str, Path], cert: str = "server", mutual: bool = False
) -> Daemon:
    env = {
        "MANAGERD_TLS_CERT": str(pki[cert]),
        "MANAGERD_TLS_KEY": str(pki[cert + "_key"]),
    }
    if mutual:
        env["MANAGERD_TLS_CA"] = str(pki["ca"])
        env["MANAGERD_TLS_REQUIRE_CLIENT_CERT"] = "true"
    return Daemon(tmp, env=env).start()


@pytest.fixture
def tls_daemon(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Daemon]:
    d = _tls_daemon(tmp_path, pki)
    try:
        yield d
    finally:
        d.stop()


def test_tls_round_trip(tls_daemon: Daemon, pki: dict[str, Path]) -> None:
    with connect(tls_daemon.address, authkey=tls_daemon.authkey, tls_ca=pki["ca"]) as m:
        q = m.Queue("secure")
        q.put({"secret": 1})
        assert q.get(timeout=1) == {"secret": 1}
    assert "TLS on" in tls_daemon.log


def test_large_payloads_over_tls(tls_daemon: Daemon, pki: dict[str, Path]) -> None:
    # Spliced into the request and answered raw: both through the TLS layer.
    blob = os.urandom(3 << 20)
    with connect(tls_daemon.address, authkey=tls_daemon.authkey, tls_ca=pki["ca"]) as m:
        q = m.Queue("secure.large")
        for _ in range(3):
            q.put(blob)
            assert q.get(timeout=5) == blob


def test_plaintext_client_is_refused_and_daemon_serves_on(
    tls_daemon: Daemon, pki: dict[str, Path]
) -> None:
    with pytest.raises(ConnectFailed, match="connect with tls"):
        connect(tls_daemon.address, authkey=tls_daemon.authkey, connect_timeout_s=2)
    with connect(tls_daemon.address, authkey=tls_daemon.authkey, tls_ca=pki["ca"]) as m:
        m.ping()


def test_untrusted_certificate_is_refused(tls_daemon: Daemon, pki: dict[str, Path]) -> None:
    with pytest.raises(AuthenticationFailed, match="certificate verify failed"):
        connect(tls_daemon.address, authkey=tls_daemon.authkey, tls_ca=pki["other_ca"])
    assert wait_until(lambda: "TLS handshake with 127.0.0.1" in tls_daemon.log)
    failures = [line for line in tls_daemon.lines if "TLS handshake with" in line]
    assert len(failures) == 1 and "Traceback" not in tls_daemon.log


def test_wrong_hostname_is_refused(tmp_path: Path, pki: dict[str, Path]) -> None:
    d = _tls_daemon(tmp_path, pki, cert="wrong_host")
    try:
        with pytest.raises(AuthenticationFailed, match=r"match|mismatch"):
            connect(d.address, authkey=d.authkey, tls_ca=pki["ca"])
    finally:
        d.stop()


def test_mutual_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    d = _tls_daemon(tmp_path, pki, mutual=True)
    try:
        with pytest.raises(AuthenticationFailed):
            connect(d.address, authkey=d.authkey, tls_ca=pki["ca"], connect_timeout_s=3)
        with connect(
            d.address,
            authkey=d.authkey,
            tls_ca=pki["ca"],
            tls_cert=pki["client"],
            tls_key=pki["client_key"],
        ) as m:
            m.dict("mtls")["k"] = "v"
            assert m.dict("mtls")["k"] == "v"
    finally:
        d.stop()


def test_wrong_authkey_inside_tls(tls_daemon: Daemon, pki: dict[str, Path]) -> None:
    with pytest.raises(AuthenticationFailed, match="refused"):
        connect(tls_daemon.address, authkey=b"wrong", tls_ca=pki["ca"])
