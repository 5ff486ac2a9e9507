"""URL fetching: the SSRF guard, DNS pinning, the total deadline and the download cap.

Every server here is started by the test on 127.0.0.1; names that should look public are
answered by a patched ``socket.getaddrinfo`` and the "public" address is routed back to the
local server by a patched connector, so nothing outside this machine is ever contacted.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from shitu import net
from shitu.errors import FetchTimeout, Forbidden, ShiTuError, Unavailable
from shitu.net import fetch_url, is_public_address

PUBLIC_IP = "93.184.215.14"  # looks public; never contacted (the connector reroutes it)


class _Handler(http.server.BaseHTTPRequestHandler):
    """/img: a small body naming the Host header; /moved-*: redirects; /drip-*: slow servers;
    /hold: waits for the test to let it answer."""

    protocol_version = "HTTP/1.1"
    hits: list[tuple[str, str | None]] = []
    redirects: dict[str, str] = {}
    holding = threading.Event()
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).hits.append((self.path, self.headers.get("Host")))
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/drip-body":
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            self._drip(b"x" * 40)
        elif self.path == "/drip-headers":
            self._drip(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 38)
        elif self.path == "/hold":
            type(self).holding.set()
            type(self).release.wait(5)  # bounded even if the test fails
            self._send(b"held")
        else:
            self._send(f"image for {self.headers.get('Host')}".encode())

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, data: bytes) -> None:
        # one byte every 50 ms: each read is quick, the whole answer takes 2 s at most
        for byte in data:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return  # the client gave up
            time.sleep(0.05)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    """``host:port`` of a fresh local server; hits and redirects are reset per test."""
    _Handler.hits = []
    _Handler.redirects = {}
    _Handler.holding.clear()
    _Handler.release.clear()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        _Handler.release.set()
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def fake_dns(monkeypatch, server) -> dict:
    """Patch name resolution and connecting: ``answers[name]`` lists the answers to successive
    lookups of ``name``; connections to PUBLIC_IP reach the local server. Records lookups and
    the addresses connected to."""
    record: dict = {"answers": {}, "lookups": [], "connected": []}
    real_getaddrinfo = socket.getaddrinfo
    real_connect = getattr(net, "_connect_socket", None)
    local_port = int(server.rsplit(":", 1)[1])

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in record["answers"]:
            return real_getaddrinfo(host, port, *args, **kwargs)
        record["lookups"].append(host)
        queue = record["answers"][host]
        ips = queue.pop(0) if len(queue) > 1 else queue[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port)) for ip in ips]

    def connect(family, sockaddr, timeout):
        record["connected"].append(sockaddr[:2])
        if sockaddr[0] == PUBLIC_IP:
            return real_connect(socket.AF_INET, ("127.0.0.1", local_port), timeout)
        return real_connect(family, sockaddr, timeout)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(net, "_connect_socket", connect, raising=False)
    return record


@pytest.fixture
def no_connections(monkeypatch) -> list:
    """Fail any attempt to open a connection, by this module or by urllib3 directly."""
    import urllib3.util.connection

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(net, "_connect_socket", refuse, raising=False)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", refuse)
    return attempts


# --- 1. SSRF: ambiguous URLs, pinning, redirects ----------------------------------------------


def test_backslash_before_userinfo_does_not_reach_the_local_server(server):
    """urlparse sees host 1.1.1.1 here, but urllib3 (which connects) sees 127.0.0.1."""
    with pytest.raises(ShiTuError, match="backslash") as info:
        fetch_url(f"http://{server}\\@1.1.1.1/img.jpg", guard=True)
    assert type(info.value) is ShiTuError  # a plain 400, not a crash
    assert _Handler.hits == []


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]:7890\\@1.1.1.1/img.jpg",
        "http://127.0.0.1:7890/\\@1.1.1.1/img.jpg",
        "http://user:pw@127.0.0.1:7890/img.jpg",
        "http://1.1.1.1@127.0.0.1:7890/img.jpg",
        "http://127.0.0.1:7890 @1.1.1.1/img.jpg",
        "http://127.0.0.1:7890/img.jpg\r\nX-Injected: 1",
        "http://127.0.0.1\t:7890/img.jpg",
        "http://[fe80::1%25eth0]:7890/img.jpg",
        "http://%31%32%37.0.0.1:7890/img.jpg",
        "http://127.0.0.%31:7890/img.jpg",
        "http://%6cocalhost:7890/img.jpg",
        "http://127.1:7890/img.jpg",
        "http://0x7f.0.0.1:7890/img.jpg",
        "http://0177.0.0.1:7890/img.jpg",
        "http://2130706433:7890/img.jpg",
        "http://\uff11\uff12\uff17.0.0.1:7890/img.jpg",
        "http://127\u30020.0.1:7890/img.jpg",
        "http://127.0.0.1:+7890/img.jpg",
        "http://127.0.0.1:7890:80/img.jpg",
        "http:///img.jpg",
        "file:///etc/passwd",
        "gopher://127.0.0.1:7890/_x",
    ],
)
def test_ambiguous_or_unsupported_urls_are_refused_before_connecting(url, no_connections):
    with pytest.raises(ShiTuError) as info:
        fetch_url(url, guard=True, allowlist=("127.0.0.1", "::1"))
    assert no_connections == []
    message = info.value.message
    assert "\n" not in message and "Traceback" not in message


def test_userinfo_is_refused_even_for_allowlisted_hosts(server):
    with pytest.raises(ShiTuError, match="user name or password"):
        fetch_url(f"http://someone:secret@{server}/img.jpg", guard=True, allowlist=("127.0.0.1",))
    assert _Handler.hits == []


def test_dns_rebinding_resolves_once_and_connects_to_the_checked_address(server, fake_dns):
    port = server.rsplit(":", 1)[1]
    # the first answer is public, every later one is the loopback server
    fake_dns["answers"]["images.example"] = [[PUBLIC_IP], ["127.0.0.1"]]
    body = fetch_url(f"http://images.example:{port}/img.jpg", guard=True)
    assert fake_dns["lookups"] == ["images.example"], "the name is resolved exactly once"
    assert fake_dns["connected"] == [(PUBLIC_IP, int(port))], "the checked address is the one connected to"
    assert body == f"image for images.example:{port}".encode(), "the Host header names the original host"


def test_any_private_answer_refuses_the_host(server, fake_dns):
    port = server.rsplit(":", 1)[1]
    fake_dns["answers"]["mixed.example"] = [[PUBLIC_IP, "127.0.0.1"]]
    with pytest.raises(Forbidden, match="non-public address"):
        fetch_url(f"http://mixed.example:{port}/img.jpg", guard=True)
    assert fake_dns["connected"] == [] and _Handler.hits == []


def test_closed_and_open_private_ports_answer_the_same(server):
    """The private address is refused before any connection, so a caller cannot probe ports."""
    with socket.socket() as probe:  # a port nothing listens on (bound, never listening)
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
        errors = []
        for url in (f"http://{server}/img.jpg", f"http://127.0.0.1:{closed}/img.jpg"):
            with pytest.raises(Forbidden) as info:
                fetch_url(url, guard=True)
            errors.append(info.value.message)
    assert errors[0] == errors[1]
    assert _Handler.hits == []


def test_each_redirect_hop_is_checked(server, fake_dns):
    fake_dns["answers"]["evil.example"] = [["10.0.0.1"]]
    _Handler.redirects = {
        "/to-private": "http://10.0.0.1/img.jpg",
        "/to-private-name": "http://evil.example/img.jpg",
        "/to-backslash": f"http://{server}\\@1.1.1.1/img.jpg",
        "/to-ok": "/img.jpg",
    }
    for path in ("/to-private", "/to-private-name"):
        with pytest.raises(Forbidden, match="non-public address"):
            fetch_url(f"http://{server}{path}", guard=True, allowlist=("127.0.0.1",))
    with pytest.raises(ShiTuError, match="backslash"):
        fetch_url(f"http://{server}/to-backslash", guard=True, allowlist=("127.0.0.1",))
    assert fetch_url(f"http://{server}/to-ok", guard=True, allowlist=("127.0.0.1",)) == f"image for {server}".encode()
    hops = ["/to-private", "/to-private-name", "/to-backslash", "/to-ok", "/img.jpg"]
    assert [path for path, _ in _Handler.hits] == hops
    assert all(addr[0] == "127.0.0.1" for addr in fake_dns["connected"]), "no private hop was connected to"


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # cloud metadata
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("not an address", False),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public


def test_https_keeps_the_host_name_for_sni_and_the_certificate(tmp_path, monkeypatch, fake_dns):
    """The socket goes to the pinned address; TLS still verifies the URL's host name."""
    pytest.importorskip("cryptography")
    ca_pem, cert_pem, key_pem = _make_certs("images.test")
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = srv.server_address[1]
    try:
        fake_dns["answers"]["images.test"] = [["127.0.0.1"]]
        fake_dns["answers"]["other.test"] = [["127.0.0.1"]]
        body = fetch_url(f"https://images.test:{port}/img.jpg", guard=True, allowlist=("images.test", "other.test"))
        assert body == f"image for images.test:{port}".encode()
        assert names == ["images.test"]
        with pytest.raises(ShiTuError, match="TLS"):  # same address, a name the certificate does not cover
            fetch_url(f"https://other.test:{port}/img.jpg", guard=True, allowlist=("images.test", "other.test"))
    finally:
        srv.shutdown()
        srv.server_close()


def _make_certs(hostname: str) -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a server certificate for ``hostname`` signed by it (PEM)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shitu test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


# --- 2. total deadline and the process-wide cap on downloads -----------------------------------


@pytest.mark.parametrize("path", ["/drip-body", "/drip-headers"])
def test_a_dripping_server_is_cut_off_by_the_total_deadline(server, path):
    """Each byte arrives well within the per-read timeout; only a total deadline stops it."""
    with pytest.raises(FetchTimeout, match="timed out"):
        fetch_url(f"http://{server}{path}", timeout=5, deadline=0.3)


def test_a_hanging_name_lookup_is_cut_off_by_the_total_deadline(monkeypatch):
    answered = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def slow_getaddrinfo(host, *args, **kwargs):
        if host == "slow-dns.example":
            answered.wait(3)  # a resolver that hangs (bounded, so the test's thread ends)
        return real_getaddrinfo("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    try:
        with pytest.raises(FetchTimeout, match="timed out"):
            fetch_url("http://slow-dns.example/img.jpg", guard=True, deadline=0.2)
    finally:
        answered.set()


def test_concurrent_downloads_are_capped(server, monkeypatch):
    monkeypatch.setattr(net, "SLOT_WAIT", 0.05)
    monkeypatch.setattr(net, "_fetch_slots", threading.BoundedSemaphore(1))
    results: list = []
    first = threading.Thread(target=lambda: results.append(fetch_url(f"http://{server}/hold", deadline=5)))
    first.start()
    try:
        assert _Handler.holding.wait(5), "the first download started"
        with pytest.raises(Unavailable, match="too many image downloads in progress, try again"):
            fetch_url(f"http://{server}/img.jpg")
    finally:
        _Handler.release.set()
        first.join(5)
    assert results == [b"held"]
    # slots come back after successes and failures alike
    with pytest.raises(Forbidden):
        fetch_url(f"http://{server}/img.jpg", guard=True)
    with pytest.raises(FetchTimeout):
        fetch_url(f"http://{server}/drip-body", deadline=0.2)
    assert fetch_url(f"http://{server}/img.jpg") == f"image for {server}".encode()
    assert net._fetch_slots.acquire(blocking=False), "the slot was released"
    net._fetch_slots.release()


def test_size_limit_and_http_errors(server):
    with pytest.raises(ShiTuError, match="larger than") as info:
        fetch_url(f"http://{server}/img.jpg", max_bytes=5)
    assert info.value.message.endswith("larger than 5 bytes")
    _Handler.redirects = {f"/loop{i}": f"/loop{i + 1}" for i in range(10)}
    with pytest.raises(ShiTuError, match="too many redirects"):
        fetch_url(f"http://{server}/loop0")
