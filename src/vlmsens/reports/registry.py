"""The analyses the workflow runs, each declared once by its own module in this package.

An analysis module calls :func:`register` with its name, its level (one job for the whole grid,
per model, or per cell), what it reads, its outputs with their label in ``snakemake --report``,
the grid orders it needs, when the default target asks for it, and a ``write(job)`` function. ``rules/report.smk`` turns every entry into a rule of the same
name, with the caption ``docs/report/<name>.rst`` and the one adapter script
``workflow/scripts/analysis.py``; a new plot is therefore one module and one caption file.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("global", "model", "cell")
# What an analysis reads: the autoquant manifests, the recipes.json of rule recipes, the
# validation.json of rule validate, or the ladder.json of rule ladder (one file for a cell-level
# analysis, a list otherwise); one of them, or a tuple of several (the job then has them by name
# in ``Job.named``).
READS = ("manifests", "recipes", "validations", "ladders")
# When the default target asks for an analysis: always, only with validation enabled, only
# when the grid holds two model families, or only when some cell gets a ladder (ship_this.ladder).
REQUIRES = (None, "validation", "two_families", "ladder")
# The rule params an analysis may ask for (each changes its output): the grid's size and format
# orders, and the ship_this thresholds.
PARAMS = ("size_order", "format_order", "ship_this")


@dataclass(frozen=True)
class Output:
    """One output file: its name in the rule, its path under ``<outdir>/reports``, and its label in
    the HTML report (``None``: written next to the others but not shown in the report)."""

    key: str
    path: str
    item: str | None = None


@dataclass(frozen=True)
class Job:
    """What the adapter script hands to ``write``: the rule's inputs, outputs, wildcards and params."""

    inputs: list[str]
    outputs: dict[str, str]
    wildcards: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    # The inputs by what they are ("manifests", "validations", ...), for an analysis that reads several.
    named: dict[str, list[str]] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.wildcards["model"]

    @property
    def size_order(self) -> list[str]:
        return list(self.params["size_order"])

    @property
    def format_order(self) -> list[str]:
        return list(self.params["format_order"])


@dataclass(frozen=True)
class Analysis:
    name: str
    level: str
    reads: str | tuple[str, ...]
    subcategory: str
    outputs: tuple[Output, ...]
    write: Callable[[Job], None]
    # The grid orders the analysis needs (rule params; each one changes its output).
    params: tuple[str, ...] = ("size_order",)
    # Report category; per-model and per-cell analyses file under the model's name.
    category: str = "{model}"
    requires: str | None = None

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"analysis {self.name}: level {self.level!r} is not one of {LEVELS}")
        if not set(self.kinds_read) <= set(READS):
            raise ValueError(f"analysis {self.name}: reads {self.reads!r} is not one of {READS}")
        if self.requires not in REQUIRES:
            raise ValueError(f"analysis {self.name}: requires {self.requires!r} is not one of {REQUIRES}")
        unknown = set(self.params) - set(PARAMS)
        if unknown:
            raise ValueError(f"analysis {self.name}: unknown params {sorted(unknown)}")

    @property
    def kinds_read(self) -> tuple[str, ...]:
        return (self.reads,) if isinstance(self.reads, str) else tuple(self.reads)

    def output(self, key: str) -> Output:
        return next(o for o in self.outputs if o.key == key)

    def describe(self, wildcards: dict[str, str]) -> str:
        """The job's name in its log: the analysis, then its wildcards (model/format/scope/size)."""
        return " ".join([self.name, "/".join(wildcards.values())]) if wildcards else self.name


REGISTRY: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    if analysis.name in REGISTRY:
        raise ValueError(f"two analyses named {analysis.name}")
    REGISTRY[analysis.name] = analysis
    return analysis


def analyses() -> dict[str, Analysis]:
    """Every analysis of the package, by name (imports each module of vlmsens.reports once)."""
    from .. import reports

    for module in pkgutil.iter_modules(reports.__path__):
        importlib.import_module(f"{reports.__name__}.{module.name}")
    return dict(sorted(REGISTRY.items()))


# --- Order of the HTML report ----------------------------------------------------------------
# Snakemake's HTML report lists categories, and the subcategories of each, sorted by name
# (JavaScript localeCompare) and has no setting for another order. A number in front of each name
# puts them in reading order: the summary, what to ship, each model in the grid's order, the
# comparison of model families; inside a category, the sections below in this order, then any other
# by name. Numbers are zero-padded when there are ten or more, so that "10" sorts after "9".
MODEL_CATEGORY = "{model}"
CATEGORY_ORDER = ("Summary", "Ship this", MODEL_CATEGORY, "Model families")
SECTION_ORDER = (
    # Summary
    "Front page", "Cells", "Validation of rankings",
    # per model
    "Per-group sensitivity", "Heatmaps: block × sublayer", "Layers per cell", "Recipes per effective-bits budget",
    "Exported checkpoints",
    "Rank stability across sizes", "Format comparison (FP8 vs INT8)", "LM-only vs all-layers", "Towers: vision / text / head",
    "Validation of the ranking", "Validation per cell",
)
_LETTER = re.compile(r"^\([a-z]\)\s+")


def _numbered(names: list[str]) -> dict[str, str]:
    width = len(str(len(names)))
    return {name: f"{i:0{width}d} {name}" for i, name in enumerate(names, start=1)}


def category_labels(models: Iterable[str], categories: Iterable[str] = ()) -> dict[str, str]:
    """Report category name -> its numbered label, for the ``categories`` the analyses use: those of
    :data:`CATEGORY_ORDER` in its order with each model in place of ``{model}``, then others by name."""
    models, used = list(models), set(categories)
    extra = sorted(used - set(CATEGORY_ORDER) - {MODEL_CATEGORY})
    names = [m for c in CATEGORY_ORDER for m in (models if c == MODEL_CATEGORY else [c] if c in used else [])] + extra
    return _numbered(list(dict.fromkeys(names)))


def section_label(subcategory: str) -> str:
    """A subcategory without its letter ("(b) Format comparison" -> "Format comparison")."""
    return _LETTER.sub("", subcategory)


def subcategory_labels(subcategories: Iterable[str]) -> dict[str, str]:
    """Subcategory (as an analysis declares it) -> its numbered label, in :data:`SECTION_ORDER`."""
    plain = {s: section_label(s) for s in subcategories}
    known = [s for s in SECTION_ORDER if s in plain.values()]
    names = known + sorted(set(plain.values()) - set(known))
    labels = _numbered(names)
    return {s: labels[p] for s, p in plain.items()}
