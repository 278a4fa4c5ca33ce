"""Reading configuration text safely: JSON and YAML files of bounded size (no alias bombs, no
duplicate keys, ``1e-3`` read as a number) and ``--set key=value`` overrides, into plain values
that ``config.py`` then type-checks and validates.
"""

from __future__ import annotations

import json
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .json_types import JSONObject

MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 100
MAX_CONFIG_ELEMENTS = 100_000  # values in a configuration once its aliases are expanded
# YAML 1.1 reads 1e-3 (no dot, or no sign in the exponent) as a string; YAML 1.2 and JSON as a number
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads 1e-3 as a number, refuses duplicate keys and stops alias bombs
    ("billion laughs": a few hundred bytes that expand to gigabytes) after MAX_YAML_ALIASES aliases."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} YAML aliases")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {short_repr(key)}")
            seen.add(key)
        return super().construct_mapping(node, deep)


_SafeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML (a superset of JSON) with :class:`_SafeLoader`'s limits and a size limit."""
    if len(text) > MAX_CONFIG_BYTES:
        raise yaml.YAMLError(f"more than {MAX_CONFIG_BYTES} bytes")
    data = yaml.load(text, Loader=_SafeLoader)
    _check_expanded_size(data)
    return data


def _check_expanded_size(data: Any) -> None:
    """A few aliases nested in each other expand to billions of values (the parsed object shares
    them, but every later walk over it would not): count, stopping at the limit."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_CONFIG_ELEMENTS:
            raise yaml.YAMLError(f"more than {MAX_CONFIG_ELEMENTS} values once its aliases are expanded")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 8, 8, 60, 60


def short_repr(value: Any, limit: int = 80) -> str:
    """A bounded repr of ``value``: error lines quote a value, never a whole file, and computing
    the quote never walks a huge object."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_config_file(path: str | Path, max_bytes: int = MAX_CONFIG_BYTES) -> JSONObject:
    """Read a JSON or YAML configuration file into a plain dict (``max_bytes``: larger files are
    refused; YAML files are bounded by MAX_CONFIG_BYTES whatever it says)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        if path.stat().st_size > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes")
        text = path.read_text()
        data = load_yaml(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"configuration file {path} could not be parsed: {first_line[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {path} must contain a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as JSON/YAML when it parses."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and "," in value and key not in ("data_path", "output_dir"):
        parts = [p.strip() for p in value.split(",")]
        try:
            value = [load_yaml(p) for p in parts]
        except yaml.YAMLError:
            value = parts
    return key, value
