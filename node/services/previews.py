"""Series previews for the patient's wallet: a small greyscale or colour PNG per series.

A preview is the middle image of a series (the middle frame of a multi-frame instance),
rendered from its pixel data: modality rescale, then the stored VOI window (else the
image's own range), MONOCHROME1 inverted, scaled to fit ``MAX_EDGE`` pixels. Only the
patient who owns the study may ask (the HTTP edge checks the patient's signature; this
module checks ownership). Series are named by their position in the study, never by
their UIDs, so nothing identifying travels to the phone beyond the image itself.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from node.errors import BadInput, Forbidden, NotFound
from node.services import consent
from node.services.runtime import NodeRuntime
from node.store.dicom_header import InflateLimits, read_dataset

MAX_EDGE = 160
# Bigger images are refused rather than decoded: a preview must stay cheap.
MAX_PIXELS = 64 * 1024 * 1024


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
    rows = runtime.store.reader.execute(
        "SELECT series_instance_uid, modality, series_description FROM series"
        " WHERE study_instance_uid = ? ORDER BY series_number, series_instance_uid",
        (study_uid,),
    ).fetchall()
    return [(r[0], r[1] or "", r[2] or "") for r in rows]


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

    A deflated file is inflated within ``limits``. Raises BadInput if the file has no
    pixel data, it cannot be decoded, or it inflates past the limits.
    """
    try:
        dataset = read_dataset(path, limits)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
        if rows * columns * frames > MAX_PIXELS:
            raise BadInput("the image is too large to preview")
        frame = dataset.pixel_array
    except BadInput:
        raise
    except Exception as exc:  # pydicom raises many types for unreadable pixel data
        raise BadInput(f"the image cannot be previewed: {exc or type(exc).__name__}") from exc
    if frames > 1:
        frame = frame[frames // 2]
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2"))
    if frame.ndim == 3:  # colour (RGB or YBR converted by pydicom): scale to 8 bits
        image = Image.fromarray(_to_uint8(frame.astype(np.float64)), "RGB")
    else:
        values = apply_modality_lut(frame, dataset)
        if "WindowCenter" in dataset or "VOILUTSequence" in dataset:
            values = apply_voi_lut(values, dataset)
        grey = _to_uint8(np.asarray(values, dtype=np.float64))
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        image = Image.fromarray(grey, "L")
    image.thumbnail((max_edge, max_edge))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch ``values`` linearly onto 0..255 (a flat image becomes mid-grey)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.full(values.shape, 128, dtype=np.uint8)
    return np.clip((values - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
