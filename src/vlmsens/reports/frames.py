"""Manifests turned into data frames: one row per (cell, group), per scored format, per cell."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..families import TOWERS as TOWERS  # re-exported to the plots
from ..io import atomic_path
from ..render import cell_inputs, layer_rows
from ..scopes import SCOPES as SCOPE_REGISTRY

CELL_KEYS = ["model", "format", "scope", "size"]
SCOPES = tuple(SCOPE_REGISTRY)  # the registry's order: lm-only, then all-layers


@dataclass
class Comparison:
    """Two ways of scoring the same groups: agreement per pair, per-group rows, or why not applicable."""

    agreement: pd.DataFrame
    per_layer: pd.DataFrame
    reason: str | None = None


def load_manifests(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in paths]


def layers_frame(manifests: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (cell, group) with the headline sensitivity (per caption token), rank and selection."""
    records = []
    for m in manifests:
        cell = m["cell"]
        costs = {g["layer"]: float(g["uncompressed_cost"]) for g in m["groups"]}
        for row in layer_rows(m):
            records.append(
                {
                    **{k: cell[k] for k in CELL_KEYS},
                    "family": cell.get("family", ""),
                    "inputs": cell_inputs(m),
                    "layer": row["layer"],
                    "tower": row["tower"],
                    "block": row["block"],
                    "sublayer": row["sublayer"],
                    "sensitivity": row["sensitivity"],
                    "sensitivity_raw": row["sensitivity_raw"],
                    "rank": row["rank"],
                    "selected_format": row["selected_format"],
                    "num_bits": row["num_bits"],
                    "uncompressed_cost": costs[row["layer"]],
                    "kept_bf16": not row["quantized"],
                }
            )
    frame = pd.DataFrame.from_records(records, columns=_LAYER_COLUMNS)
    frame["block"] = frame["block"].astype("Int64")
    return frame


_LAYER_COLUMNS = [
    *CELL_KEYS, "family", "inputs", "layer", "tower", "block", "sublayer", "sensitivity", "sensitivity_raw", "rank",
    "selected_format", "num_bits", "uncompressed_cost", "kept_bf16",
]


def scores_frame(manifests: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (cell, group, scored format): every candidate's per-token score, not only the first."""
    records = []
    for m in manifests:
        cell = m["cell"]
        for g in m["groups"]:
            for fmt, score in g["scores_per_token"].items():
                records.append(
                    {
                        **{k: cell[k] for k in CELL_KEYS},
                        "family": cell.get("family", ""),
                        "layer": g["layer"],
                        "tower": g["tower"],
                        "block": g["block"],
                        "sublayer": g["sublayer"],
                        "scored_format": fmt,
                        "score": float(score),
                        "selected_format": g["selected_format"],
                    }
                )
    columns = [*CELL_KEYS, "family", "layer", "tower", "block", "sublayer", "scored_format", "score", "selected_format"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame["block"] = frame["block"].astype("Int64")
    return frame


def model_layers(manifest_paths: list[str], model: str) -> pd.DataFrame:
    """The layers frame of one model's cells."""
    layers = layers_frame(load_manifests(manifest_paths))
    return layers[layers["model"] == model].reset_index(drop=True)


def ordered(values: Iterable[str], order: Iterable[str] | None) -> list[str]:
    """``values`` in ``order`` first, then the rest sorted."""
    values = list(dict.fromkeys(values))
    order = list(order or [])
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def order_key(scope_rank: dict[str, int], size_rank: dict[str, int]):
    """A ``sort_values`` key that orders scopes and sizes by rank (the grid's order), other columns as they are."""
    def key(col: pd.Series) -> pd.Series:
        if col.name == "scope" and scope_rank:
            return col.map(scope_rank)
        if col.name == "size":
            return col.map(size_rank)
        return col
    return key


def short_name(layer: str) -> str:
    """'model.language_model.layers.3.mlp.down_proj' -> 'layers.3.mlp.down_proj'; visual -> 'visual.blocks...'."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part in ("layers", "blocks", "deepstack_merger_list", "merger", "patch_embed"):
            prefix = "visual." if "visual" in parts[:i] else ""
            return prefix + ".".join(parts[i:])
    return layer


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
