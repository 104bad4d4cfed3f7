"""The generic typed loader: a dataclass tree built from a mapping, YAML files, dotted overrides, and the table of
keys that moved.

Nothing here knows the run config's sections (they are in the sibling modules); `build_dataclass` works on any
dataclass whose fields are typed with what `coerce` knows: bool, int, float, str, Literal, Optional, list, tuple,
dict and nested dataclasses. An unknown key is a `ConfigError` that names it and suggests the nearest valid key; a
value of the wrong type is a `ConfigError` that says what was expected. A dataclass that validates itself in
`__post_init__` (the math configs: `GateConfig`, `RoutingConfig`) has its `ValueError` reported under the key of
the section, e.g. `opd.cr_opd.form: expected one of [...]`.

`MOVED_KEYS` is the one table of keys that have a new place: a config file, a mapping or an override that uses an
old key is refused with a message that names the new key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what was expected."""


# Keys that moved when `teacher` got one sub-section per teacher kind and `opd` one sub-section per part of the
# objective (route A, the policy-gradient update, credit, CR-OPD, gates, regularisers, mixtures). A key is the
# dotted path from the top; `[]` stands for any item of a list. A moved section moves everything under it
# (`opd.routing.form` -> `opd.cr_opd.form`).
MOVED_KEYS: dict[str, str] = {
    **{f"opd.{key}": f"opd.route_a.{key}"
       for key in ("divergence", "jsd_beta", "skew_alpha", "support", "support_k", "support_mode")},
    **{f"opd.{key}": f"opd.policy_gradient.{key}" for key in ("ratio", "clip_eps_low", "clip_eps_high", "dual_clip")},
    **{f"opd.{key}": f"opd.credit.{key}"
       for key in ("estimator", "gamma", "gae_lambda", "baseline", "length_normalized", "outcome_alpha",
                   "outcome_beta", "value_lr", "value_coef")},
    **{f"opd.{key}": f"opd.regularizers.{key}"
       for key in ("entropy_coef", "reference_kl_coef", "reference_kl_estimator")},
    "opd.on_policy_fraction": "opd.mixtures.on_policy_fraction",
    "opd.routing": "opd.cr_opd",
    "teacher.path": "teacher.colocated.path (teacher.kind=colocated) or teacher.inprocess.path "
                    "(teacher.kind=inprocess)",
    "teacher.model": "teacher.colocated.model",
    **{f"teacher.{key}": f"teacher.multi.{key}" for key in ("members", "routes", "default", "mixture", "weights")},
    "teacher.self_mode": "teacher.self_teacher.mode",
    "teacher.ema_decay": "teacher.self_teacher.ema_decay",
    "teacher.self_insert": "teacher.self_teacher.insert",
    "teacher.self_keep": "teacher.self_teacher.keep",
    "teacher.server.temperature": "teacher.temperature",
    "teacher.multi.members[].path": "teacher.multi.members[].colocated.path (kind colocated) or "
                                    "teacher.multi.members[].inprocess.path (kind inprocess)",
    "teacher.multi.members[].model": "teacher.multi.members[].colocated.model",
    "teacher.multi.members[].server.temperature": "teacher.multi.members[].temperature",
}

_LIST_INDEX = re.compile(r"\[\d+\]")


def moved_key(key: str, table: Mapping[str, str] = MOVED_KEYS) -> Optional[str]:
    """The new place of `key` (dotted, list items as `[i]`) if it or a section above it moved, else None."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        moved = ".".join(parts[:end])
        new = table.get(_LIST_INDEX.sub("[]", moved))
        if new is not None:
            indices = _LIST_INDEX.findall(moved)
            if indices:   # the items' own indices in place of `[]`, in order (for each alternative of `new`)
                pieces = new.split("[]")
                new = pieces[0] + "".join(indices[i % len(indices)] + piece for i, piece in enumerate(pieces[1:]))
            return new + "".join("." + part for part in parts[end:])
    return None


def reject_moved_keys(raw: Any, table: Mapping[str, str] = MOVED_KEYS) -> None:
    """A `ConfigError` naming every key of `raw` (a nested mapping, as read from YAML) that moved, and its new
    place; nothing if none did."""
    found = [f"{key} moved to {new}" for key, new in _moved_in(raw, "", table)]
    if len(found) == 1:
        raise ConfigError(f"config key {found[0]}")
    if found:
        raise ConfigError(f"{len(found)} config keys moved: " + "; ".join(found))


def _moved_in(raw: Any, prefix: str, table: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    if isinstance(raw, dict):
        for key, value in raw.items():
            path = f"{prefix}{key}"
            new = moved_key(path, table)
            if new is not None:
                yield path, new
            else:
                yield from _moved_in(value, path + ".", table)
    elif isinstance(raw, list) and prefix:
        for i, item in enumerate(raw):
            yield from _moved_in(item, f"{prefix[:-1]}[{i}].", table)


# ---------------------------------------------------------------------------------------------------------------
# Files and overrides
# ---------------------------------------------------------------------------------------------------------------

def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of sections in a YAML file (empty for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections at the top level, "
                          f"got {type(raw).__name__}")
    return raw


def parse_override(item: str, table: Mapping[str, str] = MOVED_KEYS) -> tuple[str, Any]:
    """`section.key=value` -> (key, the value read as YAML); a key that moved is refused naming its new place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected the form section.key=value, e.g. parallel.tp=2")
    new = moved_key(key, table)
    if new is not None:
        raise ConfigError(f"override {item!r}: {key} moved to {new}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc.problem}); quote it or use "
                          f"the dotted form, e.g. rollout.task_options.length=4") from exc
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """`raw[a][b][c] = value` for `key = "a.b.c"`, creating the sections on the way."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------------------------
# Typed building
# ---------------------------------------------------------------------------------------------------------------

def build_dataclass(cls: type, raw: Any, prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from the mapping `raw` (None: every default). `prefix` is the dotted
    path of `raw` in the whole config, ending in "." ("" at the top); every message names keys with it."""
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{did_you_mean(str(key), names, prefix)}; "
                              f"valid keys in {where}: {', '.join(names)}")
        kwargs[key] = coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:   # a dataclass that checks itself (the math configs): its message starts with the key
        raise ConfigError(f"{prefix}{exc}") from exc


def coerce(hint: Any, value: Any, key: str) -> Any:
    """`value` as the type `hint` of the field `key`, or a ConfigError saying what was expected. YAML reads "1e-4"
    (no dot) as a string: a float field takes it; a bare string where a list of strings is expected is a list of
    one."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return coerce(args[0], value, key)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        if origin is list and args == (str,) and isinstance(value, str):
            value = [value]
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
            return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [v if item is Any else coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint) or (str, Any)
        return {str(k): v if item is Any else coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}"
                              f"{did_you_mean(str(value), [str(c) for c in choices])}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if value is None:   # `key=` (an override reads an empty value as null) or a YAML null
            expected = "a path" if is_path_key(key) else "a string"
            raise ConfigError(f"{key}: no value (`{key}=` or null); expected {expected}")
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"config field {key} has an unsupported type {hint}")


def is_path_key(key: str) -> bool:
    """Whether the config key `key` names a file or directory, by its last name (`path`, `output_dir`,
    `tokenizer`, `teacher_cache`, ...): what an error for its value should ask for."""
    name = key.rsplit(".", 1)[-1]
    return name.endswith(("path", "_dir", "cache")) or name == "tokenizer"


def require(ok: bool, key: str, expected: str, got: Any) -> None:
    """A ConfigError `key: expected ..., got ...` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def did_you_mean(word: str, options, prefix: str = "") -> str:
    """` (did you mean 'x'?)` with the option closest to `word`, or "" when none is close."""
    by_lower = {str(option).lower(): str(option) for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.5)
    return f" (did you mean {prefix + by_lower[close[0]]!r}?)" if close else ""
