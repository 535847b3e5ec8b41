"""Check the TLS certificate and key at start-up, and name what is wrong with them.

grpc reports every bad pair (a file that is not PEM, a key of another certificate, the two
files swapped) only as a failed bind, which the server used to explain as a port in use. The
standard library's OpenSSL reads the same PEM files, so loading them once with
`ssl.SSLContext.load_cert_chain` before the port opens finds each problem, and the PEM markers
tell which file holds what.
"""
from __future__ import annotations

import ssl

from server.config import ConfigError

_CERT = b"-----BEGIN CERTIFICATE-----"
_KEY = b"PRIVATE KEY-----"  # BEGIN PRIVATE KEY, BEGIN RSA/EC PRIVATE KEY, BEGIN ENCRYPTED PRIVATE KEY


def _no_password() -> bytes:
    raise ConfigError("server.tls_key is encrypted with a passphrase; grpc needs an unencrypted PEM key")


def check_key_pair(cert_path: str, key_path: str, cert_pem: bytes, key_pem: bytes) -> None:
    """Raise ConfigError naming the file and the problem unless the pair can serve TLS."""
    if _CERT not in cert_pem:
        swapped = _KEY in cert_pem and _CERT in key_pem
        raise ConfigError(
            f"server.tls_cert={cert_path!r} holds a private key, not a certificate: are server.tls_cert and "
            "server.tls_key swapped?" if swapped else
            f"server.tls_cert={cert_path!r} is not a PEM certificate (no '{_CERT.decode()}' line)")
    if _KEY not in key_pem:
        raise ConfigError(f"server.tls_key={key_path!r} is not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' line)"
                          + (" but a certificate" if _CERT in key_pem else ""))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ConfigError(f"server.tls_key={key_path!r} does not match the certificate in "
                              f"server.tls_cert={cert_path!r} (it is the key of another certificate)") from None
        raise ConfigError(f"server.tls_cert={cert_path!r} / server.tls_key={key_path!r}: OpenSSL cannot load "
                          f"the pair ({reason})") from None
    except OSError as exc:
        raise ConfigError(f"server.tls_cert/server.tls_key: cannot read {exc.filename or cert_path!r} "
                          f"({exc.strerror or exc})") from None
