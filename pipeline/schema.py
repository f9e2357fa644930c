"""The building blocks of every config section: the base model and the operational marker.

A config section is a :class:`Section`: unknown keys, inf/nan and booleans in numeric fields are
refused.  A field declared with :func:`operational` decides how a stage runs (workers, devices,
memory budgets), not what it writes: :func:`decisive` leaves it out of what fingerprints hash.
The loss registry (``losses/``) builds its configs from these, and ``pipeline.config`` assembles
the schema; neither imports the other's importer.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


def operational(default: Any, **constraints: Any) -> Any:
    """A field that decides how a stage runs (workers, devices, memory budgets), not what it outputs:
    :func:`decisive` leaves it out, so fingerprints ignore it."""
    return Field(default, json_schema_extra={"operational": True}, **constraints)


def is_operational(field) -> bool:
    """Whether a pydantic field was declared with :func:`operational`."""
    return bool((field.json_schema_extra or {}).get("operational"))


def decisive(model: BaseModel) -> dict:
    """``model_dump(mode="json")`` without its operational fields, at every level (models inside
    lists and dicts included): what goes into a fingerprint."""
    out = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        if is_operational(field):
            out.pop(name, None)
        else:
            out[name] = _decisive_value(getattr(model, name), out[name])
    return out


def _decisive_value(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel):
        return decisive(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, BaseModel) for v in value):
        return [_decisive_value(v, d) for v, d in zip(value, dumped)]
    if isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
        return {k: _decisive_value(v, dumped[k]) for k, v in value.items()}
    return dumped


class Section(BaseModel):
    """Every config section: unknown keys, inf/nan and booleans in numeric fields are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info) -> Any:
        """YAML's ``true`` is not a count or a rate (pydantic would read it as 1)."""
        if isinstance(v, bool) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("a true/false value where a number or text is expected")
        return v


def _accepts_bool(ann: Any) -> bool:
    if ann is bool or ann is Any:
        return True
    return any(_accepts_bool(a) for a in getattr(ann, "__args__", ()) or ())
