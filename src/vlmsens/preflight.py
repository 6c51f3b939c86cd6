"""Preflight: what the jobs will load exists and is what the config says, checked before any job.

Called from the config check (:func:`vlmsens.config.check_config`), so a wrong checkpoint fails in
seconds with the config key and its value named, instead of after the subsets and samples were built.

* Paths: ``~`` expands in every path of the config (:data:`PATH_KEYS`, every checkpoint), and a
  relative path resolves against the working directory: the folder Snakemake runs in, which is where
  every job runs too. A relative path that does not exist is reported as a missing folder.
* Checkpoints: a local folder, or a Hugging Face hub id whose snapshot is in the local cache. The
  workflow is offline by default: neither the preflight nor a job downloads anything (jobs load with
  ``local_files_only``), so an uncached id fails here, naming the key and ``HF_HUB_OFFLINE``.
  ``HF_HUB_OFFLINE=0`` in the environment opts in to downloads; the checks below then run on what the
  cache holds, if anything.
* The checkpoint's ``config.json`` ``model_type`` must be a known family, and the one the config's
  ``family`` names; a model entry without ``family`` gets the family from it.
* The processor files (image processor and tokenizer) must be in the folder.
* Demo models (``models.<name>.demo``) are skipped: rule demo_checkpoint builds them during the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import VlmsensError
from .families import FAMILIES

# Config paths (dotted keys) that may start with ``~``; checkpoints are handled per model.
PATH_KEYS = ("outdir", "coco.root", "coco.prebuilt_dir")
OFFLINE_ENV = "HF_HUB_OFFLINE"
# What AutoProcessor needs next to config.json: an image processor config and a tokenizer.
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def expand_paths(config: dict[str, Any]) -> None:
    """Expand ``~`` in place in every path value of the config (jobs get the expanded path)."""
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        section = config
        for part in parents:
            section = section.get(part) or {}
        value = section.get(leaf)
        if isinstance(value, str) and value.startswith("~"):
            section[leaf] = os.path.expanduser(value)
    for entry in config.get("models", {}).values():
        value = entry.get("checkpoint")
        if isinstance(value, str) and value.startswith("~"):
            entry["checkpoint"] = os.path.expanduser(value)


def downloads_allowed() -> bool:
    """True only when the user set HF_HUB_OFFLINE to a false value; unset means offline."""
    value = os.environ.get(OFFLINE_ENV)
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


def looks_like_path(value: str) -> bool:
    """A value to take as a path only: absolute, ``./``/``../``/``~``, more than one ``/``, not a valid
    hub id, or ``a/b`` where ``a`` is a local folder."""
    if value.startswith(("/", ".", "~")) or value.count("/") > 1 or value.endswith("/"):
        return True
    first = value.split("/", 1)[0]
    if "/" in value and Path(first).is_dir():
        return True  # "checkpoints/qwen" with a local checkpoints/ folder
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return False


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of ``repo_id`` (revision main) in the HF cache, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_checkpoint(value: str, key: str) -> Path | None:
    """The folder ``value`` names: a local folder or a cached hub snapshot.

    None when the value is an uncached hub id and downloads are allowed (HF_HUB_OFFLINE=0).
    Raises VlmsensError naming ``key`` otherwise.
    """
    path = Path(os.path.expanduser(value))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise VlmsensError(f"{key}: {value} is a folder but not a checkpoint (no config.json in {path.resolve()})")
        return path
    if path.exists():
        raise VlmsensError(f"{key}: {value} is a file, not a checkpoint folder; point it at the folder holding config.json")
    where = f"{path.resolve()} does not exist" + ("" if path.is_absolute() else f", relative to the working directory {Path.cwd()}")
    if looks_like_path(value):
        raise VlmsensError(f"{key}: checkpoint folder {value} not found ({where}); fix the path, or give a Hugging Face id")
    snapshot = cached_snapshot(value)
    if snapshot is not None:
        return snapshot
    if downloads_allowed():
        return None
    raise VlmsensError(
        f"{key}: no checkpoint folder {value} ({where}), and no Hugging Face model {value} in the local cache "
        f"({_hub_cache()}). Fix the path; or, for a hub model, download it first (`hf download {value}`) or set "
        f"{OFFLINE_ENV}=0 to let the jobs download it (the workflow is offline unless {OFFLINE_ENV}=0 is set)"
    )


def model_type_family(model_type: str | None) -> str | None:
    """The vlmsens family whose transformers config class is the one of ``model_type``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config_class = CONFIG_MAPPING_NAMES.get(model_type or "")
    return next((name for name, fam in FAMILIES.items() if fam.config_class == config_class), None)


def checkpoint_family(folder: Path, key: str, value: str) -> str:
    """The family of the checkpoint in ``folder`` from its config.json ``model_type``."""
    config_path = folder / "config.json"
    try:
        model_type = json.loads(config_path.read_bytes()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise VlmsensError(f"{key}: {config_path} cannot be read as a model config ({type(err).__name__}: {err})") from None
    family = model_type_family(model_type)
    if family is None:
        raise VlmsensError(
            f"{key}: {value} is a {model_type!r} checkpoint (model_type in {config_path}); vlmsens handles the "
            f"families {sorted(FAMILIES)} only: point {key} at a checkpoint of one of them"
        )
    return family


def check_processor_files(folder: Path, key: str, value: str) -> None:
    names = {p.name for p in folder.iterdir()}
    for needed in (IMAGE_PROCESSOR_FILES, TOKENIZER_FILES):
        if not names & set(needed):
            raise VlmsensError(
                f"{key}: {value} has no processor file ({' or '.join(needed)} in {folder}); AutoProcessor needs "
                "the image processor and tokenizer files of the checkpoint: copy or download them too"
            )


def check_model(config: dict[str, Any], model: str) -> None:
    """Preflight of one model entry; fills in ``family`` from the checkpoint when it is absent."""
    entry = config["models"][model]
    key = f"models.{model}.checkpoint"
    if "demo" in entry:
        if not entry.get("family"):
            raise VlmsensError(f"models.{model}.family is not set; a demo model needs it to build its checkpoint")
        return  # built by rule demo_checkpoint during the run
    value = entry["checkpoint"]
    folder = resolve_checkpoint(value, key)
    if folder is None:
        if not entry.get("family"):
            raise VlmsensError(f"models.{model}.family is not set and {value} is not in the cache to read it from: set it")
        return
    family = checkpoint_family(folder, key, value)
    configured = entry.get("family")
    if configured is None:
        entry["family"] = family
    elif configured != family:
        raise VlmsensError(
            f"models.{model}.family is {configured!r} but {key} ({value}) is a {family!r} checkpoint "
            f"(model_type in {folder / 'config.json'}): set models.{model}.family to {family!r} or remove it"
        )
    check_processor_files(folder, key, value)


def check_eval_split(config: dict[str, Any]) -> None:
    """coco.eval_images cannot exceed the images of coco.eval_split (its annotations file, when there)."""
    coco = config["coco"]
    if "demo" in coco:
        total = coco["demo"].get("val_images", 16) if coco.get("eval_split", "val2017") == "val2017" else None
        source = "coco.demo.val_images"
    else:
        annotations = Path(coco["root"]) / "annotations" / f"captions_{coco['eval_split']}.json"
        if not annotations.is_file():
            return
        try:
            total = len(json.loads(annotations.read_bytes()).get("images", []))
        except (OSError, ValueError, AttributeError):
            return  # the subset job names the broken file
        source = str(annotations)
    if total is not None and coco["eval_images"] > total:
        raise VlmsensError(
            f"coco.eval_images is {coco['eval_images']} but split {coco.get('eval_split', 'val2017')} has only "
            f"{total} images ({source}): lower coco.eval_images"
        )


def preflight(config: dict[str, Any]) -> None:
    """Every check above, for the models of the grid and the COCO evaluation split."""
    for model in config["grid"]["models"]:
        check_model(config, model)
    check_eval_split(config)
