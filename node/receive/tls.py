"""DICOM over TLS on the listener's second port (PS3.15 Annex B, the BCP 195 profiles).

PS3.15 B.12 "BCP 195 RFC 8996, 9325 TLS Secure Transport Connection Profile" (and its
"Modified" variant B.13) asks of a server: TLS 1.2 at least, TLS 1.3 preferred when the
client offers it, BCP 195's cipher suites (RFC 9325 §4.2: ECDHE key exchange with
AES-GCM), no TLS-level compression (RFC 9325 §3.3, CRIME) and no insecure renegotiation
(§3.5). :func:`server_context` builds that context with :mod:`ssl`:

* ``minimum_version = TLSv1_2``; OpenSSL picks 1.3 when both sides have it;
* TLS 1.2 suites: :data:`BCP195_TLS12_CIPHERS` only (no RSA key transport, no CBC, no
  DHE — B.13 forbids DHE where its key length cannot be set); the server's order wins;
* TLS 1.3 suites: OpenSSL's defaults (AES-256-GCM, ChaCha20-Poly1305, AES-128-GCM),
  the ones B.13 has servers support (Python cannot narrow them further);
* ``OP_NO_COMPRESSION``, ``OP_NO_RENEGOTIATION``; no session tickets (a DICOM sender
  does not resume sessions; a ticket would be one more write per connection);
* ``ca_file`` verifies the senders' certificates: required with
  ``require_client_cert`` (a sender without one is refused in the handshake), else
  checked when one is offered.

The handshake runs in the listener's event loop (:class:`Handshake`, driven by
:class:`node.receive.acceptor_server.AcceptorServer`): each step does what the socket allows
and says whether it waits to read or to write; it must finish within the ACSE timeout,
so a silent or plain-DICOM client on the TLS port is dropped without delaying anyone.
Then the connection becomes an ordinary :class:`node.receive.acceptor.Connection` over
:class:`NonBlockingSSLSocket`, which looks like a non-blocking plain socket to it.

Who may call (PS3.15 B.1: the certificate's significance is the site's policy): a
``[[senders]]`` entry with ``tls_name`` admits only a caller whose *verified*
certificate has that name as its subject CN or as a subjectAltName dNSName
(case-insensitive, no wildcards); entries without it admit any caller that passed the
handshake (and nothing about the plain port changes). :class:`IdentifiedServices`
hands the names to :meth:`node.receive.scp.Listener.admits`.
"""

from __future__ import annotations

import errno
import selectors
import ssl
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from node.config import ListenerTlsSettings
from node.receive.acceptor import EventReport, Incoming, Peer, Services, StoreRequest

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

#: TLS 1.2 cipher suites of BCP 195 (RFC 9325 §4.2), by their OpenSSL names:
#: TLS_ECDHE_{ECDSA,RSA}_WITH_AES_{128_GCM_SHA256,256_GCM_SHA384}.
BCP195_TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
)


def server_context(tls: ListenerTlsSettings) -> ssl.SSLContext:
    """The TLS port's server context (see the module documentation).

    Raises ``OSError`` / ``ssl.SSLError`` when a file is missing, unreadable, or the
    key does not match the certificate (``qcnode config check`` names which).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(":".join(BCP195_TLS12_CIPHERS))
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                    | ssl.OP_CIPHER_SERVER_PREFERENCE)
    ctx.num_tickets = 0
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.sslsocket_class = NonBlockingSSLSocket
    return ctx


def _would_block(exc: ssl.SSLError) -> BlockingIOError:
    return BlockingIOError(errno.EAGAIN, f"TLS: {type(exc).__name__}")


class NonBlockingSSLSocket(ssl.SSLSocket):
    """An :class:`ssl.SSLSocket` the event loop treats like a plain non-blocking one.

    "Would block" is ``BlockingIOError`` (not ``SSLWantReadError``), and a read takes
    every record already decrypted or waiting in the socket, up to the buffer's size:
    one ``SSL_read`` returns at most one record (16 KiB), the connection's buffer holds
    256 KiB. What is left inside the SSL object (``pending()``) is invisible to epoll:
    the loop serves it without waiting (:meth:`AcceptorServer._serve_buffered`).
    """

    def recv_into(self, buffer: WriteableBuffer, nbytes: int | None = None, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        limit = nbytes or len(view)
        total = 0
        while total < limit:
            try:
                count = super().recv_into(view[total:limit], limit - total, flags)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                if total:
                    break
                raise _would_block(exc) from exc
            if count == 0:  # the peer closed: what came before it first, then 0
                break
            total += count
        return total

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
            raise _would_block(exc) from exc


def peer_names(cert: dict[str, Any] | None) -> frozenset[str]:
    """The lower-cased subject CNs and subjectAltName dNSNames of a verified peer
    certificate (``SSLSocket.getpeercert()``; empty when none was verified)."""
    if not cert:
        return frozenset()
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"}
    names |= {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    return frozenset(name.lower() for name in names)


def failure_reason(exc: BaseException) -> str:
    """A short reason for a failed handshake: OpenSSL's reason code (e.g.
    ``WRONG_VERSION_NUMBER`` for a plain client, ``CERTIFICATE_VERIFY_FAILED``),
    else the error's class. Never a certificate's contents."""
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else type(exc).__name__


class Handshake:
    """One accepted TLS connection until its handshake is done (or failed, or timed out).

    The loop calls :meth:`step` when :attr:`events` says the socket is ready; it
    returns what to wait for next, 0 once the handshake is complete.
    """

    def __init__(self, sock: ssl.SSLSocket, host: str, over_limit: bool,
                 timeout: float) -> None:
        self.sock, self.host, self.over_limit = sock, host, over_limit
        self.fd = sock.fileno()
        self.deadline = time.monotonic() + timeout
        self.events = 0  # what the event loop watches the socket for

    def step(self) -> int:
        """Advance the handshake; raises ``OSError`` (``ssl.SSLError``) when it fails."""
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            return selectors.EVENT_WRITE
        return 0

    def names(self) -> frozenset[str]:
        """The names of the sender's verified certificate (:func:`peer_names`)."""
        return peer_names(self.sock.getpeercert())


class TlsServices(Services, Protocol):
    """The node's services, whose admission also takes the certificate's names."""

    def admits(self, calling_ae: str, address: str,
               tls_names: frozenset[str] | None = None
               ) -> Mapping[str, tuple[str, ...]] | None: ...


class TlsPort:
    """What the listener needs for its TLS port: port, context, services."""

    def __init__(self, port: int, context: ssl.SSLContext, services: TlsServices) -> None:
        self.port, self.context, self.services = port, context, services

    def wrap(self, client: Any) -> ssl.SSLSocket:
        """``client`` (accepted, non-blocking) as the server side of a TLS connection
        whose handshake the loop drives."""
        return self.context.wrap_socket(client, server_side=True,
                                        do_handshake_on_connect=False)

    def services_for(self, names: frozenset[str]) -> Services:
        """The services of one connection whose certificate carries ``names``."""
        return IdentifiedServices(self.services, names)


class IdentifiedServices:
    """:class:`TlsServices` for one TLS connection: :meth:`admits` passes on the
    names of its verified certificate; everything else is the node's."""

    def __init__(self, services: TlsServices, names: frozenset[str]) -> None:
        self._services, self.names = services, names

    def admits(self, calling_ae: str, address: str) -> Mapping[str, tuple[str, ...]] | None:
        return self._services.admits(calling_ae, address, self.names)

    def event_report(self, peer: Peer, report: EventReport) -> int:
        return self._services.event_report(peer, report)

    def known_host(self, address: str) -> bool:
        return self._services.known_host(address)

    def opened(self, peer: Peer) -> None:
        self._services.opened(peer)

    def closed(self, peer: Peer, *, aborted: bool) -> None:
        self._services.closed(peer, aborted=aborted)

    def echo(self, peer: Peer) -> int:
        return self._services.echo(peer)

    def incoming(self, peer: Peer, part10_header: bytes) -> Incoming:
        return self._services.incoming(peer, part10_header)

    def store(self, peer: Peer, request: StoreRequest) -> int:
        return self._services.store(peer, request)

    def error_comment(self, status: int) -> str | None:
        return self._services.error_comment(status)
