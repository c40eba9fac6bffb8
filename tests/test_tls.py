"""shared/tls.py: the TLS contexts of both peers' servers and clients.

The properties (TLS 1.2 or later, client certificates required exactly when a client CA is
given, no CA of the system's store trusted by a server), the one-line errors naming each
command line's own options, and real handshakes on loopback, bounded in time.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl

import pytest
from attack_helpers import make_certificate

from shared.tls import client_tls_context, server_tls_context

DICOM_OPTIONS = ("--dicom-tls-cert", "--dicom-tls-key", "--dicom-tls-ca")
#: A 256-bit token for dlad-receive (it refuses weaker ones).
TOKEN = secrets.token_hex(32)
#: Seconds any one handshake or exchange of the loopback tests may take.
TIMEOUT_S = 10.0


@pytest.fixture()
def certs(tmp_path):
    """Self-signed certificates (each its own CA): the server's, a client the server's CA file
    names, an intruder it does not, and one standing for a public CA of the system's store."""
    return {name: make_certificate(tmp_path / name, name=name)
            for name in ("server", "ct-room-3", "intruder", "system-ca")}


@pytest.fixture()
def system_store(certs, tmp_path, monkeypatch):
    """Point OpenSSL's default store (what ``load_default_certs`` reads) at the "system-ca"
    certificate alone, so that a context that loads the system's store shows it."""
    empty = tmp_path / "no-system-certs"
    empty.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["system-ca"][0]))
    monkeypatch.setenv("SSL_CERT_DIR", str(empty))
    # The checks below have teeth: a server context that loads the system's store shows it.
    control = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    control.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    assert [common_name(ca) for ca in control.get_ca_certs()] == ["system-ca"]


def common_name(certificate: dict) -> str:
    """The subject's CN of a certificate as ``SSLContext.get_ca_certs``/``getpeercert`` give it."""
    return dict(field for rdn in certificate.get("subject", ()) for field in rdn)["commonName"]


# --- properties ----------------------------------------------------------------------------------

def test_server_context_without_client_ca_loads_no_ca(certs, system_store):
    context = server_tls_context(*certs["server"])
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    assert context.get_ca_certs() == []
    assert context.cert_store_stats() == {"x509": 0, "crl": 0, "x509_ca": 0}


def test_server_context_with_client_ca_trusts_that_ca_alone(certs, system_store):
    context = server_tls_context(*certs["server"], client_ca=certs["ct-room-3"][0])
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert [common_name(ca) for ca in context.get_ca_certs()] == ["ct-room-3"]
    assert context.cert_store_stats() == {"x509": 1, "crl": 0, "x509_ca": 1}


def test_server_context_writes_no_session_keys(certs, tmp_path, monkeypatch):
    """``SSLKEYLOGFILE`` (which ``ssl.create_default_context`` honours) does not make a server
    write its session keys."""
    monkeypatch.setenv("SSLKEYLOGFILE", str(tmp_path / "keys.log"))
    assert server_tls_context(*certs["server"]).keylog_filename is None
    assert ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).keylog_filename is not None


def test_client_context_trusts_the_ca_file_or_else_the_system_store(certs, system_store):
    given = client_tls_context(certs["server"][0])
    assert given.minimum_version == ssl.TLSVersion.TLSv1_2
    assert given.verify_mode == ssl.CERT_REQUIRED and given.check_hostname
    assert [common_name(ca) for ca in given.get_ca_certs()] == ["server"]
    system = client_tls_context()
    assert system.minimum_version == ssl.TLSVersion.TLSv1_2
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname
    assert [common_name(ca) for ca in system.get_ca_certs()] == ["system-ca"]


# --- one-line errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("missing cert", "cannot use --dicom-tls-cert {missing} / --dicom-tls-key {key}: "
                     "No such file or directory"),
    ("missing key", "cannot use --dicom-tls-cert {cert} / --dicom-tls-key {missing}: "
                    "No such file or directory"),
    ("key of another certificate", "cannot use --dicom-tls-cert {cert} / --dicom-tls-key "
                                   "{other_key}: [X509: KEY_VALUES_MISMATCH] key values mismatch"),
    ("key given as the certificate", "cannot use --dicom-tls-cert {key} / --dicom-tls-key {key}: "
                                     "[SSL] PEM lib"),
    ("missing client CA", "cannot use --dicom-tls-ca {missing}: No such file or directory"),
    ("client CA file without a certificate", "cannot use --dicom-tls-ca {key}: "
                                             "[X509: NO_CERTIFICATE_OR_CRL_FOUND]"),
])
def test_server_context_errors_are_one_line_and_name_the_options(certs, tmp_path, case, message):
    (cert, key), other_key = certs["server"], certs["intruder"][1]
    missing = tmp_path / "missing.pem"
    arguments = {"missing cert": (missing, key), "missing key": (cert, missing),
                 "key of another certificate": (cert, other_key),
                 "key given as the certificate": (key, key),
                 "missing client CA": (cert, key, missing),
                 "client CA file without a certificate": (cert, key, key)}[case]
    with pytest.raises(ValueError) as raised:
        server_tls_context(*arguments, options=DICOM_OPTIONS)
    text = str(raised.value)
    assert "\n" not in text
    assert text.startswith(message.format(cert=cert, key=key, other_key=other_key,
                                          missing=missing)), text


def test_errors_name_the_default_options(certs, tmp_path):
    """Without ``options`` the receiver's (``--tls-cert``/``--tls-key``) and the client's
    ``--ca-file`` are named."""
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=f"^cannot use --tls-cert {missing} / --tls-key "):
        server_tls_context(missing, certs["server"][1])
    with pytest.raises(ValueError, match=f"^cannot use --ca-file {missing}: No such file"):
        client_tls_context(missing)
    with pytest.raises(ValueError, match=f"^cannot use --signaling-ca {missing}: "):
        client_tls_context(missing, option="--signaling-ca")


# --- real handshakes on loopback ---------------------------------------------------------------------

async def serve_and_connect(server: ssl.SSLContext, clients: dict[str, ssl.SSLContext]
                            ) -> tuple[dict[str, str], list[str]]:
    """Serve ``server`` on 127.0.0.1; each client connects and reads the greeting, which names
    the client certificate the server saw. Returns {client: greeting or "refused: why"} and the
    names the server greeted."""
    greeted = []

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        name = common_name(peer) if peer else "anonymous"
        greeted.append(name)
        writer.write(f"hello {name}\n".encode())
        await writer.drain()
        writer.close()

    async def exchange(context: ssl.SSLContext) -> str:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, ssl_handshake_timeout=TIMEOUT_S)
        except (ssl.SSLError, ConnectionError) as error:
            return f"refused: {error}"
        try:
            # TLS 1.3: the client's handshake ends before the server has checked the client's
            # certificate; a refusal arrives as an alert on the first read.
            line = await asyncio.wait_for(reader.readline(), TIMEOUT_S)
        except (ssl.SSLError, ConnectionError) as error:
            return f"refused: {error}"
        finally:
            writer.close()
        return line.decode().strip() or "refused: closed without a word"

    listener = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=server,
                                          ssl_handshake_timeout=TIMEOUT_S)
    port = listener.sockets[0].getsockname()[1]
    try:
        answers = {name: await exchange(context) for name, context in clients.items()}
    finally:
        listener.close()
        await listener.wait_closed()
    return answers, greeted


def client_context(certs, server: str, identity: str | None = None) -> ssl.SSLContext:
    """A client that trusts ``server``'s certificate and presents ``identity``'s, if any."""
    context = client_tls_context(certs[server][0])
    if identity is not None:
        context.load_cert_chain(*certs[identity])
    return context


def test_a_required_client_certificate_is_checked_in_a_real_handshake(certs):
    """With a client CA, the client that CA signed is served; a client without a certificate
    and one whose certificate another CA signed are refused by the handshake itself."""
    server = server_tls_context(*certs["server"], client_ca=certs["ct-room-3"][0],
                                options=DICOM_OPTIONS)
    clients = {"signed": client_context(certs, "server", "ct-room-3"),
               "anonymous": client_context(certs, "server"),
               "intruder": client_context(certs, "server", "intruder")}
    answers, greeted = asyncio.run(asyncio.wait_for(serve_and_connect(server, clients),
                                                    6 * TIMEOUT_S))
    assert answers["signed"] == "hello ct-room-3"
    assert answers["anonymous"].startswith("refused"), answers
    assert answers["intruder"].startswith("refused"), answers
    assert greeted == ["ct-room-3"]


def test_without_a_client_ca_any_client_is_served_and_the_server_is_verified(certs):
    """Without a client CA a client without a certificate is served (it proves itself with a
    bearer token instead); a client that does not trust the server's certificate refuses it."""
    server = server_tls_context(*certs["server"])
    clients = {"anonymous": client_context(certs, "server"),
               "trusting another CA": client_context(certs, "intruder")}
    answers, greeted = asyncio.run(asyncio.wait_for(serve_and_connect(server, clients),
                                                    4 * TIMEOUT_S))
    assert answers["anonymous"] == "hello anonymous"
    assert answers["trusting another CA"].startswith("refused: [SSL: CERTIFICATE_VERIFY_FAILED]")
    assert greeted == ["anonymous"]


# --- each command line names its own options ---------------------------------------------------------

def test_dlad_send_names_its_dicom_tls_options(certs, tmp_path, capsys):
    from sender.cli import main

    (cert, key), missing = certs["server"], tmp_path / "missing.pem"
    common = ["--dicom-listen", "127.0.0.1:0", "--to", "http://127.0.0.1:9", "--token-file",
              str(tmp_path / "token.txt"), "--spool", str(tmp_path / "spool")]
    assert main(common + ["--dicom-tls-cert", str(missing), "--dicom-tls-key", str(key)]) == 1
    assert capsys.readouterr().err == (f"dlad-send: error: cannot use --dicom-tls-cert {missing} "
                                       f"/ --dicom-tls-key {key}: No such file or directory\n")
    assert main(common + ["--dicom-tls-cert", str(cert), "--dicom-tls-key", str(key),
                          "--dicom-tls-ca", str(missing)]) == 1
    assert capsys.readouterr().err == (f"dlad-send: error: cannot use --dicom-tls-ca {missing}: "
                                       "No such file or directory\n")
    assert not (tmp_path / "spool").exists()  # refused before anything is written


def test_dlad_receive_names_its_tls_options(certs, tmp_path, capsys):
    from receiver.cli import main

    token = tmp_path / "token.txt"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    cert, other_key = certs["server"][0], certs["intruder"][1]
    out = tmp_path / "received"
    assert main(["--listen", "127.0.0.1:0", "--token-file", str(token), "--out-dir", str(out),
                 "--tls-cert", str(cert), "--tls-key", str(other_key)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"dlad-receive: error: cannot use --tls-cert {cert} / --tls-key "
                            f"{other_key}: [X509: KEY_VALUES_MISMATCH] key values mismatch"), error
    assert error.count("\n") == 1
    assert not out.exists()
