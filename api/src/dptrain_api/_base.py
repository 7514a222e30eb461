"""The base model every resource schema derives from: camelCase on the wire, unknown fields refused."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, JsonValue
from pydantic.alias_generators import to_camel

JsonDict = dict[str, JsonValue]


class ApiModel(BaseModel):
    """Field docstrings become the CRD descriptions, so write them for `kubectl explain` readers."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def kubernetes_rule(rule: str, message: str, *, field_path: str | None = None) -> JsonDict:
    """One CEL `x-kubernetes-validations` entry; the pydantic validators enforce the same rule."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


IMMUTABLE: list[JsonValue] = [
    kubernetes_rule("self == oldSelf", "is immutable after creation (privacy plan and ledger depend on it)")
]
