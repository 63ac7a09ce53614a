from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.config import ConfigError, load_settings, validate_ae_title


@pytest.mark.parametrize("ae", ["QCNODE", "A", "SIXTEEN_CHARS_OK", " PADDED "])
def test_valid_ae_titles(ae: str) -> None:
    assert validate_ae_title(ae) == ae.strip()


@pytest.mark.parametrize(
    "ae", ["", "    ", "SEVENTEEN_CHARS_X", "BACK\\SLASH", "TAB\tAE", "NUL\x00", "ÄRZTE"]
)
def test_invalid_ae_titles(ae: str) -> None:
    with pytest.raises(ValueError):
        validate_ae_title(ae)


def test_defaults_need_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None)
    assert settings.node.ae_title == "QCNODE"
    assert settings.engine.name == "physics"
    assert settings.broker.url is None
    assert settings.senders[0].admits("ANY_AE", "127.0.0.1")
    assert not settings.senders[0].admits("ANY_AE", "10.0.0.5")


def test_file_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "qc.toml"
    cfg.write_text(
        """
[node]
ae_title = "QC1"
port = 104
home = "/srv/qc"

[[senders]]
ae_title = "CT01"
host = "10.1.0.0/16"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242

[[rules]]
name = "ct"
modalities = ["ct"]
destinations = ["pacs"]
quiet_seconds = 2

[engine]
name = "physics"
"""
    )
    monkeypatch.setenv("QCNODE_NODE__PORT", "11113")
    settings = load_settings(cfg)
    assert settings.node.port == 11113
    assert settings.node.ae_title == "QC1"
    assert settings.rules[0].modalities == ("CT",)
    assert settings.senders[0].admits("CT01", "10.1.200.3")
    assert not settings.senders[0].admits("CT02", "10.1.200.3")
    assert settings.destinations_for(settings.rules[0])[0].port == 4242


def test_every_error_is_reported_with_its_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        """
[node]
ae_title = "THIS_AE_TITLE_IS_TOO_LONG"
port = 70000
colour = "blue"

[[senders]]
ae_title = "CT01"
host = "not-an-address"
"""
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    keys = {key for key, _ in info.value.problems}
    assert {"node.ae_title", "node.port", "node.colour", "senders[0].host"} <= keys


def test_unknown_destination_in_rule(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[rules]]\nname = "ct"\ndestinations = ["nowhere"]\n')
    with pytest.raises(ConfigError, match="unknown destination 'nowhere'"):
        load_settings(cfg)


def test_config_check_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nae_title = "A\\\\B"\nport = "x"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "config", "check", str(bad)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1
    assert "node.ae_title" in proc.stderr and "node.port" in proc.stderr
    good = tmp_path / "good.toml"
    good.write_text('[node]\nae_title = "QC"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "config", "check", str(good)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def test_toml_syntax_error(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text("[node\n")
    with pytest.raises(ConfigError, match="TOML syntax"):
        load_settings(cfg)
