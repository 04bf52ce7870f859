"""Model factory: every ConvNeXt variant by name (`convnext_tiny`, ...)."""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Sequence

from core.errors import UserError

from .convnext import VARIANTS, ConvNeXt
from .pretrained import load_pretrained

__all__ = ["ConvNeXt", "UnknownModelError", "VARIANTS", "check_model_name", "create_model", "list_models",
           "stage_shapes"]

_PREFIX = "convnext_"
# Everything the constructor takes except what create_model sets itself.
_OVERRIDES = tuple(p for p in inspect.signature(ConvNeXt.__init__).parameters if p not in ("self", "num_classes"))


class UnknownModelError(UserError):
    """A model name or a model option that does not exist."""


def list_models() -> list[str]:
    return [_PREFIX + v for v in VARIANTS]


def _unknown(kind: str, word: str, choices: Iterable[str], prefix: str = "") -> UnknownModelError:
    """One-line error naming the closest valid choices, compared without their common `prefix`."""
    short = {c.removeprefix(prefix): c for c in choices}
    close = [short[c] for c in difflib.get_close_matches(word.lower().removeprefix(prefix), short, n=3, cutoff=0.6)]
    guess = f"did you mean {' or '.join(close)}? " if close else ""
    return UnknownModelError(f"unknown {kind} {word!r}; {guess}(valid: {', '.join(short.values())})")


def check_model_name(name: str) -> None:
    """Raise UnknownModelError, naming the closest variants, unless `name` is one of list_models()."""
    if name not in list_models():
        raise _unknown("model", name, list_models(), prefix=_PREFIX)


def stage_shapes(name: str, depths: Sequence[int] = (), dims: Sequence[int] = ()) -> tuple[Sequence[int], Sequence[int]]:
    """(depths, dims) of `convnext_<variant>`, each replaced by the given one when that is not empty."""
    variant_depths, variant_dims = VARIANTS[name.removeprefix(_PREFIX)]
    return depths or variant_depths, dims or variant_dims


def create_model(name: str, num_classes: int = 1000, pretrained: str = "", pretrained_ema: bool = False,
                 pretrained_head: bool = True, log: Callable[[str], None] = print, depths: Sequence[int] = (),
                 dims: Sequence[int] = (), **overrides) -> ConvNeXt:
    """Build `convnext_<variant>`; `depths`/`dims`, when given, replace the variant's, `overrides` any other
    constructor argument.

    `pretrained`: a weights file of any supported layout (models.pretrained) to start from, its EMA weights with
    `pretrained_ema`, without its head when not `pretrained_head`; what had to be adapted to fit (head, stem) is
    said through `log`, a line each.
    """
    check_model_name(name)
    for key in overrides:
        if key not in _OVERRIDES:
            raise _unknown("model option", key, _OVERRIDES)
    depths, dims = stage_shapes(name, depths, dims)
    model = ConvNeXt(num_classes=num_classes, depths=depths, dims=dims, **overrides)
    if pretrained:
        for note in load_pretrained(model, pretrained, ema=pretrained_ema, head=pretrained_head):
            log(f"{pretrained}: {note}")
    return model
