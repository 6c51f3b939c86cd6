"""check_config: the checks after the schema, each naming the key at fault (in process, no Snakemake).

tests/test_workflow.py runs a few bad configs through Snakemake end to end; these cover the other
branches, one each, on the demo config with one thing broken.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import REPO, fake_checkpoint
from snakemake.utils import validate

from vlmsens import config as vlmsens_config
from vlmsens.errors import VlmsensError

LEGACY = REPO / "tests" / "data" / "legacy-calib"


def check_config(config: dict, **kwargs) -> None:
    """As the Snakefile runs it: the schema first (it fills the defaults), then the checks after it."""
    validate(config, str(REPO / "config" / "schema.yaml"))
    vlmsens_config.check_config(config, **kwargs)


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def real_config(tmp_path: Path) -> dict:
    """The demo grid on a real (placeholder) COCO tree and a local checkpoint folder."""
    config = demo_config()
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    images = ", ".join(f'{{"id": {i}, "file_name": "{i:012d}.jpg"}}' for i in range(20))
    for split in ("train2017", "val2017"):
        (coco / "annotations" / f"captions_{split}.json").write_text(f'{{"images": [{images}], "annotations": []}}')
    config["coco"] = {"root": str(coco), "calib_split": "train2017", "eval_split": "val2017", "eval_images": 12}
    checkpoint = fake_checkpoint(tmp_path / "ckpt", "qwen3_vl")
    config["models"]["tiny_qwen3_vl"] = {"family": "qwen3_vl", "checkpoint": str(checkpoint)}
    return config


def test_the_demo_and_a_real_config_pass(tmp_path):
    check_config(demo_config())
    check_config(real_config(tmp_path))


def _nested_set(config: dict, value, *keys: str) -> None:
    for key in keys[:-1]:
        config = config[key]
    config[keys[-1]] = value


CASES = {
    "candidate-set-of-sets": (lambda c, _: c.update(formats={"a": {"candidates": ["wfp8_afp8"]}, "b": {"candidates": ["a"]}}),
                              "formats.b.candidates names 'a', itself a candidate set"),
    "unknown-candidate": (lambda c, _: c.update(formats={"a": {"candidates": ["wfp8_afp8", "wint2"]}}),
                          "formats.a.candidates names unknown format 'wint2'"),
    "no-bits-target": (lambda c, _: c["autoquant"]["effective_bits"].pop("wint8_aint8"),
                       "autoquant.effective_bits.wint8_aint8"),
    "size-not-defined": (lambda c, _: c["sizes"].pop("large"), "grid.sizes names 'large'"),
    "pixels-inverted": (lambda c, _: _nested_set(c, 10**6, "prompts", "min_pixels"),
                        "prompts.min_pixels (1000000) exceeds prompts.max_pixels"),
    "no-checkpoint": (lambda c, _: c["models"].update(tiny_qwen3_vl={"family": "qwen3_vl"}),
                      "models.tiny_qwen3_vl.checkpoint is not set"),
    "ladder-size-not-in-grid": (lambda c, _: _nested_set(c, ["huge"], "ship_this", "ladder", "sizes"),
                                "ship_this.ladder.sizes names ['huge'], not in grid.sizes"),
}
REAL_CASES = {
    "checkpoint-without-config-json": (lambda c, tmp: (tmp / "ckpt" / "config.json").unlink(),
                                       "is a folder but not a checkpoint (no config.json"),
    "no-coco-root": (lambda c, _: c["coco"].pop("root"), "coco.root is not set"),
    "coco-root-missing": (lambda c, tmp: _nested_set(c, str(tmp / "nowhere"), "coco", "root"), "does not exist"),
    "no-annotations": (lambda c, tmp: (tmp / "coco" / "annotations" / "captions_val2017.json").unlink(),
                       "captions_val2017.json not found"),
    "prebuilt-db-missing": (lambda c, _: _nested_set(c, str(LEGACY), "coco", "prebuilt_dir"),
                            "coco.prebuilt_dir: " + str(LEGACY / "coco2017_vlm_calib_large.db") + " not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_demo_config_with_one_fault(case, tmp_path):
    mutate, message = CASES[case]
    config = demo_config()
    mutate(config, tmp_path)
    with pytest.raises(VlmsensError) as err:
        check_config(config)
    assert message in str(err.value)


@pytest.mark.parametrize("case", sorted(REAL_CASES))
def test_real_config_with_one_fault(case, tmp_path):
    mutate, message = REAL_CASES[case]
    config = real_config(tmp_path)
    mutate(config, tmp_path)
    with pytest.raises(VlmsensError) as err:
        check_config(config)
    assert message in str(err.value)
    # Paths are checked only where asked: the same config passes without them.
    check_config(copy.deepcopy(config), check_paths=False)
