"""Incoming DICOM over TLS (PS3.15 B.12, BCP 195) on a real ``qcnode serve``.

One node for the module: plain port and TLS port, client certificates required (a
test CA made here with ``cryptography``), senders::

    CT1     tls_name = "ct1.example"   (its certificate must carry that name)
    PYNET, STORESCU, PLAIN             (any certificate the CA signed)

Peers: DCMTK ``storescu +tls`` (OpenSSL 3), pynetdicom with an ``ssl`` context, raw
sockets for a plain client and an idle one, and a hand-made TLS client for the bytes
the listener must read out of the SSL object itself.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian
from pynetdicom import AE

from node import cli
from node.config import SenderSettings
from node.receive import upperlayer as ul
from node.receive.tls import peer_names
from node.serve import EXIT_CONFIG
from tests.support.dcmtk import DCMTK, storescu, successes, write_ct_series
from tests.support.net import free_port, wait_for
from tests.support.node import RunningNode, running_node
from tests.support.pki import CA, Issued, issue, make_ca
from tests.test_acceptor import (
    _associate_rq,
    _dataset_bytes,
    _pdu,
    _pdv,
    _read_pdu,
    _response,
    _store_rq,
)

STATUS_SUCCESS = 0x0000
#: Bytes the listener reads into a connection's buffer at most (node.receive.acceptor).
BUFFER_BYTES = 256 << 10
#: TLS plaintext record size (RFC 8446 §5.1): one SSL_read returns at most this.
RECORD = 16384
BCP195_CIPHERS = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                  "TLS_CHACHA20_POLY1305_SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
                  "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",
                  "ECDHE-ECDSA-AES256-GCM-SHA384"}


@dataclass(frozen=True)
class Site:
    node: RunningNode
    tls_port: int
    ca: CA
    ct1: Issued  # CN CT1, DNS ct1.example
    ct2: Issued  # CN CT2: same CA, another device
    foreign: Issued  # CN CT1, DNS ct1.example, but signed by another CA
    images: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("tls")
    pki = tmp / "pki"
    ca = make_ca(pki, "site")
    server = issue(ca, pki, "server", common_name="qcnode", dns=("localhost",),
                   ip=("127.0.0.1",))
    ct1 = issue(ca, pki, "ct1", common_name="CT1", dns=("ct1.example",))
    ct2 = issue(ca, pki, "ct2", common_name="CT2")
    foreign = issue(make_ca(tmp / "foreign", "foreign"), tmp / "foreign", "ct1",
                    common_name="CT1", dns=("ct1.example",))
    tls_port = free_port()
    extra: dict[str, dict[str, object]] = {
        "node": {"tls_port": tls_port, "network_timeout": 30.0},
        "node.tls": {"cert_file": server.cert, "key_file": server.key, "ca_file": ca.cert,
                     "require_client_cert": True},
    }
    tables = {"senders": [{"ae_title": "CT1", "host": "127.0.0.1", "tls_name": "ct1.example"},
                          {"ae_title": "PYNET", "host": "127.0.0.1"},
                          {"ae_title": "STORESCU", "host": "127.0.0.1"},
                          {"ae_title": "PLAIN", "host": "127.0.0.1"}]}
    with running_node(tmp, extra=extra, tables=tables) as node:
        yield Site(node, tls_port, ca, ct1, ct2, foreign, tmp / "images")


def _storescu_tls(site: Site, files: list[Path], cert: Issued, *, aet: str,
                  port: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(DCMTK / "storescu"), "-aet", aet, "-aec", "QCNODE", "-to", "30", "-v",
           "+tls", str(cert.key), str(cert.cert), "+cf", str(site.ca.cert),
           "127.0.0.1", str(port or site.tls_port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "TCP_NODELAY": "1"})


def _in_spool(site: Site, uid: str) -> list[Path]:
    return list(site.node.spool.rglob(f"{uid}.dcm"))


def _spooled(site: Site, files: list[Path]) -> None:
    for path in files:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        wait_for(partial(_in_spool, site, uid), timeout=30, what=f"{path.name} spooled")


def _log_events(site: Site, event: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in site.node.log_text().splitlines()
             if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def _client_context(site: Site, cert: Issued | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(site.ca.cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def test_dcmtk_storescu_over_tls_stores_into_the_spool(site: Site) -> None:
    files = write_ct_series(site.images / "dcmtk", 3)
    done = _storescu_tls(site, files, site.ct1, aet="CT1")
    assert done.returncode == 0, done.stderr + done.stdout
    assert successes(done.stdout + done.stderr) == files
    _spooled(site, files)
    established = _log_events(site, "TLS established")
    assert established, "no TLS handshake logged"
    # PS3.15 B.12: TLS 1.2 at least, 1.3 when both have it; BCP 195 cipher suites only.
    assert {e["version"] for e in established} <= {"TLSv1.3", "TLSv1.2"}
    assert {e["cipher"] for e in established} <= BCP195_CIPHERS


def test_pynetdicom_over_tls_echo_and_store(site: Site) -> None:
    path = write_ct_series(site.images / "pynet", 1)[0]
    ae = AE(ae_title="PYNET")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", site.tls_port, ae_title="QCNODE",
                         tls_args=(_client_context(site, site.ct2), "localhost"))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == STATUS_SUCCESS
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == STATUS_SUCCESS
    finally:
        assoc.release()
    _spooled(site, [path])


def test_tls_name_must_match_and_does_not_admit_on_the_plain_port(site: Site) -> None:
    files = write_ct_series(site.images / "names", 1)
    wrong = _storescu_tls(site, files, site.ct2, aet="CT1")  # CT2's certificate as CT1
    assert wrong.returncode != 0 and not successes(wrong.stdout + wrong.stderr)
    assert "Association Rejected" in wrong.stdout + wrong.stderr
    plain = storescu(site.node.port, files, aet="CT1")  # the right AE, no certificate
    assert plain.returncode != 0 and not successes(plain.stdout + plain.stderr)
    right = _storescu_tls(site, files, site.ct1, aet="CT1")
    assert successes(right.stdout + right.stderr) == files


def test_plain_idle_and_foreign_clients_are_refused_while_a_tls_association_goes_on(
    site: Site,
) -> None:
    """A plain DICOM client on the TLS port, a certificate from another CA, one
    without a certificate and a connection that never speaks are each refused; an
    association already established over TLS meanwhile stores and releases."""
    first, second = write_ct_series(site.images / "concurrent", 2)
    ae = AE(ae_title="PYNET")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", site.tls_port, ae_title="QCNODE",
                         tls_args=(_client_context(site, site.ct2), "localhost"))
    assert assoc.is_established
    try:
        assert assoc.send_c_store(pydicom.dcmread(first)).Status == STATUS_SUCCESS
        idle = socket.create_connection(("127.0.0.1", site.tls_port))
        plain = storescu(site.tls_port, [second], aet="PLAIN")
        foreign = _storescu_tls(site, [second], site.foreign, aet="STORESCU")
        anonymous = subprocess.run(
            [str(DCMTK / "storescu"), "-aet", "STORESCU", "-aec", "QCNODE", "+tla",
             "+cf", str(site.ca.cert), "127.0.0.1", str(site.tls_port), str(second)],
            capture_output=True, text=True, timeout=60, check=False)
        for refused in (plain, foreign, anonymous):
            assert refused.returncode != 0, refused.stdout + refused.stderr
            assert not successes(refused.stdout + refused.stderr)
        assert not _in_spool(site, str(pydicom.dcmread(second).SOPInstanceUID))
        # The idle connection is closed once the ACSE timeout (2 s here) passed.
        idle.settimeout(15)
        with idle:
            assert idle.recv(1) == b""
        assert assoc.send_c_store(pydicom.dcmread(second)).Status == STATUS_SUCCESS
    finally:
        assoc.release()
    reasons = {e["reason"] for e in _log_events(site, "TLS handshake failed")}
    assert {"WRONG_VERSION_NUMBER", "CERTIFICATE_VERIFY_FAILED",
            "PEER_DID_NOT_RETURN_A_CERTIFICATE"} <= reasons
    assert _log_events(site, "TLS handshake timed out")
    _spooled(site, [first, second])


def _handshake(site: Site, ctx: ssl.SSLContext) -> tuple[str | None, str | None]:
    """(version, cipher) of a TLS handshake with the node, with ``ctx``."""
    ctx.load_cert_chain(str(site.ct2.cert), str(site.ct2.key))
    with socket.create_connection(("127.0.0.1", site.tls_port), timeout=10) as tcp, \
            ctx.wrap_socket(tcp, server_hostname="localhost") as sock:
        cipher = sock.cipher()
        return sock.version(), cipher[0] if cipher else None


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_bcp195_profile_tls12_suites_only_and_nothing_older(site: Site) -> None:
    """PS3.15 B.12 / RFC 9325: a TLS 1.2 client gets an ECDHE AES-GCM suite; one that
    offers only a CBC suite, or only TLS 1.1, gets no connection."""
    tls12 = ssl.create_default_context(cafile=str(site.ca.cert))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = _handshake(site, tls12)
    assert version == "TLSv1.2" and cipher in BCP195_CIPHERS
    cbc = ssl.create_default_context(cafile=str(site.ca.cert))
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
    with pytest.raises(ssl.SSLError):
        _handshake(site, cbc)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(site.ca.cert))
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        _handshake(site, old)


def test_bytes_left_inside_the_ssl_object_are_served(site: Site, tmp_path: Path) -> None:
    """The last bytes of a data set wait decrypted inside the SSL object, none in the
    socket: epoll never reports them; the loop must read them itself (``pending()``).

    The stream after A-ASSOCIATE-AC is sent as a small TLS record of k bytes, then
    16 full records, while the node is stopped (SIGSTOP): it then reads k + 15 records
    and 16384 - k bytes of the last one into its 256 KiB buffer, and k bytes stay in
    the SSL object — exactly the end of the data set, which the sender waits on.
    """
    ds, raw = _dataset_bytes(write_ct_series(tmp_path / "big", 1, size=362)[0])
    uid = str(ds.SOPInstanceUID)
    stream = (_pdu(_pdv(0x03, _store_rq(CTImageStorage, uid, 7)))
              + _pdu(_pdv(0x02, raw)))
    head = len(stream) - BUFFER_BYTES
    assert 0 < head < RECORD
    ctx = _client_context(site, site.ct2)
    with socket.create_connection(("127.0.0.1", site.tls_port), timeout=20) as tcp, \
            ctx.wrap_socket(tcp, server_hostname="localhost") as sock:
        sock.sendall(_associate_rq(0, CTImageStorage).replace(b"RAWPEER".ljust(16),
                                                               b"PYNET".ljust(16)))
        assert _read_pdu(sock)[0] == ul.A_ASSOCIATE_AC
        os.kill(site.node.proc.pid, signal.SIGSTOP)
        try:
            sock.sendall(stream[:head])
            sock.sendall(stream[head:])  # 16 records of 16384 bytes
        finally:
            os.kill(site.node.proc.pid, signal.SIGCONT)
        fields = _response(sock)  # times out (20 s) if the last k bytes are never read
        assert int.from_bytes(fields[0x0900], "little") == STATUS_SUCCESS
        sock.sendall(bytes([ul.A_RELEASE_RQ, 0]) + (4).to_bytes(4, "big") + bytes(4))
        assert _read_pdu(sock)[0] == ul.A_RELEASE_RP
    wait_for(lambda: _in_spool(site, uid), timeout=30, what="the data set spooled")


# config check --------------------------------------------------------------------------
def _config(tmp: Path, cert: Issued, ca: Path, key: Path | None = None) -> Path:
    path = tmp / "qcnode.toml"
    path.write_text(f'[node]\nhome = "{tmp / "home"}"\ntls_port = 2762\n\n[node.tls]\n'
                    f'cert_file = "{cert.cert}"\nkey_file = "{key or cert.key}"\n'
                    f'ca_file = "{ca}"\n', encoding="utf-8")
    return path


def test_config_check_accepts_good_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         ) -> None:
    ca = make_ca(tmp_path, "site")
    good = issue(ca, tmp_path, "server")
    assert cli.main(["config", "check", str(_config(tmp_path, good, ca.cert))]) == 0
    assert "OK" in capsys.readouterr().out


def test_config_check_flags_expired_and_not_yet_valid_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    ca = make_ca(tmp_path, "site")
    now = dt.datetime.now(dt.UTC)
    expired = issue(ca, tmp_path, "expired", not_before=now - dt.timedelta(days=400),
                    not_after=now - dt.timedelta(days=2))
    assert cli.main(["config", "check", str(_config(tmp_path, expired, ca.cert))]) == 1
    err = capsys.readouterr().err
    assert "line 6: node.tls.cert_file: certificate expired on" in err
    future = issue(ca, tmp_path, "future", not_before=now + dt.timedelta(days=3),
                   not_after=now + dt.timedelta(days=30))
    assert cli.main(["config", "check", str(_config(tmp_path, future, ca.cert))]) == 1
    assert "node.tls.cert_file: certificate is not valid before" in capsys.readouterr().err


def test_config_check_flags_missing_files_and_a_key_of_another_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    ca = make_ca(tmp_path, "site")
    server, other = issue(ca, tmp_path, "server"), issue(ca, tmp_path, "other")
    config = _config(tmp_path, server, tmp_path / "missing-ca.pem", key=other.key)
    assert cli.main(["config", "check", str(config)]) == 1
    err = capsys.readouterr().err
    assert "line 7: node.tls.key_file: " in err and "is not the key of the certificate" in err
    assert "line 8: node.tls.ca_file: cannot read" in err
    (tmp_path / "junk.pem").write_text("not a certificate")
    bad = Issued(tmp_path / "junk.pem", server.key)
    assert cli.main(["config", "check", str(_config(tmp_path, bad, ca.cert))]) == 1
    assert "node.tls.cert_file: " in (err := capsys.readouterr().err)
    assert "holds no PEM certificate" in err


# Who may call over TLS (fast, no node) ----------------------------------------------
def test_sender_tls_name_rule() -> None:
    """An entry with ``tls_name`` admits only a caller whose verified certificate
    names it (case-insensitive), and nothing on the plain port; one without admits
    any certificate."""
    named = SenderSettings(ae_title="CT1", host="10.1.0.0/16", tls_name="CT1.Example")
    assert named.admits("CT1", "10.1.2.3", frozenset({"ct1.example"}))
    assert not named.admits("CT1", "10.1.2.3", frozenset({"ct2.example"}))
    assert not named.admits("CT1", "10.1.2.3", frozenset())
    assert not named.admits("CT1", "10.1.2.3")  # the plain port
    assert not named.admits("CT1", "10.2.0.1", frozenset({"ct1.example"}))  # wrong host
    anyone = SenderSettings(ae_title="CT1", host="10.1.0.0/16")
    assert anyone.admits("CT1", "10.1.2.3", frozenset({"whoever"}))
    assert anyone.admits("CT1", "10.1.2.3")


def test_peer_names_are_subject_cn_and_dns_sans_only() -> None:
    cert = {"subject": ((("countryName", "CH"),), (("commonName", "CT1"),)),
            "subjectAltName": (("DNS", "CT1.radiology.example"), ("IP Address", "10.1.2.3"),
                               ("email", "ct@example"))}
    assert peer_names(cert) == {"ct1", "ct1.radiology.example"}
    assert peer_names({}) == frozenset() and peer_names(None) == frozenset()


def test_serve_refuses_to_start_with_an_unusable_key(tmp_path: Path) -> None:
    """A key that is not the certificate's: ``qcnode serve`` says which key and line,
    and does not start (it could not build its TLS context)."""
    ca = make_ca(tmp_path, "site")
    server, other = issue(ca, tmp_path, "server"), issue(ca, tmp_path, "other")
    config = _config(tmp_path, server, ca.cert, key=other.key)
    run = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == EXIT_CONFIG, run.stderr
    assert "not starting" in run.stderr
    assert "line 7: node.tls.key_file: " in run.stderr
