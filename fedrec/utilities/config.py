"""Experiment configs: a YAML file (``safe_load`` only) plus command-line overrides.

A config is a plain nested dict with the sections ``model``, ``train`` and, for FL
runs, ``fl`` (see ``configs/dlrm.yml``); any other top-level section, and a key given
twice in one mapping, is an error (YAML itself would keep the last value silently).
Overrides come in two forms:

* the seed's flat flags (``--batch_size 256``), each mapped to one dotted path by
  :data:`FLAG_PATHS`;
* a generic ``--set train.config.batch_size=256`` (the value is parsed as YAML, so
  ``256`` is an int, ``[1, 2]`` a list and ``true`` a bool).

Errors name the file, the key and what was expected.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, MutableMapping

import yaml

TOP_LEVEL_SECTIONS = ("model", "train", "fl")

# Flat CLI flags of the seed (configs/flags.md of the original project) and where they
# land in the config tree.
FLAG_PATHS: Dict[str, str] = {
    # standard training (train.config.*)
    **{
        flag: f"train.config.{flag}"
        for flag in (
            "eval_every_n", "report_every_n", "save_every_n", "keep_every_n", "batch_size",
            "eval_batch_size", "eval_on_train", "no_eval_on_val", "data_seed", "init_seed",
            "model_seed", "num_batches", "num_epochs", "num_workers", "num_eval_batches",
            "log_gradients", "devices", "pin_memory",
        )
    },
    # data
    "datafile": "model.preproc.datafile",
    "output_file": "model.preproc.output_file",
    "max_ind_range": "model.preproc.max_ind_range",
    # federated simulation (fl.*)
    **{
        flag: f"fl.{flag}"
        for flag in (
            "num_rounds", "client_num_per_round", "local_epochs",
            "local_steps", "local_batch_size", "local_lr", "eval_every_n_rounds", "backend",
            "embedding_updates", "embedding_aggregation", "seed",
        )
    },
}
# `--num_workers` means simulated FL workers for `simulate`, data-loader workers for `train`.
FL_FLAG_PATHS = {**FLAG_PATHS, "num_workers": "fl.num_workers"}


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and what to fix."""


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only, no code execution) that refuses a key given
    twice in one mapping, e.g. two ``fl:`` sections. Merge keys (``<<: *base``) may still
    be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not key_node.start_mark:
                    raise _DuplicateKeyError(None, None, f"duplicate key {key!r} (first given on "
                                             f"line {first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: where and what (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or ["?"])[0]
    context = getattr(err, "context", None)
    return f"{where}: " + (f"{problem} ({context})" if context else problem)


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """Read a YAML mapping with :class:`StrictSafeLoader`; errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the path of a YAML file "
                          "(e.g. configs/dlrm_fl.yml)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                          f"offset {err.start}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=StrictSafeLoader)
    except _DuplicateKeyError as err:
        raise ConfigError(f"{path}{_yaml_problem(err)}: each key may appear once per section") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}{_yaml_problem(err).replace(': ', ': not valid YAML: ', 1)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_LEVEL_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level section(s) {unknown}; expected some of {list(TOP_LEVEL_SECTIONS)}"
        )
    return data


def parse_value(text: str) -> Any:
    """Parse a CLI value the way YAML would (``256`` -> int, ``true`` -> bool)."""
    try:
        return yaml.load(text, Loader=StrictSafeLoader)
    except _DuplicateKeyError as err:
        raise ConfigError(f"--set value {text!r}{_yaml_problem(err)}") from None
    except yaml.YAMLError:
        return text


def set_path(config: MutableMapping[str, Any], dotted: str, value: Any) -> None:
    """Set ``config[a][b][c] = value`` for ``dotted == 'a.b.c'``, creating mappings."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"bad config path {dotted!r}: expected keys separated by dots")
    node: MutableMapping[str, Any] = config
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, MutableMapping):
            where = ".".join(keys[: i + 1])
            raise ConfigError(f"cannot set {dotted!r}: {where!r} is a {type(child).__name__}, not a section")
        node = child
    node[keys[-1]] = value


def get_path(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def apply_overrides(config: Dict[str, Any], sets: Iterable[str] = (),
                    flags: Mapping[str, Any] | None = None,
                    flag_paths: Mapping[str, str] = FLAG_PATHS) -> Dict[str, Any]:
    """A copy of ``config`` with flat ``flags`` and ``--set key=value`` strings applied.

    Flags whose value is ``None`` (not given on the command line) are ignored.
    """
    out = copy.deepcopy(config)
    for flag, value in (flags or {}).items():
        if value is None:
            continue
        if flag not in flag_paths:
            raise ConfigError(f"unknown flag --{flag}; known flags: {sorted(flag_paths)}")
        set_path(out, flag_paths[flag], value)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.config.batch_size=256), got {item!r}")
        key, _, raw = item.partition("=")
        set_path(out, key.strip(), parse_value(raw.strip()))
    return out


def load_config(path: str | Path, sets: Iterable[str] = (), flags: Mapping[str, Any] | None = None,
                flag_paths: Mapping[str, str] = FLAG_PATHS) -> Dict[str, Any]:
    """Load ``path`` and apply overrides; the result records its source file."""
    config = apply_overrides(load_yaml(path), sets, flags, flag_paths)
    unknown = sorted(set(config) - set(TOP_LEVEL_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown top-level section(s) {unknown}; expected some of {list(TOP_LEVEL_SECTIONS)}")
    for name, section in config.items():
        if section is not None and not isinstance(section, Mapping):
            raise ConfigError(f"'{name}' must be a section (a mapping of keys such as "
                              f"{name}.<key>: value), got {section!r}; set one key with "
                              f"--set {name}.<key>=<value>")
    return config
