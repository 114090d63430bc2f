"""Where preprocess may write: never over the user's files, and tidy after killed runs.

``preprocess`` builds its folder at ``<output>.tmp-<pid>`` and renames it into place,
moving an earlier dataset to ``<output>.old-<pid>`` for the moment of the swap. So the
only things it may ever delete are folders it wrote itself: an earlier processed dataset
at ``<output>`` (recognised by its metadata and its layout), and the ``.tmp-<pid>`` /
``.old-<pid>`` folders of runs that were killed. Anything else at ``<output>`` is refused
with a message naming it, before any work is done.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from fedrec.data.errors import DataError

log = logging.getLogger(__name__)

WRITTEN_BY = "fedrec preprocess"  # the marker in metadata.json of every processed folder
SPLIT_FOLDERS = ("train", "val", "test")
# Criteo: dense/sparse/label(/user); MovieLens ratings: user/item/label/timestamp
SPLIT_FILES = ("dense.npy", "sparse.npy", "label.npy", "user.npy", "item.npy", "timestamp.npy")
#: top-level files beside the splits (MovieLens: the original ids of users and items)
TOP_FILES = ("user_ids.npy", "item_ids.npy")
METADATA = "metadata.json"


# --------------------------------------------------------------------------------------
# what may be replaced


def check_output(output: Path, inputs: Iterable[Path]) -> None:
    """Refuse an ``output`` whose replacement would lose anything preprocess did not write.

    ``inputs`` (the data file, the users file) may be neither the output nor inside it.
    An existing output must be a processed dataset or an empty folder.
    """
    for item in inputs:
        relation = _containment(output, item)
        if relation is not None:
            raise DataError(
                f"output_file {output} {relation} the input {item}: preprocess replaces its output "
                f"folder as a whole, so this would delete the input; choose a new folder, e.g. "
                f"{_suggestion(item)}")
    problem = replace_problem(output)
    if problem is not None:
        raise DataError(
            f"output_file {output} {problem}; preprocess replaces only a processed dataset (a folder "
            f"whose {METADATA} it wrote) or an empty folder, and nothing was changed. Move it away "
            "or choose another output_file")


def replace_problem(path: Path) -> Optional[str]:
    """Why ``path`` may not be replaced by a new dataset (None: absent, empty or ours)."""
    if path.is_symlink():
        return "is a symbolic link (give the folder it points to, or a new path)"
    if not path.exists():
        return None
    if not path.is_dir():
        return "is an existing file, not a processed dataset folder"
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return None
    if METADATA not in entries:
        return f"is a folder without {METADATA} (holding {_names(entries)}), not a processed dataset"
    if not is_processed_metadata(path / METADATA):
        return f"is a folder whose {METADATA} was not written by preprocess"
    foreign = foreign_entries(path, need_metadata=True)
    if foreign:
        return f"is a processed dataset that also holds {_names(foreign)}, which preprocess did not write"
    return None


def is_processed_metadata(meta_path: Path) -> bool:
    """True when ``meta_path`` is the metadata of a processed dataset (this or format 1)."""
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(metadata, dict):
        return False
    if metadata.get("written_by") == WRITTEN_BY:
        return True
    # format 1 had no marker: recognise its keys
    return metadata.get("format_version") == 1 and {"table_sizes", "splits", "source", "num_sparse"} <= set(metadata)


def foreign_entries(folder: Path, need_metadata: bool) -> List[str]:
    """Entries of ``folder`` that are not part of a processed dataset's layout."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.name == METADATA:
            if not entry.is_file():
                foreign.append(entry.name)
        elif entry.name in TOP_FILES and entry.is_file():
            continue
        elif entry.name in SPLIT_FOLDERS and entry.is_dir():
            foreign += [f"{entry.name}/{f.name}" for f in sorted(entry.iterdir())
                        if f.name not in SPLIT_FILES or f.is_symlink() or not f.is_file()]
        else:
            foreign.append(entry.name)
    if need_metadata and not (folder / METADATA).is_file():
        foreign.append(f"(no {METADATA})")
    return foreign


def _containment(output: Path, item: Path) -> Optional[str]:
    """'is' / 'contains' when replacing ``output`` would delete ``item``."""
    out, inner = output.resolve(), item.resolve()
    if out == inner:
        return "is"
    if out in inner.parents:
        return "contains"
    return None


def _suggestion(item: Path) -> Path:
    """A fresh output path beside the input, for the message."""
    return item.parent / f"{item.name.split('.')[0] or 'data'}-processed"


def _names(entries: List[str], limit: int = 5) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


# --------------------------------------------------------------------------------------
# the swap into place


def commit_folder(tmp: Path, final: Path) -> None:
    """Move the finished folder into place; an earlier dataset is replaced only now.

    What is at ``final`` is checked again: something may have appeared there while the
    passes ran, and only an earlier processed dataset (or an empty folder) may go.
    """
    problem = replace_problem(final)
    if problem is not None:
        raise DataError(f"output_file {final} {problem} (it appeared while preprocessing); "
                        "nothing was changed there. Move it away or choose another output_file")
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.parent / f"{final.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------
# leftovers of killed runs


def clean_leftovers(output: Path) -> List[Path]:
    """Remove ``<output>.tmp-<pid>`` / ``.old-<pid>`` folders left by killed runs.

    Only folders with exactly that name, whose process is gone and whose content is a
    (partial) processed dataset, are touched. An ``.old`` folder is the earlier dataset
    of a run killed while swapping: if ``output`` is missing it is put back, not deleted.
    Returns the folders removed.
    """
    parent = output.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(re.escape(output.name) + r"\.(tmp|old)-([0-9]+)")
    removed = []
    for entry in sorted(parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        kind, pid = match[1], int(match[2])
        if pid_alive(pid):
            log.info("leaving %s: process %d that wrote it is still running", entry, pid)
            continue
        if entry.is_symlink() or not entry.is_dir() or foreign_entries(entry, need_metadata=False):
            log.warning("left %s alone: it is named like a leftover of a killed preprocess run "
                        "but does not hold a processed dataset", entry)
            continue
        if kind == "old" and not output.exists() and not output.is_symlink() \
                and is_processed_metadata(entry / METADATA):
            os.replace(entry, output)
            log.warning("restored %s to %s (a preprocess run, process %d, was killed while "
                        "replacing it)", entry, output, pid)
            continue
        try:
            shutil.rmtree(entry)
        except OSError as err:
            log.warning("could not remove %s, left by killed preprocess process %d: %s", entry, pid, err)
            continue
        log.warning("removed %s, left by preprocess process %d, which is no longer running", entry, pid)
        removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (when unsure, say yes: keep its files)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process
        return True
    return True


# --------------------------------------------------------------------------------------
# I/O errors


def io_error(err: OSError, source: Path, output: Path) -> DataError:
    """One clear line for an OSError met while reading ``source`` or writing ``output``."""
    where = Path(err.filename) if err.filename else output
    reason = err.strerror or str(err)
    if _is_source(where, source):
        return DataError(f"cannot read the data file {source}: {reason}")
    hint = {
        errno.ENOSPC: "free some space or choose an output_file on another disk",
        errno.EDQUOT: "free some space (disk quota) or choose an output_file on another disk",
        errno.EACCES: f"check the permissions of {output.parent} or choose another output_file",
        errno.EPERM: f"check the permissions of {output.parent} or choose another output_file",
        errno.EROFS: "the file system is read-only: choose another output_file",
    }.get(err.errno, "check the output folder or choose another output_file")
    return DataError(f"cannot write the processed dataset {output}: {reason} ({where}); the partial "
                     f"output was removed and any earlier dataset there is unchanged; {hint}")


def _is_source(where: Path, source: Path) -> bool:
    try:
        return where.resolve() == source.resolve()
    except OSError:
        return False
