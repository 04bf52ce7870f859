"""Reading a Config: defaults <- YAML files (with their bases) <- dotted overrides, each value checked against its
field's declared type; rebuilding one from a saved dict, and writing one out."""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any

import yaml

from core.config_schema import Config
from core.config_validation import validate
from core.errors import ConfigError
from core.files import atomic_write


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key of the schema, e.g. 'optim.lr'."""
    cfg = cfg or Config()
    keys = []
    for name, f in _fields(cfg).items():
        value = getattr(cfg, name)
        keys += [f"{name}.{k}" for k in _fields(value)] if dataclasses.is_dataclass(value) else [name]
    return keys


def _unknown_key(key: str, cfg: Config) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(cfg), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid keys: {', '.join(all_keys(cfg))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Check a value against the field's declared type, converting only where nothing can be lost."""
    kind = annotation.replace(" ", "")
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind == "str":
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind == "list":
        if isinstance(value, (list, tuple)):
            return list(value)
    raise ConfigError(f"config key '{key}' must be {kind}, got {type(value).__name__} {value!r}")


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        fields = _fields(node)
        if part not in fields:
            raise _unknown_key(key, cfg)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; give a mapping or set '{key}.<name>'")
                for sub, sub_value in value.items():
                    _set(cfg, f"{key}.{sub}", sub_value)
                return
            setattr(node, part, _coerce(key, value, str(fields[part].type)))
            return
        node = getattr(node, part)
        if not dataclasses.is_dataclass(node):
            raise _unknown_key(key, cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001). Values are YAML, so lists and booleans work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key.sub=value (e.g. optim.lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist; see configs/ for the shipped ones")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(data).__name__}")
    return data


def _base_path(path: str, data: dict) -> str | None:
    """The file named by a top-level 'base:' key (removed from data), relative to the folder of path."""
    if "base" not in data:
        return None
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file '{path}': base must be the path of the YAML file it extends (relative to "
                          f"its folder, or absolute), got {type(base).__name__} {base!r}")
    return os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(base.strip())))


def _apply_file(cfg: Config, path: str, chain: tuple[str, ...] = ()) -> None:
    """Set cfg from a YAML file: its base first (recursively), then its own keys, each overriding one key."""
    data = _read_yaml(path)
    base = _base_path(path, data)
    if base is not None:
        chain = (*chain, path)
        if os.path.realpath(base) in map(os.path.realpath, chain):
            raise ConfigError(f"config files extend each other in a cycle: {' -> '.join((*chain, base))}; "
                              f"remove the base key from one of them")
        if not os.path.isfile(base):
            raise ConfigError(f"config file '{path}': its base '{base}' does not exist; base is a path relative "
                              f"to the folder of '{path}', or absolute")
        _apply_file(cfg, base, chain)
    try:
        for key, value in data.items():
            _set(cfg, str(key), value)
    except ConfigError as e:
        raise ConfigError(f"config file '{path}': {e}") from None


def load_config(path: str | None = None, overrides: typing.Sequence[str] = (), saved: dict | None = None) -> Config:
    """Defaults <- YAML file <- overrides, validated. Raises ConfigError with a one-line message.

    A file may start from another: a top-level 'base: other.yaml' (relative to the file's folder) loads that
    file first (which may have a base of its own); the file's keys then override the base's one by one, so a
    section names only the keys it changes. The resolved Config holds no trace of the base.

    Args:
        saved: a config saved whole (to_dict: a checkpoint's `config` entry), in the defaults' place.
    """
    cfg = Config()
    if saved is not None:
        try:
            cfg = config_from_dict(saved)
        except ConfigError as e:
            raise ConfigError(f"the config saved with the weights does not fit this trainer ({e}); give --config "
                              f"FILE instead") from None
    if path:
        _apply_file(cfg, path)
    for text in overrides:
        _set(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved by to_dict (e.g. from a checkpoint)."""
    cfg = Config()
    for key, value in data.items():
        _set(cfg, key, value)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config atomically, so a crash never leaves half a file."""
    atomic_write(path, lambda f: yaml.safe_dump(to_dict(cfg), f, sort_keys=False), binary=False)
