"""The ``[envelope]`` config table: the documented example parses, bad keys are named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.config import ConfigError, load_config
from gateway.signing import public_key_to_b64, save_public_key

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "gateway.example.toml"


def _enabled_example(tmp_path: Path, key_line: str) -> Path:
    text = EXAMPLE.read_text()
    head, block = text.split("#[envelope]")
    keys = [re.sub(r"^# ", "", ln) for ln in block.splitlines()
            if re.match(r"^# [a-z_]+ = ", ln) and "dso_public_key" not in ln
            and "fallback_import_w" not in ln]
    p = tmp_path / "gw.toml"
    p.write_text(head + "[envelope]\n" + key_line + "\n" + "\n".join(keys) + "\n")
    return p


def test_documented_envelope_table_parses_with_a_key_file(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    save_public_key(key, tmp_path / "dso.pub")
    cfg = load_config(_enabled_example(tmp_path, 'dso_public_key_file = "dso.pub"'))
    assert cfg.envelope is not None
    assert cfg.envelope.dso_public_key == public_key_to_b64(key)
    assert cfg.envelope.fallback_export_w == 1500.0 and cfg.envelope.contact_timeout_s == 1800.0
    cfg2 = load_config(_enabled_example(tmp_path, f'dso_public_key = "{public_key_to_b64(key)}"'))
    assert cfg2.envelope == cfg.envelope


@pytest.mark.parametrize(("line", "key"), [
    ('dso_public_key = "bm90IGEga2V5"', "envelope.dso_public_key"),
    ('dso_public_key_file = "missing.pub"', "envelope.dso_public_key_file"),
    ('dso_public_key = "x"\ndso_public_key_file = "k.pub"', "envelope.dso_public_key"),
])
def test_bad_envelope_keys_are_named(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_enabled_example(tmp_path, line))
    assert e.value.key == key


def test_floor_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    b64 = public_key_to_b64(Ed25519PrivateKey.generate().public_key())
    p = _enabled_example(tmp_path, f'dso_public_key = "{b64}"')
    p.write_text(p.read_text().replace("min_limit_pct = 2.0", "min_limit_pct = 0.0"))
    with pytest.raises(ConfigError, match=r"envelope\.min_limit_pct"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"envelope\.export_limit"):
        load_config(_enabled_example(tmp_path, f'dso_public_key = "{b64}"\nexport_limit = 1'))
