"""Typed configuration: dataclasses read through OmegaConf, YAML files and `key=value` overrides.

Every config group is a dataclass that lives next to the code it configures (`model/config.py`,
`data/config.py`, `training/config.py`, ...). This module only knows how to *load* them:

    cfg = load_config(ExperimentConfig, "experiments/configs/default.yaml", ["model=small", "model.n_layers=4"])

- `model=<preset>` (on the command line or as `model: small` in YAML) starts the `model` group from a
  named preset; later `model.*` keys override single fields.
- An unknown key or a value of the wrong type raises `ConfigError` naming the key and the expected type.
- A string option keeps the word as written: YAML 1.1 reads `off`, `on`, `yes`, `no` (and `true`, `false`) as
  booleans, so `sampler.parallel=off` used to arrive as the string 'False' (see `_keep_written_words`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .model.config import PRESETS, ModelConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def _preset_node(name: Any) -> DictConfig:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"model={name!r} is not a known preset; available presets: {', '.join(PRESETS)}")
    return OmegaConf.structured(PRESETS[name])


def _expected_type(schema: type, dotted: str) -> str:
    """Best-effort name of the declared type of `a.b.c` in a dataclass schema."""
    cls: Any = schema
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return "?"
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return "?"
        cls = hints[part]
    return getattr(cls, "__name__", str(cls)).replace("typing.", "")


def _valid_keys(schema: type, dotted: str) -> list[str]:
    cls: Any = schema
    parts = dotted.split(".")[:-1]
    for part in parts:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        cls = hints.get(part)
    return sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []


def _explain(exc: OmegaConfBaseException, schema: type, key_hint: str | None = None) -> ConfigError:
    key = getattr(exc, "full_key", None) or key_hint or "?"
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        scope = key.rsplit(".", 1)[0] if "." in key else "the top level"
        valid = _valid_keys(schema, key)
        return ConfigError(f"unknown config key '{key}' (valid keys under {scope}: {', '.join(valid)})")
    if isinstance(exc, ValidationError):
        return ConfigError(
            f"config key '{key}' expects {_expected_type(schema, key)}, got {getattr(exc, 'value', '?')!r} ({exc.msg.splitlines()[0]})"
        )
    return ConfigError(f"config key '{key}': {exc}")


# String options and YAML's booleans ------------------------------------------------------------------------------
def _field_type(tp: Any, part: str) -> Any:
    """The declared type one level down: a dataclass field, a list item, a dict value (Any when unknown)."""
    tp = _without_none(tp)
    if dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp).get(part, Any)
    if typing.get_origin(tp) in (list, tuple):
        return (typing.get_args(tp) or (Any,))[0]
    if typing.get_origin(tp) is dict:
        return (typing.get_args(tp) or (Any, Any))[-1]
    return Any


def _without_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _keep_written_words(value: Any, written: Any, declared: Any) -> Any:
    """`value` as YAML 1.1 parsed it, with the booleans it made of words put back where they mean text.

    `written` is the same node with every scalar as written (PyYAML's BaseLoader). A boolean becomes its word
    again where the schema declares `str` (`parallel: off` is the mode 'off'); where it declares no type
    (`Any`, e.g. a sweep's `choices`), only `true`/`false` stay booleans (YAML 1.2's rule), so `[off, threshold]`
    are two words; declared `bool`, OmegaConf reads every one of those words itself."""
    if isinstance(value, bool) and isinstance(written, str):
        declared = _without_none(declared)
        if declared is str or (declared is Any and written.lower() not in ("true", "false")):
            return written
        return value
    if isinstance(value, dict) and isinstance(written, dict):
        return {k: _keep_written_words(v, written.get(k), _field_type(declared, str(k))) for k, v in value.items()}
    if isinstance(value, list) and isinstance(written, list) and len(value) == len(written):
        item = _field_type(declared, "")
        return [_keep_written_words(v, w, item) for v, w in zip(value, written)]
    return value


def _as_written(text: str) -> Any:
    try:
        return yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506  (BaseLoader builds only str/list/dict)
    except yaml.YAMLError:
        return None


def _merge(base: DictConfig, other: Any, schema: type, key_hint: str | None = None) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, key_hint) from None


def load_config(
    schema: type[T],
    yaml_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    validate: bool = True,
) -> T:
    """Build a `schema` dataclass instance from its defaults, an optional YAML file and overrides; keys and types
    are always checked, each group's `validate()` unless `validate=False` (`--show-config` lists the keys of a
    config that still lacks a required one)."""
    cfg = OmegaConf.structured(schema)
    has_model = any(f.name == "model" for f in dataclasses.fields(schema))
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come from the yaml package
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
        if has_model and isinstance(loaded, DictConfig) and isinstance(loaded.get("model"), str):
            cfg.model = _preset_node(loaded.pop("model"))
        if isinstance(loaded, DictConfig):
            plain = OmegaConf.to_container(loaded, resolve=False)
            loaded = _keep_written_words(plain, _as_written(path.read_text()), schema)
        cfg = _merge(cfg, loaded, schema)
    for key, value in parse_overrides(overrides):
        if has_model and key == "model":
            cfg.model = _preset_node(value)
            continue
        try:
            parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        except Exception as exc:  # a value that is not valid YAML (e.g. unbalanced brackets)
            raise ConfigError(f"cannot parse the value of override '{key}': {value!r} ({exc})") from None
        declared: Any = schema
        for part in key.split("."):
            declared = _field_type(declared, part)
        leaf = OmegaConf.select(parsed, key, throw_on_missing=False)
        if isinstance(leaf, (bool, ListConfig, DictConfig)):
            plain = OmegaConf.to_container(leaf) if isinstance(leaf, (ListConfig, DictConfig)) else leaf
            parsed = OmegaConf.from_dotlist([])
            OmegaConf.update(parsed, key, _keep_written_words(plain, _as_written(value), declared), force_add=True)
        cfg = _merge(cfg, parsed, schema, key)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema) from None
    try:
        if validate:
            _validate_tree(obj)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return obj


def _validate_tree(obj: Any) -> None:
    """Call `validate()` on every dataclass in the tree that defines one (children first)."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        _validate_tree(getattr(obj, f.name))
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain nested dicts/lists (for YAML dumps and MLflow)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


SHOW_CONFIG = "--show-config"  # every CLI that reads a config: print it resolved (every key) and run nothing


def show_config(schema: type, yaml_path: str | Path | None, overrides: list[str]) -> str:
    """The config a command would run with, as YAML: every key, its value after the YAML file and overrides."""
    if yaml_path is not None and Path(yaml_path).resolve().is_relative_to(Path.cwd()):
        yaml_path = Path(yaml_path).resolve().relative_to(Path.cwd())
    header = f"# {schema.__name__}" + (f" from {yaml_path}" if yaml_path else "") + \
        (f" with {' '.join(overrides)}" if overrides else "") + "; any key can be overridden as key=value\n"
    return header + to_yaml(load_config(schema, yaml_path, overrides, validate=False))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"model.n_layers": 4, ...}`: the resolved config as flat params (MLflow logs these)."""
    node = cfg if isinstance(cfg, (dict, list)) else to_dict(cfg)
    out: dict[str, Any] = {}
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, DictConfig)) and v:
            out.update(flatten(dict(v), key + "."))
        elif isinstance(v, (list, ListConfig)):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out


__all__ = ["SHOW_CONFIG", "ConfigError", "ModelConfig", "flatten", "load_config", "parse_overrides", "show_config",
           "to_dict", "to_yaml"]
