"""The inputs of each partial computation in a round request, checked before any is run.

A round request's ``tasks`` maps a task to its inputs (``params``). The site reads the
fields below; their types are checked here so that a malformed value is an error naming
the task, the field and the value, not a failure deep inside an estimator. Fields the
site does not read are ignored, so a coordinator may add some without breaking sites.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import ProtocolError

_SHOWN_CHARS = 100


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class CoxParams(_Params):
    """crude_cox: the log hazard ratio to evaluate at, and whether to add the site's own fit."""

    beta: float = Field(default=0.0, allow_inf_nan=False)
    local_fit: bool = False


class PropensityParams(_Params):
    """propensity: the coefficients (default zeros), the site's own fit, large-scale columns."""

    beta: list[float] | None = None
    local_fit: bool = False
    concepts: list[str] | None = None


class AdjustedParams(_Params):
    """adjusted (and weighted_cox.propensity): the PS model, the caliper and the exposed share."""

    beta: list[float]
    caliper: float = Field(ge=0.0, allow_inf_nan=False)
    exposed_share: float = Field(ge=0.0, le=1.0)
    concepts: list[str] | None = None
    event_tables: bool = True


class CoxFitParams(_Params):
    """One weighted Cox model's point: its log hazard ratio, and whether it is the final one."""

    beta: float = Field(allow_inf_nan=False)
    final: bool = False


class WeightedCoxParams(_Params):
    """weighted_cox: the PS model and each analysis's point."""

    propensity: AdjustedParams
    fits: dict[str, CoxFitParams] = Field(min_length=1)


TASK_PARAMS: dict[str, type[_Params]] = {
    "crude_cox": CoxParams,
    "propensity": PropensityParams,
    "adjusted": AdjustedParams,
    "weighted_cox": WeightedCoxParams,
}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def check_task_params(tasks: dict[str, dict[str, Any]]) -> None:
    """Raise ``ProtocolError`` naming every malformed input of the request's tasks."""
    problems = []
    for task, params in tasks.items():
        model = TASK_PARAMS.get(task)
        if model is None:
            continue
        try:
            model.model_validate(params)
        except ValidationError as error:
            for item in error.errors():
                where = ".".join(["tasks", task, *map(str, item["loc"])])
                shown = "" if item["type"] == "missing" else f" (got {_shown(item.get('input'))})"
                problems.append(f"field `{where}`: {item['msg']}{shown}")
    if problems:
        raise ProtocolError(
            f"round request has malformed task inputs: {'; '.join(problems)}. Fix: run the same "
            f"fedrwe version on the coordinator and every site; the inputs are the coordinator's."
        )
