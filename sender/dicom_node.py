"""``dlad-send --dicom-listen``: a DICOM C-STORE SCP that takes CT images from a scanner or PACS.

The node (pynetdicom) accepts associations for **CT Image Storage** and **Verification** (C-ECHO)
only, in every transfer syntax the installed decoders read (:func:`accepted_transfer_syntaxes`:
implicit and explicit VR little endian, deflated, big endian, JPEG lossless and extended, JPEG-LS,
JPEG 2000, HTJ2K, RLE). The dataset is kept exactly as received: the scanner's transfer syntax
(JPEG 2000 stays JPEG 2000 in the spool), every attribute, the pixel data's bytes.

For each C-STORE, in order (the status the scanner gets, and the log line the admin reads):

1. the dataset parses, is a CT image (``Modality`` CT, single frame, with pixel data, position,
   orientation and spacing) and its UIDs are valid, else ``0xA900`` ("dataset does not match SOP
   class") or ``0xC000`` ("cannot understand"), with the reason in the log and in the status's
   ErrorComment;
2. its pixel data decodes (so that an image accepted is an image the sender can use), else
   ``0xC000``;
3. there is room (open series, instances per series, spool size and free disk), else ``0xA700``
   ("out of resources": the scanner keeps the image and may retry);
4. it is written to the spool, fsync'd (:mod:`sender.spool`), and only then answered ``0x0000``
   and handed to the :class:`~sender.live.SeriesCollector`.

Associations proposing other SOP classes (MR, PET, secondary capture, enhanced CT...) get those
presentation contexts rejected by the negotiation ("abstract syntax not supported"), and a log
line names them and the calling AE: the scanner's own log says the same.

Who may push: any host and calling AE title unless the administrator narrows it, as for any DICOM
node of a hospital network: ``--dicom-allow-hosts`` (addresses or CIDR networks; a connection
from elsewhere is closed before any DICOM is read, and logged) and ``--dicom-allow-ae`` (calling
AE titles; an association from another title is rejected, "calling AE title not recognised",
and logged).

DICOM over TLS (PS3.15 Annex B, BCP 195: TLS 1.2 or later): ``--dicom-tls-cert/--dicom-tls-key``,
and with ``--dicom-tls-ca`` only peers whose certificate that CA signed (mutual TLS, as IHE ATNA
nodes do). The handshake runs in the association's own thread with a time limit
(:data:`TLS_HANDSHAKE_S`), after the host check: a peer that connects and stays silent cannot
hold up the node's accept loop (pynetdicom's own server would do the handshake there).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time
from dataclasses import dataclass

from sender.series import Arrival, SeriesCollector
from sender.spool import Spool, SpoolError, valid_uid

log = logging.getLogger("dlad.sender")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
UID_NAMES = {CT_IMAGE_STORAGE: "CT Image Storage", VERIFICATION: "Verification SOP Class"}
#: C-STORE statuses (PS3.4 Annex B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: Candidate transfer syntaxes, in the order the node prefers them; those without an installed
#: decoder are left out.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.4.90",    # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.201",   # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",   # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.80",    # JPEG-LS lossless
    "1.2.840.10008.1.2.4.70",    # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.57",    # JPEG lossless
    "1.2.840.10008.1.2.5",       # RLE lossless
    "1.2.840.10008.1.2.1",       # explicit VR little endian
    "1.2.840.10008.1.2",         # implicit VR little endian
    "1.2.840.10008.1.2.1.99",    # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",       # explicit VR big endian (retired, still sent by old scanners)
    "1.2.840.10008.1.2.4.91",    # JPEG 2000 (lossy allowed)
    "1.2.840.10008.1.2.4.203",   # HTJ2K
    "1.2.840.10008.1.2.4.81",    # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.51",    # JPEG extended (12-bit, lossy)
    "1.2.840.10008.1.2.4.50",    # JPEG baseline (8-bit, lossy)
)
#: Largest encoded instance accepted (bytes): a 1024 x 1024 16-bit slice is 2 MiB uncompressed.
MAX_INSTANCE_BYTES = 64 * 1024 * 1024
#: Seconds a peer has to complete the TLS handshake: a few round trips on any network.
TLS_HANDSHAKE_S = 15.0


def parse_hosts(text: str) -> tuple:
    """``"10.1.2.0/24,10.1.3.7"`` -> networks (``--dicom-allow-hosts``); ValueError names the
    bad part."""
    networks = []
    for part in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"--dicom-allow-hosts: {part!r} is not an address or CIDR "
                             "network") from None
    if not networks:
        raise ValueError("--dicom-allow-hosts needs at least one address or CIDR network")
    return tuple(networks)


def check_ae_title(title: str, option: str = "--ae-title") -> str:
    """``title`` if it is a valid AE title (1 to 16 printable characters, no backslash)."""
    if not 0 < len(title.strip()) <= 16 or not title.isprintable() or "\\" in title:
        raise ValueError(f"{option}: an AE title has 1 to 16 printable characters, got "
                         f"{title!r}")
    return title.strip()


def parse_ae_titles(text: str) -> list[str]:
    """``"CT01,CT02"`` -> AE titles (``--dicom-allow-ae``)."""
    titles = [check_ae_title(part, "--dicom-allow-ae") for part in text.split(",") if part]
    if not titles:
        raise ValueError("--dicom-allow-ae needs at least one AE title")
    return titles


def host_allowed(host: str, networks: tuple | None) -> bool:
    """Whether a peer at ``host`` may connect (an IPv4-mapped IPv6 address counts as IPv4)."""
    if networks is None:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def accepted_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes of :data:`TRANSFER_SYNTAXES` that pydicom can decode here."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    accepted = []
    for uid in TRANSFER_SYNTAXES:
        try:
            if get_decoder(UID(uid)).is_available:
                accepted.append(uid)
        except (NotImplementedError, ValueError):
            continue
    return accepted


class Refusal(Exception):
    """A C-STORE answered with an error status."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_ct_image(dataset) -> None:
    """Raise :class:`Refusal` unless ``dataset`` is a single-frame CT image the sender can use."""
    modality = str(dataset.get("Modality", "") or "")
    if modality != "CT":
        raise Refusal(DOES_NOT_MATCH_SOP_CLASS,
                      f"Modality is {modality or 'missing'!r}, this node takes CT images only")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(dataset.get(keyword, "") or "")
        if not valid_uid(value):
            raise Refusal(CANNOT_UNDERSTAND, f"{keyword} {value!r} is not a valid UID")
    if "PixelData" not in dataset:
        raise Refusal(CANNOT_UNDERSTAND, "no pixel data")
    frames = dataset.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        frames = 0
    if frames != 1:
        raise Refusal(CANNOT_UNDERSTAND, f"{frames} frames; single-frame CT images only")
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
                    "Columns"):
        if dataset.get(keyword) in (None, "", []):
            raise Refusal(CANNOT_UNDERSTAND, f"no {keyword}")


def decode_pixels(dataset) -> None:
    """Decode the pixel data now, or raise :class:`Refusal`.

    Decoded once, on arrival: an image acknowledged is an image the sender can use (a truncated
    or corrupt one is refused while the scanner still has it), and a series is ready to go the
    moment it is complete (pydicom keeps the decoded array with the dataset).
    """
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        meta = getattr(dataset, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID", "?") if meta is not None else "?"
        raise Refusal(CANNOT_UNDERSTAND, f"cannot decode the pixel data "
                                         f"({getattr(syntax, 'name', syntax)}): "
                                         f"{str(error).strip()[:120]}") from None
    if pixels.shape != (int(dataset.Rows), int(dataset.Columns)):
        raise Refusal(CANNOT_UNDERSTAND, f"the pixel data decodes to {pixels.shape}, not "
                                         f"{dataset.Rows} x {dataset.Columns}")


@dataclass
class NodeStatistics:
    """Counters of the node since it started (logged at the end)."""

    stored: int = 0
    refused: int = 0
    echoes: int = 0
    associations: int = 0
    hosts_refused: int = 0
    """Connections closed because their host is not in ``--dicom-allow-hosts``."""
    tls_failed: int = 0
    """Connections whose TLS handshake failed or timed out."""


class DicomNode:
    """The C-STORE SCP (see the module docstring).

    Args:
        host, port: where to listen (port 0: any free port, see :attr:`address`).
        ae_title: this node's AE title (the scanner's destination is configured with it; a
            call to another title is accepted and logged).
        spool: where instances go before they are acknowledged.
        collector: who groups them into series.
        max_associations: associations served at once.
        allow_hosts: the networks peers may connect from (None: any; :func:`parse_hosts`).
        allow_calling_ae: the calling AE titles accepted (None: any).
        tls: serve DICOM over TLS with this context (:func:`shared.tls.server_tls_context`),
            or None.
    """

    def __init__(self, host: str, port: int, ae_title: str, spool: Spool,
                 collector: SeriesCollector, max_associations: int = 8,
                 allow_hosts: tuple | None = None, allow_calling_ae: list[str] | None = None,
                 tls: ssl.SSLContext | None = None):
        try:
            from pynetdicom import AE, evt
        except ImportError:
            raise ValueError("--dicom-listen needs pynetdicom: pip install "
                             "'dlad-stream[sender]'") from None
        ae_title = check_ae_title(ae_title)
        self.host, self.port, self.ae_title = host, port, ae_title
        self.allow_hosts = allow_hosts
        self.tls = tls
        self.spool, self.collector = spool, collector
        self.statistics = NodeStatistics()
        self.syntaxes = accepted_transfer_syntaxes()
        ae = AE(ae_title=ae_title)
        ae.maximum_associations = max_associations
        # A slow or silent peer must not hold an association for ever.
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 60
        ae.add_supported_context(CT_IMAGE_STORAGE, self.syntaxes)
        ae.add_supported_context(VERIFICATION)
        if allow_calling_ae:
            # pynetdicom rejects the association itself (A-ASSOCIATE-RJ, "calling AE title not
            # recognised"); _on_rejected logs it.
            ae.require_calling_aet = list(allow_calling_ae)
        self.ae = ae
        self._handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                          (evt.EVT_ACCEPTED, self._on_accepted),
                          (evt.EVT_REJECTED, self._on_rejected)]
        self.server = None

    def start(self) -> tuple[str, int]:
        """Start listening (in pynetdicom's threads); return the bound address."""
        import socketserver
        import threading

        from pynetdicom.transport import ThreadedAssociationServer

        node = self

        class ScreenedServer(ThreadedAssociationServer):
            """pynetdicom's server, closing connections from hosts not allowed before any
            DICOM is read (socketserver's verify_request)."""

            def verify_request(self, request, client_address) -> bool:
                if host_allowed(client_address[0], node.allow_hosts):
                    return True
                node.statistics.hosts_refused += 1
                log.warning("DICOM connection from %s:%d closed: not in --dicom-allow-hosts",
                            client_address[0], client_address[1])
                return False

            def get_request(self):
                client, address = self.socket.accept()
                if self.ssl_context is not None:
                    # No handshake here, in the accept loop: see process_request_thread.
                    client = self.ssl_context.wrap_socket(client, server_side=True,
                                                          do_handshake_on_connect=False)
                return client, address

            def process_request_thread(self, request, client_address) -> None:
                if isinstance(request, ssl.SSLSocket):
                    try:
                        request.settimeout(TLS_HANDSHAKE_S)
                        request.do_handshake()
                        request.settimeout(None)
                    except (OSError, ssl.SSLError) as error:
                        node.statistics.tls_failed += 1
                        log.warning("DICOM TLS handshake with %s:%d failed: %s",
                                    client_address[0], client_address[1], error)
                        self.shutdown_request(request)
                        return
                super().process_request_thread(request, client_address)

            def shutdown(self) -> None:
                # pynetdicom's shutdown also unregisters a server that start_server made; this
                # one is made with make_server and served by the thread below.
                socketserver.BaseServer.shutdown(self)
                self.server_close()

        try:
            self.server = self.ae.make_server((self.host, self.port),
                                              evt_handlers=self._handlers,
                                              server_class=ScreenedServer, ssl_context=self.tls)
        except OSError as error:
            raise OSError(f"cannot listen for DICOM on {self.host}:{self.port}: "
                          f"{error.strerror or error}") from None
        threading.Thread(target=self.server.serve_forever, name="dlad-dicom-node",
                         daemon=True).start()
        self.address = self.server.server_address[:2]
        log.info("DICOM node %s listening on %s:%d%s (C-STORE CT Image Storage in %d transfer "
                 "syntaxes, C-ECHO)", self.ae_title, *self.address,
                 "" if self.tls is None else " over TLS", len(self.syntaxes))
        return self.address

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        log.info("DICOM node %s stopped: %d image(s) stored, %d refused, %d echo(es), "
                 "%d association(s), %d connection(s) from hosts not allowed", self.ae_title,
                 self.statistics.stored, self.statistics.refused, self.statistics.echoes,
                 self.statistics.associations, self.statistics.hosts_refused)

    # --- handlers (pynetdicom threads) -------------------------------------------------------

    @staticmethod
    def _peer(event) -> str:
        requestor = event.assoc.requestor
        return f"{requestor.ae_title} at {requestor.address}:{requestor.port}"

    def _on_accepted(self, event) -> None:
        self.statistics.associations += 1
        assoc = event.assoc
        called = assoc.acceptor.ae_title if hasattr(assoc.acceptor, "ae_title") else ""
        if called and called.strip() != self.ae_title:
            log.warning("association from %s calls AE title %r; this node is %r (accepted)",
                        self._peer(event), called, self.ae_title)
        def names(contexts) -> list[str]:
            from pydicom.uid import UID

            return sorted({UID(c.abstract_syntax).name for c in contexts})

        accepted = names(assoc.accepted_contexts)
        rejected = names(assoc.rejected_contexts)
        if rejected and not set(accepted) - {UID_NAMES[VERIFICATION]}:
            # Nothing this node takes was offered: the scanner's push will fail, say why here.
            log.warning("association from %s offers only %s: this node takes CT Image Storage "
                        "(and Verification) only", self._peer(event), ", ".join(rejected[:8])
                        + (f" and {len(rejected) - 8} more" if len(rejected) > 8 else ""))
        else:
            # Store SCUs such as storescu propose every storage class they know: the ones
            # declined are worth a debug line only.
            log.info("association from %s: %s", self._peer(event), ", ".join(accepted))
            if rejected:
                log.debug("declined %d other SOP classes: %s", len(rejected), ", ".join(rejected))

    def _on_rejected(self, event) -> None:
        allowed = self.ae.require_calling_aet
        calling = event.assoc.requestor.ae_title
        reason = (f"calling AE title {calling!r} is not in --dicom-allow-ae"
                  if allowed and calling not in allowed else "negotiation failed")
        log.warning("association from %s rejected (%s)", self._peer(event), reason)

    def _on_echo(self, event) -> int:
        self.statistics.echoes += 1
        log.info("C-ECHO from %s", self._peer(event))
        return SUCCESS

    def _on_store(self, event):
        started = time.thread_time()
        peer = self._peer(event)
        try:
            arrival = self._store(event, peer)
        except Refusal as refusal:
            self.statistics.refused += 1
            log.warning("C-STORE from %s refused (0x%04X): %s", peer, refusal.status,
                        refusal.reason)
            return self._status(refusal.status, refusal.reason)
        except Exception as error:  # never let a bad image take the node down
            self.statistics.refused += 1
            log.exception("C-STORE from %s: unexpected error", peer)
            return self._status(CANNOT_UNDERSTAND, f"{type(error).__name__}: {error}")
        arrival.decode_s = time.thread_time() - started
        self.statistics.stored += 1
        self.collector.add(arrival)
        return SUCCESS

    @staticmethod
    def _status(code: int, comment: str):
        from pydicom.dataset import Dataset

        status = Dataset()
        status.Status = code
        # ErrorComment is LO: 64 characters at most.
        status.ErrorComment = comment[:64]
        return status

    def _store(self, event, peer: str) -> Arrival:
        data = event.encoded_dataset(include_meta=True)
        if len(data) > MAX_INSTANCE_BYTES:
            raise Refusal(OUT_OF_RESOURCES, f"{len(data)} bytes, more than the "
                                            f"{MAX_INSTANCE_BYTES} this node takes")
        try:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
        except Exception as error:  # a dataset pydicom cannot parse
            raise Refusal(CANNOT_UNDERSTAND, f"cannot parse the dataset: {error}") from None
        check_ct_image(dataset)
        study, series, sop = (str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID),
                              str(dataset.SOPInstanceUID))
        decode_pixels(dataset)
        room = self.collector.room_for(study, series)
        if room is not None:
            raise Refusal(OUT_OF_RESOURCES, room)
        try:
            path = self.spool.store(study, series, sop, data)
        except SpoolError as error:
            raise Refusal(OUT_OF_RESOURCES, str(error)) from None
        return Arrival(study, series, sop, path, dataset=dataset, source=peer)
