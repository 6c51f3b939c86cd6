"""Where each AutoQuantize group sits in the network: an x position by tower and block, shared by every cell of a model.

A plot of 276 groups is only readable when its x axis says where a group is: vision block 0–31,
text layer 0–35, the head. The positions come from the union of a model's groups, so text layer 7
sits at the same x in an ``lm-only`` cell (no vision groups) and in an ``all-layers`` one.
Groups outside the blocks (patch embedding, merger, deepstack mergers, ``lm_head``) get slots of
their own before or after their tower's blocks; the sublayers of one block share its slot,
dodged a little so that their markers do not hide each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .frames import TOWERS

# Sublayer order within a tower (rows of a heatmap, legend order, dodge order); others follow alphabetically.
SUBLAYER_ORDER = {
    "vision": ["patch_embed", "qkv", "proj", "gate_up", "down", "fc1", "fc2", "merger_fc1", "merger_fc2", "deepstack_fc1", "deepstack_fc2"],
    "text": ["qkv", "o", "gate_up", "down"],
    "head": ["lm_head"],
}
# Groups of a tower that are not in its numbered blocks, and whether their slot comes before the blocks.
BEFORE_BLOCKS = {"patch_embed"}
DEEPSTACK = ("deepstack_fc1", "deepstack_fc2")
TOWER_GAP = 2.0  # empty slots between towers
TOWER_PREFIX = {"vision": "v", "text": "t", "head": ""}


@dataclass(frozen=True)
class Layout:
    """x of every group, and the axis ticks and tower spans that explain it."""

    positions: pd.DataFrame  # layer, tower, sublayer, block, slot, x, in_block
    ticks: list[tuple[float, str]]
    spans: dict[str, tuple[float, float]]  # tower -> (first x, last x)

    def x(self, layers: pd.Series) -> pd.Series:
        return layers.map(self.positions.set_index("layer")["x"])


def sublayers_in_order(groups: pd.DataFrame) -> list[str]:
    """Every sublayer of ``groups``, tower by tower in :data:`SUBLAYER_ORDER`, each once."""
    out: list[str] = []
    for tower in [*TOWERS, *sorted(set(groups["tower"]) - set(TOWERS))]:
        present = set(groups.loc[groups["tower"] == tower, "sublayer"])
        order = SUBLAYER_ORDER.get(tower, [])
        out += [s for s in order if s in present and s not in out]
        out += [s for s in sorted(present) if s not in order and s not in out]
    return out


def _slot(row) -> tuple[int, int, str]:
    """(order within the tower, block or index, tick label) of one group's slot."""
    prefix = TOWER_PREFIX.get(row.tower, row.tower[:1])
    block = None if pd.isna(row.block) else int(row.block)
    if row.sublayer in BEFORE_BLOCKS:
        return 0, 0, row.sublayer.split("_")[0]
    if row.sublayer in DEEPSTACK:
        return 3, block or 0, f"ds{block if block is not None else ''}"
    if block is None:
        return 2, 0, "merger" if row.sublayer.startswith("merger") else row.sublayer
    return 1, block, f"{prefix}{block}"


def network_layout(groups: pd.DataFrame, dodge: float = 0.5) -> Layout:
    """Positions of the groups of ``groups`` (columns layer, tower, block, sublayer; duplicates ignored).

    Towers run vision → text → head with :data:`TOWER_GAP` empty slots between them; within a
    tower: slots before the blocks, one slot per block, then merger and deepstack slots. Block
    ticks are thinned to about ten per tower; the first and last block are always labelled.
    """
    unique = groups.drop_duplicates("layer")[["layer", "tower", "block", "sublayer"]].reset_index(drop=True)
    order = {s: i for i, s in enumerate(sublayers_in_order(unique))}
    slots = pd.DataFrame([_slot(r) for r in unique.itertuples()], columns=["slot_kind", "slot_index", "slot"])
    unique = pd.concat([unique, slots], axis=1)
    unique["in_block"] = unique["slot_kind"] == 1
    towers = [t for t in [*TOWERS, *sorted(set(unique["tower"]) - set(TOWERS))] if t in set(unique["tower"])]
    xs, ticks, spans = {}, [], {}
    start = 0.0
    for tower in towers:
        part = unique[unique["tower"] == tower]
        keys = sorted(set(zip(part["slot_kind"], part["slot_index"], part["slot"], strict=True)))
        slot_x = {key: start + i for i, key in enumerate(keys)}
        block_keys = [k for k in keys if k[0] == 1]
        step = 1 if len(block_keys) <= 12 else 4 if len(block_keys) <= 40 else 8
        for i, key in enumerate(keys):
            if key[0] != 1 or i == 0 or key == block_keys[-1] or key[1] % step == 0:
                ticks.append((slot_x[key], key[2]))
        width = max(len(set(part.loc[part["slot_kind"] == k[0], "sublayer"])) for k in keys) if keys else 1
        for row in part.itertuples():
            siblings = sorted(part.loc[(part["slot_kind"] == row.slot_kind) & (part["slot_index"] == row.slot_index), "sublayer"],
                              key=order.get)
            offset = (siblings.index(row.sublayer) - (len(siblings) - 1) / 2) * dodge / max(width, 1)
            xs[row.layer] = slot_x[(row.slot_kind, row.slot_index, row.slot)] + offset
        spans[tower] = (start, start + len(keys) - 1)
        start += len(keys) + TOWER_GAP
    unique["x"] = unique["layer"].map(xs)
    ticks = sorted(dict(ticks).items())
    return Layout(unique.drop(columns=["slot_kind", "slot_index"]), ticks, spans)
