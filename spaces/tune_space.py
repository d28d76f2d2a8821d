"""Turn a validated search space into Ray Tune's param_space (which OptunaSearch converts for TPE)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import tune

from spaces.config import Parameter

__all__ = ["to_param_space"]


def _domain(parameter: Parameter) -> Any:
    if parameter.kind == "fixed":
        return parameter.values[0]
    if parameter.kind == "choice":
        return tune.choice(list(parameter.values))
    if parameter.is_integer:
        # tune.randint excludes its upper bound; the YAML range includes it.
        if parameter.log:
            return tune.lograndint(int(parameter.low), int(parameter.high) + 1)
        return tune.randint(int(parameter.low), int(parameter.high) + 1)
    if parameter.log:
        return tune.loguniform(float(parameter.low), float(parameter.high))
    return tune.uniform(float(parameter.low), float(parameter.high))


def to_param_space(space: Mapping[str, Parameter]) -> dict[str, Any]:
    """Return ``{name: tune domain or fixed value}`` for every searched parameter."""
    return {name: _domain(parameter) for name, parameter in space.items()}
