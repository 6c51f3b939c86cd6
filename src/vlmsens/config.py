"""The validated config as settings, checks the JSON schema cannot express, and the grid of cells.

The schema (config/schema.yaml) checks types, unknown keys and ranges, and is the only place that
holds defaults; this module checks cross-references (grid entries that name a model, format or
size that does not exist) and paths, so that a bad config fails before any job starts with a
message that names the key, and turns the config into frozen :class:`Settings` once.

Jobs receive the config sections they depend on as rule params (so that a change reruns exactly
the jobs it affects) and read them through the same dataclasses, whose ``from_config`` fills any
key the section lacks from the schema's defaults.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import VlmsensError
from .formats import format_registry
from .preflight import expand_paths, preflight
from .scopes import CAPTION_ONLY, IMAGE_AND_CAPTION, sample_inputs

REPLACE_HINT = (
    "a config file given with --configfile is merged into config/config.yaml unless "
    "--replace-workflow-config is given too"
)

SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


@functools.cache
def _schema() -> dict[str, Any]:
    import yaml

    if not SCHEMA.is_file():
        raise VlmsensError(f"{SCHEMA} not found: vlmsens reads its config defaults from the repository's config/schema.yaml")
    return yaml.safe_load(SCHEMA.read_text())


def schema_defaults(section: str) -> dict[str, Any]:
    """The schema's defaults of the top-level config ``section`` (keys without a default are absent)."""
    properties = _schema()["properties"][section].get("properties", {})
    return {key: prop["default"] for key, prop in properties.items() if "default" in prop}


def _section(cfg: Mapping[str, Any] | None, section: str) -> dict[str, Any]:
    return {**schema_defaults(section), **(cfg or {})}


@dataclass(frozen=True)
class AutoquantSettings:
    method: str
    effective_bits: Mapping[str, float]
    batch_size: int  # 0: auto, sized by memory
    gpu_memory_gib: float | None
    device: str
    gradient_checkpointing: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> AutoquantSettings:
        cfg = _section(cfg, "autoquant")
        return cls(
            method=str(cfg["method"]),
            effective_bits={name: float(bits) for name, bits in cfg["effective_bits"].items()},
            batch_size=0 if cfg["batch_size"] == "auto" else int(cfg["batch_size"]),
            gpu_memory_gib=None if cfg["gpu_memory_gib"] is None else float(cfg["gpu_memory_gib"]),
            device=str(cfg["device"]),
            gradient_checkpointing=bool(cfg["gradient_checkpointing"]),
        )

    def effective_bits_of(self, format_name: str) -> float:
        if format_name not in self.effective_bits:
            raise VlmsensError(f"autoquant.effective_bits has no target for format {format_name!r}; add one to the config")
        return self.effective_bits[format_name]


@dataclass(frozen=True)
class ValidationSettings:
    """How rule validate measures a ranking (recorded in validation.json as ``settings``)."""

    k_fractions: tuple[float, ...]
    random_draws: int
    ablation_groups: int
    bootstrap_resamples: int
    seed: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, seed: int) -> ValidationSettings:
        cfg = _section(cfg, "validation")
        return cls(
            k_fractions=tuple(float(k) for k in cfg["k"]),
            random_draws=int(cfg["random_draws"]),
            ablation_groups=int(cfg["ablation_groups"]),
            bootstrap_resamples=int(cfg["bootstrap_resamples"]),
            seed=int(seed),
        )


@dataclass(frozen=True)
class Settings:
    """The whole validated config, once: what the rules and the jobs read."""

    outdir: str
    seed: int
    autoquant: AutoquantSettings
    validation: ValidationSettings
    validate: bool
    budgets: tuple[float, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        seed = int(config["seed"])
        return cls(
            outdir=str(config["outdir"]).rstrip("/"),
            seed=seed,
            autoquant=AutoquantSettings.from_config(config["autoquant"]),
            validation=ValidationSettings.from_config(config["validation"], seed),
            validate=bool(_section(config["validation"], "validation")["enabled"]),
            budgets=tuple(float(b) for b in _section(config["report"], "report")["budgets"]),
        )


@dataclass(frozen=True)
class Cell:
    model: str
    format: str
    scope: str
    size: str


def grid_cells(config: dict[str, Any]) -> list[Cell]:
    grid = config["grid"]
    return [Cell(*c) for c in itertools.product(grid["models"], grid["formats"], grid["scopes"], grid["sizes"])]


def is_demo_model(config: dict[str, Any], model: str) -> bool:
    return "demo" in config["models"][model]


def is_demo_coco(config: dict[str, Any]) -> bool:
    return "demo" in config["coco"]


def check_not_merged(config: dict[str, Any]) -> None:
    """A config is a demo (coco.demo) or a real one (coco.root), never both.

    Both set is what Snakemake makes of ``--configfile config/demo.yaml`` without
    ``--replace-workflow-config``: config/config.yaml merged under the demo config, whose real models,
    COCO root and settings would then leak into the demo run (and into its jobs' params).
    """
    coco = config["coco"]
    if coco.get("root") and "demo" in coco:
        raise VlmsensError(
            f"coco.root ({coco['root']}) and coco.demo are both set: a config is either a demo or a real run. "
            f"If you ran the demo config, add --replace-workflow-config ({REPLACE_HINT}); otherwise remove one of them"
        )
    for name, entry in config["models"].items():
        if entry.get("checkpoint") and "demo" in entry:
            raise VlmsensError(
                f"models.{name}.checkpoint and models.{name}.demo are both set: remove one ({REPLACE_HINT})"
            )


def check_config(config: dict[str, Any], *, check_paths: bool = True, check_merged: bool = True) -> None:
    """Raise VlmsensError naming the first bad key; the schema has already run.

    Expands ``~`` in the config's paths in place, and with ``check_paths`` runs the preflight of
    checkpoints and data (vlmsens.preflight), which also fills in a model's ``family`` when absent.
    """
    expand_paths(config)
    grid = config["grid"]
    if check_merged:
        check_not_merged(config)
    for model in grid["models"]:
        if model not in config["models"]:
            raise VlmsensError(f"grid.models names {model!r}, which is not a key of 'models' (known: {sorted(config['models'])})")
    registry = format_registry(config["formats"])
    for name, spec in registry.items():
        for candidate in spec.get("candidates", []):
            if candidate not in registry:
                raise VlmsensError(f"formats.{name}.candidates names unknown format {candidate!r} (known: {sorted(registry)})")
            if "candidates" in registry[candidate]:
                raise VlmsensError(f"formats.{name}.candidates names {candidate!r}, itself a candidate set")
    for fmt in grid["formats"]:
        if fmt not in registry:
            raise VlmsensError(f"grid.formats names unknown format {fmt!r}; known formats: {sorted(registry)} (add it under 'formats')")
        if fmt not in config["autoquant"]["effective_bits"]:
            raise VlmsensError(f"autoquant.effective_bits has no target for format {fmt!r}; add autoquant.effective_bits.{fmt}")
    for size in grid["sizes"]:
        if size not in config["sizes"]:
            raise VlmsensError(f"grid.sizes names {size!r}, which is not a key of 'sizes' (known: {sorted(config['sizes'])})")
    prompts = config["prompts"]
    if prompts["min_pixels"] > prompts["max_pixels"]:
        raise VlmsensError(f"prompts.min_pixels ({prompts['min_pixels']}) exceeds prompts.max_pixels ({prompts['max_pixels']})")
    for model in grid["models"]:
        entry = config["models"][model]
        if "demo" not in entry and not entry.get("checkpoint"):
            raise VlmsensError(f"models.{model}.checkpoint is not set (a local folder or HF id), and models.{model}.demo is absent")
    if not check_paths:
        return
    coco = config["coco"]
    if "demo" not in coco:
        root = coco["root"]
        if not root:
            raise VlmsensError("coco.root is not set: point it at a COCO 2017 folder (annotations/, train2017/, val2017/)")
        if not Path(root).is_dir():
            where = "" if Path(root).is_absolute() else f" (relative to the working directory {Path.cwd()})"
            raise VlmsensError(f"coco.root: {root} does not exist{where}; point it at a COCO 2017 folder")
        for split in sorted({coco["calib_split"], coco["eval_split"]}):
            ann = Path(root) / "annotations" / f"captions_{split}.json"
            if not ann.is_file() and not coco["prebuilt_dir"]:
                raise VlmsensError(f"coco.root: {ann} not found; the COCO 2017 captions annotations are required")
    if coco["prebuilt_dir"]:
        folder = Path(coco["prebuilt_dir"])
        for size in grid["sizes"]:
            db = folder / f"coco2017_vlm_calib_{size}.db"
            if not db.is_file():
                raise VlmsensError(f"coco.prebuilt_dir: {db} not found (one DB per size in grid.sizes is needed)")
    preflight(config)


# --- What a job's params carry -------------------------------------------------------------------
# Snakemake reruns a job when its params change (rerun trigger "params"). Each GPU rule's params
# therefore carry only the config its output depends on, so that e.g. a new effective_bits target
# for one format reruns that format's cells and nothing else.


def model_settings(config: dict[str, Any], model: str) -> dict[str, Any]:
    """The cell's own model entry (family, checkpoint, demo settings)."""
    return dict(sorted(config["models"][model].items()))


def format_settings(config: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The config's ``formats`` entries this format resolves to: itself and, for a set, its candidates."""
    own = config.get("formats") or {}
    spec = format_registry(own).get(fmt, {})
    names = [fmt, *spec.get("candidates", [])]
    return {name: own[name] for name in sorted(set(names)) if name in own}


def autoquant_settings(config: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The ``autoquant`` section with the effective-bits target of ``fmt`` only."""
    section = dict(config["autoquant"])
    bits = section.pop("effective_bits", {})
    section["effective_bits"] = {fmt: bits[fmt]} if fmt in bits else {}
    return dict(sorted(section.items()))


# The prompt settings samples with each kind of input are encoded with (vlmsens.batches.encode_samples).
INPUT_PROMPT_KEYS = {IMAGE_AND_CAPTION: ("image_instruction", "min_pixels", "max_pixels"), CAPTION_ONLY: ("text_instruction",)}


def calibration_inputs(config: dict[str, Any], scope: str) -> str:
    """What the samples of ``scope`` hold (``calibration.inputs``; all-layers always sees images)."""
    return sample_inputs(scope, _section(config.get("calibration"), "calibration")["inputs"])


def prompt_settings(config: dict[str, Any], scope: str) -> dict[str, Any]:
    """The ``prompts`` keys the samples of ``scope`` depend on: caption-only samples use no image settings."""
    return {key: config["prompts"][key] for key in INPUT_PROMPT_KEYS[calibration_inputs(config, scope)]}


def validation_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The ``validation`` section without ``enabled`` (which picks targets, not what a job computes)."""
    return {k: v for k, v in sorted(config["validation"].items()) if k != "enabled"}
