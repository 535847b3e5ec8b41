"""Expert-load statistics files: what EPLB places experts from at start-up.

A stats file is JSON holding per-MoE-layer, per-logical-expert token counts:

    {"format": "epserve.expert_load", "version": 1, "num_experts": E,
     "expert_tokens": [[c_0, ..., c_{E-1}], ...],   # [layer][expert]
     "source": "how the counts were made"}

Also accepted, so no conversion step is needed: a bare [[...], ...] matrix, the JSON that
`epserve-client expert-load --json` prints (GetExpertLoad: {"layers": [{"expert_tokens":
[...]}, ...]}) and a benchmark run's JSON ({"load": {"expert_tokens": ...}}, server/bench).
Builders for other sources (a policy alone, a routing trace, a server) are in build_stats.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

FORMAT = "epserve.expert_load"
VERSION = 1


class StatsFileError(ValueError):
    """A statistics file that cannot be used; the message names the file and what is wrong."""


def _matrix(data: Any, where: str) -> list[list[float]]:
    if isinstance(data, dict) and isinstance(data.get("load"), dict):  # a benchmark run (server/bench)
        data = data["load"]
    if isinstance(data, dict):
        if "expert_tokens" in data:
            data = data["expert_tokens"]
        elif "layers" in data and isinstance(data["layers"], list):
            data = [layer.get("expert_tokens") if isinstance(layer, dict) else None for layer in data["layers"]]
        else:
            raise StatsFileError(f"{where}: expected key 'expert_tokens' ([layer][expert] counts) or 'layers'")
    if not isinstance(data, list) or not data:
        raise StatsFileError(f"{where}: expert loads must be a non-empty [layer][expert] list")
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, list) or not row:
            raise StatsFileError(f"{where}: layer {i} is not a non-empty list of expert counts")
        for e, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise StatsFileError(f"{where}: layer {i}, expert {e}: {v!r} is not a finite count >= 0")
        rows.append([float(v) for v in row])
    return rows


def read_expert_load(path: str | Path, num_layers: int | None = None, num_experts: int | None = None) -> list[list[float]]:
    """The [layer][expert] loads in `path`, checked against the model's shape when given."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise StatsFileError(f"{path}: expert-load statistics file does not exist")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise StatsFileError(f"{path}: not valid JSON ({exc})") from None
    rows = _matrix(data, str(path))
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise StatsFileError(f"{path}: layers have different expert counts {sorted(widths)}")
    if num_layers is not None and len(rows) != num_layers:
        raise StatsFileError(f"{path}: has {len(rows)} MoE layers, the model has {num_layers}")
    if num_experts is not None and rows[0] and len(rows[0]) != num_experts:
        raise StatsFileError(f"{path}: has {len(rows[0])} experts per layer, the model has {num_experts}")
    return rows


def write_expert_load(path: str | Path, expert_tokens: Sequence[Sequence[float]], source: str) -> Path:
    path = Path(path).expanduser()
    rows = _matrix([list(r) for r in expert_tokens], "expert_tokens")
    payload = {"format": FORMAT, "version": VERSION, "num_experts": len(rows[0]),
               "expert_tokens": [[int(v) if float(v).is_integer() else v for v in r] for r in rows], "source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) + "\n")
    return path
