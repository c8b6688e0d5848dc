"""From sections to a verb's configuration class, and from a YAML file and flags to its values.

``compose`` builds a verb's dataclass from its sections. ``Catalog`` knows every verb's options and
resolves a name to them:

* on the command line a name is the verb's option of that exact path (``lr``, ``data.max_seq_len``),
  else every option of the verb whose last part it is (``--max_seq_len`` is ``data.max_seq_len``);
* in a YAML file a key is the option of that exact path in any verb (a run's ``output_dir`` is
  training's), a section key holds a mapping, and a bare name reaches the options it ends.
  Options of verbs other than this one are skipped: one file can serve several verbs.

A name that no verb takes is an error naming the closest ones; on the command line, a name that
only other verbs take is an error naming them.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cotune.options.cookbook import cookbook_only, cookbook_value, translate
from cotune.options.fields import ConfigError, Section

# Other spellings of an option (old flags of the use commands, and --data FILE for the held-out file).
ALIASES = {
    "output": "output_dir",
    "beam": "beam_size",
    "n": "beam_size",
    "model": "model_name",
    "dtype": "torch_dtype",
    "data": "data.test_file",  # only with a value that is not a mapping: a mapping is the data section
}
BOOL_WORDS = ("true", "false", "1", "0", "yes", "no", "on", "off")


def parse_flags(argv: list[str]) -> tuple[list[str], list[tuple[str, Any]]]:
    """Splits ``argv`` into positional arguments and (key, value) pairs.

    Accepts ``--key value``, ``--key=value`` and bare ``--flag`` (meaning True), as llama-cookbook's
    fire-based command line does.
    """
    positional, pairs, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, value = body, argv[i + 1]
                i += 1
            else:
                key, value = body, True
            pairs.append((key, value))
        else:
            positional.append(arg)
        i += 1
    return positional, pairs


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Turns a flag string (or YAML scalar) into the field's type."""
    if typ is Any:
        if isinstance(value, str) and value.startswith("["):
            value = yaml.safe_load(value)
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("true", "1", "yes", "on"):
            return True
        if s in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"option '{key}' expects True or False, got '{value}'")
    if typ is dict or typ is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if typ is dict else [value]
        if not isinstance(value, typ):
            raise ConfigError(
                f"option '{key}' expects a {'mapping' if typ is dict else 'list'}, got '{value}'"
            )
        return [str(v) for v in value] if typ is list else value
    try:
        if typ is int and isinstance(value, str | float):
            number = float(value)  # accepts "1e3"; rejects 2.5 below
            if number != int(number):
                raise ValueError
            return int(number)
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option '{key}' expects {typ.__name__}, got '{value}'") from None


# ----------------------------------------------------------------------------- composing a verb


def _copy(f: dataclasses.Field) -> dataclasses.Field:
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def compose(name: str, sections: Sequence[Section], namespace: dict, key: str = "") -> type:
    """The dataclass of a verb: the fields of its sections at ``key``, and a nested dataclass for each
    key below it. A key held by one section alone (``lora_config``) is that section's own class.

    Composed classes are put in ``namespace`` (a module's globals) under ``name`` so they pickle.
    """
    here = [s for s in sections if s.key == key]
    below = [s.key for s in sections if s.key.startswith(f"{key}." if key else "") and s.key != key]
    children = list(dict.fromkeys(k[len(key) + 1 if key else 0 :].split(".")[0] for k in below))
    if len(here) == 1 and not children:
        return here[0].cls
    fields, seen = [], set()
    for section in here:
        hints = typing.get_type_hints(section.cls)
        for f in dataclasses.fields(section.cls):
            if f.name in seen:
                raise TypeError(f"option '{f.name}' is in two sections at '{key}' of {name}")
            seen.add(f.name)
            fields.append((f.name, hints[f.name], _copy(f)))
    for child in children:
        cls = compose(name + child.title().replace("_", ""), sections, namespace, f"{key}.{child}".strip("."))
        fields.append((child, cls, dataclasses.field(default_factory=cls)))
    cls = dataclasses.make_dataclass(name, fields)
    cls.__module__ = namespace["__name__"]
    namespace[name] = cls
    return cls


# ----------------------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class Option:
    """One option as a verb sees it."""

    path: str
    section: Section
    field: dataclasses.Field
    type: Any

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")


def section_options(section: Section) -> list[Option]:
    hints = typing.get_type_hints(section.cls)
    prefix = f"{section.key}." if section.key else ""
    return [Option(prefix + f.name, section, f, hints[f.name]) for f in dataclasses.fields(section.cls)]


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


class Catalog:
    """Every verb's options (``verbs``: verb -> its sections), and name resolution."""

    def __init__(self, verbs: dict[str, Sequence[Section]]) -> None:
        self.sections = dict(verbs)
        self.options = {v: {o.path: o for s in ss for o in section_options(s)} for v, ss in verbs.items()}
        self.keys = {v: {k for s in ss for k in _key_prefixes(s.key)} for v, ss in verbs.items()}
        self.all_paths = {p for own in self.options.values() for p in own}
        self.all_keys = {k for keys in self.keys.values() for k in keys}

    def taken_by(self, name: str) -> list[str]:
        """The verbs that take the option ``name`` (a path, or the last part of one)."""
        return [v for v, own in self.options.items() if name in own or any(_leaf(p) == name for p in own)]

    def resolve_flag(self, verb: str, key: str, value: Any) -> list[tuple[str, Any]]:
        """The (option path, value) pairs that ``--key value`` sets for ``verb``.

        Raises:
            ConfigError: a section named without a field, an option only other verbs take, or an
                unknown option (with the closest ones).
        """
        own = self.options[verb]
        key = translate(key.replace("-", "_"))  # the cookbook's --use-wandb, --train_config.lr
        if key in self.keys[verb] and isinstance(value, dict):
            return [pair for k, v in value.items() for pair in self.resolve_flag(verb, f"{key}.{k}", v)]
        name = ALIASES.get(key, key)
        # as in the cookbook, a name without a section reaches every section that has that field
        leaves = [p for p in own if "." in p and _leaf(p) == name] if "." not in name else []
        if name in own or leaves:
            return [(p, cookbook_value(p, value)) for p in ([name] if name in own else []) + leaves]
        if name in self.keys[verb]:
            raise ConfigError(f"option '{name}' is a section; set its fields as {name}.FIELD")
        accepted = cookbook_only(key, value)
        if accepted is not None:
            return accepted
        if value is True and key.startswith("no") and len(key) > 2:  # the cookbook's (fire's) --noflag
            try:
                pairs = self.resolve_flag(verb, key[2:], True)
            except ConfigError:
                pairs = None
            if pairs is not None and all(own[p].type is bool for p, _ in pairs):
                return [(p, False) for p, _ in pairs]
            if pairs == []:
                return self.resolve_flag(verb, key[2:], False)
        takers = self.taken_by(name)
        if takers:
            hint = self.close(verb, key)
            raise ConfigError(f"cotune {verb} does not take --{key} (taken by: {', '.join(takers)}).{hint}")
        raise self.unknown(verb, key)

    def resolve_yaml(self, verb: str, key: str, value: Any, prefix: str = "") -> list[tuple[str, Any]]:
        """The (option path, value) pairs that a YAML entry sets for ``verb`` (none for other verbs' options)."""
        name = prefix + str(key).replace("-", "_")
        if name in self.all_keys and isinstance(value, dict):
            return [pair for k, v in value.items() for pair in self.resolve_yaml(verb, k, v, f"{name}.")]
        name = name if prefix else ALIASES.get(name, name)
        own = self.options[verb]
        if name in self.all_paths:
            return [(name, value)] if name in own else []
        leaves = [p for p in self.all_paths if _leaf(p) == name] if "." not in name else []
        if leaves:
            return [(p, value) for p in leaves if p in own]
        if name in self.all_keys:
            raise ConfigError(f"option '{name}' is a section; give it a mapping of its fields")
        raise self.unknown(verb, name, self.all_paths)  # a file may hold any verb's options

    def close(self, verb: str, key: str, paths: Any = None) -> str:
        """' Did you mean --a, --b?' naming the options closest to ``key`` (``verb``'s, or ``paths``), or ''."""
        paths = sorted(paths) if paths is not None else list(self.options[verb])
        names = list(dict.fromkeys(paths + [_leaf(p) for p in paths]))
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
        return f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""

    def unknown(self, verb: str, key: str, paths: Any = None) -> ConfigError:
        hint = self.close(verb, key, paths)
        return ConfigError(f"unknown option '{key}'.{hint} ('cotune {verb} --help' lists every option.)")

    def short_name(self, verb: str, path: str) -> str:
        """``--leaf`` when it reaches ``path`` alone on ``verb``'s command line, else ''."""
        if "." not in path:
            return ""
        try:
            return f"--{_leaf(path)}" if self.resolve_flag(verb, _leaf(path), "") == [(path, "")] else ""
        except ConfigError:
            return ""


def _key_prefixes(key: str) -> list[str]:
    parts = key.split(".") if key else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


# ----------------------------------------------------------------------------- values


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML configuration file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    return data


def section_object(cfg: Any, key: str) -> Any:
    """The object holding the options of the section at ``key`` (``cfg`` itself for the top level)."""
    for part in key.split(".") if key else []:
        cfg = getattr(cfg, part)
    return cfg


def set_value(cfg: Any, option: Option, value: Any, append: bool = False) -> Any:
    """Sets ``option`` on ``cfg`` (coerced to its type); ``append`` adds to a repeatable list. Returns the value."""
    obj = section_object(cfg, option.section.key)
    value = coerce(value, option.type, option.path)
    if append:
        value = getattr(obj, option.field.name) + value
    setattr(obj, option.field.name, value)
    return value


def check_values(cfg: Any, sections: Sequence[Section]) -> None:
    """The checks of the field metadata (choices, positive) and of each section, in order."""
    for section in sections:
        obj = section_object(cfg, section.key)
        prefix = f"{section.key}." if section.key else ""
        for f in dataclasses.fields(section.cls):
            value, meta = getattr(obj, f.name), f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                allowed = ", ".join(meta["choices"])
                raise ConfigError(f"option '{prefix}{f.name}' must be one of {allowed}; got '{value}'")
            if meta.get("positive") and value <= 0:
                raise ConfigError(f"option '{prefix}{f.name}' must be positive; got {value}")
        if section.check:
            section.check(obj, prefix)
