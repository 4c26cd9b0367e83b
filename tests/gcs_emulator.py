"""A real Google Cloud Storage emulator on localhost for tests, reachable from every gs:// client.

`start_emulator(bucket)` runs the PyPI package `gcp-storage-emulator` (pure Python, in memory) in a
child process on a free 127.0.0.1 port, waits until it answers, creates the bucket through the
emulator's JSON API and returns an `Emulator`. `Emulator.env` holds the environment variables that
a *subprocess* needs so that the real, unmodified client libraries send their HTTP requests to it:

| client                                   | how it reaches the emulator                                    |
| ---------------------------------------- | -------------------------------------------------------------- |
| tensorstore `gcs` kvstore (orbax arrays) | `TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT` (documented    |
|                                          | override of `https://storage.googleapis.com`)                  |
| `tf.io.gfile` (TensorBoard event files,  | TF's GCS filesystem has the hosts `www.googleapis.com` and     |
| clu's SummaryWriter) and `etils.epath`   | `storage.googleapis.com` compiled in and no endpoint variable, |
| (which uses tf.io.gfile for gs:// when   | so its libcurl is sent through `HTTPS_PROXY` to a local        |
| TensorFlow is installed)                 | CONNECT proxy in the same child process; the proxy terminates  |
|                                          | TLS with a throw-away CA (`CURL_CA_BUNDLE`) and forwards each  |
|                                          | request to the emulator. It refuses every other host, so       |
|                                          | nothing leaves localhost.                                      |
| auth (TF and tensorstore)                | `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a fixed bearer token, no      |
|                                          | credentials file, no metadata server), `NO_GCE_CHECK=true`;    |
|                                          | the metadata-server hosts point at the emulator's local port   |
|                                          | so a stray metadata request fails locally and at once.         |
| google-cloud-storage (orbax 0.12.8 calls | `STORAGE_EMULATOR_HOST`, `GOOGLE_CLOUD_PROJECT`; gcsfs (epath  |
| it for every gs:// checkpoint directory) | with EPATH_USE_TF=false) reads the same variable, not exercised |

gcp-storage-emulator 2026.7.19 is adjusted inside the child process (the clients themselves are not
touched); the first three broke these clients, as observed before each fix:

- an upload with an empty body (tensorstore writing b"", TF creating a directory marker) crashed the
  handler (`len(None)`) and left the client without a response: the body is read as b"";
- objects.list ignored `startOffset`/`endOffset` and returned the whole bucket; tensorstore lists
  and deletes key ranges that way and aborted (std::out_of_range) or deleted keys outside the
  range: the listing is cut to the range;
- media downloads had no `x-goog-generation` header; tensorstore then took generation 0 for every
  read and orbax's next OCDBT manifest update failed ("Malformed StorageGeneration"): the
  generation headers are added;
- speed only: Nagle's algorithm is switched off on its sockets (each response waited ~40 ms for a
  delayed ACK: two orbax saves took 7 s instead of 2 s), and as a precaution the listen backlog is
  raised from 5 to 128 (tensorstore opens connections in parallel; no drop was seen at 5).

What the emulator does not implement is listed in `KNOWN_GAPS`.

Use it as a context manager (`with start_emulator("b") as emu:`) or through the session-scoped
pytest fixture `gcs_emulator` (import it into a conftest or a test module). The child process exits
when `stop()` closes its stdin, and also on its own when the parent dies (its stdin reaches EOF).
`list_objects` reads the bucket through the emulator's JSON API with urllib (no proxy), independent
of the clients under test.

This file is also the child process's entry point: `python gcs_emulator.py --serve DIR`.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import http.client
import json
import os
import select
import shutil
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from typing import Iterator

#: Hosts that TF's GCS filesystem calls (compiled into libtensorflow_framework); the proxy serves
#: only these (plus the OAuth host, answered by the emulator with an error) and refuses all others.
GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")

#: Things the emulator does not do like GCS, which a test must not rely on.
KNOWN_GAPS = (
    "preconditions (ifGenerationMatch / ifGenerationNotMatch / ifMetagenerationMatch) are ignored: "
    "every conditional write succeeds, a conditional read never answers 304/412",
    "HEAD is not implemented (501)",
    "listing ignores maxResults and never pages",
    "an object 'a' and a directory marker 'a/' share one in-memory slot (writing 'a/' empties 'a')",
)

PROJECT = "emulator-project"
TOKEN = "emulator-test-token"


# ------------------------------------------------------------------------------------ the parent


class Emulator:
    """A running emulator child process; see the module docstring."""

    def __init__(self, bucket: str):
        self.bucket = bucket
        self.port: int | None = None
        self.proxy_port: int | None = None
        self.ca_file: str | None = None
        self.workdir: str | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    # the URLs and the environment

    @property
    def url(self) -> str:
        """Base URL of the emulator's JSON/XML API, e.g. http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def env(self) -> dict[str, str]:
        """Every environment variable a subprocess needs so that its gs:// clients use the emulator."""
        local = "127.0.0.1,localhost"
        return {
            # tensorstore's gcs driver (orbax's array data)
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "TENSORSTORE_GCS_BACKEND": "gcs",  # orbax's choice of tensorstore driver (HTTP, not gRPC)
            # auth without credentials or a metadata server (TF and tensorstore both read these)
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": TOKEN,
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": f"127.0.0.1:{self.port}",  # TF, if it ever asked the metadata server
            "GCE_METADATA_ROOT": f"127.0.0.1:{self.port}",  # tensorstore / google-auth, likewise
            "GCE_METADATA_IP": f"127.0.0.1:{self.port}",  # google-auth
            # TF's GCS filesystem (tf.io.gfile, epath's default gs:// backend, TensorBoard writers)
            "HTTPS_PROXY": self.proxy_url,
            "https_proxy": self.proxy_url,
            "HTTP_PROXY": self.proxy_url,  # a plain http:// URL to a Google host: the proxy again
            "http_proxy": self.proxy_url,
            "NO_PROXY": local,  # tensorstore and the STORAGE_EMULATOR_HOST clients go direct
            "no_proxy": local,
            "CURL_CA_BUNDLE": self.ca_file or "",
            "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",  # fail within seconds, not minutes
            "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "1000000",
            "GCS_RETRY_CONFIG_MAX_RETRIES": "3",
            # google-cloud-storage, gcsfs (epath with EPATH_USE_TF=false), google-cloud-cpp
            "STORAGE_EMULATOR_HOST": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
        }

    def subprocess_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: os.environ) with `env` applied."""
        return {**(os.environ if base is None else base), **self.env}

    def run_python(self, code: str, *, timeout: float = 60.0, cwd: str | None = None,
                   extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Runs `python -c code` with `env` applied; returns the completed process (text output)."""
        env = self.subprocess_env()
        env.update(extra_env or {})
        return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)

    # what is in the bucket, read without the clients under test

    def list_objects(self, gs_prefix: str = "") -> list[dict]:
        """The object resources under `gs_prefix` (gs://BUCKET/dir or a bare prefix), sorted by name."""
        return list_objects(self.url, gs_prefix if gs_prefix.startswith("gs://")
                            else f"gs://{self.bucket}/{gs_prefix}")

    def object_names(self, gs_prefix: str = "") -> list[str]:
        return [item["name"] for item in self.list_objects(gs_prefix)]

    def read_object(self, gs_path: str) -> bytes:
        return read_object(self.url, gs_path if gs_path.startswith("gs://")
                           else f"gs://{self.bucket}/{gs_path}")

    def log_text(self, limit: int = 20000) -> str:
        """The tail of the child's log: one line per request the emulator and the proxy answer, errors."""
        if not self.workdir:
            return ""
        try:
            with open(os.path.join(self.workdir, "emulator.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")[-limit:]
        except OSError:
            return ""

    # life cycle

    def start(self, timeout: float = 30.0) -> "Emulator":
        if self._proc is not None:
            raise RuntimeError("already started")
        self.workdir = tempfile.mkdtemp(prefix="gcs-emulator-")
        self._log = open(os.path.join(self.workdir, "emulator.log"), "wb")
        child_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        child_env["PYTHONUNBUFFERED"] = "1"
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", self.workdir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=child_env,
            cwd=self.workdir)
        _LIVE.add(self)
        try:
            ready = self._read_ready_line(timeout)
            self.port, self.proxy_port, self.ca_file = ready["port"], ready["proxy_port"], ready["ca_file"]
            deadline = time.monotonic() + timeout
            while True:  # the emulator's health check
                try:
                    if _get(f"{self.url}/", timeout=2).strip() == b"OK":
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError("the emulator did not answer its health check")
                time.sleep(0.05)
            create_bucket(self.url, self.bucket)
            self._check_proxy()
        except BaseException as error:
            log = self.log_text(4000)
            self.stop()
            if isinstance(error, Exception):
                raise RuntimeError(f"could not start the GCS emulator: {error}\n--- log ---\n{log}") from error
            raise
        return self

    def _read_ready_line(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        line = b""
        fd = self._proc.stdout.fileno()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no ready line within {timeout:.0f} s")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"the emulator exited (status {self._proc.wait()})")
                line += chunk
        return json.loads(line.decode())

    def _check_proxy(self) -> None:
        """One GET through the proxy with TLS verified against our CA, as TF's libcurl will do it."""
        context = ssl.create_default_context(cafile=self.ca_file)
        conn = http.client.HTTPSConnection("127.0.0.1", self.proxy_port, context=context, timeout=10)
        conn.set_tunnel("www.googleapis.com", 443)
        try:
            conn.request("GET", f"/storage/v1/b/{self.bucket}")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200 or json.loads(body).get("name") != self.bucket:
                raise RuntimeError(f"proxy check: HTTP {response.status} {body[:200]!r}")
        finally:
            conn.close()

    def stop(self) -> None:
        """Stops the child (closing its stdin, then SIGTERM, then SIGKILL) and removes its files.

        Set GCS_EMULATOR_KEEP_LOG=1 to keep the child's directory (emulator.log, the certificates).
        """
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            with contextlib.suppress(OSError):
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.workdir and not os.environ.get("GCS_EMULATOR_KEEP_LOG"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "Emulator":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_LIVE: set[Emulator] = set()


@atexit.register
def _stop_all() -> None:
    for emulator in list(_LIVE):
        emulator.stop()


def start_emulator(bucket: str, *, timeout: float = 30.0) -> Emulator:
    """Starts an emulator with `bucket` created; use as `with start_emulator("b") as emu:` or stop()."""
    return Emulator(bucket).start(timeout=timeout)


@contextlib.contextmanager
def running_emulator(bucket: str, *, timeout: float = 30.0) -> Iterator[Emulator]:
    emulator = start_emulator(bucket, timeout=timeout)
    try:
        yield emulator
    finally:
        emulator.stop()


# ---------------------------------------------------- the JSON API, read directly (no client library)

_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 10) -> bytes:
    with _NO_PROXY_OPENER.open(url, timeout=timeout) as response:
        return response.read()


def _split_gs(gs_path: str) -> tuple[str, str]:
    if not gs_path.startswith("gs://"):
        raise ValueError(f"not a gs:// path: {gs_path!r}")
    bucket, _, name = gs_path[len("gs://"):].partition("/")
    return bucket, name


def create_bucket(emulator_url: str, bucket: str) -> dict:
    """Creates `bucket` (soft delete off, so deleted objects are gone as on a bucket without it)."""
    body = json.dumps({"name": bucket, "softDeletePolicy": {"retentionDurationSeconds": "0"}}).encode()
    request = urllib.request.Request(f"{emulator_url}/storage/v1/b?project={PROJECT}", data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
    with _NO_PROXY_OPENER.open(request, timeout=10) as response:
        return json.loads(response.read())


def list_objects(emulator_url: str, gs_prefix: str) -> list[dict]:
    """Every object resource whose name starts with the prefix of `gs_prefix`, sorted by name.

    `gs_prefix` is gs://BUCKET/PREFIX; the prefix is matched as a string (gs://b/run also matches
    gs://b/run2/x; end it with '/' for a folder). Directory markers (names ending in '/') are included.
    """
    bucket, prefix = _split_gs(gs_prefix)
    items, token = [], None
    while True:
        query = {"prefix": prefix} if prefix else {}
        if token:
            query["pageToken"] = token
        url = f"{emulator_url}/storage/v1/b/{urllib.parse.quote(bucket)}/o"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        page = json.loads(_get(url))
        items.extend(page.get("items") or [])
        token = page.get("nextPageToken")
        if not token:
            return sorted(items, key=lambda item: item["name"])


def read_object(emulator_url: str, gs_path: str) -> bytes:
    bucket, name = _split_gs(gs_path)
    return _get(f"{emulator_url}/download/storage/v1/b/{urllib.parse.quote(bucket)}/o/"
                f"{urllib.parse.quote(name, safe='')}?alt=media")


# ---------------------------------------------------------------------------------- pytest fixture

pytest = None
if __name__ != "__main__":  # not in the child process
    with contextlib.suppress(ImportError):
        import pytest

if pytest is not None:
    @pytest.fixture(scope="session")
    def gcs_emulator():
        """A session-wide emulator with the bucket 'contrastood-test'; skips if the package is absent."""
        pytest.importorskip("gcp_storage_emulator",
                            reason="gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
        with running_emulator("contrastood-test") as emulator:
            yield emulator


# ------------------------------------------------------------------------------- the child process


def _make_certificates(directory: str, hosts: tuple[str, ...]) -> tuple[str, str, str]:
    """A throw-away CA and a server certificate for `hosts`; returns (ca, cert, key) file paths."""
    ca_path, cert_path, key_path = (os.path.join(directory, n) for n in ("ca.pem", "server.pem", "server.key"))
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        _make_certificates_openssl(directory, hosts, ca_path, cert_path, key_path)
        return ca_path, cert_path, key_path
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=7)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gcs-emulator test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    with open(ca_path, "wb") as f:
        f.write(ca.public_bytes(pem))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(pem))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def _make_certificates_openssl(directory, hosts, ca_path, cert_path, key_path) -> None:
    """The same with the openssl command (when the `cryptography` package is not installed)."""
    ca_key, csr, ext = (os.path.join(directory, n) for n in ("ca.key", "server.csr", "server.ext"))
    with open(ext, "w") as f:
        f.write("subjectAltName=" + ",".join(f"DNS:{h}" for h in hosts) + "\n"
                "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
            ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_path, "-days", "7",
             "-subj", "/CN=gcs-emulator test CA", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"],
            ["openssl", "req", *ec, "-keyout", key_path, "-out", csr, "-subj", f"/CN={hosts[0]}"],
            ["openssl", "x509", "-req", "-in", csr, "-CA", ca_path, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert_path, "-days", "7", "-extfile", ext]):
        subprocess.run(command, check=True, capture_output=True, cwd=directory)


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "expect", "content-length"}


def _read_head(rfile):
    """(method, target, version, [(name, value)]) of the next request, or None at EOF."""
    line = rfile.readline(65537)
    while line in (b"\r\n", b"\n"):  # tolerate stray blank lines between requests
        line = rfile.readline(65537)
    if not line:
        return None
    method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers = []
    while True:
        raw = rfile.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return method, target, version, headers


def _read_body(rfile, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return body
            body += rfile.read(size)
            rfile.readline()
    length = int(headers.get("content-length") or 0)
    return rfile.read(length) if length else b""


class _ProxyHandler(socketserver.StreamRequestHandler):
    """CONNECT to a Google host, TLS with our certificate, then HTTP/1.1 requests to the emulator."""

    rbufsize = 0  # nothing may sit in a buffer when the socket is wrapped in TLS after CONNECT
    disable_nagle_algorithm = True

    def handle(self) -> None:
        head = _read_head(self.rfile)
        if head is None:
            return
        method, target, _, _ = head
        if method != "CONNECT":  # plain http://host/... through the proxy
            self._serve(self.rfile, self.wfile, "http", None, head)
            return
        host, _, _port = target.rpartition(":")
        if host not in GOOGLE_HOSTS:
            self._log(f"refused CONNECT {target}")
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()
        try:
            tls = self.server.tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as error:
            self._log(f"TLS handshake for {host} failed: {error}")
            return
        with tls, tls.makefile("rb") as rfile, tls.makefile("wb") as wfile:
            self._serve(rfile, wfile, "https", host, None)

    def _serve(self, rfile, wfile, scheme: str, tls_host: str | None, head) -> None:
        while True:
            head = head or _read_head(rfile)
            if head is None:
                return
            method, target, version, header_list = head
            head = None
            headers = {k.lower(): v for k, v in header_list}
            if target.startswith(("http://", "https://")):
                parts = urllib.parse.urlsplit(target)
                host = parts.hostname or ""
                path = parts.path + (f"?{parts.query}" if parts.query else "")
            else:
                host = tls_host or headers.get("host", "").split(":")[0]
                path = target
            if headers.get("expect", "").lower() == "100-continue":
                wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                wfile.flush()
            body = _read_body(rfile, headers)
            if host not in GOOGLE_HOSTS:
                self._log(f"refused {method} {target}")
                status, reason, out_headers, data = 403, "Forbidden", [], b"only Google hosts are proxied"
            else:
                status, reason, out_headers, data = self._forward(method, host, path, header_list, body)
                if scheme == "https":  # the emulator builds URLs (resumable Location) from Host as http://
                    out_headers = [(k, v.replace(f"http://{host}", f"https://{host}"))
                                   if k.lower() == "location" else (k, v) for k, v in out_headers]
                self._log(f"{method} {scheme}://{host}{path[:160]} -> {status} ({len(body)} B in, "
                          f"{len(data)} B out)")
            lines = [f"HTTP/1.1 {status} {reason}"]
            lines += [f"{k}: {v}" for k, v in out_headers if k.lower() not in _HOP_BY_HOP]
            lines.append(f"Content-Length: {len(data)}")
            wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            if method != "HEAD":
                wfile.write(data)
            wfile.flush()
            if headers.get("connection", "").lower() == "close" or version == "HTTP/1.0":
                return

    def _forward(self, method, host, path, header_list, body):
        headers = {k: v for k, v in header_list if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
        headers["Host"] = host
        if body or method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", self.server.emulator_port, timeout=120)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        except (OSError, http.client.HTTPException) as error:
            message = f"the emulator gave no response: {type(error).__name__}: {error}"
            self._log(f"{method} {host}{path[:160]}: {message}")
            return 502, "Bad Gateway", [("Content-Type", "text/plain")], message.encode()
        finally:
            conn.close()

    def _log(self, message: str) -> None:
        sys.stderr.write(f"[proxy {time.strftime('%H:%M:%S')}] {message}\n")


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def _patch_emulator(emulator_server) -> None:
    """The two workarounds described in the module docstring (child process only)."""
    import http.server

    http.server.HTTPServer.request_queue_size = 128
    # Headers and body leave in two writes; with Nagle on, each response waited ~40 ms for the
    # client's delayed ACK.
    emulator_server.RequestHandler.disable_nagle_algorithm = True
    read_data = emulator_server._read_data

    def _read_data(request_handler, query):
        data = read_data(request_handler, query)
        if data is None and request_handler.command in ("POST", "PUT") and (
                "uploadType" in query or "upload_id" in query):
            return b""  # an empty upload body: the emulator called len(None) on it
        return data

    emulator_server._read_data = _read_data

    # objects.list's startOffset / endOffset (tensorstore lists and deletes key ranges with them and
    # no prefix): the emulator ignored them and returned the whole bucket, which made tensorstore
    # abort (std::out_of_range on a name outside its path) or delete keys outside the range.
    from gcp_storage_emulator.handlers import objects

    list_objects_handler = objects.ls

    def ls(request, response, storage, *args, **kwargs):
        list_objects_handler(request, response, storage, *args, **kwargs)
        start = (request.query.get("startOffset") or [None])[0]
        end = (request.query.get("endOffset") or [None])[0]
        if (start is None and end is None) or response.status != 200:
            return
        listing = json.loads(response._content)

        def in_range(name):
            return (start is None or name >= start) and (end is None or name < end)

        listing["items"] = [item for item in listing.get("items") or [] if in_range(item["name"])]
        listing["prefixes"] = [p for p in listing.get("prefixes") or [] if in_range(p)]
        response.json(listing)

    # Media downloads: GCS sends the object's generation as x-goog-generation; the emulator sent
    # none, so tensorstore took generation 0 for every read and its next conditional write (an OCDBT
    # manifest update) failed with "Malformed StorageGeneration".
    download_handler = objects.download

    def download(request, response, storage, *args, **kwargs):
        download_handler(request, response, storage, *args, **kwargs)
        if response.status in (200, 206):
            with contextlib.suppress(Exception):
                obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
                response["x-goog-generation"] = str(obj["generation"])
                response["x-goog-metageneration"] = str(obj["metageneration"])
                response["x-goog-stored-content-length"] = str(obj["size"])

    objects.download = download  # objects.get (alt=media) looks it up here at call time
    replacements = {list_objects_handler: ls, download_handler: download}
    for _, handlers in emulator_server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in replacements:
                handlers[method] = replacements[handler]


def _serve(directory: str) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="[emulator %(asctime)s] %(levelname)s %(name)s: %(message)s")
    # One INFO line per request the emulator answers (tensorstore's too, which bypass the proxy),
    # without the warning the emulator logs for every plain-text response.
    server_log = logging.getLogger("gcp_storage_emulator.server")
    server_log.setLevel(logging.INFO)
    server_log.addFilter(lambda record: not record.getMessage().startswith("[RESPONSE]"))
    from gcp_storage_emulator import server as emulator_server

    _patch_emulator(emulator_server)
    emulator = emulator_server.create_server("127.0.0.1", 0, in_memory=True)
    emulator.start()
    port = emulator._api._httpd.server_address[1]  # bound to port 0: the OS picked a free one

    ca_path, cert_path, key_path = _make_certificates(directory, GOOGLE_HOSTS)
    proxy = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
    proxy.emulator_port = port
    proxy.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    proxy.tls.load_cert_chain(cert_path, key_path)
    proxy.tls.set_alpn_protocols(["http/1.1"])
    threading.Thread(target=proxy.serve_forever, daemon=True, name="proxy").start()

    sys.stdout.write(json.dumps({"port": port, "proxy_port": proxy.server_address[1],
                                 "ca_file": ca_path}) + "\n")
    sys.stdout.flush()
    # Runs until the parent closes stdin (stop()) or dies (EOF as well).
    with contextlib.suppress(Exception):
        while sys.stdin.buffer.read(4096):
            pass
    proxy.shutdown()
    emulator.stop()
    if not os.environ.get("GCS_EMULATOR_KEEP_LOG"):  # also when the parent died without stop()
        shutil.rmtree(directory, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        _serve(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} --serve DIRECTORY  (normally started by start_emulator())")
