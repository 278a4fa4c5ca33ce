"""The one name for a free-form JSON object, so that ``dict[str, Any]`` in a signature means "keys
not fixed here" and every record with known keys has a named type of its own instead."""

from __future__ import annotations

from typing import Any

JSONObject = dict[str, Any]
"""A JSON object whose keys this code does not fix: JSON read from disk before it is checked, a
configuration's key -> value map, options passed through to something else, or the JSON form
(``to_json``/``to_dict``) of an object whose own class names its fields."""
