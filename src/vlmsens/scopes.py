"""Scopes: which part of the model a cell searches, and what its calibration samples hold.

Adding a scope is one more ``Scope`` entry in ``SCOPES`` (and its name in the schema's enum, which
a test keeps equal to this registry). Everything else reads the flags below:

* ``searches_vision``: the vision tower (the family's ``vision_patterns``) is in the AutoQuantize
  search and in the bit budget. When it is not, ModelOpt gets it both as ``disabled_layers`` and
  as ``excluded_module_name_patterns`` of the cost, so it counts neither as searched nor at 16 bits.
* ``needs_images``: the samples must hold the images (the searched vision tower needs its inputs).
  Otherwise the config key ``calibration.inputs`` decides (``sample_inputs``): image+caption by
  default, so that a scope changes what is quantized and nothing else; caption-only on request.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import VlmsensError


@dataclass(frozen=True)
class Scope:
    name: str
    searches_vision: bool
    needs_images: bool
    description: str


SCOPES: dict[str, Scope] = {
    "lm-only": Scope(
        name="lm-only",
        searches_vision=False,
        needs_images=False,
        description="the vision tower stays BF16, outside the search and the bit budget",
    ),
    "all-layers": Scope(
        name="all-layers",
        searches_vision=True,
        needs_images=True,
        description="image+caption samples; every Linear incl. vision tower, mergers and lm_head is searched",
    ),
}


def get_scope(name: str) -> Scope:
    try:
        return SCOPES[name]
    except KeyError:
        raise VlmsensError(f"unknown scope {name!r}; use one of {tuple(SCOPES)}") from None


# What a cell's samples hold: the values of ``calibration.inputs``.
IMAGE_AND_CAPTION = "image+caption"
CAPTION_ONLY = "caption-only"
INPUTS = (IMAGE_AND_CAPTION, CAPTION_ONLY)


def sample_inputs(scope: str, requested: str) -> str:
    """What the samples of ``scope`` hold when ``calibration.inputs`` is ``requested``.

    A scope that searches the vision tower always sees images; ``caption-only`` applies to the others.
    """
    if requested not in INPUTS:
        raise VlmsensError(f"calibration.inputs must be one of {INPUTS}, got {requested!r}")
    return IMAGE_AND_CAPTION if get_scope(scope).needs_images else requested
