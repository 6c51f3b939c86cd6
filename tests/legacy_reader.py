"""How per-layer-sensitivity.json files of the earlier format are read: only their keys, with their types.

A reader written for those files must open vlmsens' own (which carry more keys) the same way.
"""

from __future__ import annotations

from typing import Any

ROW_KEYS = ("layer", "num_bits", "sensitivity", "size_cost")


def read_legacy(payload: dict[str, Any]) -> dict[str, Any]:
    """The fields of the earlier per-layer format, each checked for its type; rows in file order."""
    scheme, model, dataset, state = payload["scheme"], payload["model"], payload["dataset"], payload["autoquant_state"]
    assert isinstance(scheme["name"], str)
    assert isinstance(scheme["auto_quantize_bits"], float)
    assert scheme["auto_quantize_method"] in ("gradient", "kl_div")
    assert isinstance(scheme["auto_quantize_score_size"], int) and not isinstance(scheme["auto_quantize_score_size"], bool)
    assert scheme["coverage_mode"] in ("lm_only", "full")
    assert isinstance(scheme["coverage_fraction"], float) and 0 < scheme["coverage_fraction"] <= 1
    assert scheme["quant_formats"] and all(isinstance(f, str) and f.endswith("_CFG") for f in scheme["quant_formats"])
    assert isinstance(model["id"], str)
    assert isinstance(dataset["name"], str) and isinstance(dataset["size"], str)
    for key in ("num_calib_samples", "batch_size"):
        assert isinstance(dataset[key], int) and not isinstance(dataset[key], bool), key
    assert isinstance(state["keys"], list) and all(isinstance(k, str) for k in state["keys"])
    assert isinstance(state["constraints"]["effective_bits"], float)
    assert isinstance(state["score"], float) and isinstance(state["is_satisfied"], bool)
    rows = []
    for row in payload["layer_sensitivity"]:
        assert tuple(row)[:4] == ROW_KEYS, list(row)
        assert isinstance(row["layer"], str)
        for key in ROW_KEYS[1:]:
            assert isinstance(row[key], float), (key, row[key])
        rows.append({**{k: row[k] for k in ROW_KEYS}, "searched": row.get("searched", True)})
    unsearched = [r for r in rows if not r["searched"]]
    assert all(r["num_bits"] == 16.0 and r["sensitivity"] == 0.0 for r in unsearched)
    assert (scheme["coverage_mode"] == "full") == (not unsearched)
    return {"scheme": scheme, "model_id": model["id"], "rows": rows, "unsearched": [r["layer"] for r in unsearched]}
