import base64
import os
from pathlib import Path

import dns.tsig
import pytest

from mesh.errors import ConfigError
from mesh.keyfile import generate_key_file, load_key, load_keyring


def test_generated_key_is_private_and_readable(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "k" / "tsig.key", "srvmesh-key")
    assert os.stat(path).st_mode & 0o777 == 0o600
    key = load_key(path)
    assert key.algorithm == dns.tsig.HMAC_SHA256
    assert len(key.secret) == 32
    with pytest.raises(FileExistsError):
        generate_key_file(path)


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "tsig.key")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_keyring(path)


def test_reads_bind_syntax_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text(
        '# made by tsig-keygen\nkey "a-key" {\n  algorithm hmac-sha512; // strong\n'
        '  secret "c2VjcmV0";\n};\nkey b.example. { algorithm HMAC-SHA256; secret "eHl6"; };\n'
    )
    path.chmod(0o600)
    ring = load_keyring(path)
    assert [str(n) for n in ring] == ["a-key.", "b.example."]
    assert load_key(path, "b.example").secret == b"xyz"


def test_errors_never_show_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text('key "k" { algorithm hmac-foo; secret "c2VjcmV0"; };\n')
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load_keyring(path)
    assert "c2VjcmV0" not in str(info.value)


@pytest.mark.parametrize("secret", ["ab//cd+/", "////", "AAAA//8="])
def test_secret_with_comment_marker_is_kept(tmp_path: Path, secret: str) -> None:
    # Base64 uses '/', so one random secret in about 60 holds "//".
    path = tmp_path / "k.key"
    path.write_text(
        f'key "k" {{ /* c */ algorithm hmac-sha256; secret "{secret}"; }}; // end\n'
    )
    path.chmod(0o600)
    assert load_key(path).secret == base64.b64decode(secret)
