"""Name-to-class registry: configs pick components by ``(kind, name)``.

Usage::

    from fedrec.utilities import registry

    @registry.load("model", "dlrm")
    class DLRM_Net(nn.Module): ...

    model = registry.construct("model", {"name": "dlrm", "arch_feature_emb_size": 16})

Registering a name twice is an error, an unknown name lists the known names of that kind,
and a config key the constructor does not take is an error naming the key: a typo in a
YAML file must never be silently ignored.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import typing
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, Mapping, TypeVar

import pydantic

T = TypeVar("T")

_REGISTRY: Dict[str, Dict[str, Any]] = defaultdict(dict)

# Modules whose import registers the built-in components. Imported lazily on the first
# lookup so that `import fedrec.utilities.registry` stays cheap and cycle-free.
_BUILTIN_MODULES = (
    "fedrec.modules",
    "fedrec.optimization",
    "fedrec.trainers",
    "fedrec.federated",
    "fedrec.data",
    "fedrec.preprocessor",
)
_builtins_loaded = False


class RegistryError(KeyError):
    """An unknown or duplicate registry name, or a config key a component does not take."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type; the message names the key and the expected type."""


def load(kind: str, name: str) -> Callable[[T], T]:
    """Decorator recording ``obj`` under ``(kind, name)``; a duplicate name is an error."""

    def decorator(obj: T) -> T:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not obj:
            if _same_definition(existing, obj):
                # The same class re-executed (e.g. a module imported as a script and as a
                # module): keep the latest definition rather than refusing it.
                _REGISTRY[kind][name] = obj
                return obj
            raise RegistryError(
                f"{kind} {name!r} is already registered by "
                f"{_describe(existing)}; pick another name for {_describe(obj)}"
            )
        _REGISTRY[kind][name] = obj
        return obj

    return decorator


register = load  # a clearer alias for new code


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _same_definition(a: Any, b: Any) -> bool:
    return getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None) and (
        _source_file(a) == _source_file(b)
    )


def _source_file(obj: Any) -> str | None:
    try:
        return inspect.getsourcefile(obj)
    except TypeError:
        return None


def ensure_builtins() -> None:
    """Import the modules that register fedrec's own components (idempotent)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def known(kind: str) -> list[str]:
    """The registered names of ``kind``, sorted."""
    ensure_builtins()
    return sorted(_REGISTRY.get(kind, {}))


def kinds() -> list[str]:
    ensure_builtins()
    return sorted(k for k, v in _REGISTRY.items() if v)


def lookup(kind: str, name: Any) -> Any:
    """The object registered as ``(kind, name)``; ``name`` may be a config dict with 'name'."""
    ensure_builtins()
    if isinstance(name, Mapping):
        if "name" not in name:
            raise RegistryError(f"{kind} config needs a 'name' key; known {kind} names: {known(kind)}")
        name = name["name"]
    table = _REGISTRY.get(kind)
    if not table:
        raise RegistryError(f"unknown registry kind {kind!r}; known kinds: {kinds()}")
    try:
        return table[name]
    except KeyError:
        raise RegistryError(
            f"unknown {kind} {name!r}; known {kind} names: {', '.join(sorted(table))}"
        ) from None


def accepted_keys(obj: Any) -> tuple[set[str], bool]:
    """The keyword names ``obj`` takes, and whether it takes ``**kwargs`` too."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    names.discard("self")
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    return names, has_var_kw


def instantiate(obj: Any, config: Mapping[str, Any], *, kind: str = "component",
                unused_keys: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Call ``obj(**config, **kwargs)``, refusing config keys it does not accept."""
    values = {k: v for k, v in config.items() if k != "name" and k not in unused_keys}
    label = f"{kind} {config.get('name')!r}" if "name" in config else kind
    if inspect.isclass(obj) and issubclass(obj, pydantic.BaseModel):
        return validate_model(obj, {**values, **kwargs}, label)
    return obj(**_checked_values(obj, values, label, code_keys=kwargs), **kwargs)


def _checked_values(obj: Any, values: Mapping[str, Any], label: str,
                    code_keys: Iterable[str] = ()) -> Dict[str, Any]:
    """Config ``values`` for ``obj``: unknown keys refused, types checked against its hints.

    ``code_keys`` (arguments passed from code, not YAML) win over config keys of the
    same name and are neither refused nor type-checked.
    """
    code_keys = set(code_keys)
    values = {k: v for k, v in values.items() if k not in code_keys}
    names, has_var_kw = accepted_keys(obj)
    unknown = sorted(set(values) - names)
    if unknown and not has_var_kw:
        raise RegistryError(f"{label} does not take config key(s) {unknown}; it takes: {sorted(names)}")
    return {**values, **_validate_types(obj, values, label)}


def check_class_config(cls: type, values: Mapping[str, Any], label: str,
                       reserved: Iterable[str] = ()) -> Dict[str, Any]:
    """Config ``values`` for a class whose ``__init__``s pass ``**kwargs`` up the MRO
    (FL algorithms): the keys any of them names are accepted, others refused with the
    known keys, and each value is checked against the hint of the class that names it.
    ``reserved`` keys (set from code, not YAML) are refused too."""
    names: Dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            hints = typing.get_type_hints(init, include_extras=True)
        except Exception:
            hints = {}
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.setdefault(p.name, hints.get(p.name, Any))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    reserved = set(reserved)
    allowed = sorted(set(names) - reserved)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise RegistryError(f"{label} does not take config key(s) {unknown}; it takes: {allowed}")
    return {key: _checked_value(names[key], key, value, label) for key, value in values.items()}


def _checked_value(hint: Any, key: str, value: Any, label: str) -> Any:
    """``value`` validated (and coerced, lax mode) against ``hint``; ``ConfigTypeError``
    naming the key and the expected type when it does not fit."""
    if hint is None or hint is Any:
        return value
    try:
        return _adapter(hint).validate_python(value)
    except pydantic.ValidationError as err:
        detail = err.errors()[0].get("msg", str(err))
        raise ConfigTypeError(
            f"{label}: config key {key!r} expects {_type_name(hint)}, got {value!r} ({detail})") from None
    except pydantic.PydanticSchemaGenerationError:
        return value


def validate_model(model: type, values: Mapping[str, Any], label: str) -> Any:
    """Build a pydantic config class, turning its errors into one message per bad key."""
    try:
        return model.model_validate(dict(values))
    except pydantic.ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e.get("loc", ())) or "(config)"
            if e.get("type") == "extra_forbidden":
                problems.append(f"unknown key {key!r}; known keys: "
                                f"{sorted(f.alias or n for n, f in model.model_fields.items())}")
            else:
                problems.append(f"key {key!r}: {e.get('msg')} (got {e.get('input')!r})")
        raise ConfigTypeError(f"{label}: " + "; ".join(problems)) from None


def _validate_types(obj: Any, values: Mapping[str, Any], label: str) -> Dict[str, Any]:
    """Check config values against the constructor's type hints (pydantic, lax mode).

    Only values that came from the config are checked; objects passed from code are
    trusted. A mismatch raises ``ConfigTypeError`` naming the key and the expected type.
    """
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations: nothing to check against
        return {}
    return {key: _checked_value(hints[key], key, value, label)
            for key, value in values.items() if hints.get(key) not in (None, Any)}


@functools.lru_cache(maxsize=None)
def _adapter(hint: Any) -> "pydantic.TypeAdapter[Any]":
    return pydantic.TypeAdapter(hint)


def _type_name(hint: Any) -> str:
    """A readable type: ``Optional[float]``, ``list[int]``; Annotated constraints are left
    to pydantic's message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        inner = " | ".join(_type_name(a) for a in rest)
        return f"Optional[{inner}]" if len(rest) < len(args) else inner
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def prepare(kind: str, config: Any, unused_keys: tuple[str, ...] = ()) -> Callable[..., Any]:
    """Validate ``config`` once and return a factory taking the code-side kwargs.

    For hot paths that build the same component many times (an optimizer per simulated
    client): ``make = prepare("optimizer", cfg)`` then ``make(model=m)``.
    """
    if isinstance(config, str):
        config = {"name": config}
    obj = lookup(kind, config)
    values = {k: v for k, v in config.items() if k != "name" and k not in unused_keys}
    return functools.partial(obj, **_checked_values(obj, values, f"{kind} {config.get('name')!r}"))


def construct(kind: str, config: Any, unused_keys: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Build the component named by ``config['name']`` with the rest of ``config`` as kwargs.

    ``config`` may also be a bare name. ``kwargs`` are passed too (and win over config
    keys), for arguments that come from code rather than from YAML, such as ``params``.
    """
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, Mapping):
        raise RegistryError(f"{kind} config must be a mapping with a 'name' key, got {config!r}")
    return instantiate(lookup(kind, config), config, kind=kind, unused_keys=unused_keys, **kwargs)
