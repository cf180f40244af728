# The model families cpdit trains, by name. launch/ and parallel/ find a family here (from a preset name, a config
# or a model) and ask its spec (cpdit/models/family.py) what differs; nothing else tells the families apart.
from __future__ import annotations

from cpdit.models import cogvideox, factorized, phenaki
from cpdit.models.family import ModelFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (cogvideox.FAMILY, factorized.FAMILY, phenaki.FAMILY)}


def all_presets() -> list[str]:
    return [name for family in FAMILIES.values() for name in family.presets]


def family_of_preset(preset: str) -> ModelFamily:
    for family in FAMILIES.values():
        if preset in family.presets:
            return family
    raise ValueError(f"model preset {preset!r} is unknown; choose one of {', '.join(all_presets())}")


def family_of(config_or_model) -> ModelFamily:
    """The family of a config (or of a model, through its `config`)."""
    config = getattr(config_or_model, "config", config_or_model)
    for family in FAMILIES.values():
        if type(config) is family.config_class:
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a registered model family ({', '.join(FAMILIES)})")


def family_of_diffusers(config: dict) -> ModelFamily:
    """The family whose diffusers class wrote this config.json (`_class_name`; without one, the family that has a
    diffusers format)."""
    name = config.get("_class_name")
    for family in FAMILIES.values():
        if family.diffusers is not None and name in (None, family.diffusers.class_name):
            return family
    known = [f.diffusers.class_name for f in FAMILIES.values() if f.diffusers is not None]
    raise ValueError(f"diffusers class {name!r} has no cpdit family; cpdit loads {', '.join(known)}")
