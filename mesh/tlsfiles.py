"""Checks on the files that hold certificates and secrets, phrased for one line of output.

A key, a credentials file or a password file must exist, be readable by us and not be
readable by every user of the machine; a certificate file must hold PEM certificates, and
a certificate and its key must belong together. Nothing here ever puts a file's content
in an error message.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


class FileProblem(ValueError):
    """Why a file cannot be used; never contains the file's content."""


def readable(path: Path) -> Path:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileProblem(f"{path}: no such file") from None
    except OSError as exc:
        raise FileProblem(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise FileProblem(f"{path}: not readable by this user")
    return path


def private(path: Path) -> Path:
    """A secret: readable by us, not world-readable (mode o+r is refused)."""
    readable(path)
    mode = path.stat().st_mode
    if mode & stat.S_IROTH:
        raise FileProblem(
            f"{path}: readable by every user (mode {stat.S_IMODE(mode):04o}); chmod o-r it"
        )
    return path


def load_certificates(path: Path) -> list[x509.Certificate]:
    readable(path)
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        raise FileProblem(f"{path}: no PEM certificate in it") from None
    if not certs:
        raise FileProblem(f"{path}: no PEM certificate in it")
    return certs


def check_pair(cert_path: Path, key_path: Path) -> None:
    """The first certificate in ``cert_path`` is for the private key in ``key_path``."""
    cert = load_certificates(cert_path)[0]
    private(key_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (ValueError, TypeError):
        raise FileProblem(f"{key_path}: not an unencrypted PEM private key") from None
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, fmt) != cert.public_key().public_bytes(enc, fmt):
        raise FileProblem(f"{key_path}: does not match the certificate in {cert_path}")


def read_secret(path: Path) -> str:
    """The first line of a password file, stripped; the file must be private."""
    private(path)
    value = path.read_text().strip().splitlines()[0:1]
    if not value or not value[0]:
        raise FileProblem(f"{path}: empty")
    return value[0]
