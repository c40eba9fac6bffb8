"""TLS contexts of both peers: the servers' (the receiver's HTTPS, the sender's DICOM node) and
the clients' (the sender and ``dlad-link`` towards an HTTPS receiver).

Both follow BCP 195 (RFC 9325, the IETF's recommendations for TLS; also what DICOM's PS3.15
Annex B profiles refer to): TLS 1.2 or later, never SSL 3, TLS 1.0 or 1.1; the cipher suites are
Python's defaults (forward-secret AEAD suites).

A server context is built on ``ssl.SSLContext(PROTOCOL_TLS_SERVER)`` with exactly what it needs,
not on ``ssl.create_default_context(Purpose.CLIENT_AUTH)``: client verification must trust the
given CA file and nothing else (mutual TLS as IHE ATNA nodes do it: only the hospital's own CA),
never the system's store, where any certificate a public CA signed would pass; without a client
CA no CA is loaded at all, since client certificates are then never asked for. Python documents
``create_default_context``'s settings as liable to change without notice (today it leaves the
store empty for servers only because it does not verify clients), and it writes every session's
keys to the file ``SSLKEYLOGFILE`` names when that variable is set: a debugging hook a server
that carries patient data does not honour.

A client context verifies the server's certificate and host name against the CA file given
(a hospital's own CA), or against the system's store when none is given (a receiver with a
public certificate); it is Python's default client context, ``SSLKEYLOGFILE`` included (the
sender's own keys, for whoever debugs its side of a connection).

Errors are one line naming the command-line option at fault, as the callers print them::

    cannot use --tls-cert cert.pem / --tls-key key.pem: No such file or directory
"""

from __future__ import annotations

import ssl
from pathlib import Path

#: Oldest protocol accepted on either side (BCP 195: TLS 1.2 or later).
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def _reason(error: OSError) -> str:
    """``No such file or directory`` rather than ``[Errno 2] No such file or directory``;
    OpenSSL's own text (``[X509: KEY_VALUES_MISMATCH] key values mismatch``) for the rest."""
    return getattr(error, "strerror", None) or str(error)


def server_tls_context(cert: str | Path, key: str | Path, client_ca: str | Path | None = None, *,
                       options: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--tls-ca")
                       ) -> ssl.SSLContext:
    """A server's TLS context: TLS 1.2 or later, this certificate chain and key, and with
    ``client_ca`` a client certificate signed by that CA required (mutual TLS).

    No system CA is ever loaded (see the module docstring): with ``client_ca`` the context
    trusts exactly the certificates of that file, without it none, and clients are not asked
    for a certificate.

    Args:
        cert: PEM file of the server's certificate, followed by any intermediate certificates.
        key: PEM file of its private key (unencrypted: a service starts unattended).
        client_ca: PEM file of the CA(s) whose client certificates are accepted, or None to
            accept any client (which then proves itself otherwise, e.g. with a bearer token).
        options: the command-line options that gave ``cert``, ``key`` and ``client_ca``, named
            by the error messages (``dlad-send`` has ``--dicom-tls-cert`` ..., ``dlad-receive``
            ``--tls-cert`` ...).

    Raises:
        ValueError: in one line, naming the options, when a file is missing or unreadable, is
            not PEM, or when the key does not belong to the certificate.

    Example:
        >>> context = server_tls_context("cert.pem", "key.pem")  # doctest: +SKIP
        >>> context.minimum_version, context.verify_mode  # doctest: +SKIP
        (<TLSVersion.TLSv1_2: 771>, <VerifyMode.CERT_NONE: 0>)
    """
    cert_option, key_option, ca_option = options
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot use {cert_option} {cert} / {key_option} {key}: "
                         f"{_reason(error)}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(str(client_ca))
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"cannot use {ca_option} {client_ca}: {_reason(error)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_context(ca_file: str | Path | None = None, *, option: str = "--ca-file"
                       ) -> ssl.SSLContext:
    """A client's TLS context: TLS 1.2 or later, the server's certificate and host name verified
    against the CAs of ``ca_file``, or against the system's store when it is None.

    Args:
        ca_file: PEM file of the CA(s) that signed the server's certificate (a hospital's own
            CA, a self-signed receiver), or None for the system's store.
        option: the command-line option that gave ``ca_file``, named by the error message.

    Raises:
        ValueError: in one line, naming ``option``, when ``ca_file`` is missing, unreadable or
            holds no certificate.
    """
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=None if ca_file is None else str(ca_file))
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot use {option} {ca_file}: {_reason(error)}") from None
    context.minimum_version = MINIMUM_VERSION
    return context
