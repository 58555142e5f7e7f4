"""Ed25519 signatures on envelope messages: only the DSO may publish limits.

Wire form: the payload object plus a ``sig`` field holding the base64 (standard alphabet, with
padding) Ed25519 signature of the payload's canonical JSON *without* ``sig``:
``json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)`` encoded as UTF-8. Both ends use this module, so Python's float formatting
(shortest round-trip ``repr``) is the canonical number form; a non-Python publisher must emit
the same bytes (it is close to, but not exactly, RFC 8785 JCS).

Keys are PEM files: PKCS#8 private key (mode 0600, unencrypted: the DSO host protects it) and
SubjectPublicKeyInfo public key; a public key can also travel as base64 of its 32 raw bytes
(for the gateway's TOML config).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIG_FIELD: Final = "sig"


class SignatureInvalid(ValueError):
    """A message failed verification; ``reason`` names why (missing, malformed, mismatch)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def canonical(payload: dict[str, Any]) -> bytes:
    """The signed bytes: canonical JSON of ``payload`` without ``sig``.
    Raises ValueError/TypeError for what JSON cannot carry (NaN, infinities, non-JSON types)."""
    body = {k: v for k, v in payload.items() if k != SIG_FIELD}
    text = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def sign(payload: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``payload`` with ``sig`` set (any existing ``sig`` is replaced)."""
    sig = private_key.sign(canonical(payload))
    out = {k: v for k, v in payload.items() if k != SIG_FIELD}
    out[SIG_FIELD] = base64.b64encode(sig).decode("ascii")
    return out


def verify(msg: object, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The payload (``msg`` without ``sig``) if the signature is valid for ``public_key``.
    Raises :class:`SignatureInvalid` with the reason otherwise."""
    if not isinstance(msg, dict):
        raise SignatureInvalid(f"message must be a JSON object, got {type(msg).__name__}")
    sig_text = msg.get(SIG_FIELD)
    if sig_text is None:
        raise SignatureInvalid("message is not signed (no 'sig' field)")
    if not isinstance(sig_text, str):
        raise SignatureInvalid(f"'sig' must be a base64 string, got {type(sig_text).__name__}")
    try:
        sig = base64.b64decode(sig_text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SignatureInvalid("'sig' is not valid base64") from None
    if len(sig) != 64:
        raise SignatureInvalid(f"'sig' decodes to {len(sig)} bytes, an Ed25519 signature has 64")
    try:
        data = canonical(msg)
    except (ValueError, TypeError) as exc:
        raise SignatureInvalid(f"payload cannot be canonicalised: {exc}") from None
    try:
        public_key.verify(sig, data)
    except InvalidSignature:
        raise SignatureInvalid("signature does not match the payload and the DSO's key") from None
    return {k: v for k, v in msg.items() if k != SIG_FIELD}


# --- keys -------------------------------------------------------------------------------------


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write a PKCS#8 PEM private key, created with mode 0600 (never world-readable)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(p, 0o600)  # O_CREAT's mode does not apply to an existing file


def save_public_key(key: Ed25519PublicKey, path: str | os.PathLike[str]) -> None:
    """Write a SubjectPublicKeyInfo PEM public key."""
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    Path(path).write_bytes(pem)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a PEM private key; ValueError naming the file unless unencrypted Ed25519."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: private key is {type(key).__name__}, not Ed25519")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a PEM public key; ValueError naming the file if it is not Ed25519."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: public key is {type(key).__name__}, not Ed25519")
    return key


def public_key_to_b64(key: Ed25519PublicKey) -> str:
    """The 32 raw public-key bytes as base64 (for a config file)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Inverse of :func:`public_key_to_b64`; ValueError if it is not 32 base64 bytes."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("public key is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"public key decodes to {len(raw)} bytes, an Ed25519 key has 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def generate_keypair(directory: str | os.PathLike[str], name: str = "dso") -> tuple[Path, Path]:
    """Create ``directory/<name>.key`` (private, 0600) and ``directory/<name>.pub``; returns both
    paths. Refuses to overwrite an existing private key (FileExistsError)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / f"{name}.key", d / f"{name}.pub"
    if priv_path.exists():
        raise FileExistsError(f"{priv_path} exists; refusing to overwrite a private key")
    key = Ed25519PrivateKey.generate()
    save_private_key(key, priv_path)
    save_public_key(key.public_key(), pub_path)
    return priv_path, pub_path
