"""Series previews for the patient's wallet: a small greyscale or colour PNG per series.

A preview is the middle image of a series (the middle frame of a multi-frame instance),
rendered by node.services.rendering (as the WADO-RS rendered resources are), scaled to
fit ``MAX_EDGE`` pixels. Only the
patient who owns the study may ask (the HTTP edge checks the patient's signature; this
module checks ownership). Series are named by their position in the study, never by
their UIDs, so nothing identifying travels to the phone beyond the image itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import BadInput, Forbidden, ImageShareError, NotFound
from node.services import consent, rendering
from node.services.runtime import NodeRuntime
from node.store.dicom_header import InflateLimits

MAX_EDGE = rendering.THUMBNAIL_EDGE


@dataclass(frozen=True)
class SeriesSummary:
    """One series of a study as the wallet shows it."""

    position: int
    modality: str
    description: str
    instances: int

    def as_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "modality": self.modality,
            "description": self.description,
            "instances": self.instances,
        }


def owned_study_uid(runtime: NodeRuntime, public_key: bytes, study_ref: bytes) -> str:
    """The Study Instance UID behind ``study_ref`` if the patient holding ``public_key`` owns it.

    Raises Forbidden if the key is not enrolled or the study is another patient's, and
    NotFound if no study here has that reference.
    """
    key = runtime.services.consent.state.key(public_key)
    if key is None or key.retired:
        raise Forbidden("that key is not enrolled here")
    study_uid = consent.resolve_study_reference(runtime, study_ref)
    patient_id = consent.patient_of_subject(runtime, key.subject)
    if patient_id is None or study_uid not in consent.own_studies_of_patient(runtime, patient_id):
        raise Forbidden("that study is not one of yours")
    return study_uid


def _series_uids(runtime: NodeRuntime, study_uid: str) -> list[tuple[str, str, str]]:
    """(series UID, modality, description) in the order the wallet numbers them."""
    return [
        (s.series_instance_uid, s.modality, s.description)
        for s in runtime.store.series_of_study(study_uid)
    ]


def study_series(runtime: NodeRuntime, public_key: bytes, study_ref: bytes) -> list[SeriesSummary]:
    """The series of one of the patient's studies; raises as ``owned_study_uid``."""
    study_uid = owned_study_uid(runtime, public_key, study_ref)
    summaries = []
    for position, (series_uid, modality, description) in enumerate(
        _series_uids(runtime, study_uid)
    ):
        count = len(runtime.store.instances(study_uid, series_uid))
        summaries.append(SeriesSummary(position, modality, description, count))
    return summaries


def series_preview(
    runtime: NodeRuntime, public_key: bytes, study_ref: bytes, position: int
) -> bytes:
    """The PNG preview of the series at ``position`` in one of the patient's studies.

    Raises as ``owned_study_uid``, NotFound for a position past the last series, and
    BadInput if the middle image cannot be rendered (no or undecodable pixel data).
    """
    study_uid = owned_study_uid(runtime, public_key, study_ref)
    series = _series_uids(runtime, study_uid)
    if not 0 <= position < len(series):
        raise NotFound("the study has no series at that position")
    instances = runtime.store.instances(study_uid, series[position][0])
    return render_preview(instances[len(instances) // 2].path, runtime.store.inflate_limits)


def render_preview(path: Path, limits: InflateLimits, max_edge: int = MAX_EDGE) -> bytes:
    """A PNG of the middle frame of the DICOM image at ``path``, at most ``max_edge`` wide/high.

    Rendered by node.services.rendering (the stored window, MONOCHROME1 inverted, colour
    kept). Raises BadInput if the file has no pixel data, it cannot be decoded, or it
    inflates past the limits.
    """
    options = rendering.RenderOptions(rendering.PNG, max_edge=max_edge)
    try:
        return rendering.render_file(path, limits, options)
    except BadInput as exc:
        raise BadInput(f"the image cannot be previewed: {exc}") from exc
    except ImageShareError as exc:  # no image, or no decoder for it
        raise BadInput(f"the image cannot be previewed: {exc}") from exc
