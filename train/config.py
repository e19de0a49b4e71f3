"""One config system for every trainer: dataclass schemas, YAML files, dotted command-line overrides.

A schema is a (nested) dataclass. `load_config(Schema, "configs/x.yaml", ["train.lr=1e-4"])` reads the
YAML, applies the overrides, and builds the dataclass while checking every key and value; anything
wrong raises `ConfigError` with the dotted path of the offending key, before a trainer starts. A
dataclass may define `validate(self)` for value checks (ranges, choices, cross-field rules) and calls
`require(cond, msg)` inside it. `dump_config` writes the resolved config (the run directory keeps it,
checkpoints embed it).

Supported field types: bool, int, float, str, Optional[X], Literal[...], tuple[X, ...], list[X],
dict (free-form, e.g. extra DeepSpeed settings) and nested dataclasses.
"""
import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key."""


def require(cond, msg):
    if not cond:
        raise ConfigError(msg)


# ----------------------------------------------------------------------------- building dataclasses

def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, path):
    """Return `value` checked against (and, for numbers written as strings, converted to) type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        require(isinstance(value, dict), f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is typing.Literal:
        require(value in args, f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        require(isinstance(value, (list, tuple)), f"{path}: expected a list, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            require(len(value) == len(args), f"{path}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else typing.Any
            items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is dict or origin is dict:
        require(isinstance(value, dict), f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is typing.Any:
        return value
    if tp is bool:
        require(isinstance(value, bool), f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):  # "1_000" or "80000" from the command line
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        require(isinstance(value, int) and not isinstance(value, bool), f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        require(isinstance(value, (int, float)) and not isinstance(value, bool),
                f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        require(isinstance(value, str), f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def _build(cls, data, path=""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section '{path}'" if path else "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(repr(f'{path}.{k}' if path else k) for k in unknown)} "
                          f"in {where}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}'")
    obj = cls(**kwargs)
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        value = getattr(obj, name)
        if name not in data and dataclasses.is_dataclass(value):
            _validate_tree(value, key)  # a section the YAML omits is validated like one it names
        if hints[name] is int and (name == "every" or name.endswith("_every")):
            _check_interval(key, value, f.default)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return obj


def _check_interval(key, value, default):
    """`every` / `*_every` fields count steps between events: >= 1, or >= 0 where the default is 0 (0 = never)."""
    lowest = 0 if default == 0 else 1
    require(value >= lowest, f"{key}: must be >= {lowest} (steps between events{'; 0 = never' if lowest == 0 else ''}),"
                             f" got {value}")


def _validate_tree(obj, path):
    """Run the validation `_build` runs, on a dataclass built from defaults (nested sections first)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}.{f.name}"
        if dataclasses.is_dataclass(value):
            _validate_tree(value, key)
        if hints.get(f.name) is int and (f.name == "every" or f.name.endswith("_every")):
            _check_interval(key, value, f.default)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def from_dict(cls, data):
    """Build and validate schema `cls` from a plain dict (e.g. a config stored in a checkpoint). A schema may
    define a static `upgrade(data) -> data` that renames keys of older versions first (convert on read)."""
    if hasattr(cls, "upgrade"):
        data = cls.upgrade(data)
    return _build(cls, data or {})


def to_dict(cfg):
    """The config as plain YAML-able Python (tuples become lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------- YAML + overrides

def parse_override(text):
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4); the value is parsed as YAML ('[0.9, 0.95]', 'null')."""
    require("=" in text, f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    require(key and all(key.split(".")), f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key.split("."), value


def apply_overrides(data, overrides):
    """Set dotted keys in the nested dict `data` (in place). Unknown keys are caught by validation."""
    for text in overrides or ():
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            require(isinstance(nxt, dict), f"override {text!r}: '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def read_yaml(path):
    path = Path(path)
    require(path.is_file(), f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    data = data or {}
    require(isinstance(data, dict), f"{path}: the top level must be a mapping")
    return data


def load_config(cls, path=None, overrides=()):
    """YAML file (optional) + dotted overrides -> validated instance of schema `cls`."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, overrides)
    return from_dict(cls, data)


def dump_config(cfg, path=None):
    """YAML text of the resolved config; also written to `path` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


def add_config_args(parser: argparse.ArgumentParser):
    """--config FILE, --set k=v (repeatable), and bare k=v arguments."""
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("extra", nargs="*", metavar="KEY=VALUE", help="more overrides")
    return parser


def config_from_args(cls, args):
    return load_config(cls, args.config, list(args.overrides) + list(args.extra))
