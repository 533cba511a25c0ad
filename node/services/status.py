"""What the admin dashboard shows: one summary of the node, its peers, its log, its
transfers and its forwarding; the study list; and an audit of the federation on demand.

Everything here reads what other services already keep (replication, transfer, forwarder,
ledger, instance index); nothing is recorded for the dashboard's sake, except the last
audit's checkpoints (so that a later audit flags a rolled-back or forked log).

Privacy: the summary holds nothing but ledger data and node state, and the ledger holds
no PHI. The study list is the hospital's own index (names, MRNs): it is served to the
hospital's staff behind the admin token, never to peers.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from collections.abc import Iterator
from csv import writer as csv_rows  # (a CSV writer, not a database's)
from dataclasses import dataclass
from typing import Any

from node import __version__
from node.core.consent import RULE_MESSAGES, Rule, decode_grant, decode_revocation, token_id_of
from node.core.entries import (
    Access,
    Denial,
    Enroll,
    Grant,
    KeyRotation,
    Receipt,
    Revoke,
    Witness,
    decode_entry,
)
from node.core.notes import Checkpoint, parse_note, verify_cosignature
from node.core.roster import key_fingerprint
from node.errors import BadInput, Conflict
from node.services.alerts import plain_peer_error
from node.services.audit import Workers, audit_views, collect
from node.services.audit_state import AuditState
from node.services.runtime import NodeRuntime
from node.store.attributes import BY_KEYWORD
from node.store.audit_scratch import Scratch
from node.store.queries import STUDY_LIST_ORDERS, StudyPage, checked_filter

# Entries of the node's own log shown, newest first.
RECENT_ENTRIES = 25
# Transfers shown per list (the transfer service keeps more; the page needs the latest).
RECENT_TRANSFERS = 20
MAX_STUDIES = 200
# Log entries per page of the dashboard's log, and read at a time for its CSV export.
MAX_LOG_PAGE = 200
CSV_CHUNK = 1000
MAX_QUERY_CHARS = 200
# Seconds the index's counts (studies, instances, bytes) are reused between polls.
COUNTS_MAX_AGE = 3.0
AUDIT_STATE_DIR = "dashboard-audit"
AUDIT_TIMEOUT = 10.0


_RULES = {rule.value for rule in Rule}


def _utc(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def _short(token_id: bytes) -> str:
    return token_id.hex()[:16]


def human_size(count: int) -> str:
    """A size as the dashboard shows every size (app.js ``bytes``): decimal units, one
    decimal place from KB up."""
    units = ["B", "KB", "MB", "GB", "TB"]
    value, unit = float(count), 0
    while value >= 1000 and unit < len(units) - 1:
        value /= 1000
        unit += 1
    return f"{count} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv_rows(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue()


def describe_entry(index: int, raw: bytes, log_names: dict[str, str]) -> dict[str, Any]:
    """One ledger entry in plain words: kind, time, token id, the other party, a sentence.

    ``log_names`` maps log IDs (hex) to origins, to name witnessed logs. Never raises: an
    entry that does not decode is described as unreadable. Study and subject references
    are keyed hashes and are not shown at all.
    """
    try:
        entry = decode_entry(raw)
    except BadInput as exc:
        return {"index": index, "kind": "unreadable", "time": None, "text": str(exc)}
    body = entry.body
    described: dict[str, Any] = {"index": index, "kind": entry.kind, "time": entry.time}
    token_id = body.token_id if isinstance(body, Access | Denial | Receipt) else None
    try:
        if isinstance(body, Enroll):
            text = "a patient key was enrolled"
            if body.replaces is not None:
                text += ", replacing the patient's earlier key and its grants"
        elif isinstance(body, Grant):
            grant = decode_grant(body.token)
            token_id = token_id_of(body.token)
            described["party"] = grant.fields.grantee
            scope = grant.fields.scope
            what = "all the patient's studies" if scope is None else f"{len(scope)} study(ies)"
            until = _utc(grant.fields.expires)
            text = f"the patient granted {grant.fields.grantee} {what} until {until}"
            described["expires"] = grant.fields.expires
        elif isinstance(body, Revoke):
            token_id = decode_revocation(body.revocation).token_id
            text = "the patient revoked a grant"
        elif isinstance(body, Access):
            described["party"] = body.grantee
            text = f"sent {body.instances} instance(s), {human_size(body.bytes)}, to {body.grantee}"
        elif isinstance(body, Denial):
            described["party"] = body.requester
            described["rule"] = body.rule
            reason = RULE_MESSAGES.get(Rule(body.rule), "") if body.rule in _RULES else ""
            text = f"refused {body.requester}: {body.rule}" + (f" ({reason})" if reason else "")
        elif isinstance(body, Receipt):
            described["party"] = body.custodian
            text = (
                f"received {body.instances} instance(s), {human_size(body.bytes)},"
                f" from {body.custodian}"
            )
        elif isinstance(body, Witness):
            name = log_names.get(body.log_id.hex(), "log " + body.log_id.hex()[:16])
            described["party"] = log_names.get(body.log_id.hex())
            text = f"witnessed {name} at size {body.size}"
        elif isinstance(body, KeyRotation):
            text = f"this node's key was rotated ({body.reason})"
        else:
            text = entry.kind
    except (BadInput, KeyError, TypeError, ValueError) as exc:
        text = f"{entry.kind} entry with an unreadable payload ({exc})"
    if token_id is not None:
        described["token_id"] = token_id.hex()
        text += f" (token {_short(token_id)})"
    described["text"] = text
    return described


@dataclass(frozen=True)
class StudyQuery(StudyPage):
    """A study-list search as the dashboard asks it: every word must appear in one of
    the searched columns, and every filter (study date range, modality) match."""

    @classmethod
    def parse(
        cls,
        text: str,
        limit: str | int = 50,
        offset: str | int = 0,
        date_from: str = "",
        date_to: str = "",
        modality: str = "",
        order: str = "arrival",
    ) -> StudyQuery:
        """Raises BadInput for an over-long query, a limit that is not 1..MAX_STUDIES, a
        negative offset, a malformed date (YYYY-MM-DD or YYYYMMDD) or modality, or an
        unknown order."""
        if len(text) > MAX_QUERY_CHARS:
            raise BadInput(f"a study search is at most {MAX_QUERY_CHARS} characters")
        count = _whole("limit", limit)
        if not 1 <= count <= MAX_STUDIES:
            raise BadInput(f"limit must be between 1 and {MAX_STUDIES}")
        start = _whole("offset", offset)
        if start < 0:
            raise BadInput("offset must not be negative")
        if order not in STUDY_LIST_ORDERS:
            raise BadInput(f"order must be one of {', '.join(STUDY_LIST_ORDERS)}")
        filters = []
        first, last = date_from.replace("-", ""), date_to.replace("-", "")
        if first or last:
            dates = checked_filter(BY_KEYWORD["StudyDate"], [f"{first}-{last}"])
            if dates is not None:
                filters.append(dates)
        if modality.strip():
            found = checked_filter(BY_KEYWORD["ModalitiesInStudy"], [modality.strip().upper()])
            if found is not None:
                filters.append(found)
        return cls(tuple(text.split()), count, start, tuple(filters), order)


def _whole(name: str, value: str | int) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise BadInput(f"{name} must be a whole number") from exc


class StatusService:
    """The dashboard's reads over one node's services, and its audit button."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self._audit_lock = asyncio.Lock()
        self.last_audit: dict[str, Any] | None = None
        self._counts: tuple[float, dict[str, int]] | None = None

    # -- the summary the page polls -------------------------------------------------------

    async def summary(self) -> dict[str, Any]:
        """Node, peers, own log, transfers, forwarding and the last audit, in one document."""
        node, log = await asyncio.to_thread(lambda: (self.node(), self.own_log()))
        forwarder = self.runtime.services.forwarder
        forwarding = (
            await asyncio.to_thread(forwarder.status)
            if forwarder is not None
            else {"enabled": False}
        )
        pacs = self.runtime.services.pacs
        return {
            "node": node,
            "peers": self.peers(),
            "log": log,
            "transfers": self.transfers(),
            "forwarding": forwarding,
            "pacs": {"enabled": False} if pacs is None else await asyncio.to_thread(pacs.status),
            "last_audit": self.last_audit,
            "health": self.health(),
            "generated_at": time.time(),
        }

    def health(self) -> dict[str, Any]:
        """The status strip: the open incidents (alerts.py), and when they were checked."""
        alerts = self.runtime.services.alerts
        return {"incidents": alerts.open_incidents(), "checked_at": alerts.last_check}

    def node(self) -> dict[str, Any]:
        """Identity, version, uptime, storage, and what the index holds. Blocking."""
        runtime = self.runtime
        disk = shutil.disk_usage(runtime.config.data_dir)
        now = time.monotonic()
        if self._counts is None or now - self._counts[0] >= COUNTS_MAX_AGE:
            # Summing sizes scans the instance index: at most once per COUNTS_MAX_AGE,
            # however many pages poll.
            self._counts = (now, runtime.store.counts())
        counts = self._counts[1]
        return {
            "origin": runtime.config.origin,
            "vkey": runtime.identity.vkey,
            "key_id": runtime.identity.key_id.hex(),
            "fingerprint": key_fingerprint(runtime.identity.public_key),
            "version": __version__,
            "public_url": runtime.config.public_url,
            "started_at": runtime.started_at,
            "uptime_seconds": round(time.time() - runtime.started_at, 1),
            "storage": {
                "used_bytes": counts["bytes"],
                "free_bytes": disk.free,
                "disk_bytes": disk.total,
            },
            "held": {k: counts[k] for k in ("studies", "series", "instances")},
        }

    def peers(self) -> dict[str, Any]:
        """Each roster member as replication sees it, plus the cosignatures exchanged."""
        replication = self.runtime.services.replication
        federation = replication.status()
        members = {m.origin: m for m in replication.roster.roster}
        own_note = self.runtime.services.ledger.own.checkpoint_note()
        cosigned_ours = self._cosigners(own_note, members)
        store = self.runtime.services.ledger.store
        peers = [
            {
                **peer,
                "problem": plain_peer_error(peer["last_error"])
                if peer["reachable"] is False
                else None,
                "cosigned_our_log_at": cosigned_ours.get(peer["origin"]),
                "we_cosigned_size": getattr(store.witnessed(peer["origin"]), "size", None),
            }
            for peer in federation["peers"]
        ]
        return {
            "members": peers,
            "equivocations": federation["equivocations"],
            "ignored_by_discovery": federation["ignored_by_discovery"],
        }

    def _cosigners(
        self, note: str | None, members: dict[str, Any], exclude: str | None = None
    ) -> dict[str, int]:
        """Verified cosigners of a checkpoint note (roster members and this node) -> time."""
        if note is None:
            return {}
        try:
            body, signatures = parse_note(note)
        except BadInput:
            return {}
        found: dict[str, int] = {}
        for signature in signatures:
            if signature.name == exclude:
                continue
            if signature.name == self.runtime.config.origin:
                vkey = self.runtime.identity.vkey
            elif signature.name in members:
                vkey = members[signature.name].vkey
            else:
                continue
            stamp = verify_cosignature(body, signature, vkey)
            if stamp is not None:
                found[signature.name] = stamp
        return found

    def own_log(self, recent: int = RECENT_ENTRIES) -> dict[str, Any]:
        """The node's own log: size, latest checkpoint and its cosigners, recent entries
        in plain words (newest first). Blocking."""
        own = self.runtime.services.ledger.own
        size = own.size()
        note = own.checkpoint_note()
        checkpoint: dict[str, Any] | None = None
        if note is not None:
            members = {m.origin: m for m in self.runtime.services.roster.roster}
            body, _ = parse_note(note)
            parsed = Checkpoint.parse(body)
            checkpoint = {
                "size": parsed.size,
                "root": parsed.root_hash.hex(),
                "cosigners": [
                    {"origin": origin, "time": stamp}
                    for origin, stamp in sorted(
                        self._cosigners(note, members, exclude=self.runtime.config.origin).items()
                    )
                ],
            }
        names = {m.log_id: m.origin for m in self.runtime.services.roster.roster}
        first = max(0, size - recent)
        entries = [
            describe_entry(first + i, raw, names) for i, raw in enumerate(own.entries(first, size))
        ]
        return {
            "origin": self.runtime.config.origin,
            "size": size,
            "checkpoint": checkpoint,
            "recent": entries[::-1],
        }

    def log_page(self, before: int | None, limit: int) -> dict[str, Any]:
        """Up to ``limit`` entries of the own log before index ``before`` (default: its
        end), newest first, in plain words. Blocking."""
        own = self.runtime.services.ledger.own
        size = own.size()
        end = size if before is None else max(0, min(before, size))
        first = max(0, end - limit)
        names = {m.log_id: m.origin for m in self.runtime.services.roster.roster}
        entries = [
            describe_entry(first + i, raw, names) for i, raw in enumerate(own.entries(first, end))
        ]
        return {"size": size, "entries": entries[::-1], "next_before": first or None}

    def log_csv(self) -> Iterator[str]:
        """The whole own log in plain words as CSV lines, oldest first, read in chunks
        (bounded memory however long the log). Blocking."""
        own = self.runtime.services.ledger.own
        size = own.size()
        names = {m.log_id: m.origin for m in self.runtime.services.roster.roster}
        yield _csv_line(["index", "time_utc", "kind", "token_id", "other_party", "what"])
        for start in range(0, size, CSV_CHUNK):
            end = min(size, start + CSV_CHUNK)
            for i, raw in enumerate(own.entries(start, end)):
                e = describe_entry(start + i, raw, names)
                when = e["time"]
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)) if when else ""
                row = [e["index"], stamp, e["kind"], e.get("token_id", ""), e.get("party") or ""]
                yield _csv_line([*row, e["text"]])

    def transfers(self) -> dict[str, Any]:
        """Fetches (running first, then the latest) and streams sent, as the transfer
        service reports them. Runs on the event loop: the jobs live there."""
        reported = self.runtime.services.transfer.transfers_json()
        fetches = sorted(reported["fetches"], key=lambda j: j["state"] != "running")
        return {
            "fetches": fetches[:RECENT_TRANSFERS],
            "sent": reported["sent"][:RECENT_TRANSFERS],
        }

    # -- the study list ---------------------------------------------------------------------

    def studies(self, query: StudyQuery) -> dict[str, Any]:
        """Studies of the local index matching ``query``, newest first, each with where it
        came from and a viewer link, then those of the PACS (``_pacs_studies``). Blocking."""
        total, rows = self.runtime.store.study_list(query)
        studies = [
            {**row, "viewer_url": self.viewer_url(row["study_instance_uid"])} for row in rows
        ]
        in_pacs = self._pacs_studies(query, {row["study_instance_uid"] for row in rows})
        return {"total": total + len(in_pacs), "studies": studies + in_pacs[: query.limit]}

    def _pacs_studies(self, query: StudyQuery, shown: set[str]) -> list[dict[str, Any]]:
        """A one-word search is also a patient id: that patient's studies held only in the
        hospital's PACS (no viewer link: the node serves them only to grantees)."""
        source = self.runtime.services.pacs
        # After the local ones, on the first page, when no filter narrows the list.
        if source is None or len(query.words) != 1 or query.offset or query.filters:
            return []
        return [
            {
                "study_instance_uid": study.study_uid,
                "patient_id": study.patient_id,
                "study_date": study.date,
                "study_description": study.description,
                "modalities": ",".join(study.modalities),
                "instances": study.instances,
                "bytes": None,
                "source": "PACS",
                "viewer_url": None,
            }
            for study in source.studies_of_patient(query.words[0])
            if study.study_uid not in shown
            and self.runtime.store.instance_count(study.study_uid) == 0
        ]

    def viewer_url(self, study_uid: str) -> str:
        """The link that opens a study: node.toml's [dashboard] viewer_url template, or the
        study's DICOMweb metadata on this node."""
        dicomweb = self.runtime.config.public_url + "/dicomweb"
        template = self.runtime.config.dashboard.viewer_url
        if not template:
            return f"{dicomweb}/studies/{study_uid}/metadata"
        return template.replace("{dicomweb}", dicomweb).replace("{study_uid}", study_uid)

    # -- the audit button -----------------------------------------------------------------

    def federation_urls(self) -> list[str]:
        """This node's URL and the best URL of every roster member."""
        roster = self.runtime.services.roster
        urls = [self.runtime.config.public_url]
        for member in roster.roster:
            found = roster.urls_of(member)
            if found:
                urls.append(found[0])
        return urls

    async def audit(self) -> dict[str, Any]:
        """Audit the federation as `imageshare audit` does, over this node and its peers.

        Checkpoints of clean logs are kept in the data directory, so a later audit flags a
        log that was rolled back or forked since. Raises Conflict while an audit runs,
        BadInput if the kept state is corrupt.
        """
        if self._audit_lock.locked():
            raise Conflict("an audit is already running")
        async with self._audit_lock:
            started = time.time()
            urls = self.federation_urls()
            trusted = self.runtime.config.http.trusted_ca_file
            scratch = Scratch()
            try:
                views, unreachable = await collect(urls, scratch, AUDIT_TIMEOUT, trusted)
                state = AuditState(self.runtime.config.data_dir / AUDIT_STATE_DIR)
                consent = self.runtime.config.consent

                def judge() -> dict[str, Any]:
                    saved = state.load()
                    # In-process: forking a pool from the threaded daemon is not safe.
                    report, to_save = audit_views(
                        views,
                        saved,
                        int(time.time()),
                        clock_skew=consent.clock_skew_seconds,
                        workers=Workers(processes=1),
                        unreachable=unreachable,
                        scratch=scratch,
                    )
                    for checkpoint in to_save:
                        state.save(checkpoint)
                    return {**report.as_json(), "exit_status": report.exit_status}

                result = await asyncio.to_thread(judge)
            finally:
                scratch.close()
            result["urls"] = urls
            result["seconds"] = round(time.time() - started, 3)
            self.last_audit = result
            return result
