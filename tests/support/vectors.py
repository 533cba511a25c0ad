"""Published test vectors kept in the repository (tests/vectors/)."""

import json
from pathlib import Path
from typing import Any

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"


def rfc6962_vectors() -> dict[str, Any]:
    """RFC 6962 Merkle and C2SP signed-note vectors, with their provenance."""
    loaded: dict[str, Any] = json.loads((VECTORS_DIR / "rfc6962_vectors.json").read_text())
    return loaded
