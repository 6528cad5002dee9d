"""Schemas every vlaprep output is validated against (JSON Schema files beside this module)."""

from __future__ import annotations

import functools
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def load_json_schema(name: str) -> dict:
    with open(os.path.join(_HERE, f"{name}.schema.json")) as f:
        return json.load(f)


def validate_json(document, name: str) -> None:
    """Raise ``jsonschema.ValidationError`` if ``document`` does not match ``schemas/<name>.schema.json``."""
    import jsonschema

    jsonschema.validate(document, load_json_schema(name))
