"""The known answers of ``shared/vectors/dice.json``, computed independently of this project.

Where they are read from, first found: ``$STAKEPRO_VECTORS``; ``../shared/vectors/dice.json``
beside the repository (the contract's own copy); else ``tests/vectors/dice.json``, the copy
kept in the repository so that a clone on its own still tests against them.
tests/test_games_vectors.py checks the kept copy against its recorded SHA-256 and, when the
contract's copy is there, that the two are the same file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

KEPT = Path(__file__).resolve().parent / "dice.json"
KEPT_SHA256 = "dbc798856c646a15e2f3f05ad877fc8a5fa8b816b0f612dfd8ed1afe4c28c3d9"
CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "dice.json"


def path() -> Path:
    override = os.environ.get("STAKEPRO_VECTORS")
    if override:
        return Path(override)
    return CONTRACT if CONTRACT.is_file() else KEPT


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path().read_text(encoding="utf-8"))
    return data
