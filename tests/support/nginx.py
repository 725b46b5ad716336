"""A real nginx in front of real bridges, rendered from the checked-in ``deploy/nginx.conf``.

The template's ``{{NAME}}`` placeholders are filled in (listen port, bridge addresses, a temp
prefix for temp files and logs), then nginx runs in the foreground with ``-p PREFIX`` so nothing
outside the test's directory is touched, even as root. Readiness is nginx's own "start worker
process" notice on stderr followed by an accepted TCP connection, never a sleep.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.support.processes import ROOT, free_port, with_port_retries

TEMPLATE = ROOT / "deploy" / "nginx.conf"
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
_READY = "start worker process"


def render(values: Mapping[str, str], template: str | None = None) -> str:
    """The template with every ``{{NAME}}`` replaced; a missing or unused value is an error."""
    text = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    names = set(_PLACEHOLDER.findall(text))
    if missing := names - set(values):
        raise KeyError(f"no value for placeholders {sorted(missing)}")
    if unused := set(values) - names:
        raise KeyError(f"values for placeholders the template does not have: {sorted(unused)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _bridge_address(url_or_address: str) -> str:
    return url_or_address.removeprefix("http://").rstrip("/")


class Nginx:
    """One nginx master (+ workers) serving ``url``; ``conf_text`` is the rendered config."""

    def __init__(
        self,
        binary: str,
        prefix: Path,
        bridges: tuple[str, str],
        *,
        template: str | None = None,
        port: int | None = None,
        ready_timeout: float = 15,
    ) -> None:
        self.binary = binary
        self.prefix = prefix
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        text = TEMPLATE.read_text(encoding="utf-8") if template is None else template
        self.tls_port: int | None = None
        self.tls_url: str | None = None
        self.cert: Path | None = None
        tls: dict[str, str] = {}
        if "{{TLS_LISTEN}}" in text:
            self.tls_port = free_port()
            self.tls_url = f"https://127.0.0.1:{self.tls_port}"
            self.cert, key = self_signed_cert(prefix)
            tls = {"TLS_LISTEN": f"127.0.0.1:{self.tls_port}", "TLS_CERT": str(self.cert), "TLS_KEY": str(key)}
        for sub in ("state", "logs"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        self.access_log = prefix / "logs" / "bali-zero-bridge.access.log"
        self.conf_text = render(
            {
                "LISTEN": f"127.0.0.1:{self.port}",
                "BRIDGE_A": _bridge_address(bridges[0]),
                "BRIDGE_B": _bridge_address(bridges[1]),
                "STATE_DIR": str(prefix / "state"),
                "LOG_DIR": str(prefix / "logs"),
                **tls,
            },
            text,
        )
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(self.conf_text, encoding="utf-8")
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(self.conf), "-g", self.globals()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        with self._cond:
            self._cond.wait_for(lambda: self._started() or self.proc.poll() is not None, ready_timeout)
        if not self._started() or not self._accepts():
            self.stop()
            raise RuntimeError(f"nginx on port {self.port} did not start: {self.lines[-20:]}")

    def globals(self) -> str:
        """Main-context directives given on the command line (the template leaves them out)."""
        directives = [
            "daemon off;",
            f"pid {self.prefix / 'nginx.pid'};",
            # notice level: the "start worker process" line is the readiness signal.
            "error_log stderr notice;",
        ]
        if os.geteuid() == 0:
            # Workers would otherwise drop to `nobody`, who cannot enter pytest's 0700 tmp dirs.
            directives.append("user root;")
        return " ".join(directives)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _started(self) -> bool:
        return any(_READY in line for line in self.lines)

    def _accepts(self) -> bool:
        try:
            for port in (self.port, self.tls_port):
                if port is not None:
                    with socket.create_connection(("127.0.0.1", port), timeout=2):
                        pass
        except OSError:
            return False
        return True

    def upstreams(self) -> list[str]:
        """``$upstream_addr`` of every logged request, in order (``-`` when none was tried)."""
        if not self.access_log.exists():
            return []
        text = self.access_log.read_text(encoding="utf-8")
        return re.findall(r' upstream="([^"]*)" ', text)

    def stop(self) -> None:
        """Fast shutdown (SIGTERM closes open streams at once; SIGQUIT would wait for them)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pump.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1/localhost (cert.pem, key.pem) in ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def check_config(binary: str, prefix: Path, conf: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a rendered config (same -p/-g as a real start)."""
    globals_ = f"pid {prefix / 'nginx.pid'}; error_log stderr notice;"
    if os.geteuid() == 0:
        globals_ += " user root;"
    return subprocess.run(
        [binary, "-t", "-p", str(prefix), "-c", str(conf), "-g", globals_],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


NginxFactory = Callable[..., Nginx]


def nginx_binary() -> str:
    """The nginx binary, or a skip (locally) / failure (CI=true) when it is not installed."""
    return require_binary("nginx", "/usr/sbin/nginx")


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[NginxFactory]:
    """``nginx_factory(bridge_a_url, bridge_b_url, template=None)`` → a running ``Nginx``."""
    binary = nginx_binary()
    started: list[Nginx] = []

    def start(bridge_a: str, bridge_b: str, *, template: str | None = None) -> Nginx:
        prefix = tmp_path / f"nginx-{len(started)}"
        server = with_port_retries(lambda: Nginx(binary, prefix, (bridge_a, bridge_b), template=template))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
