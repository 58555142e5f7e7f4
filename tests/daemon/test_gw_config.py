"""Config validation: a valid file loads; each bad file gives one error naming the key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import ConfigError, check_config, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "gateway.example.toml"

GOOD = """
site_id = "home-1"
[[devices]]
kind = "meter"
host = "192.0.2.10"
[[devices]]
kind = "battery"
host = "192.0.2.11"
port = 1502
unit = 3
[broker]
url = "mqtt://broker.local:1884"
username = "gw"
password = "secret"
[control]
reserve_soc_pct = 15
[store]
path = "gw.db"
[tariff]
import_per_kwh = 0.30
feed_in_per_kwh = 0.08
import_periods = [[17, 21, 0.45]]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(text)
    return p


def test_good_config_loads_with_values_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.site_id == "home-1"
    assert [d.kind for d in cfg.devices] == ["meter", "battery"]
    bat = cfg.device("battery")
    assert bat is not None and (bat.port, bat.unit, bat.name) == (1502, 3, "battery")
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.username) == ("broker.local", 1884, "gw")
    assert cfg.control.reserve_soc_pct == 15.0 and cfg.control.cycle_s == 1.0
    assert cfg.store.path == str(tmp_path / "gw.db")  # relative to the config file
    imp, exp = cfg.tariff.tariff.prices(18 * 3600, 1, 3600)
    assert imp[0] == pytest.approx(0.45) and exp[0] == pytest.approx(0.08)
    assert check_config(write(tmp_path, GOOD)) == []


def test_example_config_is_valid() -> None:
    assert check_config(EXAMPLE) == []


@pytest.mark.parametrize(("mutation", "key", "fragment"), [
    (lambda t: t.replace('site_id = "home-1"', ""), "site_id", "is required"),
    (lambda t: t.replace('"home-1"', '"Home 1/x"'), "site_id", "MQTT topic level"),
    (lambda t: t.replace("mqtt://broker.local:1884", "http://broker.local"), "broker.url",
     "mqtt://"),
    (lambda t: t.replace("reserve_soc_pct = 15", "reserve_sco_pct = 15"),
     "control.reserve_sco_pct", "did you mean 'reserve_soc_pct'"),
    (lambda t: t.replace("reserve_soc_pct = 15", "reserve_soc_pct = 150"),
     "control.reserve_soc_pct", "between 0 and 100"),
    (lambda t: t.replace("reserve_soc_pct = 15", 'reserve_soc_pct = "15"'),
     "control.reserve_soc_pct", "must be a number"),
    (lambda t: t.replace("port = 1502", "port = 70000"), "devices[1].port", "1..65535"),
    (lambda t: t.replace('kind = "battery"', 'kind = "meter"'), "devices[1].kind",
     "a second 'meter'"),
    (lambda t: t.replace('kind = "battery"', 'kind = "heatpump"'), "devices[1].kind",
     "one of meter"),
    (lambda t: t.replace("reserve_soc_pct = 15", "cycle_s = 5.0\nrevert_s = 10"),
     "control.revert_s", "at least 4 x cycle_s"),
    (lambda t: t.replace("reserve_soc_pct = 15", "cycle_s = 5.0\nphase_s = 5.0"),
     "control.phase_s", "must be in [0, cycle_s = 5)"),
    (lambda t: t.replace('password = "secret"', 'password_file = "nope.txt"'),
     "broker.password_file", "cannot read"),
    (lambda t: t.replace('username = "gw"\n', ""), "broker.username", "required when a password"),
    (lambda t: t.replace("mqtt://", "mqtts://") + "\n[broker.tls]\nca_file = 'ca.pem'\n",
     "broker.tls.ca_file",
     "file not found"),
    (lambda t: t.replace('[[devices]]\nkind = "meter"\nhost = "192.0.2.10"\n', ""), "devices",
     "kind = \"meter\""),
    (lambda t: t.replace("import_periods = [[17, 21, 0.45]]", "import_periods = [[17, 25, 1]]"),
     "tariff.import_periods[0]", "[start_hour, end_hour, price]"),
])
def test_bad_config_names_the_key(tmp_path: Path, mutation: Callable[[str], str], key: str,
                                  fragment: str) -> None:
    p = write(tmp_path, mutation(GOOD))
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.key == key, str(ei.value)
    assert fragment in str(ei.value)
    assert str(ei.value).startswith(f"config key '{key}'")
    problems = check_config(p)
    assert len(problems) == 1, problems


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "site_id = \n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    bad = GOOD.replace("reserve_soc_pct = 15", "reserve_soc_pct = -1\nbogus = 1").replace(
        "port = 1502", "port = 0")
    problems = check_config(write(tmp_path, bad))
    assert len(problems) == 3
    assert any("control.reserve_soc_pct" in p for p in problems)
    assert any("control.bogus" in p for p in problems)
    assert any("devices[1].port" in p for p in problems)
