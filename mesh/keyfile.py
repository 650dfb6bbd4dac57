"""TSIG keys in BIND's key-file format.

The format is what ``tsig-keygen`` writes and what ``named`` and ``nsupdate -k``
read, so one file serves srvmesh, BIND and the command-line tools unchanged::

    key "srvmesh-key" {
        algorithm hmac-sha256;
        secret "base64...";
    };

Secrets never appear in logs or error messages: errors name the file and the
key, never the bytes.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import stat
from pathlib import Path

import dns.name
import dns.tsig

from mesh.errors import ConfigError

__all__ = ["format_key", "generate_key_file", "load_keyring", "load_key"]

log = logging.getLogger(__name__)

_KEY_BLOCK = re.compile(
    r"""key\s+"?(?P<name>[^"\s{]+)"?\s*\{(?P<body>[^}]*)\}\s*;""", re.IGNORECASE
)
_STATEMENT = re.compile(r"""(?P<word>algorithm|secret)\s+"?(?P<value>[^";\s]+)"?\s*;""")
# Quoted strings are matched first so that a base64 secret holding "//" or "/*"
# is never mistaken for the start of a comment.
_STRING_OR_COMMENT = re.compile(r'"[^"]*"|(#|//)[^\n]*|/\*.*?\*/', re.DOTALL)


def _strip_comments(text: str) -> str:
    return _STRING_OR_COMMENT.sub(lambda m: m[0] if m[0].startswith('"') else " ", text)


# RFC 8945 section 6 lists these; hmac-md5 is kept only so that a peer using
# it gets BADKEY from a clear rule rather than from an unknown-name accident.
_ALGORITHMS = {
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-md5": dns.tsig.HMAC_MD5,
}


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"key file {path} is readable by others (mode {stat.S_IMODE(mode):04o}). "
            f"Run 'chmod 600 {path}'."
        )


def load_keyring(path: str | os.PathLike[str]) -> dict[dns.name.Name, dns.tsig.Key]:
    """Read every key in a BIND key file, keyed by key name.

    Raises :class:`ConfigError` when the file is missing, unreadable, readable
    by group or others, or holds no well-formed key.
    """
    path = Path(path)
    try:
        _check_private(path)
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    text = _strip_comments(text)
    keyring: dict[dns.name.Name, dns.tsig.Key] = {}
    for block in _KEY_BLOCK.finditer(text):
        name = dns.name.from_text(block["name"])
        fields = {
            m["word"].lower(): m["value"] for m in _STATEMENT.finditer(block["body"])
        }
        if "secret" not in fields or "algorithm" not in fields:
            raise ConfigError(f"key {name} in {path} lacks an algorithm or a secret")
        algorithm = _ALGORITHMS.get(fields["algorithm"].lower())
        if algorithm is None:
            raise ConfigError(
                f"key {name} in {path} uses unsupported algorithm {fields['algorithm']!r}"
            )
        try:
            secret = base64.b64decode(fields["secret"], validate=True)
        except binascii.Error:
            raise ConfigError(
                f"key {name} in {path} has a secret that is not base64"
            ) from None
        keyring[name] = dns.tsig.Key(name, secret, algorithm)
    if not keyring:
        raise ConfigError(f"key file {path} holds no key block")
    return keyring


def load_key(path: str | os.PathLike[str], name: str | None = None) -> dns.tsig.Key:
    """Read one key from a BIND key file: the one called ``name``, else the first."""
    keyring = load_keyring(path)
    if name is None:
        return next(iter(keyring.values()))
    key = keyring.get(dns.name.from_text(name))
    if key is None:
        raise ConfigError(f"key file {path} has no key named {name!r}")
    return key


def format_key(name: str, secret: bytes, algorithm: str = "hmac-sha256") -> str:
    """Render one key block in BIND's syntax."""
    label = name.rstrip(".")
    encoded = base64.b64encode(secret).decode()
    return f'key "{label}" {{\n\talgorithm {algorithm};\n\tsecret "{encoded}";\n}};\n'


def generate_key_file(
    path: str | os.PathLike[str],
    name: str = "srvmesh-key",
    algorithm: str = "hmac-sha256",
) -> Path:
    """Create a key file with a fresh random secret, mode 0600.

    Refuses to overwrite an existing file. The secret is 32 bytes, the output
    size of SHA-256, as RFC 8945 section 6 recommends for hmac-sha256.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = format_key(name, secrets.token_bytes(32), algorithm).encode()
    # O_EXCL: two processes racing to create the key must not both win.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("generated TSIG key %s in %s", name, path)
    return path
