"""qcnode settings: one pydantic-settings model, loaded once at the entry point.

Sources, highest priority first:

1. environment variables ``QCNODE_<SECTION>__<KEY>`` (e.g. ``QCNODE_NODE__PORT=11113``);
2. the TOML file given with ``--config``, else ``$QCNODE_CONFIG``, else the first of
   ``./qcnode.toml`` and ``/etc/qcnode/qcnode.toml`` that exists;
3. built-in defaults (a node that runs with no external server).

Values are validated here, at the edge, once: AE titles follow PS3.5 §6.2 (AE VR),
hosts are IP addresses or CIDR networks, ports are in range. The rest of the code
trusts the typed objects it is handed.
"""

from __future__ import annotations

import ipaddress
import os
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
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from node.config_errors import (
    CROSS_REFERENCE,
    Problem,
    Sources,
    cross_reference_problems,
    explain,
)

DEFAULT_CONFIG_FILE = Path("qcnode.toml")
SYSTEM_CONFIG_FILE = Path("/etc/qcnode/qcnode.toml")
#: Environment variable naming the settings file (when ``--config`` is not given).
CONFIG_ENV = "QCNODE_CONFIG"
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


class ListenerTlsSettings(_Section):
    """``[node.tls]``: the TLS listening port's certificate (PS3.15 B.12, BCP 195).

    ``ca_file`` verifies the senders' certificates; with ``require_client_cert`` a
    sender without a certificate this CA signed is refused during the handshake.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _ca_for_client_certs(self) -> ListenerTlsSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signed the "
                             "senders' certificates)")
        return self


class NodeSettings(_Section):
    """The listener: ``[node]``; ``tls_port`` with ``[node.tls]`` adds a TLS port."""

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
    tls_port: BindPort | None = None
    tls: ListenerTlsSettings | None = None

    @model_validator(mode="after")
    def _tls_port_and_files(self) -> NodeSettings:
        if (self.tls_port is None) != (self.tls is None):
            raise ValueError("tls_port and [node.tls] go together: set both or neither")
        return self


class SenderSettings(_Section):
    """One allowed caller: ``[[senders]]``. ``ae_title = "*"`` admits any AE from ``host``.

    ``tls_name``: the sender must call the TLS port with a verified certificate whose
    subject CN or a subjectAltName dNSName equals it (case-insensitive); such an entry
    admits nothing on the plain port.
    """

    ae_title: SenderAETitle
    host: HostPattern
    tls_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None

    def admits(self, calling_ae: str, address: str,
               tls_names: frozenset[str] | None = None) -> bool:
        """True when this entry admits ``calling_ae`` connecting from ``address``;
        ``tls_names``: the lower-cased names of the caller's verified certificate on
        the TLS port (``None``: the plain port)."""
        if self.tls_name is not None and (
                tls_names is None or self.tls_name.lower() not in tls_names):
            return False
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
    # AE for its N-EVENT-REPORT, to the node's main listener (always admitted for this
    # destination's AE and host), or to this local port, which the delivering process
    # listens on meanwhile.
    commitment_port: Port | None = None

    @property
    def uses_commitment(self) -> bool:
        """True when deliveries ask for Storage Commitment: ``confirm = "commitment"``
        (reports to the main listener or ``commitment_port``), or ``"auto"`` with a
        ``commitment_port``."""
        return self.confirm == "commitment" or (
            self.confirm == "auto" and self.commitment_port is not None)


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
    #: Size of one receive-journal segment in ``<home>/journal`` (node.store.journal): each
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


class MppsSettings(_Section):
    """The Modality Performed Procedure Step SCP: ``[mpps]`` (PS3.4 Annex F.7).

    Its own AE title and port (modalities send MPPS to a separately configured AE),
    bound to ``[node] host``, admitting the same ``[[senders]]``. A series an ended
    step lists closes without waiting for the quiet period (node.store.completion).
    """

    enabled: bool = False
    ae_title: AETitle = "QCNODE_MPPS"
    port: BindPort = 11113


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
    #: VLM: which series get a generated explanation (inference.vlm.policy): "always",
    #: "below" (read-out score below ``explain_below``; others get the physics words),
    #: or "never".
    explain: Literal["always", "below", "never"] = "always"
    explain_below: float = Field(default=2.5, ge=0.0, le=4.0)
    #: a gpu worker assesses up to this many waiting series together (threads pool, one
    #: task per series; inference.batcher), waiting at most ``batch_wait_seconds`` for
    #: companions; 1: one series at a time (prefork pool)
    batch_series: int = Field(default=1, ge=1, le=64)
    batch_wait_seconds: float = Field(default=0.5, ge=0.0, le=60.0)
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


class WebSettings(_Section):
    """``[web]``: the console, the API, health, readiness and metrics over HTTP (node.web).

    On a loopback address by default. Another address needs HTTPS — ``tls_cert_file``
    and ``tls_key_file`` (PEM) — and, at start, an admin account (``qcnode user add NAME
    --role admin``): without one the node serves DICOM but leaves the web side off and
    says why (``web_refused``).
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8480, ge=0, le=65535)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: a console sign-in lasts this long (the API takes credentials on every call)
    session_minutes: float = Field(default=60.0, ge=1.0, le=1440.0)

    @property
    def loopback(self) -> bool:
        """Whether ``host`` is a loopback address."""
        import ipaddress

        try:
            return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @model_validator(mode="after")
    def _https_off_loopback(self) -> WebSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if not self.loopback and self.tls_cert_file is None:
            raise ValueError(
                f"{self.host!r} is not a loopback address: serving the console and API "
                "there needs HTTPS (tls_cert_file, tls_key_file) and an admin account")
        return self


class RetentionSettings(_Section):
    """What the node deletes, and when: ``[retention]`` (node.store.retention).

    Only finished data is ever deleted: a series once ``delivered`` (every destination
    confirmed, or its job done with no destinations) and, when ``ignored_days`` is set,
    a series kept by a ``store`` rule; never one receiving, queued, being assessed or
    failed, nor one with a record still in the receive journal. Ages count from when
    the series entered that state; unset (``None``) keeps it forever.

    Above ``disk_high_percent`` used on the spool's disk the oldest deletable series
    go first, down to ``disk_low_percent``, whatever their age; it must stay below the
    point where the listener refuses images (``100 - [spool] min_free_percent``). Less
    than twice ``[spool] min_free_bytes`` free counts as above the high mark too.
    """

    delivered_days: float | None = Field(default=None, ge=0)
    ignored_days: float | None = Field(default=None, ge=0)
    quarantine_days: float | None = Field(default=None, ge=0)
    #: SR / Text SR / PDF files under ``<home>/reports`` of jobs done this long ago.
    reports_days: float | None = Field(default=None, ge=0)
    disk_high_percent: float = Field(default=90.0, gt=0, le=100)
    disk_low_percent: float = Field(default=80.0, ge=0, le=100)
    sweep_seconds: PositiveSeconds = 600.0
    #: How often the disk's usage is checked between sweeps (one ``statvfs``).
    disk_check_seconds: PositiveSeconds = 5.0

    @model_validator(mode="after")
    def _low_below_high(self) -> RetentionSettings:
        if self.disk_low_percent >= self.disk_high_percent:
            raise ValueError("disk_low_percent must be below disk_high_percent")
        return self


class LoggingSettings(_Section):
    """``[logging]``: ``json`` is ``auto`` (JSON unless stderr is a terminal)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_output: Literal["auto", "always", "never"] = Field(default="auto", alias="json")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AuditSettings(_Section):
    """``[audit]``: the security audit log (node.atna): DICOM audit messages (PS3.15 A.5)
    for rejected associations, configuration changes, API logins and report deliveries.

    ``target``: ``none``, ``file`` (one XML message per line, ``file`` defaults to
    ``<home>/audit/atna.log``) or ``syslog`` (RFC 5424 over UDP, RFC 5426, to
    ``syslog_host:syslog_port``, as PS3.15 A.6/A.7 transmit audit messages).
    """

    target: Literal["none", "file", "syslog"] = "none"
    file: Path | None = None
    syslog_host: str = Field(default="127.0.0.1", min_length=1)
    syslog_port: Port = 514
    #: AuditSourceID (PS3.15 A.5.1): the host name when empty
    source_id: str = ""
    #: AuditEnterpriseSiteID, when the site has one
    site_id: str = ""


def _check_commitment_route(dest: DestinationSettings, node: NodeSettings) -> None:
    """Reports to the main listener must be addressed to the node's AE title (PS3.4 J.3:
    the PACS calls the AE that asked, i.e. the calling AE)."""
    to_main = dest.commitment_port in (None, node.port)
    calling = dest.calling_ae_title or node.ae_title
    if dest.confirm == "commitment" and to_main and calling != node.ae_title:
        raise ValueError(
            f"destination {dest.name!r}: commitment reports to the main listener must be "
            f"addressed to {node.ae_title}; set commitment_port or drop calling_ae_title")


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
    mpps: MppsSettings = MppsSettings()
    broker: BrokerSettings = BrokerSettings()
    engine: EngineSettings = EngineSettings()
    delivery: DeliverySettings = DeliverySettings()
    retention: RetentionSettings = RetentionSettings()
    logging: LoggingSettings = LoggingSettings()
    web: WebSettings = WebSettings()
    audit: AuditSettings = AuditSettings()

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        problems = cross_reference_problems(
            self.model_dump(include={"destinations", "rules"}))
        if problems:
            raise PydanticCustomError(CROSS_REFERENCE, "; ".join(m for _, m in problems))
        for destination in self.destinations:
            _check_commitment_route(destination, self.node)
        if self.retention.disk_high_percent >= 100.0 - self.spool.min_free_percent:
            raise ValueError("retention.disk_high_percent must be below the spool's refusal "
                             "point (100 - spool.min_free_percent): clean up first")
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
    def audit_file(self) -> Path:
        """Where the ``file`` audit target writes."""
        return self.audit.file if self.audit.file is not None \
            else self.node.home / "audit" / "atna.log"

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
    """A configuration could not be loaded.

    ``issues`` lists each :class:`~node.config_errors.Problem` (key, message, line of
    the file or environment variable); ``problems`` the same as ``(key, message)``.
    """

    def __init__(self, source: str, issues: Sequence[Problem]) -> None:
        self.source = source
        self.issues = list(issues)
        self.problems = [(p.key, p.message) for p in self.issues]
        super().__init__(f"invalid configuration {source}:\n  "
                         + "\n  ".join(str(p) for p in self.issues))

    def report(self, action: str = "") -> str:
        """``SOURCE: N error(s)[; action]`` and one indented line per problem."""
        head = f"{self.source}: {len(self.issues)} error(s){'; ' + action if action else ''}"
        return "\n".join([head, *(f"  {p}" for p in self.issues)])


def config_candidates() -> list[Path]:
    """Where a settings file is looked for when none is given, first found wins:
    ``$QCNODE_CONFIG``, ``./qcnode.toml``, ``/etc/qcnode/qcnode.toml``."""
    env = os.environ.get(CONFIG_ENV)
    return [*([Path(env)] if env else []), DEFAULT_CONFIG_FILE, SYSTEM_CONFIG_FILE]


def resolve_config_path(path: Path | None) -> Path | None:
    """The file to load: ``path`` if given, else the first of :func:`config_candidates`
    that exists (``$QCNODE_CONFIG`` is used even when missing: an error then)."""
    if path is not None:
        return path
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return next((p for p in config_candidates() if p.is_file()), None)


def _read(config_path: Path, source: str) -> tuple[str, dict[str, Any]]:
    try:
        text = config_path.read_bytes().decode("utf-8")
        return text, tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(source, [Problem("(file)", f"cannot read: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [Problem("(file)", f"not UTF-8: {exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        raise ConfigError(source, [Problem("(file)", f"TOML syntax error: {exc}", line)]) from exc


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (see :func:`resolve_config_path`) and the environment.

    Raises
    ------
    ConfigError
        With every problem at once: unreadable file, TOML syntax, or each validation
        error and cross-section problem with its dotted key (e.g. ``senders[0].host``),
        the file's line or the environment variable, and "did you mean" for unknown keys.
    """
    config_path = resolve_config_path(path)
    source = str(config_path) if config_path is not None else "(built-in defaults)"
    text, data = _read(config_path, source) if config_path is not None else ("", {})
    cls: type[Settings] = Settings
    if config_path is not None:
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_path})
        cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        env = EnvSettingsSource(cls)()
        return cls(**overrides)
    except SettingsError as exc:  # an override that is not valid JSON, for one
        raise ConfigError(source, [Problem("(environment)", str(exc))]) from exc
    except ValidationError as exc:
        sources = Sources(text, data, env, str(cls.model_config.get("env_prefix", "")),
                          str(cls.model_config.get("env_nested_delimiter") or "__"))
        raise ConfigError(source, explain(exc, Settings, sources)) from exc
