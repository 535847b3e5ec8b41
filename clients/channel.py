"""Connection settings shared by Client and AsyncClient: target, TLS, token, limits."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
TOKEN_ENV = "EPSERVE_TOKEN"


@dataclass(frozen=True)
class ConnectionSettings:
    target: str = DEFAULT_TARGET
    token: str | None = None  # bearer token sent on every call
    tls: bool = False  # use TLS (with root_certificates, or the system roots)
    root_certificates: bytes | None = None  # PEM of the CA (or self-signed cert) to trust
    server_hostname: str | None = None  # override the name checked against the certificate
    max_message_bytes: int = 64 * 1024 * 1024

    @classmethod
    def make(cls, target: str | None, token: str | None, tls: bool, root_certificates: bytes | str | Path | None,
             server_hostname: str | None, max_message_bytes: int) -> "ConnectionSettings":
        """Resolve defaults: token from $EPSERVE_TOKEN, certificates from a path, TLS implied by a CA."""
        if isinstance(root_certificates, (str, Path)):
            root_certificates = Path(root_certificates).read_bytes()
        return cls(
            target=target or DEFAULT_TARGET,
            token=token if token is not None else os.environ.get(TOKEN_ENV) or None,
            tls=tls or root_certificates is not None,
            root_certificates=root_certificates,
            server_hostname=server_hostname,
            max_message_bytes=max_message_bytes,
        )

    def options(self) -> list[tuple[str, object]]:
        opts: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 0),  # retries are ours: UNAVAILABLE only, streams before the first token
        ]
        if self.server_hostname:
            opts.append(("grpc.ssl_target_name_override", self.server_hostname))
        return opts

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates) if self.tls else None

    def sync_channel(self) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(self.target, options=self.options())
        return grpc.secure_channel(self.target, creds, options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(self.target, options=self.options())
        return grpc.aio.secure_channel(self.target, creds, options=self.options())
