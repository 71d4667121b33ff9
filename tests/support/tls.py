"""TLS for brokers that run without it here: a throwaway CA with server and client certificates, and a TLS
endpoint forwarding the decrypted stream to a plaintext broker."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any

from listener.throwaway import free_port

__all__ = ["Certificates", "TlsForwarder", "enable_postgres_tls"]


class Certificates:
    """A throwaway CA with a server certificate (for 127.0.0.1 and localhost unless ``server_names`` says
    otherwise) and a client certificate whose common name is ``client``, as PEM files."""

    def __init__(self, directory: Path, server_names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC)

        def name(common: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

        def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
            cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            key_path.chmod(0o600)  # libpq refuses a key others can read
            return cert_path, key_path

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(name("wal-listener test CA"))
            .issuer_name(name("wal-listener test CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        self.ca, _ = write("ca", ca_key, ca)

        def leaf(stem: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> tuple[Path, Path]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(stem))
                .issuer_name(ca.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            )
            if san:
                builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            return write(stem, key, builder.sign(ca_key, hashes.SHA256()))

        def san(text: str) -> x509.GeneralName:
            try:
                return x509.IPAddress(ipaddress.ip_address(text))
            except ValueError:
                return x509.DNSName(text)

        self.server_cert, self.server_key = leaf(
            "server", ExtendedKeyUsageOID.SERVER_AUTH, [san(n) for n in server_names]
        )
        self.client_cert, self.client_key = leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def server_context(self) -> ssl.SSLContext:
        """The broker side: our server certificate; client certificates signed by our CA required."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_cert, self.server_key)
        context.load_verify_locations(self.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        return context


class TlsForwarder:
    """A TLS endpoint on 127.0.0.1:``port`` that forwards the decrypted stream to a plaintext server:
    a broker with (mutual) TLS, for brokers that have it switched off here."""

    def __init__(self, target_port: int, context: ssl.SSLContext, port: int | None = None) -> None:
        self.target_port = target_port
        self.context = context
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.handshakes = 0

    async def __aenter__(self) -> TlsForwarder:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.context)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError, ssl.SSLError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        tasks = [asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)


def enable_postgres_tls(server: Any, certs: Certificates, *, client_cert_users: tuple[str, ...] = ()) -> None:
    """Restart ``server`` (a stopped-or-running test PostgreSQL) with ``ssl = on`` and ``certs``' server
    certificate; TCP connections must use TLS (``hostssl`` only), and ``client_cert_users`` log in with a
    client certificate signed by the CA (``cert`` method; the certificate's CN is the user name)."""
    import os
    import shutil

    server.stop()
    data = Path(server.data_dir)
    for source, target in ((certs.server_cert, "server.crt"), (certs.server_key, "server.key"), (certs.ca, "ca.crt")):
        shutil.copyfile(source, data / target)
        os.chmod(data / target, 0o600)
        if os.geteuid() == 0:
            stat = data.stat()
            os.chown(data / target, stat.st_uid, stat.st_gid)
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n")
    lines = ["local all all trust", "local replication all trust"]
    for user in client_cert_users:
        lines += [f"hostssl all {user} 127.0.0.1/32 cert", f"hostssl replication {user} 127.0.0.1/32 cert"]
    lines += ["hostssl all all 127.0.0.1/32 trust", "hostssl replication all 127.0.0.1/32 trust"]
    (data / "pg_hba.conf").write_text("\n".join(lines) + "\n")
    server.sslmode = "require"
    server.start()
