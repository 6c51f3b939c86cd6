"""The validation page of one cell (rule validate's validation.md), in the report."""

from __future__ import annotations

import json
from pathlib import Path

from .registry import Analysis, Job, Output, register
from .validate import validation_doc


def write(job: Job) -> None:
    validation_doc(json.loads(Path(job.inputs[0]).read_text())).write(None, job.outputs["html"])


ANALYSIS = register(Analysis(
    name="validation_page", level="cell", reads="validations", subcategory="Validation per cell", params=(),
    outputs=(Output("html", "{model}/cells/{format}/{scope}/{size}/cell_validation.html", "cell validation (page)"),),
    requires="validation",
    write=write,
))
