"""The one config layer: option values typed by one rule, experiment files, a run's recorded config.

Every option set (stage two's TrainCfg, stage three's FinetuneCfg and AugmentCfg, each head's
config) is a dataclass; its fields are the schema. A value reaches a field from ``--set
key=value`` (text) or from an experiment file (YAML: already a bool, int, float, text or list),
and both go through ``coerce_option``:

- bool: true/false, yes/no, on/off, 1/0 (any case), or a YAML boolean;
- int: an integer (``1_000`` too), never a bool or a float; float: any finite number within
  float32's range (``1e-3``, which PyYAML reads as text, included; inf and nan are refused);
  text: text, or a YAML number taken as its text (``5``); a YAML boolean is refused for text
  (``no`` unquoted is False in YAML: quote it);
- tuple/list of int/float/text: a comma list (``1,2,3``) or a YAML list;
- ``X | None``: also none/null/empty.

Keys go to an option set by ``split_options``: ``section.key`` names the set (``train.``,
``finetune.``, ``aug.``, ``head.``); a bare key belongs to the stage's own set when it has the
field, else to the head's. An unknown key is one line naming the closest valid key and the
valid ones.

An experiment file (``--config exp.yaml``) holds the same keys as ``--set``, plus the command's
own options (cache, head, recipe, dataset, ...), at top level or one level down under a section:

    head: {name: evl, num_layers: 4}     # or head: evl, and head options as bare keys
    cache: artifacts/caches/k400-...
    recipe: paper
    train: {epochs: 10, lr: 1.0e-3}

Precedence (the CLI applies it): defaults < recipe < experiment file < --set < flags given on the
command line. Every run folder records its resolved config as ``config.yaml`` in this format
(stages/runs.py ``experiment_record``), so ``--config RUN/config.yaml`` runs it again under the
same run id.

A leaf: this module imports no other stage module (run folders, heads and the sampler stand on it).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from cache.errors import ConfigError

__all__ = ["coerce_option", "OptionSet", "parse_set", "split_options", "load_experiment", "closest",
           "validate_choice"]

TRUE = ("true", "yes", "on", "1")
FLOAT32_MAX = 3.4028234663852886e38
FALSE = ("false", "no", "off", "0")
NONE = ("none", "null", "")


# ----------------------------------------------------------------------------- one coercion rule
def _type_text(field) -> str:
    """A field's annotation as compact text: 'int', 'float|None', 'tuple[int,...]'."""
    kind = field.type if isinstance(field, dataclasses.Field) else field
    text = kind if isinstance(kind, str) else getattr(kind, "__name__", None) if isinstance(kind, type) else str(kind)
    return re.sub(r"\s+", "", str(text)).replace("typing.", "")


def _split_optional(kind: str) -> tuple[str, bool]:
    m = re.fullmatch(r"Optional\[(.+)\]", kind)
    if m:
        return m.group(1), True
    parts = [p for p in kind.split("|")]
    if "None" in parts and len(parts) == 2:
        return next(p for p in parts if p != "None"), True
    return kind, False


def _describe(kind: str) -> str:
    return {"str": "str (text)", "bool": "bool (true/false, yes/no, on/off, 1/0)"}.get(kind, kind)


def _scalar(kind: str, key: str, value: Any) -> Any:
    bad = ConfigError(f"option '{key}' expects {_describe(kind)}, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise bad
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(number):  # inf / nan / -inf parse as floats; no option means them
            raise ConfigError(f"option '{key}' expects a finite number, got {value!r}")
        if abs(number) > FLOAT32_MAX:  # the models compute in float32 (torch's AdamW cannot take lr=1e40)
            raise ConfigError(f"option '{key}' expects a finite number within float32's range (|x| <= 3.4e38), "
                              f"got {value!r}")
        return number
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"option '{key}' expects str (text), got {value!r}"
                          + (" (YAML reads unquoted yes/no/on/off as booleans: quote the value)"
                             if isinstance(value, bool) else ""))
    return value  # a type this layer does not know: passed through, the dataclass takes it as it is


def coerce_option(field, key: str, value: Any) -> Any:
    """``value`` (text from ``--set``, or a YAML value) as the type of ``field`` (a dataclass
    Field or its annotation), by the module's one rule; a value of the wrong type is a one-line
    ConfigError naming ``key``."""
    kind, optional = _split_optional(_type_text(field))
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in NONE):
        if optional:
            return None
        raise ConfigError(f"option '{key}' expects {_describe(kind)}, got nothing")
    m = re.fullmatch(r"(tuple|list|Tuple|List)\[(\w+)(?:,\.\.\.)?\]", kind)
    if m:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"option '{key}' expects a list (a,b,c), got {value!r}")
        out = [_scalar(m.group(2), key, x.strip() if isinstance(x, str) else x) for x in items
               if not (isinstance(x, str) and not x.strip())]
        return tuple(out) if m.group(1).lower() == "tuple" else out
    return _scalar(kind, key, value)


def validate_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """A cfg string option must be one of ``choices`` (a ConfigError listing them otherwise)."""
    if value not in choices:
        raise ConfigError(f"option '{name}' must be one of {', '.join(choices)}; got '{value}'")
    return value


# ----------------------------------------------------------------------------- keys to option sets
def closest(key: str, valid: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest valid key, or ''."""
    names = sorted(set(valid))
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not match:  # 'head.depthh' -> 'depth'
        match = difflib.get_close_matches(key.rsplit(".", 1)[-1], names, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


@dataclasses.dataclass
class OptionSet:
    """One option set: its section name (the ``name.`` prefix), its dataclass, and what a user calls it."""

    name: str
    cls: type
    label: str
    bare: bool = True        # bare keys may land here (aug: only as aug.key)
    exclude: tuple = ()      # fields not set this way (e.g. paradigm: its own flag)

    def fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.cls) if f.name not in self.exclude}


def parse_set(pairs: Iterable[str]) -> dict[str, str]:
    """``--set key=value`` pairs -> {key: value} in order (a later pair wins)."""
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def split_options(values: Mapping[str, Any], sets: list[OptionSet], where: str = "--set",
                  options: Iterable[str] = ()) -> dict[str, dict]:
    """{key: value} -> {set name: {field: typed value}}: ``name.key`` goes to that set, a bare key to
    the first set (in order) that has the field. Unknown keys and wrong types are one line, prefixed
    by ``where``; ``options``: the command's own options (an experiment file's other valid keys),
    named in the message of an unknown key."""
    options = sorted(options)
    out: dict[str, dict] = {s.name: {} for s in sets}
    by_name = {s.name: s for s in sets}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if name and section in by_name:
            target = by_name[section]
            fields = target.fields()
            if name not in fields:
                raise ConfigError(f"{where}: unknown option '{key}'{closest(key, [f'{section}.{f}' for f in fields])}; "
                                  f"valid {target.label}: {', '.join(sorted(fields))}")
        else:
            target = next((s for s in sets if s.bare and key in s.fields()), None)
            if target is None:
                for s in sets:
                    if key in s.exclude:
                        raise ConfigError(f"{where}: '{key}' is set by its own option (--{key.replace('_', '-')})")
                valid = [f"{s.name}.{k}" if not s.bare else k for s in sets for k in s.fields()] + options
                parts = "; ".join(f"{s.label}: {', '.join(sorted(s.fields()))}" if s.bare else
                                  f"{s.label}: {s.name}.<{'|'.join(sorted(s.fields()))}>" for s in sets)
                parts = (f"command options: {', '.join(options)}; " if options else "") + parts
                raise ConfigError(f"{where}: unknown option '{key}'{closest(key, valid)}; {parts}")
            name = key
        try:
            out[target.name][name] = coerce_option(target.fields()[name], key, value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return out


# ----------------------------------------------------------------------------- experiment files
def load_experiment(path: str | Path) -> dict[str, Any]:
    """An experiment file as flat keys: ``{train: {lr: 1e-3}}`` -> ``{"train.lr": 1e-3}`` (one level of
    sections). Missing, unreadable, not YAML, not a mapping: one line naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} " + ("is a folder" if path.is_dir() else "does not exist")
                          + ": give an experiment YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (an experiment is a YAML file, see configs/)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options (key: value), "
                          f"not a {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"config file {path}: option names are text, got {key!r}")
        if isinstance(value, dict):
            for sub, v in value.items():
                if not isinstance(sub, str) or isinstance(v, dict):
                    raise ConfigError(f"config file {path}: section '{key}' must map option names to values "
                                      f"(one level of sections), got {sub!r}: {v!r}")
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat
