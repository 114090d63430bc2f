"""MovieLens ratings -> a processed folder of per-user leave-one-out splits.

Reads ``ratings.csv`` (ml-latest-small, ml-25m: ``userId,movieId,rating,timestamp`` with a
header), ``ratings.dat`` (ml-1m: ``::``-separated, no header) or ``u.data`` (ml-100k: tab
separated), line by line, so memory holds the parsed columns and not the text.

Bad input is never silently dropped. A malformed line is an error naming the file and
line (or, with ``skip_bad_lines``, skipped and counted). Ratings outside the declared
scale, duplicate (user, item, timestamp) rows and users with too few interactions for the
split are dropped and counted (``invalid: drop``, the default) or an error naming the file
and line, or the user (``invalid: error``). Every count is in the metadata and printed.

Output (``<output>/``, swapped into place only when complete, see ``fedrec.data.output``):
``metadata.json``; ``train/``, ``val/``, ``test/`` each with ``user.npy`` (int64, contiguous
ids 0..U-1), ``item.npy`` (int64, 0..I-1), ``label.npy`` (float32: the rating in explicit
mode, 1 in implicit mode) and ``timestamp.npy`` (int64); ``user_ids.npy`` and
``item_ids.npy`` map the contiguous ids back to MovieLens's. The split is leave-one-out per
user: the last interaction by time (ties: the later line) is the test item, the one before
it the validation item, the rest train. ``split: temporal`` cuts the timeline once instead
(see :func:`temporal_split`), and its ``future/`` holds each user's later interactions
past its val and test items.
"""

from __future__ import annotations

import array
import dataclasses
import gzip
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple

import numpy as np
import pydantic

from fedrec.data.errors import DataError
from fedrec.data.output import WRITTEN_BY, check_output, clean_leftovers, commit_folder, io_error

FORMAT = "movielens"
FORMAT_VERSION = 1
#: ``future``: the temporal split's later interactions past each user's val and test items
#: (written by the temporal split only)
SPLIT_NAMES = ("train", "val", "test", "future")
COLUMNS = ("user", "item", "label", "timestamp")
_DTYPES = {"user": np.int64, "item": np.int64, "label": np.float32, "timestamp": np.int64}
PREPROCESS_HINT = "run `fedrec preprocess --config <config>` (it writes model.preproc.output_file)"


class MovieLensOptions(pydantic.BaseModel):
    """How ratings become interactions (``model.preproc`` keys beside the file names)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    feedback: Literal["implicit", "explicit"] = "implicit"
    #: implicit mode: a rating >= threshold is an interaction; None: every rating is
    threshold: Optional[float] = None
    rating_scale: Tuple[float, float] = (0.5, 5.0)
    #: users with fewer interactions are dropped (leave-one-out needs train, val, test)
    min_interactions: int = pydantic.Field(3, ge=3)
    #: out-of-scale ratings, duplicates and too-few users: drop and count, or stop
    invalid: Literal["drop", "error"] = "drop"
    skip_bad_lines: bool = False
    #: field separator: auto picks ``::`` for .dat, tab for .data, ``,`` otherwise
    sep: Literal["auto", ",", "::", "\t"] = "auto"
    #: leave_one_out: per user, last item test, the one before val; temporal: one global
    #: time cut, train before it, each user's first and second later items val and test
    split: Literal["leave_one_out", "temporal"] = "leave_one_out"
    #: temporal: the cut leaves this fraction of the interactions (in time order) before it
    cut_fraction: Optional[float] = pydantic.Field(None, gt=0.0, lt=1.0)
    #: temporal: or the cut is this timestamp (interactions at or after it are "later")
    cut_timestamp: Optional[int] = None

    @pydantic.model_validator(mode="after")
    def _check(self) -> "MovieLensOptions":
        cuts = (self.cut_fraction is not None) + (self.cut_timestamp is not None)
        if self.split == "temporal" and cuts != 1:
            raise ValueError("split: temporal needs exactly one of cut_fraction (0 < f < 1) and cut_timestamp")
        if self.split != "temporal" and cuts:
            raise ValueError("cut_fraction and cut_timestamp apply to split: temporal only")
        low, high = self.rating_scale
        if not low < high:
            raise ValueError(f"rating_scale must be [min, max] with min < max, got {list(self.rating_scale)}")
        if self.threshold is not None and self.feedback == "explicit":
            raise ValueError("threshold applies to feedback: implicit only (explicit keeps every rating)")
        if self.threshold is not None and not low <= self.threshold <= high:
            raise ValueError(f"threshold {self.threshold} lies outside rating_scale {list(self.rating_scale)}")
        return self


@dataclasses.dataclass
class _Columns:
    """Parsed lines, as compact typed arrays (24 bytes per rating)."""

    user: "array.array[int]" = dataclasses.field(default_factory=lambda: array.array("q"))
    item: "array.array[int]" = dataclasses.field(default_factory=lambda: array.array("q"))
    rating: "array.array[float]" = dataclasses.field(default_factory=lambda: array.array("f"))
    timestamp: "array.array[int]" = dataclasses.field(default_factory=lambda: array.array("q"))
    line: "array.array[int]" = dataclasses.field(default_factory=lambda: array.array("Q"))


def _separator(path: Path, sep: str) -> str:
    if sep != "auto":
        return sep
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".dat"):
        return "::"
    if name.endswith(".data"):
        return "\t"
    return ","


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(1-based line number, text without the newline); a non-UTF-8 line names its number."""
    with _open_text(path) as handle:
        number = 0
        while True:
            number += 1
            try:
                text = handle.readline()
            except UnicodeDecodeError as err:
                raise DataError(f"{path}, line {number}: not UTF-8 text ({err.reason})") from None
            if not text:
                return
            yield number, text.rstrip("\r\n")


def _problem(fields: List[str]) -> Tuple[Optional[str], Any]:
    """(what is wrong, or None; the parsed values)."""
    if len(fields) != 4:
        return f"expected 4 fields (user, item, rating, timestamp), found {len(fields)}", None
    try:
        user, item = int(fields[0]), int(fields[1])
    except ValueError:
        return f"user and item ids must be integers, got {fields[0]!r} and {fields[1]!r}", None
    try:
        rating = float(fields[2])
    except ValueError:
        return f"rating must be a number, got {fields[2]!r}", None
    if not math.isfinite(rating):
        return f"rating must be a finite number, got {fields[2]!r}", None
    try:
        timestamp = int(fields[3])
    except ValueError:
        return f"timestamp must be an integer, got {fields[3]!r}", None
    return None, (user, item, rating, timestamp)


def read_ratings(path: Path, options: MovieLensOptions, report: Dict[str, Any]) -> _Columns:
    """Stream ``path`` into columns; bad lines stop the run (file, line) or are counted."""
    sep = _separator(path, options.sep)
    cols = _Columns()
    low, high = options.rating_scale
    for number, text in _lines(path):
        if not text.strip():
            continue
        fields = [f.strip() for f in text.split(sep)]
        if number == 1 and fields and fields[0].lower() in ("userid", "user_id", "user"):
            continue  # the csv header
        problem, values = _problem(fields)
        if problem is not None:
            if not options.skip_bad_lines:
                raise DataError(f"{path}, line {number}: {problem} (line: {text[:80]!r}); fix the line or set "
                                "model.preproc.skip_bad_lines: true to skip and count such lines")
            report["bad_lines"] += 1
            report["examples"].setdefault("bad_lines", f"line {number}: {problem}")
            continue
        user, item, rating, timestamp = values
        if not low <= rating <= high:
            if options.invalid == "error":
                raise DataError(f"{path}, line {number}: rating {rating:g} is outside rating_scale "
                                f"[{low:g}, {high:g}]; fix the data, declare the scale in "
                                "model.preproc.rating_scale or set model.preproc.invalid: drop")
            report["out_of_scale"] += 1
            report["examples"].setdefault("out_of_scale", f"line {number}: rating {rating:g}")
            continue
        cols.user.append(user)
        cols.item.append(item)
        cols.rating.append(rating)
        cols.timestamp.append(timestamp)
        cols.line.append(number)
    return cols


def _as_arrays(cols: _Columns) -> Dict[str, np.ndarray]:
    if not len(cols.user):
        return {"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int64), "rating": np.zeros(0, np.float32),
                "timestamp": np.zeros(0, np.int64), "line": np.zeros(0, np.uint64)}
    return {"user": np.frombuffer(cols.user, np.int64), "item": np.frombuffer(cols.item, np.int64),
            "rating": np.frombuffer(cols.rating, np.float32), "timestamp": np.frombuffer(cols.timestamp, np.int64),
            "line": np.frombuffer(cols.line, np.uint64)}


def _take(data: Dict[str, np.ndarray], keep: np.ndarray) -> Dict[str, np.ndarray]:
    return {k: v[keep] for k, v in data.items()}


def drop_duplicates(data: Dict[str, np.ndarray], path: Path, options: MovieLensOptions,
                    report: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Keep the first line of each (user, item, timestamp); count (or refuse) the rest."""
    order = np.lexsort((data["line"], data["timestamp"], data["item"], data["user"]))
    u, i, t = data["user"][order], data["item"][order], data["timestamp"][order]
    repeat = np.zeros(len(order), dtype=bool)
    if len(order) > 1:
        repeat[1:] = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
    count = int(repeat.sum())
    if count:
        first = int(np.flatnonzero(repeat)[0])
        where = (f"line {int(data['line'][order[first]])} repeats line {int(data['line'][order[first - 1]])} "
                 f"(user {int(u[first])}, item {int(i[first])}, timestamp {int(t[first])})")
        if options.invalid == "error":
            raise DataError(f"{path}, {where}: duplicate (user, item, timestamp); remove it or set "
                            "model.preproc.invalid: drop to keep the first and count the rest")
        report["duplicates"] = count
        report["examples"]["duplicates"] = where
    keep = np.sort(order[~repeat])  # back to file order
    return _take(data, keep)


def drop_sparse_users(data: Dict[str, np.ndarray], path: Path, options: MovieLensOptions,
                      report: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Users with fewer than ``min_interactions`` interactions cannot be split: count or refuse."""
    users, inverse, counts = np.unique(data["user"], return_inverse=True, return_counts=True)
    few = counts < options.min_interactions
    if few.any():
        first = int(np.flatnonzero(few)[0])
        what = (f"user {int(users[first])} has {int(counts[first])} interaction(s) but the leave-one-out split "
                f"needs at least {options.min_interactions}")
        if options.invalid == "error":
            raise DataError(f"{path}: {what} ({int(few.sum())} such user(s)); set model.preproc.invalid: drop "
                            "to drop and count them")
        report["users_too_few"] = int(few.sum())
        report["interactions_of_users_too_few"] = int(counts[few].sum())
        report["examples"]["users_too_few"] = what
    return _take(data, ~few[inverse])


def leave_one_out(user: np.ndarray, timestamp: np.ndarray, line: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(order, split code): rows sorted by (user, time, line) and 0 train / 1 val / 2 test,
    the last of each user being test and the one before it val."""
    order = np.lexsort((line, timestamp, user))
    u = user[order]
    last = np.ones(len(u), dtype=bool)
    last[:-1] = u[1:] != u[:-1]
    second = np.zeros(len(u), dtype=bool)
    second[:-1] = last[1:] & ~last[:-1]
    code = np.zeros(len(u), dtype=np.int8)
    code[second] = 1
    code[last] = 2
    return order, code


def temporal_split(user: np.ndarray, timestamp: np.ndarray, line: np.ndarray,
                   cut: int) -> Tuple[np.ndarray, np.ndarray]:
    """(order, split code): rows sorted by (user, time, line); before ``cut`` is train (0);
    of a user's later rows the first is val (1) and the second test (2), or the only one
    test; the rest are 3 (the ``future`` split: neither trained on nor scored, but known to
    be the user's, so that sampled negatives avoid them)."""
    order = np.lexsort((line, timestamp, user))
    u, later = user[order], timestamp[order] >= cut
    code = np.zeros(len(u), dtype=np.int8)
    if not len(u):
        return order, code
    # rows are grouped by user and in time order, so a user's later rows are its last ones
    group = np.cumsum(np.r_[True, u[1:] != u[:-1]]) - 1
    first_row = np.searchsorted(group, group)
    n_before = np.bincount(group, weights=~later).astype(np.int64)[group]
    total = np.bincount(group, weights=later).astype(np.int64)[group]
    k = np.arange(len(u)) - first_row - n_before  # 0-based index among the user's later rows
    code[later & (k == 0)] = np.where(total[later & (k == 0)] >= 2, 1, 2)
    code[later & (k == 1)] = 2
    code[later & (k >= 2)] = 3
    return order, code


def _temporal_cut(timestamp: np.ndarray, options: MovieLensOptions) -> int:
    if options.cut_timestamp is not None:
        return int(options.cut_timestamp)
    ordered = np.sort(timestamp)
    return int(ordered[min(int(options.cut_fraction * len(ordered)), len(ordered) - 1)])


def drop_users_without_history(data: Dict[str, np.ndarray], cut: int, report: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Temporal split: users with nothing before the cut have no training data (cold
    start): dropped and counted."""
    users = np.unique(data["user"])
    early = np.unique(data["user"][data["timestamp"] < cut])
    late_only = np.setdiff1d(users, early)
    report["users_only_after_cut"] = int(len(late_only))
    if len(late_only):
        report["examples"]["users_only_after_cut"] = f"user {int(late_only[0])} has no interaction before {cut}"
    return _take(data, np.isin(data["user"], early))


def preprocess_ratings(datafile: str | os.PathLike, output_file: str | os.PathLike,
                       options: MovieLensOptions) -> Dict[str, Any]:
    """Ratings file -> processed folder; returns the metadata written (with the counts)."""
    source, output = Path(datafile), Path(output_file)
    if not source.is_file():
        raise DataError(f"ratings file {source} does not exist (or is not a file)")
    try:
        check_output(output, [source])
        clean_leftovers(output)
        return _preprocess(source, output, options)
    except OSError as err:
        raise io_error(err, source, output) from None


def _preprocess(source: Path, output: Path, options: MovieLensOptions) -> Dict[str, Any]:
    report: Dict[str, Any] = {"lines": 0, "bad_lines": 0, "out_of_scale": 0, "duplicates": 0,
                              "below_threshold": 0, "users_too_few": 0, "interactions_of_users_too_few": 0,
                              "examples": {}}
    data = _as_arrays(read_ratings(source, options, report))
    report["ratings_read"] = int(len(data["user"]))
    if not len(data["user"]):
        raise DataError(f"{source}: no ratings (an empty file, or every line was dropped)")
    data = drop_duplicates(data, source, options, report)
    if options.feedback == "implicit" and options.threshold is not None:
        liked = data["rating"] >= options.threshold
        report["below_threshold"] = int((~liked).sum())  # the definition of implicit feedback, not bad input
        data = _take(data, liked)
    data = drop_sparse_users(data, source, options, report)
    if not len(data["user"]):
        raise DataError(f"{source}: no user has the {options.min_interactions} interactions the split needs")
    if options.split == "temporal":
        cut = _temporal_cut(data["timestamp"], options)
        data = drop_users_without_history(data, cut, report)
        if not len(data["user"]):
            raise DataError(f"{source}: no user has an interaction before the temporal cut {cut}")
    user_ids, user = np.unique(data["user"], return_inverse=True)
    item_ids, item = np.unique(data["item"], return_inverse=True)
    if options.split == "temporal":
        order, code = temporal_split(user, data["timestamp"], data["line"], cut)
        if not (code == 2).any():
            raise DataError(f"{source}: no user has an interaction at or after the temporal cut {cut} (the last is "
                            f"at {int(data['timestamp'].max())}): nothing to validate or test on; lower "
                            "model.preproc.cut_timestamp or cut_fraction")
        evaluated = np.zeros(len(user_ids), bool)
        evaluated[user[order[code == 2]]] = True
        report["temporal"] = {"cut_timestamp": cut, "users_evaluated": int(evaluated.sum()),
                              "users_not_evaluated": int((~evaluated).sum()),
                              "users_without_val": int(evaluated.sum() - (code == 1).sum()),
                              "future_interactions": int((code == 3).sum())}
    else:
        order, code = leave_one_out(user, data["timestamp"], data["line"])
    label = (data["rating"] if options.feedback == "explicit" else np.ones(len(user), np.float32))
    columns = {"user": user, "item": item, "label": label, "timestamp": data["timestamp"]}

    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        splits = {}
        for k, name in enumerate(SPLIT_NAMES if options.split == "temporal" else SPLIT_NAMES[:3]):
            rows = order[code == k]
            (tmp / name).mkdir()
            for column, values in columns.items():
                np.save(tmp / name / f"{column}.npy", np.ascontiguousarray(values[rows], dtype=_DTYPES[column]))
            splits[name] = int(len(rows))
        np.save(tmp / "user_ids.npy", user_ids.astype(np.int64))
        np.save(tmp / "item_ids.npy", item_ids.astype(np.int64))
        metadata = {
            "written_by": WRITTEN_BY, "format": FORMAT, "format_version": FORMAT_VERSION,
            "source": {"path": str(source.resolve()), "sha256": _sha256(source)}, "num_users": int(len(user_ids)), "num_items": int(len(item_ids)),
            "splits": splits, "options": options.model_dump(mode="json"),
            "rating_mean": float(np.mean(label[order[code == 0]])) if splits["train"] else 0.0,
            "report": report,
        }
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        commit_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metadata


def _sha256(path: Path) -> str:
    """The source file's digest (a resumed run refuses data that changed under it)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_report(metadata: Dict[str, Any]) -> List[str]:
    """The counts of a preprocess run as lines for the terminal: nothing dropped silently."""
    r = metadata["report"]
    lines = [f"{r['ratings_read']:,} ratings read; {metadata['num_users']:,} users, {metadata['num_items']:,} items; "
             f"splits: " + ", ".join(f"{k} {v:,}" for k, v in metadata["splits"].items())]
    dropped = [("bad lines skipped", r["bad_lines"]), ("ratings outside the scale", r["out_of_scale"]),
               ("duplicate (user, item, timestamp) rows", r["duplicates"]),
               ("ratings below the implicit threshold", r["below_threshold"]),
               ("users with too few interactions", r["users_too_few"])]
    text = "; ".join(f"{what} {n:,}" for what, n in dropped)
    lines.append(f"dropped: {text} ({r['interactions_of_users_too_few']:,} interactions of those users)")
    if "temporal" in r:
        t = r["temporal"]
        lines.append(f"temporal cut at {t['cut_timestamp']}: {t['users_evaluated']:,} users evaluated "
                     f"({t['users_without_val']:,} of them with a test item but no validation item); "
                     f"not evaluated (nothing after the cut) {t['users_not_evaluated']:,}; dropped (nothing "
                     f"before the cut) {r['users_only_after_cut']:,}; later interactions past a user's val and "
                     f"test (the future split: not trained on or scored, kept out of sampled negatives) "
                     f"{t['future_interactions']:,}")
    for key, example in r.get("examples", {}).items():
        lines.append(f"  first of {key}: {example}")
    return lines


# --------------------------------------------------------------------------------------
# read side


class RatingsSplit:
    """One split's memory-mapped columns: ``user``, ``item``, ``label``, ``timestamp``."""

    def __init__(self, name: str, columns: Dict[str, np.ndarray]) -> None:
        self.name = name
        self.user = columns["user"]
        self.item = columns["item"]
        self.label = columns["label"]
        self.timestamp = columns["timestamp"]

    def __len__(self) -> int:
        return len(self.label)

    def __repr__(self) -> str:
        return f"RatingsSplit({self.name!r}, rows={len(self)})"


class RatingsDataset:
    """A processed MovieLens-format folder: metadata plus lazily mapped splits."""

    def __init__(self, path: Path, metadata: Dict[str, Any]) -> None:
        self.path = path
        self.metadata = metadata
        self.num_users = int(metadata["num_users"])
        self.num_items = int(metadata["num_items"])
        self.feedback: str = metadata["options"]["feedback"]
        self._splits: Dict[str, RatingsSplit] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RatingsDataset":
        path = Path(path)
        meta_path = path / "metadata.json"
        if not meta_path.is_file():
            raise DataError(f"processed ratings {path} do not exist (no {meta_path}); {PREPROCESS_HINT}")
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{meta_path} is not valid JSON ({err}); {PREPROCESS_HINT}") from None
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise DataError(f"{path} is not a processed MovieLens-format dataset (it holds "
                            f"{metadata.get('format', 'Criteo') if isinstance(metadata, dict) else '?'} data); "
                            f"{PREPROCESS_HINT} with model.preproc.name: movielens")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{meta_path}: format_version {metadata.get('format_version')!r}, this fedrec reads "
                            f"{FORMAT_VERSION}; {PREPROCESS_HINT}")
        splits = metadata.get("splits")
        if (not isinstance(splits, dict) or not set(SPLIT_NAMES[:3]) <= set(splits) or not set(splits) <= set(SPLIT_NAMES)
                or not all(isinstance(v, int) and v >= 0 for v in splits.values())):
            raise DataError(f"{meta_path}: splits should map {', '.join(SPLIT_NAMES[:3])} (and future, for a "
                            f"temporal split) to row counts, found {splits!r}; {PREPROCESS_HINT}")
        return cls(path, metadata)

    @property
    def splits(self) -> Dict[str, int]:
        return {k: int(v) for k, v in self.metadata["splits"].items()}

    def split(self, name: str) -> RatingsSplit:
        cached = self._splits.get(name)
        if cached is not None:  # (asked for once or more per client: no checks again)
            return cached
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        if name not in self.splits:  # future: a leave-one-out folder, or one written before it existed
            raise DataError(f"{self.path} has no {name} split (only split: temporal writes one; an older fedrec "
                            f"wrote none); {PREPROCESS_HINT}")
        columns = {}
        for column in COLUMNS:
            file = self.path / name / f"{column}.npy"
            try:
                values = np.load(file, mmap_mode="r")
            except (FileNotFoundError, ValueError) as err:
                raise DataError(f"{file} is missing or unreadable ({err}); {PREPROCESS_HINT}") from None
            if values.shape != (self.splits[name],) or values.dtype != _DTYPES[column]:
                raise DataError(f"{file}: expected {np.dtype(_DTYPES[column])} ({self.splits[name]},), found "
                                f"{values.dtype} {values.shape}; {PREPROCESS_HINT}")
            columns[column] = values
        for column, count in (("user", self.num_users), ("item", self.num_items)):
            values = columns[column]
            if len(values) and (int(values.min()) < 0 or int(values.max()) >= count):
                # an id past the model's table would fail mid-round, or read another's row
                bad = int(np.flatnonzero((values < 0) | (values >= count))[0])
                raise DataError(f"{self.path / name / f'{column}.npy'}: row {bad} holds {column} id "
                                f"{int(values[bad])}, outside 0..{count - 1} (metadata.json num_{column}s "
                                f"{count}); {PREPROCESS_HINT}")
        self._splits[name] = RatingsSplit(name, columns)
        return self._splits[name]

    def __repr__(self) -> str:
        return f"RatingsDataset({str(self.path)!r}, users={self.num_users}, items={self.num_items})"
