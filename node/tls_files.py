"""Checks of the TLS port's files (``[node.tls]``) before they are used.

``qcnode config check`` reports, each at its key (``node.tls.cert_file`` …) and line:
a file that is missing or unreadable; a certificate or CA file that holds no PEM
certificate; a key file that holds no unencrypted PEM private key; a key that is not
the certificate's; a certificate (the node's own, or a CA's) that is expired or not
yet valid. ``qcnode serve`` refuses to start on the first kinds (it could not build
its TLS context) and logs the dates as a warning (the plain port still serves).

Parsing uses ``cryptography`` (a dependency of the node); nothing here reads a
certificate into a log except its file's key path and its validity dates.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from node.config import ListenerTlsSettings, Settings
from node.config_errors import Loc, Problem, line_of, toml_lines

_TLS: Loc = ("node", "tls")


def _read(path: Path, key: str, problems: list[tuple[Loc, str]]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        problems.append(((*_TLS, key), f"cannot read {path}: {exc.strerror}"))
        return None


def _certificates(data: bytes, path: Path, key: str,
                  problems: list[tuple[Loc, str]]) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        problems.append(((*_TLS, key), f"{path} holds no PEM certificate"))
        return []


def _public_key_der(public: object) -> bytes:
    return public.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def file_problems(tls: ListenerTlsSettings) -> tuple[list[tuple[Loc, str]],
                                                     list[x509.Certificate],
                                                     list[x509.Certificate]]:
    """Problems with the files themselves, and the certificates read (own, CA)."""
    problems: list[tuple[Loc, str]] = []
    own: list[x509.Certificate] = []
    cas: list[x509.Certificate] = []
    data = _read(tls.cert_file, "cert_file", problems)
    if data is not None:
        own = _certificates(data, tls.cert_file, "cert_file", problems)
    key_data = _read(tls.key_file, "key_file", problems)
    if key_data is not None:
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError):
            problems.append(((*_TLS, "key_file"), f"{tls.key_file} holds no unencrypted "
                             "PEM private key"))
        else:
            if own and _public_key_der(key.public_key()) != _public_key_der(
                    own[0].public_key()):
                problems.append(((*_TLS, "key_file"), f"{tls.key_file} is not the key of "
                                 f"the certificate in {tls.cert_file}"))
    if tls.ca_file is not None:
        ca_data = _read(tls.ca_file, "ca_file", problems)
        if ca_data is not None:
            cas = _certificates(ca_data, tls.ca_file, "ca_file", problems)
    return problems, own, cas


def date_problems(key: str, certificates: Sequence[x509.Certificate],
                  now: dt.datetime) -> list[tuple[Loc, str]]:
    """A certificate of ``certificates`` (read from ``node.tls.<key>``) that is
    expired or not yet valid at ``now``."""
    problems: list[tuple[Loc, str]] = []
    for index, cert in enumerate(certificates):
        which = "certificate" if len(certificates) == 1 else f"certificate {index + 1}"
        if cert.not_valid_after_utc < now:
            problems.append(((*_TLS, key), f"{which} expired on "
                             f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"))
        elif cert.not_valid_before_utc > now:
            problems.append(((*_TLS, key), f"{which} is not valid before "
                             f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"))
    return problems


def check(settings: Settings, config_text: str = "", *, dates: bool = True,
          now: dt.datetime | None = None) -> list[Problem]:
    """Every problem of ``[node.tls]``'s files (and, with ``dates``, of their
    certificates' validity), located at their key and line of ``config_text``."""
    tls = settings.node.tls
    if tls is None:
        return []
    found, own, cas = file_problems(tls)
    if dates:
        moment = now or dt.datetime.now(dt.UTC)
        found += date_problems("cert_file", own, moment) + date_problems("ca_file", cas,
                                                                           moment)
    lines = toml_lines(config_text)
    return [Problem(".".join(str(p) for p in loc), message, line_of(loc, lines))
            for loc, message in found]
