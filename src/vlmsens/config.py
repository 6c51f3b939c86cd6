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
    kernels: str

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
            kernels=str(cfg["kernels"]),
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


def _nested_defaults(section: str, key: str) -> dict[str, Any]:
    properties = _schema()["properties"][section]["properties"][key].get("properties", {})
    return {name: prop["default"] for name, prop in properties.items() if "default" in prop}


@dataclass(frozen=True)
class LadderSettings:
    """Rule ladder: which cells get a damage-vs-bits ladder, and its rungs (``ship_this.ladder``)."""

    enabled: bool
    sizes: tuple[str, ...] | None
    formats: tuple[str, ...] | None
    scopes: tuple[str, ...] | None
    bits_above_uniform: tuple[float, ...]
    random_draws: int
    seed: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, seed: int) -> LadderSettings:
        cfg = {**_nested_defaults("ship_this", "ladder"), **(cfg or {})}

        def names(key: str) -> tuple[str, ...] | None:
            return None if cfg[key] is None else tuple(str(v) for v in cfg[key])

        return cls(
            enabled=bool(cfg["enabled"]),
            sizes=names("sizes"),
            formats=names("formats"),
            scopes=names("scopes"),
            bits_above_uniform=tuple(sorted(float(b) for b in cfg["bits_above_uniform"])),
            random_draws=int(cfg["random_draws"]),
            seed=int(seed),
        )


@dataclass(frozen=True)
class ShipThisSettings:
    """The consensus view's thresholds (``ship_this``) and the ladder's settings."""

    top_fraction: float
    safe_fraction: float
    ladder: LadderSettings

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, seed: int) -> ShipThisSettings:
        cfg = _section(cfg, "ship_this")
        return cls(
            top_fraction=float(cfg["top_fraction"]),
            safe_fraction=float(cfg["safe_fraction"]),
            ladder=LadderSettings.from_config(cfg["ladder"], seed),
        )


# Below this KL per caption token an export and its fake-quantized model agree, whatever a recipe's
# damage: float rounding of the same arithmetic flips a few activations across a rounding boundary
# of their quantization grid (about 1e-6 on the tiny demo models; docs/DESIGN.md, "Export").
KL_FLOOR = 1e-5


@dataclass(frozen=True)
class ExportSettings:
    """How rule export checks an exported checkpoint (recorded in vlmsens-export.json)."""

    check_samples: int
    max_kl_ratio: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> ExportSettings:
        cfg = _section(cfg, "export")
        return cls(check_samples=int(cfg["check_samples"]), max_kl_ratio=float(cfg["max_kl_ratio"]))

    def kl_limit(self, recipe_kl: float) -> float:
        """How far the reloaded export may drift from the fake-quantized model: a share of the recipe's own damage."""
        return max(self.max_kl_ratio * recipe_kl, KL_FLOOR)


@dataclass(frozen=True)
class Settings:
    """The whole validated config, once: what the rules and the jobs read."""

    outdir: str
    seed: int
    autoquant: AutoquantSettings
    validation: ValidationSettings
    validate: bool
    budgets: tuple[float, ...]
    ship_this: ShipThisSettings

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
            ship_this=ShipThisSettings.from_config(config.get("ship_this"), seed),
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


def ladder_cells(config: dict[str, Any]) -> list[Cell]:
    """The cells rule ladder measures: by default each format × scope of every model at the largest size."""
    ladder = LadderSettings.from_config((config.get("ship_this") or {}).get("ladder"), int(config["seed"]))
    if not ladder.enabled:
        return []
    grid = config["grid"]
    largest = max(grid["sizes"], key=lambda size: (int(config["sizes"][size]), size))
    sizes = ladder.sizes or (largest,)
    formats = ladder.formats or tuple(grid["formats"])
    scopes = ladder.scopes or tuple(grid["scopes"])
    return [c for c in grid_cells(config) if c.size in sizes and c.format in formats and c.scope in scopes]


def parse_cell(text: str) -> Cell:
    """'model/format/scope/size' as a Cell (the layout of the cells' output folders)."""
    parts = text.split("/")
    if len(parts) != 4 or not all(parts):
        raise VlmsensError(f"{text!r} is not a cell: write model/format/scope/size, e.g. qwen2_5_vl_3b/wfp8_afp8/all-layers/medium")
    return Cell(*parts)


def export_targets(config: dict[str, Any]) -> list[tuple[Cell, float]]:
    """(cell, budget) of every export the config asks for: each of ``export.cells`` at each of
    ``export.budgets``, or at the cell's own effective-bits target when that list is empty."""
    section = _section(config.get("export"), "export")
    targets = []
    for text in section["cells"]:
        cell = parse_cell(text)
        budgets = section["budgets"] or [config["autoquant"]["effective_bits"][cell.format]]
        targets += [(cell, float(b)) for b in budgets]
    return targets


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
    cells = set(grid_cells(config))
    for i, text in enumerate(_section(config.get("export"), "export")["cells"]):
        try:
            cell = parse_cell(text)
        except VlmsensError as err:
            raise VlmsensError(f"export.cells[{i}]: {err}") from None
        if cell not in cells:
            raise VlmsensError(f"export.cells[{i}] names {text!r}, which is not a cell of the grid (grid.models, grid.formats, "
                               "grid.scopes, grid.sizes)")
    ladder = (config.get("ship_this") or {}).get("ladder") or {}
    for key in ("sizes", "formats", "scopes"):
        unknown = [v for v in ladder.get(key) or [] if v not in grid[key]]
        if unknown:
            raise VlmsensError(f"ship_this.ladder.{key} names {unknown}, not in grid.{key} ({grid[key]}); "
                               "a ladder measures cells of the grid only")
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


def ship_this_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The ``ship_this`` keys the consensus table depends on (not the ladder's)."""
    section = _section(config.get("ship_this"), "ship_this")
    return {key: section[key] for key in ("top_fraction", "safe_fraction")}


def ladder_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The ``ship_this.ladder`` keys a ladder job's output depends on (not which cells get one)."""
    ladder = {**_nested_defaults("ship_this", "ladder"), **(_section(config.get("ship_this"), "ship_this")["ladder"] or {})}
    return {key: ladder[key] for key in ("bits_above_uniform", "random_draws")}


def export_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The ``export`` section without ``cells`` and ``budgets`` (which pick targets, not what a job computes)."""
    return {k: v for k, v in sorted(_section(config.get("export"), "export").items()) if k not in ("cells", "budgets")}


def validation_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The ``validation`` section without ``enabled`` (which picks targets, not what a job computes)."""
    return {k: v for k, v in sorted(config["validation"].items()) if k != "enabled"}
