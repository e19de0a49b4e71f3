"""One config system for every trainer: dataclass schemas, YAML files, dotted command-line overrides.

A schema is a (nested) dataclass. `load_config(Schema, "configs/x.yaml", ["optim.lr=1e-4"])` reads the
YAML, applies the overrides, and builds the dataclass while checking every key and value; anything
wrong raises `ConfigError` with the dotted path of the offending key, before a trainer starts. A
dataclass may define `validate(self)` for value checks (ranges, choices, cross-field rules) and calls
`require(cond, msg)` inside it. `dump_config` writes the resolved config (the run directory keeps it,
checkpoints embed it).

The schema documents itself: the comment after a field (`lr: float = 2e-4   # peak learning rate`) is
its help text. `add_config_args` puts every key with its type, default and comment, and the files in
configs/ that fit the schema, into the trainer's `--help` (read from the source with ast + tokenize).
`cli_parser("bench.x")` is the parser of every other `python -m` command (defaults shown).

Supported field types: bool, int, float, str, Optional[X], Literal[...], tuple[X, ...], list[X],
dict (free-form, e.g. extra DeepSpeed settings) and nested dataclasses.
"""
import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key."""


def require(cond: object, msg: str) -> None:
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
        try:
            value = float(value)  # an int of 400 digits overflows here
        except OverflowError:
            value = math.inf
        require(math.isfinite(value), f"{path}: expected a finite number, got {value!r}")  # lr=inf trains NaNs
        return value
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


def from_dict(cls: type, data: dict | None) -> typing.Any:
    """Build and validate schema `cls` from a plain dict (e.g. a config stored in a checkpoint). A schema may
    define a static `upgrade(data) -> data` that renames keys of older versions first (convert on read)."""
    if hasattr(cls, "upgrade"):
        data = cls.upgrade(data)
    return _build(cls, data or {})


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_dict(cfg: typing.Any) -> dict[str, typing.Any]:
    """The config as plain YAML-able Python (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------- YAML + overrides

class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first, again):
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first} and {again})")
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: YAML itself keeps the last one silently,
    so a config edited in two places would run with whichever came last."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    pass
        return super().construct_mapping(node, deep)


MAX_YAML_VALUES = 100_000  # a config is hundreds; aliases of aliases ("billion laughs") expand to billions


class _TooLarge(yaml.YAMLError):
    pass


def _yaml_load(text):
    data = yaml.load(text, Loader=_UniqueKeyLoader)
    # aliases are shared, not copied, by the loader; every later step (checking, printing, DeepSpeed's JSON) would
    # expand them: count the values as expanded, stopping at the limit
    stack, count = [data], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise _TooLarge(f"it expands to more than {MAX_YAML_VALUES:,} values (anchors repeating anchors)")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return data


def parse_override(text: str) -> tuple[list[str], typing.Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4); the value is parsed as YAML ('[0.9, 0.95]', 'null')."""
    require("=" in text, f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    require(key and all(key.split(".")), f"override {text!r} has an empty key")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {' '.join(str(e).split())}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: typing.Iterable[str] | None) -> dict:
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


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    require(path.is_file(), f"config file not found: {path}")
    try:
        data = _yaml_load(path.read_text())
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}; YAML would keep the last one silently: remove one") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot read the config ({' '.join(str(e).split())})") from None
    # an empty file (or only comments) is a mistake, not "all defaults": a truncated copy, the wrong file
    require(data is not None, f"{path}: the config file is empty (no settings); give a config with its sections")
    require(isinstance(data, dict), f"{path}: the top level must be a mapping")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Iterable[str] | None = ()) -> typing.Any:
    """YAML file (optional) + dotted overrides -> validated instance of schema `cls`."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, overrides)
    return from_dict(cls, data)


def dump_config(cfg: typing.Any, path: str | Path | None = None) -> str:
    """YAML text of the resolved config; also written to `path` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


# ----------------------------------------------------------------------------- self-documenting commands

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option shows its default (None, meaning "not set", is left out); descriptions and epilogs keep
    their line breaks."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class CliParser(argparse.ArgumentParser):
    """ArgumentParser with HelpFormatter; an option added without help text still shows its default.
    Sub-commands (`add_subparsers().add_parser`) are CliParsers too."""

    def __init__(self, *args: typing.Any, formatter_class: type[argparse.HelpFormatter] = HelpFormatter,
                 **kwargs: typing.Any) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def format_help(self) -> str:
        for a in self._actions:
            if a.help is None and a.option_strings and a.default not in (None, argparse.SUPPRESS):
                a.help = "(default: %(default)s)"
        return super().format_help()


def cli_parser(module: str, description: str | None = None, **kwargs: typing.Any) -> CliParser:
    """The parser of a `python -m MODULE` command: that name as prog, every default shown."""
    return CliParser(prog=f"python -m {module}", description=description, **kwargs)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (a KeyError's own message, not its quoted repr)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = " ".join(exc.args[0].split())
    return text or type(exc).__name__


# "The input is wrong" at this layer; a caller adds its own (train.errors.user_errors has the trainer's set).
USER_ERROR_TYPES = (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def out_of_memory_figures(exc: BaseException) -> str:
    """torch's own figures from a CUDA out-of-memory error, on one line ("Tried to allocate 2.25 GiB; GPU 0 has a
    total capacity of 79.19 GiB of which 1.06 GiB is free"), else its message's start."""
    import re
    text = str(exc)
    found = [m.group(0) for m in (re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", text),
                                  re.search(r"GPU \d+ has a total capacity of [\d.]+ [KMGT]?i?B of which [\d.]+ "
                                            r"[KMGT]?i?B is free", text)) if m]
    return "; ".join(found) or one_line(exc)[:200]


def user_errors(debug: bool = False, prefix: str = "error", extra: tuple = (),
                out_of_memory: typing.Union[str, typing.Callable[[], str], None] = None) -> typing.ContextManager[None]:
    """A context manager with train.errors.user_errors' semantics for the layers below train: a user mistake
    (USER_ERROR_TYPES + extra) becomes `error: <one line>` on stderr and exit status 2; anything else keeps its
    traceback; debug=True or VAVAE_DEBUG=1 keeps the traceback for user mistakes too. `out_of_memory`: what to
    lower when the GPU's memory runs out (a setting too large for the card, e.g. "lower --batch-size"), or a
    function giving it when the error comes (advice that depends on what the run wrote by then); then that error
    is a user mistake too, and its line carries torch's figures."""
    import contextlib
    import os
    import sys

    import torch

    from .safe_load import CheckpointLoadError  # a weights file that is unsafe, corrupt or does not fit
    oom = (torch.OutOfMemoryError,) if out_of_memory else ()

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except (*USER_ERROR_TYPES, CheckpointLoadError, *extra, *oom) as e:
            if debug or os.environ.get("VAVAE_DEBUG") == "1":
                raise
            advice = out_of_memory() if callable(out_of_memory) else out_of_memory
            line = (f"out of GPU memory ({out_of_memory_figures(e)}): {advice}"
                    if oom and isinstance(e, oom) else one_line(e))
            print(f"{prefix}: {line}", file=sys.stderr)
            raise SystemExit(2) from None
    return guard()


CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its source comment} for a dataclass, read from the class source with ast + tokenize.

    The comment of a field is the trailing comment on its statement's lines (continued by comment-only
    lines aligned with it below), or else the comment-only lines directly above it. Inherited fields keep
    their base class's comment."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined in a REPL / exec: no source, no comments
            continue
        comments = {}  # line -> (column where the text starts, text)
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                body = tok.string[1:]
                comments[tok.start[0]] = (tok.start[1] + 1 + len(body) - len(body.lstrip()), body.strip())
        lines = src.splitlines()
        body = ast.parse(src).body[0].body
        used = set()  # comment lines already given to a field
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            text = [c[1] for c in own]
            if own:  # comment-only continuation lines, their text aligned with the trailing comment's
                n, col = node.end_lineno + 1, own[-1][0]
                while n in comments and comments[n][0] == col and lines[n - 1].lstrip().startswith("#"):
                    text.append(comments[n][1])
                    used.add(n)
                    n += 1
            else:  # comment lines directly above
                n = node.lineno - 1
                while n in comments and n not in used and lines[n - 1].lstrip().startswith("#"):
                    text.insert(0, comments[n][1])
                    n -= 1
            docs[node.target.id] = " ".join(t for t in text if t)
    return docs


def _type_text(tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return "section"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is typing.Literal:
        return "|".join(_value_text(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return "[" + ", ".join(_type_text(a) for a in args) + "]"
        return f"[{_type_text(args[0]) if args else 'any'}, ...]"
    if tp is dict or origin is dict:
        return "mapping"
    if tp is typing.Any:
        return "any"
    return _type_name(tp)


def _value_text(v):
    if isinstance(v, str):
        return v if v and v.strip() == v and yaml.safe_load(v) == v else repr(v)
    if isinstance(v, (list, tuple, dict)) or v is None or isinstance(v, bool):
        return yaml.safe_dump(_plain(v), default_flow_style=True).strip().removesuffix("...").strip()
    return str(v)


def schema_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """[(dotted key, type text, default text, comment)] for every leaf key of a schema, in field order."""
    hints, docs, rows = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += schema_keys(tp, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = _value_text(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _value_text(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, _type_text(tp), default, docs.get(f.name, "")))
    return rows


def _keys_fit(cls, data):
    """True when every key of the nested mapping `data` names a field of schema `cls` (values unchecked)."""
    if not isinstance(data, dict):
        return False
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k, v in data.items():
        if k not in names:
            return False
        if dataclasses.is_dataclass(hints[k]) and not _keys_fit(hints[k], v):
            return False
    return True


def shipped_configs(cls: type, configs_dir: str | Path | None = None) -> list[tuple[Path, str]]:
    """[(path, first comment line)] of the YAML files in configs/ whose keys all belong to schema `cls`."""
    out = []
    for path in sorted(Path(configs_dir or CONFIGS_DIR).glob("*.y*ml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if hasattr(cls, "upgrade") and isinstance(data, dict):  # older key names, renamed on read
            try:
                data = cls.upgrade(data)
            except Exception:  # noqa: BLE001 (a file the schema cannot read is simply not listed)
                continue
        if data and _keys_fit(cls, data):
            out.append((path, _first_sentence(path.read_text())))
    return out


def _first_sentence(text, limit=150):
    """The first sentence of a YAML file's leading comment block."""
    block = []
    for ln in text.splitlines():
        if not ln.startswith("#"):
            break
        block.append(ln.lstrip("#").strip())
    words = " ".join(b for b in block if b)
    end = words.find(". ")
    first = words if end < 0 else words[:end + 1]
    if len(first) > limit and ": " in first:
        first = first[:first.index(": ")]
    return first if len(first) <= limit else first[:limit - 3].rstrip() + "..."


def schema_help(cls: type, configs_dir: str | Path | None = None, width: int = 120) -> str:
    """The --help epilog of a trainer: every config key (type, default, comment) and the shipped configs."""
    rows = schema_keys(cls)
    kw = max(len(r[0]) for r in rows)
    tw = min(max(len(r[1]) for r in rows), 28)
    lines = ["config keys (in a --config YAML file, or KEY=VALUE / --set KEY=VALUE on the command line):",
             f"  {'key':<{kw}}  {'type':<{tw}}  default",
             ]
    section = None
    for key, tp, default, doc in rows:
        sec = key.rsplit(".", 1)[0] if "." in key else ""
        if sec != section:
            section = sec
            lines.append("")
        head = f"  {key:<{kw}}  {tp:<{tw}}  {default}"
        if not doc:
            lines.append(head)
        elif len(head) + 4 + len(doc) <= width and len(tp) <= tw:
            lines.append(f"{head}  # {doc}")
        else:
            lines += [head, f"  {'':<{kw}}  # {doc}"]
    configs = shipped_configs(cls, configs_dir)
    if configs:
        lines += ["", "configs shipped in configs/ (--config FILE):"]
        pw = max(len(_display_path(p)) for p, _ in configs)
        lines += [f"  {_display_path(p):<{pw}}  {first}".rstrip() for p, first in configs]
    return "\n".join(lines)


def _display_path(path):
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _caller_schema(globs):
    """The top-level schema of the calling module: its one dataclass whose every field is a section."""
    def is_root(v):
        if not (isinstance(v, type) and dataclasses.is_dataclass(v)):
            return False
        hints = typing.get_type_hints(v)
        fields = dataclasses.fields(v)
        return bool(fields) and all(dataclasses.is_dataclass(hints[f.name]) for f in fields)
    found = {v for v in globs.values() if is_root(v)}
    return found.pop() if len(found) == 1 else None


def add_config_args(parser: argparse.ArgumentParser, schema: type | None = None,
                    configs_dir: str | Path | None = None) -> argparse.ArgumentParser:
    """--config FILE, --set k=v (repeatable), and bare k=v arguments; and a --help that documents them.

    `schema` (the trainer's top-level dataclass; default: the one top-level schema of the calling
    module) puts every key with its type, default and source comment, and the YAML files of configs/
    that fit it, into the help. A parser built with the default prog gets `python -m <calling module>`
    as its name, and every option shows its default."""
    import os
    import sys

    caller = sys._getframe(1).f_globals
    schema = schema or _caller_schema(caller)
    spec = caller.get("__spec__")
    if spec is not None and parser.prog == os.path.basename(sys.argv[0]):
        parser.prog = f"python -m {spec.name}"
    parser.formatter_class = HelpFormatter
    if schema is not None and not parser.epilog:
        parser.epilog = schema_help(schema, configs_dir)
    parser.add_argument("--config", help="YAML config file (see the list below)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("extra", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides")
    return parser


def config_from_args(cls: type, args: argparse.Namespace) -> typing.Any:
    return load_config(cls, args.config, list(args.overrides) + list(args.extra))


# ----------------------------------------------------------------------------- outputs at the command line

def check_output_path(path: str | Path, flag: str, written: typing.Sequence[str] = ()) -> Path:
    """Refuse, before any work, an output the command could not write at the end: a name or a path longer than
    the file system allows, an existing folder, a parent that is a file or not writable (tried, so it holds for
    root and read-only mounts too). `written`: the other names the command writes beside it (e.g. OUT.tmp.npz).
    Raises ConfigError naming `flag`; returns the path. Creates nothing that stays."""
    import os
    import tempfile

    def exists(q):
        try:
            return q.exists()
        except OSError:  # e.g. a component too long: it cannot exist
            return False

    p = Path(path)
    absolute = p.absolute()
    anchor = absolute.parent
    while not exists(anchor) and anchor != anchor.parent:  # the folders still to be made: the first that exists
        anchor = anchor.parent
    try:
        name_max, path_max = os.pathconf(anchor, "PC_NAME_MAX"), os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    for name in (*absolute.relative_to(anchor).parts, *written):
        if len(os.fsencode(name)) > name_max:
            raise ConfigError(f"{flag} {str(path)[:80]}...: the name {name[:40]}... is {len(os.fsencode(name))} "
                              f"bytes, longer than this file system's {name_max}")
    longest = len(os.fsencode(str(absolute.parent))) + 1 + max(len(os.fsencode(n)) for n in (p.name, *written))
    if longest >= path_max:
        raise ConfigError(f"{flag} {str(path)[:80]}...: the path is {longest} bytes, longer than this file "
                          f"system's {path_max}")
    if p.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder (give a file name)")
    if not anchor.is_dir():
        raise ConfigError(f"{flag} {path}: {anchor} is not a folder")
    try:  # the one reliable test of writability (permissions, read-only mounts, root)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {anchor} ({e.strerror or e})") from None
    return p


def exit_status(result: object) -> int:
    """A command's exit status from what its main returned: an int is the status; a report dict or None is 0."""
    return result if isinstance(result, int) else 0


def console_entry(module: str) -> typing.Callable[[], int]:
    """The setup.py console script of `python -m MODULE`: runs MODULE.main(sys.argv[1:]) and returns its exit
    status. The module is looked up at call time (so the script and `python -m` run the same main)."""
    def cli() -> int:
        import importlib
        import sys
        return exit_status(importlib.import_module(module).main(sys.argv[1:]))
    cli.__doc__ = f"python -m {module.removesuffix('.__main__')}"
    return cli
