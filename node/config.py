"""qcnode settings: one pydantic-settings model, loaded once at the entry point.

Sources, highest priority first:

1. environment variables ``QCNODE_<SECTION>__<KEY>`` (e.g. ``QCNODE_NODE__PORT=11113``);
2. the TOML file given with ``--config`` (or ``./qcnode.toml`` when present);
3. built-in defaults (a node that runs with no external server).

Values are validated here, at the edge, once: AE titles follow PS3.5 §6.2 (AE VR),
hosts are IP addresses or CIDR networks, ports are in range. The rest of the code
trusts the typed objects it is handed.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = Path("qcnode.toml")
AE_TITLE_MAX_LENGTH = 16
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def validate_ae_title(value: str) -> str:
    """Validate an Application Entity title (PS3.5 §6.2, VR AE).

    At most 16 characters of the default repertoire, no backslash, no control
    characters, not all spaces. Leading and trailing spaces are not significant and
    are removed.
    """
    if not isinstance(value, str):
        raise TypeError("AE title must be a string")
    if len(value) > AE_TITLE_MAX_LENGTH:
        raise ValueError(f"AE title {value!r} is longer than {AE_TITLE_MAX_LENGTH} characters")
    if "\\" in value:
        raise ValueError(f"AE title {value!r} contains a backslash")
    if _CONTROL_CHARS.search(value):
        raise ValueError(f"AE title {value!r} contains a control character")
    if not value.isascii():
        raise ValueError(f"AE title {value!r} contains characters outside ASCII")
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title must not be empty or all spaces")
    return stripped


def _validate_sender_ae(value: str) -> str:
    return value if value == "*" else validate_ae_title(value)


def _validate_host_pattern(value: str) -> str:
    """An IP address, a CIDR network, or the explicit word ``any``."""
    if value == "any":
        return value
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise ValueError(
            f"{value!r} is not an IP address, a CIDR network (e.g. 10.1.0.0/16) or 'any'"
        ) from exc


def _validate_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc


AETitle = Annotated[str, AfterValidator(validate_ae_title)]
SenderAETitle = Annotated[str, AfterValidator(_validate_sender_ae)]
HostPattern = Annotated[str, AfterValidator(_validate_host_pattern)]
IPAddress = Annotated[str, AfterValidator(_validate_ip)]
Port = Annotated[int, Field(ge=1, le=65535)]
BindPort = Annotated[int, Field(ge=0, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    """The listener: ``[node]``."""

    ae_title: AETitle = "QCNODE"
    host: IPAddress = "127.0.0.1"
    port: BindPort = 11112
    home: Path = Path("var")
    max_associations: int = Field(default=64, ge=1, le=1024)
    max_associations_per_host: int = Field(default=32, ge=1, le=1024)
    max_pdu: int = Field(default=4_194_304, ge=0, le=2**32 - 1)
    acse_timeout: PositiveSeconds = 10.0
    dimse_timeout: PositiveSeconds = 60.0
    network_timeout: PositiveSeconds = 60.0


class SenderSettings(_Section):
    """One allowed caller: ``[[senders]]``. ``ae_title = "*"`` admits any AE from ``host``."""

    ae_title: SenderAETitle
    host: HostPattern

    def admits(self, calling_ae: str, address: str) -> bool:
        """True when this entry admits ``calling_ae`` connecting from ``address``."""
        if self.ae_title != "*" and self.ae_title != calling_ae.strip(" "):
            return False
        if self.host == "any":
            return True
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.host)
        except ValueError:
            return False


class TlsSettings(_Section):
    """TLS for an outgoing association (PS3.15 Annex B, the TLS secure transport profile)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = False


Companion = Literal["text_sr", "pdf"]
ConfirmMode = Literal["auto", "commitment", "find", "none"]


class DestinationSettings(_Section):
    """A DICOM peer the reports go to: ``[[destinations]]``."""

    kind: Literal["dicom"] = "dicom"
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    calling_ae_title: AETitle | None = None
    tls: TlsSettings | None = None
    companions: tuple[Companion, ...] = ()
    confirm: ConfirmMode = "auto"
    timeout: PositiveSeconds = 30.0
    # Storage Commitment (PS3.4 Annex J): the PACS opens a new association to the calling
    # AE for its N-EVENT-REPORT; this is the local port the sender listens on meanwhile.
    commitment_port: Port | None = None


RuleAction = Literal["assess", "store", "reject"]


class RuleSettings(_Section):
    """Which series are assessed: ``[[rules]]``; the first matching rule wins.

    A rule matches when every given criterion matches (empty = any): modality,
    SOP Class UID, and a regular expression searched in the Series Description.
    ``assess`` queues the series; ``store`` keeps it and records it as ignored;
    ``reject`` refuses the C-STORE (0x0124 Refused: Not Authorized, nothing kept).
    """

    name: str = Field(min_length=1, max_length=64)
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    series_description: str | None = None
    action: RuleAction = "assess"
    destinations: tuple[str, ...] | None = None
    quiet_seconds: PositiveSeconds | None = None
    max_wait_seconds: PositiveSeconds | None = None

    @field_validator("series_description")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return value

    @field_validator("modalities")
    @classmethod
    def _upper_modalities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.strip().upper() for m in value)

    def matches(self, modality: str, sop_class_uid: str, series_description: str) -> bool:
        """True when the series' attributes satisfy every criterion of this rule."""
        if self.modalities and modality.strip().upper() not in self.modalities:
            return False
        if self.sop_classes and sop_class_uid not in self.sop_classes:
            return False
        return not (
            self.series_description is not None
            and re.search(self.series_description, series_description) is None
        )


def _default_rules() -> tuple[RuleSettings, ...]:
    return (
        RuleSettings(name="ct", modalities=("CT",), action="assess"),
        RuleSettings(name="other", action="store"),
    )


class SpoolSettings(_Section):
    """Where images are kept: ``[spool]``; ``dir`` defaults to ``<home>/spool``."""

    dir: Path | None = None
    min_free_bytes: int = Field(default=1_000_000_000, ge=0)
    min_free_percent: float = Field(default=5.0, ge=0, le=100)
    #: Size of one receive-journal segment in ``<home>/journal`` (node.journal): each
    #: association appends to its own; a larger data set extends its segment.
    journal_segment_bytes: int = Field(default=8 << 20, ge=1 << 20, le=1 << 34)
    #: Segments written once when the journal is created (then reused): the data
    #: the node can acknowledge ahead of moving it into the spool and the ledger.
    journal_segments: int = Field(default=64, ge=1, le=4096)


class LedgerSettings(_Section):
    """The ledger database: ``[ledger]``; ``url`` defaults to SQLite in ``<home>``."""

    url: str | None = None


class CompletionSettings(_Section):
    """When a series counts as complete: ``[completion]`` (rules may override)."""

    quiet_seconds: PositiveSeconds = 5.0
    max_wait_seconds: PositiveSeconds = 1800.0
    poll_seconds: PositiveSeconds = 0.5


class BrokerSettings(_Section):
    """Celery broker: ``[broker]``; no ``url`` runs the embedded SQLite-backed broker."""

    url: str | None = None
    result_backend: str | None = None
    # Prefix of the queue names ("<prefix>gpu", "<prefix>io"): several nodes (or test
    # runs) can share one broker without taking each other's work.
    queue_prefix: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")] = ""


EngineName = Literal["physics", "vlm"]


class EngineSettings(_Section):
    """The quality engine: ``[engine]``."""

    name: EngineName = "physics"
    model: Path | None = None
    adapter: Path | None = None
    slices: int = Field(default=8, ge=1, le=512)
    device: str = "auto"
    # The VLM's runtime: transformers (NF4 + peft, in process) or vLLM — in process, or
    # the `vllm serve` at vllm_url shared by several workers (vllm_model: served name).
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")] | None = None
    vllm_model: str | None = None

    @model_validator(mode="after")
    def _vlm_needs_model(self) -> EngineSettings:
        if self.name == "vlm" and self.model is None:
            raise ValueError("engine 'vlm' needs 'model', a local model directory")
        if self.vllm_url is not None and self.backend != "vllm":
            raise ValueError("engine 'vllm_url' needs backend = \"vllm\"")
        return self


class DeliverySettings(_Section):
    """Retry policy for sending reports: ``[delivery]``."""

    max_attempts: int = Field(default=8, ge=1, le=100)
    backoff_initial_seconds: PositiveSeconds = 5.0
    backoff_max_seconds: PositiveSeconds = 600.0


class LoggingSettings(_Section):
    """``[logging]``: ``json`` is ``auto`` (JSON unless stderr is a terminal)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_output: Literal["auto", "always", "never"] = Field(default="auto", alias="json")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Settings(BaseSettings):
    """Everything qcnode is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="QCNODE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    node: NodeSettings = NodeSettings()
    senders: tuple[SenderSettings, ...] = (
        SenderSettings(ae_title="*", host="127.0.0.1"),
    )
    destinations: tuple[DestinationSettings, ...] = ()
    rules: tuple[RuleSettings, ...] = Field(default_factory=_default_rules)
    spool: SpoolSettings = SpoolSettings()
    ledger: LedgerSettings = LedgerSettings()
    completion: CompletionSettings = CompletionSettings()
    broker: BrokerSettings = BrokerSettings()
    engine: EngineSettings = EngineSettings()
    delivery: DeliverySettings = DeliverySettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
        known = set(names)
        for rule in self.rules:
            for dest in rule.destinations or ():
                if dest not in known:
                    raise ValueError(f"rule {rule.name!r} names unknown destination {dest!r}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    # Derived locations -------------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        """Directory holding received instances."""
        return self.spool.dir if self.spool.dir is not None else self.node.home / "spool"

    @property
    def ledger_url(self) -> str:
        """SQLAlchemy URL of the ledger."""
        if self.ledger.url is not None:
            return self.ledger.url
        return f"sqlite:///{(self.node.home / 'ledger.sqlite3').resolve()}"

    def destination(self, name: str) -> DestinationSettings:
        """The destination called ``name`` (KeyError if none)."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def rule_for(
        self, modality: str, sop_class_uid: str, series_description: str
    ) -> RuleSettings | None:
        """The first rule that matches, or None (no rule: the instance is rejected)."""
        for rule in self.rules:
            if rule.matches(modality, sop_class_uid, series_description):
                return rule
        return None

    def destinations_for(self, rule: RuleSettings) -> tuple[DestinationSettings, ...]:
        """The rule's destinations; a rule that names none sends to all of them."""
        if rule.destinations is None:
            return self.destinations
        return tuple(self.destination(n) for n in rule.destinations)


class ConfigError(Exception):
    """A configuration could not be loaded; ``problems`` lists ``(key, message)``."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = [f"{key}: {message}" for key, message in self.problems]
        super().__init__(f"invalid configuration {source}:\n  " + "\n  ".join(lines))


def _loc_to_key(loc: Sequence[int | str]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(file)"


def resolve_config_path(path: Path | None) -> Path | None:
    """The file to load: ``path`` if given, else ``./qcnode.toml`` if it exists."""
    if path is not None:
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (see :func:`resolve_config_path`) and the environment.

    Raises
    ------
    ConfigError
        With one ``(key, message)`` per problem: unreadable file, TOML syntax, or each
        validation error with its dotted key (e.g. ``senders[0].host``).
    """
    config_path = resolve_config_path(path)
    source = str(config_path) if config_path is not None else "(built-in defaults)"
    if config_path is not None:
        try:
            with config_path.open("rb") as fh:
                tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(source, [("(file)", f"cannot read: {exc.strerror}")]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, [("(file)", f"TOML syntax error: {exc}")]) from exc

    cls: type[Settings] = Settings
    if config_path is not None:
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_path})
        cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = [(_loc_to_key(err["loc"]), err["msg"]) for err in exc.errors()]
        raise ConfigError(source, problems) from exc
