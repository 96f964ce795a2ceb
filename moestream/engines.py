"""Which engine runs a store, decided here at the edge: moestream's native forward
(compute/loader.py) where it has one for the family, transformers' own classes
(integrations/transformers.py) otherwise."""
from __future__ import annotations


def engine_for(architecture: str) -> str:
    """"native" or "transformers": the engine `generate --engine auto` and the checks below use."""
    from .compute.loader import FORWARDS
    return "native" if architecture in FORWARDS else "transformers"


def dense_problems(architecture: str, config: dict, moe_layers, experts_per_layer: int,
                   dense: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps `dense` (tensor name -> shape) from loading into the engine that runs
    `architecture`, one line each (formats.convert.DenseCheck; `moestream.convert` and
    `moestream verify` pass it). A family run by transformers is checked only where transformers
    is installed (the hf extra): without it such a store cannot be loaded at all, and loading says
    what to install."""
    if engine_for(architecture) == "native":
        from .compute.loader import dense_problems as native
        return native(architecture, config, moe_layers, experts_per_layer, dense)
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    from .integrations.transformers import dense_problems as hf
    return hf(architecture, config, moe_layers, experts_per_layer, dense)


def derive_family(config: dict, where: str):
    """The record of a family formats/families.py has none of, derived from transformers' own
    model class (formats.families.DeriveFamily; `moestream.convert` passes it). Needs transformers
    (the hf extra): without it the family is refused, saying what to install."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        from .errors import ConvertError
        from .formats.families import FAMILIES
        raise ConvertError(f"{where}: unsupported architecture (model_type {config.get('model_type')!r}): moestream "
                           f"has records of {', '.join(sorted(FAMILIES))}; other transformers MoE families are read "
                           "through transformers' own model classes: pip install 'moestream[hf]'") from None
    from .integrations.transformers import derive_family as derive
    return derive(config, where)
