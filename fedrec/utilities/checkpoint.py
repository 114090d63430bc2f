"""Checkpoints: atomic saves, keep-the-last-k, a best copy, ``weights_only=True`` loads.

A checkpoint holds only what ``torch.load(..., weights_only=True)`` accepts: tensors,
dicts, lists, tuples, ints, floats, strs, bools and None (and torch dtypes/sizes/devices).
:meth:`CheckpointManager.save` checks this before writing, so a bad value is reported at
save time with its location, not at resume time. RNG states, which hold numpy arrays
and tuples of Python ints, go through :func:`pack_rng_state` / :func:`unpack_rng_state`.

Layout of a checkpoint folder::

    ckpt-000001200.pt   step checkpoints (the newest ``keep_last`` are kept)
    best.pt             a copy (hard link when possible) of the best checkpoint so far
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "LoadedCheckpoint",
    "load_checkpoint",
    "save_checkpoint",
    "check_weights_only_safe",
    "pack_rng_state",
    "unpack_rng_state",
    "save_safetensors",
    "load_safetensors",
]

_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
_MARKER = "__fedrec_checkpoint__"
_FORMAT_VERSION = 1
BEST_NAME = "best.pt"

_SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                torch.Size)


class CheckpointError(RuntimeError):
    """A missing, unreadable or invalid checkpoint file; the message names the file."""


# --------------------------------------------------------------------------------------
# what may be saved


def _safe_violations(obj: Any, where: str, out: List[str], depth: int = 0) -> None:
    if len(out) >= 5:
        return
    if depth > 100:
        out.append(f"{where}: nested too deeply")
        return
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            out.append(f"{where}: tensor subclass {type(obj).__name__}")
        return
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, dict):
        if type(obj) not in (dict, collections.OrderedDict):
            out.append(f"{where}: {type(obj).__name__} (use a plain dict)")
            return
        for k, v in obj.items():
            if not isinstance(k, _SAFE_LEAVES):
                out.append(f"{where}: key {k!r} of type {type(k).__name__}")
                continue
            _safe_violations(v, f"{where}[{k!r}]", out, depth + 1)
        return
    if isinstance(obj, (list, tuple, set)):
        if type(obj) not in (list, tuple, set):  # namedtuples etc.
            out.append(f"{where}: {type(obj).__name__} (use a plain list/tuple/dict)")
            return
        for i, v in enumerate(obj):
            _safe_violations(v, f"{where}[{i}]", out, depth + 1)
        return
    hint = ""
    if isinstance(obj, (np.ndarray, np.generic)):
        hint = " (convert with torch.from_numpy or .tolist())"
    out.append(f"{where}: {type(obj).__module__}.{type(obj).__qualname__}{hint}")


def check_weights_only_safe(obj: Any, name: str = "state") -> None:
    """Raise ``TypeError`` naming the first values ``torch.load(weights_only=True)`` refuses."""
    problems: List[str] = []
    _safe_violations(obj, name, problems)
    if problems:
        raise TypeError(
            "checkpoint state must hold only tensors, dicts, lists, tuples, ints, floats, "
            "strs, bools and None (weights_only-safe); not allowed: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------------------
# atomic files


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` for a temp file in ``path``'s folder, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            # e.g. a full disk (ENOSPC): say which file could not be written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def _atomic_link_or_copy(src: Path, dst: Path) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, state: Mapping[str, Any], step: Optional[int] = None) -> Path:
    """Write ``state`` to ``path`` atomically (checked to be weights_only-safe first)."""
    path = Path(path)
    state = dict(state)
    check_weights_only_safe(state)
    payload = {_MARKER: _FORMAT_VERSION, "step": step, "state": state}
    _atomic_write(path, lambda tmp: _torch_save(payload, tmp))
    return path


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a failed write (a full disk) raises
    ``OSError`` with its errno rather than torch's opaque ``RuntimeError``."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """The state saved in ``path``, loaded with ``weights_only=True`` onto the CPU.

    Files written by :func:`save_checkpoint` give back the saved ``state``; a plain
    ``torch.save``'d dict is returned as is. Anything else raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # corrupt files fail in many ways (zip, pickle, index errors)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a valid fedrec checkpoint (torch.load with weights_only=True "
            f"failed: {first})"
        ) from err
    if isinstance(obj, dict) and _MARKER in obj:
        version = obj[_MARKER]
        if version != _FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has checkpoint format version {version}; this fedrec reads "
                f"version {_FORMAT_VERSION}"
            )
        state = obj.get("state")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} is not a valid fedrec checkpoint (no state dict)")
        return state
    if isinstance(obj, dict):
        return obj
    raise CheckpointError(
        f"{path} is not a valid fedrec checkpoint: it holds a {type(obj).__name__}, not a dict"
    )


# --------------------------------------------------------------------------------------
# manager


@dataclasses.dataclass
class LoadedCheckpoint:
    """A step checkpoint read back: its step, file and saved state."""

    step: int
    path: Path
    state: Dict[str, Any]


class CheckpointManager:
    """Step checkpoints in ``directory``: ``ckpt-<step:09d>.pt``, newest ``keep_last`` kept.

    ``keep_last=None`` keeps them all. ``best.pt`` (written when ``save(..., is_best=True)``)
    is never pruned.
    """

    def __init__(self, directory: str | Path, keep_last: Optional[int] = 2) -> None:
        if keep_last is not None and int(keep_last) < 1:
            raise ValueError(f"CheckpointManager: keep_last must be >= 1 or None, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = None if keep_last is None else int(keep_last)

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt-{int(step):09d}.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / BEST_NAME

    def save(self, step: int, state: Mapping[str, Any], *, is_best: bool = False) -> Path:
        """Write the checkpoint of ``step`` atomically, prune old ones, update ``best.pt``."""
        if int(step) < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        path = save_checkpoint(self.path_for(step), state, step=int(step))
        if is_best:
            _atomic_link_or_copy(path, self.best_path)
        self._prune()
        return path

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for _, path in self.checkpoints()[:-self.keep_last]:
            path.unlink(missing_ok=True)

    def checkpoints(self) -> List[Tuple[int, Path]]:
        """``(step, path)`` of the step checkpoints present, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            m = _CKPT_RE.match(entry.name)
            if m and entry.is_file():
                found.append((int(m.group(1)), entry))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        """The newest step checkpoint, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def latest_step(self) -> Optional[int]:
        found = self.checkpoints()
        return found[-1][0] if found else None

    def best(self) -> Optional[Path]:
        """``best.pt`` if one was saved, else None."""
        return self.best_path if self.best_path.is_file() else None

    @staticmethod
    def load(path: str | Path) -> Dict[str, Any]:
        """:func:`load_checkpoint` (``weights_only=True``, onto the CPU)."""
        return load_checkpoint(path)

    def load_latest(self) -> Optional[Dict[str, Any]]:
        path = self.latest()
        return None if path is None else load_checkpoint(path)

    def load_newest_intact(self, on_skip: Optional[Callable[[str], None]] = None
                           ) -> Optional[LoadedCheckpoint]:
        """The newest step checkpoint that loads; None when there is none at all.

        An unreadable newer file (truncated by a full disk or a crash of the file system,
        or corrupt) is skipped for the one before it, and ``on_skip`` gets a line naming
        it; when no file loads, :class:`CheckpointError` lists them all.
        """
        errors = []
        for step, path in reversed(self.checkpoints()):
            try:
                return LoadedCheckpoint(step, path, load_checkpoint(path))
            except CheckpointError as err:
                errors.append(str(err))
                if on_skip is not None:
                    on_skip(f"skipped unreadable checkpoint {path}: {err}; falling back to the one before it")
        if errors:
            raise CheckpointError(f"no loadable checkpoint in {self.directory}: " + "; ".join(errors))
        return None

    def __iter__(self) -> Iterator[Path]:
        return iter(p for _, p in self.checkpoints())

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, keep_last={self.keep_last})"


# --------------------------------------------------------------------------------------
# RNG states


def pack_rng_state(state: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """RNG states (default: the current global ones) as weights_only-safe values.

    ``state`` is a :func:`fedrec.utilities.random_state.get_rng_state` dict: ``python``
    (``random.getstate()``), ``numpy`` (``np.random.get_state()``, legacy tuple form) and
    ``torch`` (a ByteTensor); other entries (e.g. CUDA states) must already be safe.
    """
    if state is None:
        from fedrec.utilities.random_state import get_rng_state

        state = get_rng_state()
    packed: Dict[str, Any] = {}
    for key, value in state.items():
        if key == "python":
            version, internal, gauss_next = value
            packed[key] = {
                "version": int(version),
                "internal": torch.tensor([int(x) for x in internal], dtype=torch.int64),
                "gauss_next": None if gauss_next is None else float(gauss_next),
            }
        elif key == "numpy":
            if isinstance(value, Mapping):  # np.random.get_state(legacy=False)
                raise TypeError("pack_rng_state: pass numpy's legacy (tuple) state")
            name, keys, pos, has_gauss, cached_gaussian = value
            packed[key] = {
                "name": str(name),
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            }
        elif key == "torch":
            packed[key] = value.clone() if isinstance(value, torch.Tensor) else value
        else:
            packed[key] = value
    check_weights_only_safe(packed, "rng_state")
    return packed


def unpack_rng_state(obj: Mapping[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`pack_rng_state`, ready for ``random_state.set_rng_state``."""
    state: Dict[str, Any] = {}
    for key, value in obj.items():
        if key == "python":
            internal = value["internal"]
            internal = internal.tolist() if isinstance(internal, torch.Tensor) else list(internal)
            state[key] = (int(value["version"]), tuple(int(x) for x in internal),
                          value["gauss_next"])
        elif key == "numpy":
            keys = value["keys"]
            keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
            state[key] = (value["name"], keys.astype(np.uint32), int(value["pos"]),
                          int(value["has_gauss"]), float(value["cached_gaussian"]))
        elif key == "torch":
            state[key] = value if value.dtype == torch.uint8 else value.to(torch.uint8)
        else:
            state[key] = value
    return state


# --------------------------------------------------------------------------------------
# safetensors exports


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                     metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write plain weights (e.g. ``model.state_dict()``) as a ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    # safetensors refuses shared or non-contiguous storage: give it independent copies
    plain = {str(k): v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    _atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=meta))
    return path


def load_safetensors(path: str | Path) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (on the CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file: {err}") from err
