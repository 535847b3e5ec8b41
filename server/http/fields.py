"""Typed reads of JSON request fields: each wrong type is a 400 that names the field.

JSON has one number type, so the checks are Python's view of it: an integer field takes no
bool and no float, a number field takes ints and floats but no bool.
"""
from __future__ import annotations

from typing import Any

from .errors import bad_request

_MISSING = object()


class Fields:
    """`Fields(body).int("max_tokens")`: the value, None when absent or null, else HttpError 400."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def get(self, name: str) -> Any:
        value = self.body.get(name, _MISSING)
        return None if value is _MISSING else value

    def int(self, name: str) -> int | None:
        value = self.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad_request(name, f"must be an integer, got {_kind(value)}")
        return value

    def number(self, name: str) -> float | None:
        value = self.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad_request(name, f"must be a number, got {_kind(value)}")
        return None if value is None else float(value)

    def bool(self, name: str) -> bool | None:
        value = self.get(name)
        if value is not None and not isinstance(value, bool):
            raise bad_request(name, f"must be true or false, got {_kind(value)}")
        return value

    def str(self, name: str) -> str | None:
        value = self.get(name)
        if value is not None and not isinstance(value, str):
            raise bad_request(name, f"must be a string, got {_kind(value)}")
        return value

    def dict(self, name: str) -> dict[str, Any] | None:
        value = self.get(name)
        if value is not None and not isinstance(value, dict):
            raise bad_request(name, f"must be an object, got {_kind(value)}")
        return value

    def strings(self, name: str) -> list[str]:
        """A string or a list of strings (OpenAI's `stop`)."""
        value = self.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise bad_request(name, f"must be a string or a list of strings, got {_kind(value)}")

    def ints(self, name: str) -> list[int]:
        value = self.get(name)
        if value is None:
            return []
        if isinstance(value, list) and all(is_token_id(v) for v in value):
            return value
        raise bad_request(name, f"must be a list of non-negative integers, got {_kind(value)}")


def is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
