"""Scopes: which part of the model a cell searches, and what its calibration samples hold.

Adding a scope is one more ``Scope`` entry in ``SCOPES`` (and its name in the schema's enum, which
a test keeps equal to this registry). Everything else reads the flags below:

* ``searches_vision``: the vision tower (the family's ``vision_patterns``) is in the AutoQuantize
  search and in the bit budget. When it is not, ModelOpt gets it both as ``disabled_layers`` and
  as ``excluded_module_name_patterns`` of the cost, so it counts neither as searched nor at 16 bits.
* ``with_image``: the calibration samples are image+caption pairs; otherwise caption-only turns.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import VlmsensError


@dataclass(frozen=True)
class Scope:
    name: str
    searches_vision: bool
    with_image: bool
    description: str

    @property
    def modality(self) -> str:
        return "image+caption" if self.with_image else "caption only"


SCOPES: dict[str, Scope] = {
    "lm-only": Scope(
        name="lm-only",
        searches_vision=False,
        with_image=False,
        description="captions only; the vision tower stays BF16, outside the search and the bit budget",
    ),
    "all-layers": Scope(
        name="all-layers",
        searches_vision=True,
        with_image=True,
        description="image+caption samples; every Linear incl. vision tower, mergers and lm_head is searched",
    ),
}


def get_scope(name: str) -> Scope:
    try:
        return SCOPES[name]
    except KeyError:
        raise VlmsensError(f"unknown scope {name!r}; use one of {tuple(SCOPES)}") from None
