"""Security audit messages for the hospital's SIEM: DICOM PS3.15 A.5 XML in RFC 5424 syslog.

An ``AuditEvent`` says what happened (EventIdentification), who took part
(ActiveParticipant), which node reports it (AuditSourceIdentification) and what it was
about (ParticipantObjectIdentification); ``audit_message_xml`` writes it as the DICOM
Audit Message schema, ``syslog_frame`` wraps it in one RFC 5424 message and
``octet_counted`` frames that for a TCP or TLS stream (RFC 5425 / RFC 6587).

These messages go only to the hospital's own collector and may name the study UID and
the patient ID (that is what a security audit trail is for). None of it is ever written
to the ledger, whose entries carry keyed references only.

Codes are DICOM's (scheme "DCM", PS3.16 CID 400-404) and RFC 3881's (participant object
types). Event choices where the standard leaves room:

- consent grant recorded / revoked: Patient Record (110110), action C / U, with type
  Object Security Attributes Changed (110135): who may read the patient's studies changed;
- consent denial: Security Alert (110113), type Use of Restricted Function (110132),
  outcome minor failure;
- configuration change: Security Alert (110113), type Network Configuration (110128) for
  the federation roster, Security Configuration (110129) for patient key enrollment and
  node key rotation.

Pure: the time, host and process are passed in.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum

DCM = "DCM"
RFC3881 = "RFC-3881"
APP_NAME = "imageshare"
# The MSGID IHE ATNA gives audit messages sent over syslog.
MSGID = "IHE+RFC-3881"
# RFC 5424 facility 10: security/authorization messages.
FACILITY_AUTHPRIV = 10
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
BOM = b"\xef\xbb\xbf"
# Longest text kept from any value (AE titles, addresses, user names come from outside).
MAX_TEXT = 256
# Characters XML 1.0 cannot carry at all: dropped instead of making the message unparsable.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# RFC 5424 header fields are printable US-ASCII without spaces.
_NOT_HEADER = re.compile("[^\x21-\x7e]")


@dataclass(frozen=True)
class Code:
    """A coded value: csd-code, codeSystemName and originalText in the XML."""

    code: str
    meaning: str
    scheme: str = DCM


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


# EventID (CID 400)
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
BEGIN_TRANSFERRING = Code("110102", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
PATIENT_RECORD = Code("110110", "Patient Record")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
# EventTypeCode (CID 401, 403)
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
LOGIN = Code("110122", "Login")
NETWORK_CONFIGURATION = Code("110128", "Network Configuration")
SECURITY_CONFIGURATION = Code("110129", "Security Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "Use of Restricted Function")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = Code("110135", "Object Security Attributes Changed")
# RoleIDCode (CID 402)
APPLICATION = Code("110150", "Application")
DESTINATION = Code("110152", "Destination Role ID")
SOURCE = Code("110153", "Source Role ID")
# ParticipantObjectIDTypeCode (CID 404 and RFC 3881)
PATIENT_NUMBER = Code("2", "Patient Number", RFC3881)
STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
NODE_ID = Code("110182", "Node ID")
SECURITY_RESOURCE = Code("12", "URI", RFC3881)
# ParticipantObjectTypeCode and ...TypeCodeRole (RFC 3881)
PERSON = 1
SYSTEM_OBJECT = 2
ROLE_PATIENT = 1
ROLE_REPORT = 3
ROLE_RESOURCE = 13
ROLE_SECURITY_RESOURCE = 14

# EventActionCode
CREATE, READ, UPDATE, DELETE, EXECUTE = "C", "R", "U", "D", "E"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a user, a process or a remote node."""

    user_id: str
    requestor: bool
    role: Code | None = None
    # IP address or host name it acted from ("" if local).
    address: str = ""
    alternative_user_id: str = ""


@dataclass(frozen=True)
class AuditObject:
    """A ParticipantObjectIdentification: what the event was about."""

    object_id: str
    id_type: Code
    type_code: int = SYSTEM_OBJECT
    role: int = ROLE_REPORT
    name: str = ""
    # ParticipantObjectDetail type/value pairs (e.g. instance counts).
    details: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AuditEvent:
    """One audit message, before it is written as XML."""

    event_id: Code
    action: str
    outcome: Outcome
    participants: tuple[Participant, ...]
    type_codes: tuple[Code, ...] = ()
    objects: tuple[AuditObject, ...] = ()
    outcome_description: str = ""
    # What the event is, in a word, for counting and for the SIEM's filters (not sent).
    kind: str = field(default="", compare=False)


@dataclass(frozen=True)
class AuditSource:
    """Who reports: the node (AuditSourceIdentification) and its own process participant."""

    origin: str
    process: str


# -- event builders ------------------------------------------------------------------------


def application_activity(source: AuditSource, started: bool, user: str) -> AuditEvent:
    """Node start or stop: Application Activity with Application Start / Stop."""
    return AuditEvent(
        APPLICATION_ACTIVITY,
        EXECUTE,
        Outcome.SUCCESS,
        (
            Participant(source.process, False, APPLICATION, alternative_user_id=source.origin),
            Participant(user, True),
        ),
        (APPLICATION_START if started else APPLICATION_STOP,),
        kind="node-start" if started else "node-stop",
    )


def admin_authentication(source: AuditSource, succeeded: bool, address: str) -> AuditEvent:
    """A request with (or without, or with a wrong) admin bearer token: User Authentication."""
    return AuditEvent(
        USER_AUTHENTICATION,
        EXECUTE,
        Outcome.SUCCESS if succeeded else Outcome.MINOR_FAILURE,
        (Participant("admin-token", True, address=address), _node(source)),
        (LOGIN,),
        outcome_description="" if succeeded else "missing or wrong admin token",
        kind="admin-login" if succeeded else "admin-login-failed",
    )


def instances_transferred(
    source: AuditSource,
    sent: bool,
    peer: str,
    peer_address: str,
    study_uids: list[str] | tuple[str, ...],
    instances: int,
    via: str,
    patient_id: str = "",
    outcome: Outcome = Outcome.SUCCESS,
) -> AuditEvent:
    """Studies sent from (``sent``) or received by this node: DICOM Instances Transferred.

    ``via`` names the service (WADO-RS, STOW-RS, C-GET, C-MOVE, C-STORE, transfer); the
    node is the Source when sending, the Destination when receiving.
    """
    node = Participant(
        source.process, not sent, SOURCE if sent else DESTINATION, alternative_user_id=source.origin
    )
    other = Participant(peer, sent, DESTINATION if sent else SOURCE, address=peer_address)
    objects = [
        AuditObject(
            uid,
            STUDY_INSTANCE_UID,
            details=(("ContainsInstances", str(instances)), ("Service", via)),
        )
        for uid in study_uids
    ]
    if patient_id:
        objects.append(AuditObject(patient_id, PATIENT_NUMBER, PERSON, ROLE_PATIENT))
    return AuditEvent(
        INSTANCES_TRANSFERRED,
        READ if sent else CREATE,
        outcome,
        (node, other),
        objects=tuple(objects),
        kind="study-sent" if sent else "study-received",
    )


def query(source: AuditSource, requester: str, address: str, via: str, matches: int) -> AuditEvent:
    """A C-FIND or QIDO-RS query answered by this node: Query."""
    return AuditEvent(
        QUERY,
        EXECUTE,
        Outcome.SUCCESS,
        (Participant(requester, True, address=address), _node(source)),
        objects=(
            AuditObject(
                via, SECURITY_RESOURCE, role=ROLE_RESOURCE, details=(("Matches", str(matches)),)
            ),
        ),
        kind="query",
    )


def consent_changed(
    source: AuditSource, granted: bool, token_id: str, grantee: str, patient_id: str
) -> AuditEvent:
    """A patient's grant recorded, or revoked: Patient Record with Object Security
    Attributes Changed (action C for a grant, U for a revocation)."""
    objects = [AuditObject(token_id, SECURITY_RESOURCE, role=ROLE_SECURITY_RESOURCE, name=grantee)]
    if patient_id:
        objects.append(AuditObject(patient_id, PATIENT_NUMBER, PERSON, ROLE_PATIENT))
    return AuditEvent(
        PATIENT_RECORD,
        CREATE if granted else UPDATE,
        Outcome.SUCCESS,
        (Participant("patient", True), _node(source)),
        (OBJECT_SECURITY_ATTRIBUTES_CHANGED,),
        tuple(objects),
        kind="consent-grant" if granted else "consent-revoke",
    )


def consent_denied(
    source: AuditSource, requester: str, rule: str, token_id: str, study_uid: str
) -> AuditEvent:
    """A request refused by the consent rules: Security Alert, Use of Restricted Function."""
    objects = [AuditObject(token_id, SECURITY_RESOURCE, role=ROLE_SECURITY_RESOURCE)]
    if study_uid:
        objects.append(AuditObject(study_uid, STUDY_INSTANCE_UID))
    return AuditEvent(
        SECURITY_ALERT,
        EXECUTE,
        Outcome.MINOR_FAILURE,
        (Participant(requester, True), _node(source)),
        (USE_OF_RESTRICTED_FUNCTION,),
        tuple(objects),
        outcome_description=f"consent refused: {rule}",
        kind="consent-denial",
    )


def configuration_changed(
    source: AuditSource, user: str, what: str, subject: str, patient_id: str = ""
) -> AuditEvent:
    """A change of the node's configuration: Security Alert with Network Configuration
    for the federation roster (``subject`` the member's origin), or Security
    Configuration for a patient key enrolled (``patient_id`` given; ``subject`` the key)."""
    objects: tuple[AuditObject, ...]
    if patient_id:
        objects = (
            AuditObject(subject, SECURITY_RESOURCE, role=ROLE_SECURITY_RESOURCE, name=what),
            AuditObject(patient_id, PATIENT_NUMBER, PERSON, ROLE_PATIENT),
        )
    else:
        objects = (AuditObject(subject, NODE_ID, name=what),)
    return AuditEvent(
        SECURITY_ALERT,
        EXECUTE,
        Outcome.SUCCESS,
        (Participant(user, True), _node(source)),
        (SECURITY_CONFIGURATION if patient_id else NETWORK_CONFIGURATION,),
        objects,
        outcome_description=what,
        kind="config-change",
    )


def key_rotation(source: AuditSource, user: str, old_key_id: str, new_key_id: str) -> AuditEvent:
    """The node's signing key replaced: Security Alert with Security Configuration."""
    return AuditEvent(
        SECURITY_ALERT,
        EXECUTE,
        Outcome.SUCCESS,
        (Participant(user, True), _node(source)),
        (SECURITY_CONFIGURATION,),
        (
            AuditObject(old_key_id, NODE_ID, name="retired node key"),
            AuditObject(new_key_id, NODE_ID, name="new node key"),
        ),
        outcome_description="node key rotated",
        kind="key-rotation",
    )


def _node(source: AuditSource) -> Participant:
    return Participant(source.process, False, APPLICATION, alternative_user_id=source.origin)


# -- XML -------------------------------------------------------------------------------


def _text(value: str) -> str:
    """Outside text made safe for an XML attribute: no forbidden characters, bounded."""
    return _NOT_XML.sub("", value)[:MAX_TEXT]


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.scheme, "originalText": code.meaning},
    )


def event_datetime(when: float) -> str:
    """xs:dateTime in UTC with milliseconds, as EventDateTime and the syslog TIMESTAMP."""
    moment = datetime.fromtimestamp(when, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def audit_message_xml(event: AuditEvent, source: AuditSource, when: float) -> bytes:
    """The DICOM Audit Message (PS3.15 A.5.1) of ``event``, UTF-8, without declaration."""
    root = ET.Element("AuditMessage")
    ident_attrs = {
        "EventActionCode": event.action,
        "EventDateTime": event_datetime(when),
        "EventOutcomeIndicator": str(int(event.outcome)),
    }
    ident = ET.SubElement(root, "EventIdentification", ident_attrs)
    _coded(ident, "EventID", event.event_id)
    for type_code in event.type_codes:
        _coded(ident, "EventTypeCode", type_code)
    if event.outcome_description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _text(event.outcome_description)
    for participant in event.participants:
        attrs = {
            "UserID": _text(participant.user_id) or "unknown",
            "UserIsRequestor": "true" if participant.requestor else "false",
        }
        if participant.alternative_user_id:
            attrs["AlternativeUserID"] = _text(participant.alternative_user_id)
        if participant.address:
            attrs["NetworkAccessPointID"] = _text(participant.address)
            # 2: an IP address, 1: a machine name (PS3.15 A.5.1).
            attrs["NetworkAccessPointTypeCode"] = (
                "2" if _looks_like_ip(participant.address) else "1"
            )
        element = ET.SubElement(root, "ActiveParticipant", attrs)
        if participant.role is not None:
            _coded(element, "RoleIDCode", participant.role)
    audit_source = ET.SubElement(
        root, "AuditSourceIdentification", {"AuditSourceID": _text(source.origin)}
    )
    # 4: application server process (RFC 3881 audit source type).
    ET.SubElement(
        audit_source,
        "AuditSourceTypeCode",
        {"csd-code": "4", "codeSystemName": RFC3881, "originalText": "Application Server"},
    )
    for obj in event.objects:
        element = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": _text(obj.object_id),
                "ParticipantObjectTypeCode": str(obj.type_code),
                "ParticipantObjectTypeCodeRole": str(obj.role),
            },
        )
        _coded(element, "ParticipantObjectIDTypeCode", obj.id_type)
        if obj.name:
            ET.SubElement(element, "ParticipantObjectName").text = _text(obj.name)
        for detail_type, value in obj.details:
            ET.SubElement(
                element, "ParticipantObjectDetail", {"type": detail_type, "value": _text(value)}
            )
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


def _looks_like_ip(address: str) -> bool:
    return bool(re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]*:[0-9a-fA-F:.]*", address))


# -- syslog ------------------------------------------------------------------------------


def _header_field(value: str, limit: int) -> str:
    cleaned = _NOT_HEADER.sub("", value)[:limit]
    return cleaned or "-"


def syslog_frame(
    xml: bytes, when: float, hostname: str, procid: str, outcome: Outcome = Outcome.SUCCESS
) -> bytes:
    """One RFC 5424 message carrying ``xml`` (MSG with BOM, no structured data).

    Facility security/authorization; severity notice, warning for a failure outcome.
    """
    severity = SEVERITY_NOTICE if outcome == Outcome.SUCCESS else SEVERITY_WARNING
    header = " ".join(
        (
            f"<{FACILITY_AUTHPRIV * 8 + severity}>1",
            event_datetime(when),
            _header_field(hostname, 255),
            APP_NAME,
            _header_field(procid, 128),
            MSGID,
            "-",
        )
    )
    return header.encode("ascii") + b" " + BOM + xml


def octet_counted(frame: bytes) -> bytes:
    """``frame`` as one message of a TCP/TLS syslog stream: "LEN SP MSG" (RFC 5425 4.3)."""
    return str(len(frame)).encode("ascii") + b" " + frame
