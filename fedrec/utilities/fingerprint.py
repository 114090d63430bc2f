"""Resume fingerprints: the settings a checkpoint was written with, saved inside it.

Every checkpoint carries a ``fingerprint`` (a flat ``{dotted key: value}`` dict of plain
values). ``--resume`` compares it with the fingerprint of the current config and refuses
to continue when they differ, naming each differing key (old -> new): a resumed run that
silently changed its data, split or learning rate would leave nothing that describes its
earlier steps. Standard training fingerprints its data position (``BaseTrainer``);
federated simulation its whole resolved config, less an allow-list
(``fedrec/federated/resume.py``).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping

__all__ = ["UNSET", "flatten", "fingerprint_diffs"]

UNSET = "<unset>"


def flatten(tree: Mapping[str, Any], prefix: str = "", skip: Iterable[str] = ()) -> Dict[str, Any]:
    """``{"fl": {"partitioner": {"alpha": 0.5}}}`` -> ``{"fl.partitioner.alpha": 0.5}``.

    Lists stay whole (one value); mappings become dotted keys; keys in ``skip`` (dotted,
    a section skips everything under it) are left out. Values are made plain
    (tuples -> lists, other objects -> str) so the result is checkpoint-safe.
    """
    skipped = set(skip)
    out: Dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if key in skipped:
            return
        if isinstance(node, Mapping) and (node or not key):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = _plain(node)

    walk(tree, prefix)
    return out


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def fingerprint_diffs(saved: Mapping[str, Any], current: Mapping[str, Any],
                      common_only: bool = False) -> List[str]:
    """``"key old -> new"`` for every key whose value differs, in key order.

    ``common_only`` compares only keys present in both (fingerprints that grew new keys
    since a checkpoint was written); otherwise a key present on one side only differs
    too, shown as ``<unset>`` on the other.
    """
    keys = set(saved) & set(current) if common_only else set(saved) | set(current)
    diffs = []
    for key in sorted(keys):
        old, new = saved.get(key, UNSET), current.get(key, UNSET)
        if old != new:
            diffs.append(f"{key} {_show(old)} -> {_show(new)}")
    return diffs


def _show(value: Any) -> str:
    return value if value is UNSET else repr(value)
