from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import ConfigError, load_settings, validate_ae_title
from node.config_errors import line_of, toml_lines


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


BAD_IN_MANY_WAYS = """\
[node]
port = "x"
ae_titel = "QC"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242

[[destinations]]
name = "pacs"
ae_title = "PACS2"
host = "127.0.0.1"
port = 70000
[destinations.tls]
ca_fil = "ca.pem"

[[rules]]
name = "ct"
destinations = ["nowhere"]
"""


def test_every_error_in_one_pass_with_line_and_suggestion(tmp_path: Path) -> None:
    """The cross-section checks (duplicate names, unknown destinations) are reported
    together with the field errors, not only once those are fixed; each has its line."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BAD_IN_MANY_WAYS)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    found = {(p.key, p.line): p.message for p in info.value.issues}
    assert set(found) == {
        ("node.port", 2), ("node.ae_titel", 3), ("destinations[1].name", 12),
        ("destinations[1].port", 15), ("destinations[1].tls.ca_file", 16),
        ("destinations[1].tls.ca_fil", 17), ("rules[0].destinations", 21),
    }
    assert found[("node.ae_titel", 3)] == "unknown key; did you mean 'ae_title'?"
    assert found[("destinations[1].tls.ca_fil", 17)].endswith("did you mean 'ca_file'?")
    assert "duplicate destination name 'pacs'" in found[("destinations[1].name", 12)]
    assert "unknown destination 'nowhere'" in found[("rules[0].destinations", 21)]


def test_toml_lines_counts_arrays_of_tables() -> None:
    text = (
        '[node]\nport = 1\n\n[[senders]]\nhost = "a"\n[[senders]]\n'
        'ae_title = "B"\nhost = "b"\n\n[[destinations]]\nname = "x"\n'
        '[destinations.tls]\nca_file = "c"\n[[destinations]]\nname = "y"\n'
        'notes = """\nport = 9\n"""\n[destinations.tls]\nca_file = "d"\n'
        'sub.key = 1\n'
    )
    lines = toml_lines(text)
    assert lines[("node", "port")] == 2
    assert lines[("senders", 0)] == 4 and lines[("senders", 0, "host")] == 5
    assert lines[("senders", 1, "host")] == 8
    assert lines[("destinations", 0, "tls", "ca_file")] == 13
    assert lines[("destinations", 1, "name")] == 15
    assert ("destinations", 1, "port") not in lines  # inside a multi-line string
    assert lines[("destinations", 1, "tls", "ca_file")] == 20
    assert lines[("destinations", 1, "tls", "sub", "key")] == 21
    # A missing key points at its table; a table set inline at its key.
    assert line_of(("senders", 1, "port"), lines) == 6
    assert line_of(("senders", 3, "host"), toml_lines('senders = [{host = "a"}]\n')) == 1


def test_env_override_error_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "qc.toml"
    cfg.write_text('[node]\nae_title = "QC"\nport = 104\n')
    monkeypatch.setenv("QCNODE_NODE__PORT", "not-a-port")
    monkeypatch.setenv("QCNODE_NODE__AE_TITEL", "QC2")
    monkeypatch.setenv("QCNODE_SENDERS", '[{"ae_title": "CT", "host": "nowhere"}]')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    by_key = {p.key: p for p in info.value.issues}
    assert by_key["node.port"].env == "QCNODE_NODE__PORT"
    assert by_key["node.ae_titel"].env == "QCNODE_NODE__AE_TITEL"
    assert "did you mean 'ae_title'" in by_key["node.ae_titel"].message
    assert by_key["senders[0].host"].env == "QCNODE_SENDERS"
    assert "QCNODE_NODE__PORT (environment, node.port)" in str(info.value)


def test_config_check_cli_lists_everything(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BAD_IN_MANY_WAYS)
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "config", "check", str(cfg)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "QCNODE_SPOOL__MIN_FREE_BYTES": "lots"},
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == f"{cfg}: 8 error(s)"
    assert "  QCNODE_SPOOL__MIN_FREE_BYTES (environment, spool.min_free_bytes): " in proc.stderr
    assert "  line 3: node.ae_titel: unknown key; did you mean 'ae_title'?" in proc.stderr
    assert "  line 12: destinations[1].name: duplicate destination name" in proc.stderr


def test_config_file_found_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text('[node]\nae_title = "SITE"\n')
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setenv("QCNODE_CONFIG", str(cfg))
    assert load_settings(None).node.ae_title == "SITE"
