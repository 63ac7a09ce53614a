"""DICOM audit messages (PS3.15 A.5, the ATNA / RFC 3881 format) for the node's security
events: built here, sent by :mod:`node.audit_log`.

Four events, each one :class:`AuditMessage` as PS3.15 A.5.3 specialises it; codes from
PS3.16 (CID 400 Audit Event ID, CID 401/403 event types, CID 402 role IDs, CID 404
participant object ID types), every one a :class:`Code` constant below:

* a **rejected association** — Security Alert (110113) / Node Authentication (110126),
  action E, outcome 4 "minor failure" (the refusal was the mitigation; PS3.15 A.5.3.11);
  the caller as a Node ID participant object with the reason as its Alert Description;
* a **configuration change** — Security Alert (110113) / Software Configuration (110131),
  outcome 0 (informative); who changed it, the file as a "Master File" URI object;
* a **login** to the API — User Authentication (110114) / Login (110122), outcome 0 or
  4 (PS3.15 A.5.3.12); the user and the client's address;
* a **delivered report** — DICOM Instances Transferred (110104), action R (the sender
  cannot know whether the receiver held the objects, A.5.3.4), Source and Destination
  participants with their AE titles (``AETITLES=``, A.5.2.2), the study as a Study
  Instance UID object with its SOP classes and instance counts.

**No patient data.** A.5.3.4 lists a Patient participant object (Patient ID, name) for
transferred instances; qcnode leaves it out, as it keeps patient attributes out of
every log: an audit repository finds the patient through the Study Instance UID.

Messages are validated in the test suite against the Relax NG schema of PS3.15 A.5.1.1.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Code:
    """A coded value (PS3.15 A.5.1 CodedValueType: csd-code, codeSystemName, originalText)."""

    value: str
    meaning: str
    system: str = "DCM"


# PS3.16 CID 400 Audit Event ID
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
# CID 401 Audit Event Type Code, CID 403 Security Alert Type Code
LOGIN = Code("110122", "Login")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
SOFTWARE_CONFIGURATION = Code("110131", "Software Configuration")
# CID 402 Audit Active Participant Role ID Code
APPLICATION = Code("110150", "Application")
DESTINATION = Code("110152", "Destination Role ID")
SOURCE = Code("110153", "Source Role ID")
# CID 404 Audit Participant Object ID Type Code; RFC 3881 (PS3.15 A.5.1.2.4) value 12
STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
NODE_ID = Code("110182", "Node ID")
URI = Code("12", "URI", "RFC-3881")

# EventActionCode, EventOutcomeIndicator (PS3.15 A.5.1.1)
ACTION_READ = "R"
ACTION_EXECUTE = "E"
OUTCOME_SUCCESS = "0"
OUTCOME_MINOR_FAILURE = "4"
# ParticipantObjectTypeCode / ...TypeCodeRole (PS3.15 A.5.1.2.2)
SYSTEM_OBJECT = "2"
ROLE_REPORT = "3"
ROLE_MASTER_FILE = "5"
ROLE_SECURITY_RESOURCE = "13"
# NetworkAccessPointTypeCode
NAP_MACHINE_NAME = "1"
NAP_IP_ADDRESS = "2"
ALERT_DESCRIPTION = "Alert Description"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a user or process taking part in the event."""

    user_id: str
    requestor: bool
    ae_titles: tuple[str, ...] = ()
    user_name: str | None = None
    role: Code | None = None
    host: str | None = None

    def element(self) -> ET.Element:
        """``<ActiveParticipant>`` (A.5.2.1, A.5.2.2: AE titles as ``AETITLES=a;b``)."""
        attrs = {"UserID": self.user_id, "UserIsRequestor": "true" if self.requestor
                 else "false"}
        if self.ae_titles:
            attrs["AlternativeUserID"] = "AETITLES=" + ";".join(self.ae_titles)
        if self.user_name:
            attrs["UserName"] = self.user_name
        if self.host:
            attrs["NetworkAccessPointID"] = self.host
            attrs["NetworkAccessPointTypeCode"] = _nap_type(self.host)
        node = ET.Element("ActiveParticipant", attrs)
        if self.role is not None:
            node.append(_coded("RoleIDCode", self.role))
        return node


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: what the event was about."""

    object_id: str
    id_type: Code
    role: str
    #: ParticipantObjectName: a descriptor (the schema wants a name or a query)
    name: str
    details: tuple[tuple[str, str], ...] = ()
    sop_classes: dict[str, int] = field(default_factory=dict)

    def element(self) -> ET.Element:
        """``<ParticipantObjectIdentification>`` (details base64, PS3.15 A.5.1.1 ValuePair)."""
        node = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": self.object_id, "ParticipantObjectTypeCode": SYSTEM_OBJECT,
            "ParticipantObjectTypeCodeRole": self.role})
        node.append(_coded("ParticipantObjectIDTypeCode", self.id_type))
        ET.SubElement(node, "ParticipantObjectName").text = self.name
        for kind, text in self.details:
            ET.SubElement(node, "ParticipantObjectDetail", {
                "type": kind, "value": base64.b64encode(text.encode()).decode()})
        if self.sop_classes:
            description = ET.SubElement(node, "ParticipantObjectDescription")
            for uid, count in sorted(self.sop_classes.items()):
                ET.SubElement(description, "SOPClass",
                              {"UID": uid, "NumberOfInstances": str(count)})
        return node


@dataclass(frozen=True)
class AuditSource:
    """Who reports: AuditSourceIdentification, and the node as a participant."""

    source_id: str
    ae_title: str
    process: str
    site_id: str = ""

    def element(self) -> ET.Element:
        """``<AuditSourceIdentification>``: type 4, an application server process."""
        attrs = {"AuditSourceID": self.source_id}
        if self.site_id:
            attrs["AuditEnterpriseSiteID"] = self.site_id
        node = ET.Element("AuditSourceIdentification", attrs)
        ET.SubElement(node, "AuditSourceTypeCode", {"csd-code": "4"})
        return node

    def node(self, requestor: bool, role: Code | None = APPLICATION,
             host: str | None = None, ae_title: str | None = None) -> Participant:
        """The node itself as an active participant (UserID: the process, A.5.2.1)."""
        return Participant(self.process, requestor, (ae_title or self.ae_title,),
                           "qcnode", role, host)


@dataclass(frozen=True)
class AuditMessage:
    """One message: the event, its participants, the source, the objects."""

    event: Code
    event_type: Code | None
    action: str
    outcome: str
    at: dt.datetime
    participants: tuple[Participant, ...]
    source: AuditSource
    objects: tuple[ParticipantObject, ...] = ()

    @property
    def failed(self) -> bool:
        """Whether the outcome is a failure (the syslog severity follows it)."""
        return self.outcome != OUTCOME_SUCCESS

    def to_xml(self) -> bytes:
        """The ``<AuditMessage>`` document as UTF-8, on one line (no XML declaration)."""
        root = ET.Element("AuditMessage")
        event = ET.SubElement(root, "EventIdentification", {
            "EventActionCode": self.action,
            "EventDateTime": self.at.astimezone(dt.UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": self.outcome})
        event.append(_coded("EventID", self.event))
        if self.event_type is not None:
            event.append(_coded("EventTypeCode", self.event_type))
        root.extend(p.element() for p in self.participants)
        root.append(self.source.element())
        root.extend(o.element() for o in self.objects)
        return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=False))


def association_rejected(source: AuditSource, calling_ae: str, host: str, reason: str,
                         at: dt.datetime) -> AuditMessage:
    """A refused association (A-ASSOCIATE-RJ, or a connection over a limit): PS3.15
    A.5.3.11 Security Alert, the caller as the alert's subject."""
    caller = Participant(calling_ae or host, True, (calling_ae,) if calling_ae else (),
                         host=host)
    subject = ParticipantObject(host, NODE_ID, ROLE_SECURITY_RESOURCE, calling_ae or host, (
        (ALERT_DESCRIPTION, f"association rejected: {reason}"
                            + (f" (calling AE {calling_ae})" if calling_ae else "")),))
    return AuditMessage(SECURITY_ALERT, NODE_AUTHENTICATION, ACTION_EXECUTE,
                        OUTCOME_MINOR_FAILURE, at, (source.node(False), caller), source,
                        (subject,))


def config_changed(source: AuditSource, who: str, action: str, path: str, file_uri: str,
                   at: dt.datetime) -> AuditMessage:
    """A change to the configuration file: PS3.15 A.5.3.11 Security Alert (Software
    Configuration), the person who made it, the file as a Master File object."""
    user = Participant(who, True)
    changed = ParticipantObject(file_uri, URI, ROLE_MASTER_FILE, "qcnode configuration",
                                ((ALERT_DESCRIPTION, f"{action} {path}"),))
    return AuditMessage(SECURITY_ALERT, SOFTWARE_CONFIGURATION, ACTION_EXECUTE,
                        OUTCOME_SUCCESS, at, (user, source.node(False)), source, (changed,))


def login(source: AuditSource, user: str, host: str, success: bool,
          at: dt.datetime) -> AuditMessage:
    """An API authentication: PS3.15 A.5.3.12 User Authentication (Login)."""
    person = Participant(user or "(none)", True, host=host or None)
    return AuditMessage(USER_AUTHENTICATION, LOGIN, ACTION_EXECUTE,
                        OUTCOME_SUCCESS if success else OUTCOME_MINOR_FAILURE, at,
                        (person, source.node(False, role=None)), source)


@dataclass(frozen=True)
class Transfer:
    """What was sent where: the destination and the sent objects' UIDs."""

    destination: str
    destination_ae: str
    destination_host: str
    calling_ae: str
    local_host: str
    #: (Study Instance UID, SOP Class UID) of each sent object
    objects: tuple[tuple[str, str], ...]


def instances_transferred(source: AuditSource, transfer: Transfer,
                          at: dt.datetime) -> AuditMessage:
    """A confirmed delivery: PS3.15 A.5.3.4 DICOM Instances Transferred, one Study
    participant object per study with its SOP classes (no Patient object: module doc)."""
    sender = source.node(True, SOURCE, transfer.local_host, transfer.calling_ae)
    receiver = Participant(transfer.destination, False, (transfer.destination_ae,),
                           None, DESTINATION, transfer.destination_host)
    return AuditMessage(INSTANCES_TRANSFERRED, None, ACTION_READ, OUTCOME_SUCCESS, at,
                        (sender, receiver), source, tuple(_studies(transfer.objects)))


def _studies(objects: Iterable[tuple[str, str]]) -> Iterable[ParticipantObject]:
    by_study: dict[str, Counter[str]] = {}
    for study, sop_class in objects:
        by_study.setdefault(study, Counter())[sop_class] += 1
    for study, classes in by_study.items():
        yield ParticipantObject(study, STUDY_INSTANCE_UID, ROLE_REPORT, "quality report",
                                sop_classes=dict(classes))


def _coded(tag: str, code: Code) -> ET.Element:
    return ET.Element(tag, {"csd-code": code.value, "codeSystemName": code.system,
                            "originalText": code.meaning})


def _nap_type(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return NAP_MACHINE_NAME
    return NAP_IP_ADDRESS
