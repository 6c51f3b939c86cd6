"""The config as frozen settings: defaults from the schema alone, nothing mutated afterwards."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from vlmsens.config import AutoquantSettings, Settings, ValidationSettings, ladder_cells, ladder_settings, schema_defaults
from vlmsens.errors import VlmsensError

REPO = Path(__file__).resolve().parents[1]


def _validated(path: Path) -> dict:
    from snakemake.utils import validate

    config = yaml.safe_load(path.read_text())
    validate(config, str(REPO / "config" / "schema.yaml"))
    return config


def test_settings_of_the_demo_config():
    config = _validated(REPO / "config" / "demo.yaml")
    settings = Settings.from_config(config)
    assert settings.outdir == "results/demo" and settings.seed == config["seed"]
    assert settings.autoquant.device == "cpu" and settings.autoquant.effective_bits_of("wint8_aint8") == 8.5
    assert settings.budgets == tuple(float(b) for b in config["report"]["budgets"])
    assert settings.validation.seed == config["seed"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.autoquant.method = "kl_div"


def test_a_partial_section_gets_the_schema_defaults_and_only_those():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["properties"]
    quant = AutoquantSettings.from_config({"method": "kl_div"})
    assert quant.method == "kl_div"
    default_batch = schema["autoquant"]["properties"]["batch_size"]["default"]
    assert quant.batch_size == (0 if default_batch == "auto" else default_batch)
    assert quant.gpu_memory_gib == schema["autoquant"]["properties"]["gpu_memory_gib"]["default"]
    assert quant.device == schema["autoquant"]["properties"]["device"]["default"]
    assert dict(quant.effective_bits) == schema["autoquant"]["properties"]["effective_bits"]["default"]
    validation = ValidationSettings.from_config({"random_draws": 2}, seed=7)
    assert validation.random_draws == 2 and validation.seed == 7
    assert list(validation.k_fractions) == schema["validation"]["properties"]["k"]["default"]
    assert "enabled" in schema_defaults("validation") and "checkpoint" not in schema_defaults("autoquant")


def test_a_format_without_a_bits_target_is_named():
    quant = AutoquantSettings.from_config({"effective_bits": {"wfp8_afp8": 8.5}})
    with pytest.raises(VlmsensError, match="autoquant.effective_bits has no target for format 'wint8_aint8'"):
        quant.effective_bits_of("wint8_aint8")


def test_ladder_cells_default_to_the_largest_size_and_are_off_in_the_real_config():
    demo = _validated(REPO / "config" / "demo.yaml")
    ladder = Settings.from_config(demo).ship_this.ladder
    assert ladder.enabled and ladder.sizes is None and ladder.bits_above_uniform[0] == 0.0
    cells = ladder_cells(demo)
    largest = max(demo["grid"]["sizes"], key=lambda s: demo["sizes"][s])
    assert {c.size for c in cells} == {largest}
    assert len(cells) == len(demo["grid"]["models"]) * len(demo["grid"]["formats"]) * len(demo["grid"]["scopes"])
    demo["ship_this"]["ladder"].update(formats=["wint8_aint8"], scopes=["lm-only"], sizes=["small", "large"])
    assert {(c.format, c.scope, c.size) for c in ladder_cells(demo)} == {("wint8_aint8", "lm-only", s) for s in ("small", "large")}
    # which cells get a ladder is not what a ladder job computes: not in its params
    assert set(ladder_settings(demo)) == {"bits_above_uniform", "random_draws"}
    real = _validated(REPO / "config" / "config.yaml")
    assert not Settings.from_config(real).ship_this.ladder.enabled and ladder_cells(real) == []
