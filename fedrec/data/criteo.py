"""Streaming preprocessing of Criteo Display Advertising files (Kaggle layout).

Each line is ``label``, 13 integer features ``I1..I13`` and 26 categorical features
``C1..C26`` (hex strings), tab-separated; an empty field is a missing value. The result
is the processed folder described in ``docs/architecture.md``.

The file is read twice, in blocks of whole lines (``chunk_bytes``), so that memory is
bounded by the block size and the vocabularies, never by the file length:

1. a scan that counts lines and hashes the file; in vocabulary mode it also parses every
   block and counts the values of each categorical column;
2. a write pass that parses every block again, encodes it and appends the rows to the
   split files with plain writes.

Parsing is vectorized: pyarrow splits a block into columns of raw bytes (in a worker
thread, one block ahead) and numpy decodes the digits. Only a block that fails this fast
path is checked line by line in Python, to name the bad line (or to skip it with
``skip_bad_lines``). Both paths accept exactly the same values: a label is ``0`` or ``1``,
an integer is ``-?[0-9]{1,18}``, a categorical ``[0-9a-fA-F]{1,16}``; any field may be
empty except the label.

Hashing mode does not parse in the scan, so it learns about skipped lines only while
writing; since the split boundaries depend on the row count, it then writes once more.
"""

from __future__ import annotations

import gzip
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Any,
    BinaryIO,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from fedrec.data.errors import DataError
from fedrec.data.hashing import OccurringValues, renumber_sparse
from fedrec.data.output import WRITTEN_BY, check_output, clean_leftovers, io_error, replace_problem  # noqa: F401
from fedrec.data.output import commit_folder as _commit

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: hashing-mode tables sized by the hashed values that occur; max_index
READABLE_VERSIONS = (1, 2)  # 1: every hashed table had max_ind_range rows (still valid data)
NUM_DENSE = 13
NUM_SPARSE = 26
DENSE_NAMES = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
SPARSE_NAMES = tuple(f"C{i}" for i in range(1, NUM_SPARSE + 1))
SPLIT_NAMES = ("train", "val", "test")
FILE_ORDER = ("train", "test", "val")  # where each split lies in the source file
REFERENCE_LINES = 45_840_617  # Kaggle train.txt: split into 7 "days" like the DLRM reference
REFERENCE_DAYS = 7
DEFAULT_CHUNK_BYTES = 32 << 20
MAX_HEX_DIGITS = 16  # a categorical must fit in 64 bits
MAX_DEC_DIGITS = 18  # an integer feature must fit in int64 whatever its digits
MAX_WARNINGS = 5  # skipped lines logged one by one before going quiet

_DEC_RE = re.compile(rb"-?[0-9]{1,%d}" % MAX_DEC_DIGITS)
_HEX_RE = re.compile(rb"[0-9a-fA-F]{1,%d}" % MAX_HEX_DIGITS)
_INVALID = 255
_NOT_READ = object()  # marks a block whose arrow table nobody has made yet


def _digit_table(alphabet: str) -> np.ndarray:
    """Byte -> digit value lookup; bytes outside ``alphabet`` map to 255 (invalid)."""
    table = np.full(256, _INVALID, dtype=np.uint8)
    for value, char in enumerate(alphabet):
        table[ord(char)] = value
        table[ord(char.upper())] = value
    return table


_DEC_TABLE = _digit_table("0123456789")
_DEC_SIGN_TABLE = _digit_table("0123456789-")
_HEX_TABLE = _digit_table("0123456789abcdef")


# --------------------------------------------------------------------------------------
# public entry point


def preprocess(
    datafile: str | os.PathLike,
    output_file: str | os.PathLike,
    *,
    max_ind_range: int = -1,
    hash_table_size: str = "occurring",
    threshold: int = 0,
    dataset_config: Optional[Mapping[str, Any]] = None,
    split: str = "auto",
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    skip_bad_lines: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    has_label: bool = True,
    users_file: str | os.PathLike | None = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Convert a Criteo TSV (plain or gzip) into a processed folder; returns its metadata.

    ``max_ind_range > 0`` hashes each categorical to ``value % max_ind_range``; with
    ``hash_table_size="occurring"`` (the reference DLRM's sizes) each column's hashed values
    that occur are then renumbered 0..k-1 and its table has k rows, with ``"fixed"`` the
    hashed value is the index and every table has ``max_ind_range`` rows. Otherwise each
    column gets a vocabulary (index 0 = missing, 1 = values seen fewer than ``threshold``
    times when ``threshold > 1``, then the kept values in ascending order).
    ``split="auto"`` uses the reference 7-day split for the full Kaggle file and a tail
    split (``test_fraction`` then ``val_fraction``) otherwise; ``"fraction"`` forces the
    latter. The folder appears at ``output_file`` only once complete, and replaces only an
    earlier processed dataset (never the input or other files: a DataError says so).
    """
    source = Path(datafile)
    output = Path(output_file)
    check_options(max_ind_range=max_ind_range, hash_table_size=hash_table_size, threshold=threshold,
                  split=split, val_fraction=val_fraction, test_fraction=test_fraction,
                  chunk_bytes=chunk_bytes, dataset_config=dataset_config)
    if not source.is_file():
        raise DataError(f"data file {source} does not exist (or is not a file)")
    users_path = _find_users_file(source, users_file)
    options = {
        "max_ind_range": max_ind_range, "hash_table_size": hash_table_size, "threshold": threshold,
        "dataset_config": dict(dataset_config) if dataset_config else None, "split": split,
        "val_fraction": val_fraction, "test_fraction": test_fraction,
        "skip_bad_lines": skip_bad_lines, "has_label": has_label,
    }
    try:
        check_output(output, [source] + ([users_path] if users_path is not None else []))
        clean_leftovers(output)
        metadata = _preprocess(source, output, users_path, options, chunk_bytes, progress)
    except OSError as err:
        raise io_error(err, source, output) from None
    _warn_empty_splits(output, metadata["splits"], val_fraction, test_fraction)
    return metadata


def _preprocess(source: Path, output: Path, users_path: Optional[Path], options: Dict[str, Any],
                chunk_bytes: int, progress: bool) -> Dict[str, Any]:
    """The two passes into ``<output>.tmp-<pid>``, then the swap into place."""
    max_ind_range = options["max_ind_range"]
    parser = _ChunkParser(str(source), options["has_label"], options["skip_bad_lines"])
    counter = None if max_ind_range > 0 else _VocabCounter()

    scan = _scan(source, parser, counter, chunk_bytes, progress)
    if scan.lines == 0:
        raise DataError(f"{source}: no data lines")
    if users_path is not None:
        _UserIds(users_path, scan.lines).close()  # fail before the long pass, not after
    encoder: _Encoder
    if counter is not None:
        encoder = _VocabEncoder(counter.kept(options["threshold"]), rare_bucket=options["threshold"] > 1)
        counter = None  # free the counts; the encoder keeps only the kept values
    else:
        encoder = _HashEncoder(max_ind_range, options["hash_table_size"])
    method = _split_method(options["split"], scan.lines)
    fractions = options["val_fraction"], options["test_fraction"]

    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        rows = scan.lines - scan.bad_lines
        result = _write_pass(source, tmp, parser, encoder, users_path, scan.lines,
                             split_sizes(method, rows, *fractions), chunk_bytes, progress)
        if result.rows != rows:
            # Hashing mode does not parse in the scan, so skipped lines show up only now:
            # the split boundaries depend on the row count, so write again with the true one.
            log.info("%s: %d bad lines skipped; rewriting with the exact row count",
                     source, result.bad_lines)
            rows = result.rows
            result = _write_pass(source, tmp, parser, encoder, users_path, scan.lines,
                                 split_sizes(method, rows, *fractions), chunk_bytes, progress)
            if result.rows != rows:
                raise DataError(f"{source} changed while it was being preprocessed")
        max_index = encoder.finish(tmp, result.max_index, chunk_bytes)
        metadata = _metadata(source, scan, result, encoder, max_index, method, options, users_path)
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        _commit(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metadata


def _warn_empty_splits(output: Path, splits: Mapping[str, int], val_fraction: float,
                       test_fraction: float) -> None:
    """An empty val or test split is allowed, but the user should know before training."""
    rows = sum(splits.values())
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if splits[name]:
            continue
        if fraction == 0:
            why, fix = f"{name}_fraction is 0", f"set model.preproc.{name}_fraction > 0"
        else:
            why, fix = f"only {rows} rows", "preprocess more data"
        log.warning("%s: the %s split is empty (%s), so there will be no %s metrics; to have "
                    "them, %s and preprocess again", output, name, why, name, fix)


def _metadata(source: Path, scan: "_Scan", result: "_Written", encoder: "_Encoder",
              max_index: List[int], method: str, options: Dict[str, Any],
              users_path: Optional[Path]) -> Dict[str, Any]:
    """metadata.json: the layout readers check, plus what is needed to reproduce the run."""
    return {
        "format_version": FORMAT_VERSION,
        "written_by": WRITTEN_BY,
        "num_dense": NUM_DENSE,
        "num_sparse": NUM_SPARSE,
        "table_sizes": encoder.table_sizes,
        "max_index": max_index,
        "splits": result.splits,
        "split_method": method,
        "options": options,
        "source": {"path": str(source.resolve()), "bytes": scan.bytes, "sha256": scan.sha256},
        "lines": scan.lines,
        "bad_lines_skipped": result.bad_lines,
        "has_users": users_path is not None,
        "users_file": str(users_path.resolve()) if users_path is not None else None,
    }


HASH_TABLE_SIZES = ("occurring", "fixed")


def check_options(*, max_ind_range: int = -1, hash_table_size: str = "occurring", threshold: int = 0,
                  split: str = "auto", val_fraction: float = 0.05, test_fraction: float = 0.05,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  dataset_config: Optional[Mapping[str, Any]] = None, prefix: str = "",
                  where: str = "") -> None:
    """Refuse option values that would fail late or silently produce a wrong dataset.

    Raises DataError (one line on the command line); ``prefix`` is put before each key
    (``"model.preproc."``) so the message names it as the user wrote it, after ``where``
    (the config file).
    """
    def fail(key: str, expected: str, value: Any) -> None:
        raise DataError(f"{where}{prefix}{key} must be {expected}, got {value!r}")

    if not _is_int(max_ind_range) or max_ind_range > np.iinfo(np.int32).max:
        fail("max_ind_range", "an int below 2**31 = 2147483648 (indices are int32; "
             "<= 0 means one row per distinct value)", max_ind_range)
    if hash_table_size not in HASH_TABLE_SIZES:
        fail("hash_table_size", "'occurring' (a row per hashed value that occurs, like the reference "
             "DLRM) or 'fixed' (max_ind_range rows per table)", hash_table_size)
    if not _is_int(threshold):
        fail("threshold", "an int", threshold)
    if split not in ("auto", "fraction"):
        fail("split", "'auto' or 'fraction'", split)
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not _is_number(value) or not 0.0 <= float(value) < 1.0:
            fail(key, "a number in [0, 1)", value)
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"{where}{prefix}val_fraction + {prefix}test_fraction must be < 1 (the rest is the "
                        f"training split), got {val_fraction} + {test_fraction}")
    if not _is_int(chunk_bytes) or not 1 << 10 <= chunk_bytes <= 1 << 30:
        fail("chunk_bytes", "between 1 KiB and 1 GiB", chunk_bytes)
    if dataset_config is not None and not isinstance(dataset_config, Mapping):
        fail("dataset_config", "a mapping such as {'name': 'kaggle'}", dataset_config)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _find_users_file(source: Path, users_file: str | os.PathLike | None) -> Optional[Path]:
    """The latent user ids: given explicitly, or ``<datafile>.users.npy`` from the generator."""
    if users_file is not None:
        path = Path(users_file)
        if not path.is_file():
            raise DataError(f"users file {path} does not exist")
        return path
    candidates = [source.with_name(source.name + ".users.npy")]
    if source.suffix == ".gz":  # the generator's file, compressed afterwards
        candidates.append(source.with_name(source.stem + ".users.npy"))
    return next((c for c in candidates if c.is_file()), None)


# --------------------------------------------------------------------------------------
# splits


def reference_split_sizes(rows: int, days: int = REFERENCE_DAYS) -> Dict[str, int]:
    """The DLRM reference split of Kaggle: ``days`` near-equal days, like ``np.array_split``.

    Days 0..days-2 are train; the last day is halved, first half test, second half val.
    """
    base, extras = divmod(rows, days)
    day_sizes = [base + (1 if d < extras else 0) for d in range(days)]
    last = day_sizes[-1]
    test = (last + 1) // 2
    return {"train": sum(day_sizes[:-1]), "val": last - test, "test": test}


def fraction_split_sizes(rows: int, val_fraction: float, test_fraction: float) -> Dict[str, int]:
    """Tail split: the last ``test_fraction`` then ``val_fraction`` of the rows are held out.

    Each held-out split with a positive fraction gets at least one row when rows >= 3.
    """
    test = int(rows * test_fraction)
    val = int(rows * val_fraction)
    if rows >= 3:
        test = max(test, 1 if test_fraction > 0 else 0)
        val = max(val, 1 if val_fraction > 0 else 0)
    return {"train": rows - test - val, "val": val, "test": test}


def _split_method(split: str, lines: int) -> str:
    return "reference_7day" if split == "auto" and lines == REFERENCE_LINES else "fraction"


def split_sizes(method: str, rows: int, val_fraction: float, test_fraction: float) -> Dict[str, int]:
    """Rows per split for ``method`` ('reference_7day' or 'fraction')."""
    if method == "reference_7day":
        return reference_split_sizes(rows)
    return fraction_split_sizes(rows, val_fraction, test_fraction)


# --------------------------------------------------------------------------------------
# reading blocks of whole lines


class _CountingReader:
    """File wrapper that hashes and reports the raw bytes as they are read."""

    def __init__(self, raw: BinaryIO, hasher: Any = None, bar: Any = None) -> None:
        self.raw, self.hasher, self.bar = raw, hasher, bar
        self.mode, self.name = "rb", getattr(raw, "name", "")  # what GzipFile looks for

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self._account(data)
        return data

    def readinto(self, buffer: memoryview) -> int:
        n = self.raw.readinto(buffer)
        with memoryview(buffer)[:n] as data:
            self._account(data)
        return n

    def _account(self, data: Any) -> None:
        if self.hasher is not None:
            self.hasher.update(data)
        if self.bar is not None:
            self.bar.update(len(data))


class _Source:
    """The data file opened for one pass: transparently gunzipped, hashed if asked."""

    def __init__(self, path: Path, hasher: Any = None, bar: Any = None) -> None:
        self.path = path
        self.raw = open(path, "rb")
        self.is_gzip = self.raw.read(2) == b"\x1f\x8b"
        self.raw.seek(0)
        self.counter = _CountingReader(self.raw, hasher, bar)
        self.stream: Any = gzip.GzipFile(fileobj=self.counter, mode="rb") if self.is_gzip else self.counter

    def readinto(self, buffer: memoryview) -> int:
        try:
            return self.stream.readinto(buffer)
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise DataError(f"{self.path}: not a valid gzip file ({err})") from None

    def drain(self) -> None:
        """Read what the line reader left (gzip padding), so the hash covers every byte."""
        while self.counter.read(1 << 20):
            pass

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "_Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _iter_chunks(source: _Source, chunk_bytes: int) -> Iterator[Tuple[memoryview, int]]:
    """Blocks of whole lines, each ending in a newline, with their line counts.

    A block is a view into one of two alternating buffers (no copy of the data): it stays
    valid while the next block is prepared, until the one after is asked for. Blank lines
    at the very end of the file are dropped (an empty trailing line is fine); blank lines
    followed by more data stay, and are bad lines.
    """
    buffers = [bytearray(chunk_bytes), bytearray(chunk_bytes)]
    current, filled = 0, 0  # filled: bytes at the start of the buffer not yet handed out
    while True:
        buf = buffers[current]
        if filled == len(buf):  # a line longer than the buffer: grow (never resize: views)
            buffers[current] = bytearray(2 * len(buf))
            buffers[current][:filled] = buf
            buf = buffers[current]
        with memoryview(buf) as view:
            n = source.readinto(view[filled:])
        if not n:
            break
        filled += n
        end = _end_of_content(buf, buf.rfind(b"\n", 0, filled) + 1)
        if not end:
            continue
        yield memoryview(buf)[:end], buf.count(b"\n", 0, end)
        current ^= 1  # carry the partial last line over to the other buffer
        if len(buffers[current]) <= filled - end:
            buffers[current] = bytearray(2 * (filled - end))
        buffers[current][:filled - end] = buf[end:filled]
        filled -= end
    tail = bytes(buffers[current][:filled])
    if tail.strip(b"\r\n"):
        tail = tail if tail.endswith(b"\n") else tail + b"\n"
        yield memoryview(tail), tail.count(b"\n")


def _blocks(path: Path, parser: Optional["_ChunkParser"], chunk_bytes: int, hasher: Any = None,
            bar: Any = None) -> Iterator[Tuple[memoryview, int, Any]]:
    """(block, lines, arrow table) for each block; the table is ``_NOT_READ`` without a parser.

    A worker thread reads and splits the next block while the caller decodes this one:
    file reads, gunzip, hashing and arrow's CSV parser all release the GIL.
    """
    with _Source(path, hasher, bar) as source:
        chunks = _iter_chunks(source, chunk_bytes)

        def prepare() -> Optional[Tuple[memoryview, int, Any]]:
            item = next(chunks, None)
            if item is None:
                source.drain()
                return None
            block, lines = item
            return block, lines, parser.read(block) if parser is not None else _NOT_READ

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrec-preprocess") as pool:
            ahead = pool.submit(prepare)
            while True:
                item = ahead.result()
                if item is None:
                    return
                ahead = pool.submit(prepare)
                yield item


def _end_of_content(buf: bytearray, cut: int) -> int:
    """Index just past the newline of the last non-blank line in ``buf[:cut]`` (0: none)."""
    i = cut - 1
    while i >= 0 and buf[i] in (10, 13):
        i -= 1
    if i < 0:
        return 0
    return buf.index(b"\n", i + 1) + 1


# --------------------------------------------------------------------------------------
# parsing one block


@dataclass
class _Rows:
    """The decoded good lines of one block."""

    label: np.ndarray  # float32 [n]
    dense: np.ndarray  # float32 [n, 13], already log(x + 1)
    values: np.ndarray  # uint64 [26, n]: hex value of each categorical, 0 where missing
    missing: np.ndarray  # bool [26, n]
    kept: Optional[np.ndarray]  # bool [lines in the block]: lines kept; None = all of them

    def __len__(self) -> int:
        return len(self.label)

    @property
    def bad_lines(self) -> int:
        return 0 if self.kept is None else int(len(self.kept) - np.count_nonzero(self.kept))

    def select(self, keep: np.ndarray) -> "_Rows":
        return _Rows(self.label[keep], self.dense[keep], self.values[:, keep],
                     self.missing[:, keep], keep)


class _ChunkParser:
    """Parses blocks of lines; fast and vectorized, precise line by line only on failure."""

    def __init__(self, source_name: str, has_label: bool, skip_bad_lines: bool) -> None:
        self.source_name = source_name
        self.has_label = has_label
        self.skip_bad_lines = skip_bad_lines
        self.names = (("label",) if has_label else ()) + DENSE_NAMES + SPARSE_NAMES
        self.warned = 0
        self.parse_options = pacsv.ParseOptions(
            delimiter="\t", quote_char=False, escape_char=False, double_quote=False,
            newlines_in_values=False, ignore_empty_lines=False)
        self.convert_options = pacsv.ConvertOptions(
            column_types={name: pa.binary() for name in self.names}, strings_can_be_null=False)

    def check_first_line(self, block: memoryview) -> None:
        """Recognize the labeled/unlabeled mix-up up front, with a clear message."""
        fields = _nth_line(block, 0).rstrip(b"\r").count(b"\t") + 1
        if self.has_label and fields == len(self.names) - 1:
            raise DataError(
                f"{self.source_name} line 1: {fields} tab-separated fields: this looks like an "
                f"unlabeled Criteo test file; labeled files have {len(self.names)} fields "
                "(pass has_label=False for unlabeled files)")
        if not self.has_label and fields == len(self.names) + 1:
            raise DataError(
                f"{self.source_name} line 1: {fields} tab-separated fields: this looks like a "
                f"labeled file, but has_label=False expects {len(self.names)}")

    def parse(self, block: memoryview, lines: int, first_line: int, table: Any = _NOT_READ) -> _Rows:
        """Decode ``block`` (``lines`` lines from ``first_line``); bad lines raise or are skipped.

        ``table`` is the block's :meth:`read` result when a worker thread already made it.
        """
        if table is _NOT_READ:
            table = self.read(block)
        if table is not None and table.num_rows == lines:
            rows, bad = self._decode(table)
            if not bad.any():
                return rows
            for index in np.flatnonzero(bad):
                if self.warned >= MAX_WARNINGS:
                    break  # further skipped lines are counted, not described
                problem = _line_problem(_nth_line(block, int(index)), self.names)
                self._bad_line(first_line + int(index), problem or "a value the decoder rejected")
            return rows.select(~bad)
        return self._parse_line_by_line(block, first_line)

    def _parse_line_by_line(self, block: memoryview, first_line: int) -> _Rows:
        """The slow path: validate each line in Python, then decode the good ones."""
        lines = bytes(block).split(b"\n")[:-1]
        keep = np.ones(len(lines), dtype=bool)
        for i, line in enumerate(lines):
            problem = _line_problem(line, self.names)
            if problem is not None:
                self._bad_line(first_line + i, problem)
                keep[i] = False
        good = b"".join(line + b"\n" for line, k in zip(lines, keep, strict=True) if k)
        table = self.read(good) if good else self._read_empty()
        if table is None or table.num_rows != int(keep.sum()):
            raise DataError(f"{self.source_name} lines {first_line}-{first_line + len(lines) - 1}: "
                            "could not parse these lines although each looks valid")
        rows, bad = self._decode(table)
        if bad.any():
            raise DataError(f"{self.source_name} line {first_line + int(np.flatnonzero(keep)[np.argmax(bad)])}: "
                            "a value the decoder rejected")
        rows.kept = keep
        return rows

    def _bad_line(self, line_number: int, problem: str) -> None:
        message = f"{self.source_name} line {line_number}: {problem}"
        if not self.skip_bad_lines:
            raise DataError(message + " (pass skip_bad_lines=True to skip such lines)")
        if self.warned < MAX_WARNINGS:
            self.warned += 1
            log.warning("skipping %s%s", message,
                        "; further skipped lines are only counted" if self.warned == MAX_WARNINGS else "")

    def read(self, block: Any) -> Optional[pa.Table]:
        """Split ``block`` into columns of raw bytes; None when a line does not fit."""
        options = pacsv.ReadOptions(column_names=list(self.names), use_threads=True,
                                    block_size=max(1 << 20, len(block) // 2 + 1))  # one part per core
        try:
            return pacsv.read_csv(pa.py_buffer(block), read_options=options,
                                  parse_options=self.parse_options,
                                  convert_options=self.convert_options)
        except pa.ArrowInvalid:
            return None

    def _read_empty(self) -> pa.Table:
        return pa.table({name: pa.array([], pa.binary()) for name in self.names})

    def _decode(self, table: pa.Table) -> Tuple[_Rows, np.ndarray]:
        """Numbers from the byte columns, and which rows hold an invalid value."""
        n = table.num_rows
        bad = np.zeros(n, dtype=bool)
        label = np.zeros(n, dtype=np.float32)
        if self.has_label:
            label = _per_chunk(table.column("label"), _decode_label, bad)
        dense = np.empty((NUM_DENSE, n), dtype=np.float32)
        for j, name in enumerate(DENSE_NAMES):
            dense[j] = _per_chunk(table.column(name), _decode_dense, bad)
        values = np.empty((NUM_SPARSE, n), dtype=np.uint64)
        missing = np.empty((NUM_SPARSE, n), dtype=bool)
        for j, name in enumerate(SPARSE_NAMES):
            column = table.column(name)
            values[j] = _per_chunk(column, _decode_hex, bad)
            missing[j] = _per_chunk(column, _empty, bad)
        return _Rows(label, np.ascontiguousarray(dense.T), values, missing, None), bad


def _line_problem(line: bytes, names: Sequence[str]) -> Optional[str]:
    """What is wrong with one line (the field and the value), or None if it is valid.

    Mirrors the vectorized decoders exactly: a line is rejected here iff it is there.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line:
        return f"empty line (expected {len(names)} tab-separated fields)"
    fields = line.split(b"\t")
    if len(fields) != len(names):
        return f"expected {len(names)} tab-separated fields, got {len(fields)}"
    for number, (name, value) in enumerate(zip(names, fields, strict=True), start=1):
        where = f"field {number} ({name})"
        if name == "label":
            if value not in (b"0", b"1"):
                return f"{where}: expected 0 or 1, got {_show(value)}"
        elif name.startswith("I"):
            if value and not _DEC_RE.fullmatch(value):
                too_long = re.fullmatch(rb"-?[0-9]+", value) is not None
                expected = f"an integer of at most {MAX_DEC_DIGITS} digits" if too_long else "an integer"
                return f"{where}: expected {expected}, got {_show(value)}"
        elif value and not _HEX_RE.fullmatch(value):
            too_long = re.fullmatch(rb"[0-9a-fA-F]+", value) is not None
            expected = f"at most {MAX_HEX_DIGITS} hex digits" if too_long else "a hex string"
            return f"{where}: expected {expected}, got {_show(value)}"
    return None


def _nth_line(block: memoryview, index: int) -> bytes:
    """Line ``index`` (0-based) of a block, without its newline (for checks and messages)."""
    data = block.obj  # blocks are prefixes of a bytes/bytearray buffer
    start = 0
    for _ in range(index):
        start = data.find(b"\n", start, len(block)) + 1
    return bytes(data[start:data.find(b"\n", start, len(block))])


def _show(value: bytes, limit: int = 40) -> str:
    text = value.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --------------------------------------------------------------------------------------
# vectorized decoders over arrow binary columns


def _per_chunk(column: pa.ChunkedArray, decode: Any, bad: np.ndarray) -> np.ndarray:
    """Apply ``decode`` to each arrow chunk of ``column``; OR its invalid rows into ``bad``."""
    parts = []
    start = 0
    for chunk in column.chunks:
        offsets, data = _buffers(chunk)
        values, invalid = decode(offsets, data)
        parts.append(values)
        bad[start:start + len(chunk)] |= invalid
        start += len(chunk)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0)


def _buffers(chunk: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """Offsets [n + 1] and bytes of an arrow binary array, without copying."""
    if chunk.null_count:
        raise AssertionError("binary CSV columns never hold nulls")
    _, offsets_buf, data_buf = chunk.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=len(chunk) + 1,
                            offset=chunk.offset * 4)
    if data_buf is None or data_buf.size == 0:
        return offsets, np.zeros(0, dtype=np.uint8)
    return offsets, np.frombuffer(data_buf, dtype=np.uint8)


def _empty(offsets: np.ndarray, data: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    lengths = np.diff(offsets)
    return lengths == 0, np.zeros(len(lengths), dtype=bool)


def _decode_label(offsets: np.ndarray, data: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Label bytes '0'/'1' -> float32; anything else (empty included) is invalid."""
    lengths = np.diff(offsets)
    n = len(lengths)
    if n and (lengths == 1).all():
        digit = data[offsets[0]:offsets[-1]] - np.uint8(ord("0"))  # other bytes wrap above 1
        return digit.astype(np.float32), digit > 1
    label = np.zeros(n, dtype=np.float32)
    single = lengths == 1
    digit = data[offsets[:-1][single]] - np.uint8(ord("0")) if single.any() else np.zeros(0, np.uint8)
    label[single] = digit
    bad = ~single
    bad[single] = digit > 1
    return label, bad


def _decode_dense(offsets: np.ndarray, data: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Integer feature -> log(max(x, 0) + 1) as float32; missing -> 0.

    Fast path: when every byte is a digit or '-' and no value is too long, arrow's cast
    accepts exactly ``-?[0-9]+`` (what the line check accepts); anything else, or a cast
    failure, goes through the exact numpy decoder, which also flags the invalid rows.
    """
    lengths = np.diff(offsets)
    if not data.size or not len(lengths):
        return np.zeros(len(lengths), dtype=np.float32), np.zeros(len(lengths), dtype=bool)
    if (lengths.max() <= MAX_DEC_DIGITS
            and np.take(_DEC_SIGN_TABLE, data[offsets[0]:offsets[-1]]).max() != _INVALID):
        present = np.packbits(lengths > 0, bitorder="little")
        strings = pa.Array.from_buffers(pa.binary(), len(lengths), [
            pa.py_buffer(present), pa.py_buffer(offsets), pa.py_buffer(data)])
        try:
            values = pc.cast(strings, pa.int64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            pass
        else:  # float64 with NaN where missing: fmax turns NaN and negatives into 0
            return np.log1p(np.fmax(values, 0.0)).astype(np.float32), np.zeros(len(lengths), dtype=bool)
    return _decode_dense_exact(offsets, data)


def _decode_dense_exact(offsets: np.ndarray, data: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The numpy decoder behind :func:`_decode_dense`: handles and flags every input."""
    starts = offsets[:-1]
    lengths = np.diff(offsets)
    negative = np.zeros(len(lengths), dtype=bool)
    nonempty = lengths > 0
    negative[nonempty] = data[starts[nonempty]] == ord("-")
    values, bad = _decode_digits(offsets, data, _DEC_TABLE, 10, MAX_DEC_DIGITS,
                                 starts=starts + negative)
    bad |= negative & (lengths == 1)  # a lone '-'
    values[negative] = 0  # negatives -> 0
    return np.log1p(values.astype(np.float64)).astype(np.float32), bad


def _decode_hex(offsets: np.ndarray, data: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Categorical hex string -> uint64 value; missing -> 0."""
    return _decode_digits(offsets, data, _HEX_TABLE, 16, MAX_HEX_DIGITS)


def _decode_digits(offsets: np.ndarray, data: np.ndarray, table: np.ndarray, base: int,
                   max_digits: int, starts: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Value of each string ``data[starts[i]:offsets[i + 1]]`` written in ``base``.

    ``starts`` defaults to ``offsets[:-1]`` (whole strings; a sign is skipped by the caller).
    Returns (uint64 values, invalid rows). Empty strings are 0. A string longer than
    ``max_digits`` or with a non-digit byte is invalid. Strings of one common length (the
    usual 8-digit Criteo hex) are decoded as a reshaped block; others through a
    right-aligned [n, width] window of byte indices.
    """
    contiguous = starts is None
    if starts is None:
        starts = offsets[:-1]
    ends = offsets[1:]
    lengths = ends - starts
    n = len(lengths)
    values = np.zeros(n, dtype=np.uint64)
    bad = lengths > max_digits
    width = min(int(lengths.max()) if n else 0, max_digits)
    if width == 0:
        return values, bad
    nonempty = lengths > 0
    if contiguous and (lengths[nonempty] == width).all():
        digits = np.take(table, data[offsets[0]:offsets[-1]]).reshape(-1, width)
        values[nonempty] = _fold(digits, base)
        if digits.max() == _INVALID:  # rare: find the rows only then
            bad[nonempty] |= (digits == _INVALID).any(axis=1)
        return values, bad
    index = ends[:, None] - np.int32(width) + np.arange(width, dtype=np.int32)
    inside = index >= starts[:, None]
    digits = np.take(table, data[np.maximum(index, 0)])
    digits[~inside] = 0
    bad |= (digits == _INVALID).any(axis=1)
    digits[digits == _INVALID] = 0
    return _fold(digits, base), bad


def _fold(digits: np.ndarray, base: int) -> np.ndarray:
    """Combine [n, width] digit columns, most significant first, into uint64 values."""
    values = digits[:, 0].astype(np.uint64)
    scale = np.uint64(base)
    for c in range(1, digits.shape[1]):
        values *= scale
        values += digits[:, c]
    return values


# --------------------------------------------------------------------------------------
# categorical encoders


class _VocabCounter:
    """Per-column value counts, merged block by block: memory O(vocabulary), not O(lines).

    Each block's counts (a hash-based ``value_counts``) wait in a list and are merged into
    the sorted totals once they outgrow them, so the O(V log V) merge runs only a few times.
    """

    def __init__(self) -> None:
        self.keys: List[np.ndarray] = [np.zeros(0, np.uint64) for _ in range(NUM_SPARSE)]
        self.counts: List[np.ndarray] = [np.zeros(0, np.int64) for _ in range(NUM_SPARSE)]
        self.pending: List[List[Tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(NUM_SPARSE)]
        self.pending_size = [0] * NUM_SPARSE

    def add(self, rows: _Rows) -> None:
        for j in range(NUM_SPARSE):
            counted = pc.value_counts(pa.array(rows.values[j][~rows.missing[j]]))
            keys = counted.field("values").to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
            counts = counted.field("counts").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            self.pending[j].append((keys, counts))
            self.pending_size[j] += len(keys)
            if self.pending_size[j] > max(len(self.keys[j]), 1 << 20):
                self._merge(j)

    def _merge(self, j: int) -> None:
        parts = [(self.keys[j], self.counts[j])] + self.pending[j]
        self.keys[j], self.counts[j] = _merge_counts(parts)
        self.pending[j], self.pending_size[j] = [], 0

    def kept(self, threshold: int) -> List[np.ndarray]:
        """Sorted values seen at least ``threshold`` times, per column (all if <= 1)."""
        out = []
        for j in range(NUM_SPARSE):
            self._merge(j)
            keys = self.keys[j] if threshold <= 1 else self.keys[j][self.counts[j] >= threshold]
            out.append(keys)
        return out


def _merge_counts(parts: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    if len(keys) == 0:
        return keys, counts
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[starts], np.add.reduceat(counts, starts)


class _Encoder:
    table_sizes: List[int]

    def encode(self, rows: _Rows) -> np.ndarray:  # int32 [n, 26]
        raise NotImplementedError

    def finish(self, folder: Path, max_index: List[int], chunk_bytes: int) -> List[int]:
        """Last touches to the written splits in ``folder``; returns the final max index per column."""
        return max_index


class _HashEncoder(_Encoder):
    """index = hex value modulo ``max_ind_range`` (missing counts as value 0).

    With ``table_size="occurring"`` the written indices are renumbered at the end to
    0..k-1 per column (k = hashed values that occur) and each table gets k rows, as in
    the reference DLRM; with ``"fixed"`` every table keeps ``max_ind_range`` rows.
    """

    def __init__(self, max_ind_range: int, table_size: str = "occurring") -> None:
        self.modulus = np.uint64(max_ind_range)
        self.table_sizes = [int(max_ind_range)] * NUM_SPARSE
        self.occurring: Optional[List[OccurringValues]] = None
        if table_size == "occurring":
            self.occurring = [OccurringValues(max_ind_range) for _ in range(NUM_SPARSE)]

    def encode(self, rows: _Rows) -> np.ndarray:
        hashed = (rows.values % self.modulus).astype(np.int32)  # [26, n]
        if self.occurring is not None:  # a second write pass records the same values again
            for column, occurring in zip(hashed, self.occurring, strict=True):
                occurring.add(column)
        return hashed.T

    def finish(self, folder: Path, max_index: List[int], chunk_bytes: int) -> List[int]:
        if self.occurring is None:
            return max_index
        ranks = [occurring.ranks() for occurring in self.occurring]
        self.occurring = None  # the rank tables hold all that is still needed
        block_rows = max(1, chunk_bytes // (4 * NUM_SPARSE))
        for name in SPLIT_NAMES:
            renumber_sparse(folder / name / "sparse.npy", ranks, block_rows)
        self.table_sizes = [max(rank.count, 1) for rank in ranks]
        # ranks keep the order of the hashed values: the largest written one becomes k - 1
        return [rank.count - 1 if m >= 0 else -1 for rank, m in zip(ranks, max_index, strict=True)]


class _VocabEncoder(_Encoder):
    """Index 0 = missing, 1 = rare values (with a threshold), then kept values in order."""

    def __init__(self, kept: List[np.ndarray], rare_bucket: bool) -> None:
        self.kept = kept
        self.first = 2 if rare_bucket else 1
        self.table_sizes = [self.first + len(k) for k in kept]

    def encode(self, rows: _Rows) -> np.ndarray:
        """Look up each block's distinct values only (hash-encoded), then expand."""
        out = np.empty((len(rows), NUM_SPARSE), dtype=np.int32)
        for j, kept in enumerate(self.kept):
            encoded = pc.dictionary_encode(pa.array(rows.values[j]))
            distinct = encoded.dictionary.to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
            position = np.searchsorted(kept, distinct)
            found = np.zeros(len(distinct), dtype=bool)
            if len(kept):
                found = kept[np.minimum(position, len(kept) - 1)] == distinct
            if self.first == 1 and not found.all():  # all values were counted: all are kept
                found |= ~np.isin(np.arange(len(distinct)), encoded.indices.to_numpy()[~rows.missing[j]])
                if not found.all():
                    raise DataError("the data file changed while it was being preprocessed "
                                    "(a value the scan did not see)")
            code = np.where(found, position + self.first, 1).astype(np.int32)  # 1: rare bucket
            index = code[encoded.indices.to_numpy(zero_copy_only=False)]
            index[rows.missing[j]] = 0
            out[:, j] = index
        return out


# --------------------------------------------------------------------------------------
# the two passes


@dataclass
class _Scan:
    lines: int
    bad_lines: int
    bytes: int
    sha256: str


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from fedrec.utilities.console import progress_bar, progress_enabled

    if not progress_enabled(enabled):
        return None
    return progress_bar(True, total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _scan(path: Path, parser: _ChunkParser, counter: Optional[_VocabCounter], chunk_bytes: int,
          progress: bool) -> _Scan:
    """First pass: lines, sha256 of the raw bytes and, in vocabulary mode, value counts."""
    hasher = hashlib.sha256()
    bar = _progress_bar(path.stat().st_size, f"{path.name}: scan", progress)
    lines = bad = 0
    try:
        # closing(): an error mid-file must stop the read-ahead thread here and now, not
        # whenever (and on whichever thread) the garbage collector finalizes the generator.
        with contextlib.closing(_blocks(path, parser if counter is not None else None,
                                        chunk_bytes, hasher, bar)) as blocks:
            for block, block_lines, table in blocks:
                if lines == 0:
                    parser.check_first_line(block)
                if counter is not None:
                    rows = parser.parse(block, block_lines, lines + 1, table)
                    counter.add(rows)
                    bad += rows.bad_lines
                lines += block_lines
    finally:
        if bar is not None:
            bar.close()
    return _Scan(lines, bad, path.stat().st_size, hasher.hexdigest())


class _NpyWriter:
    """Appends rows to a ``.npy`` file whose final shape is known up front.

    Plain writes rather than a writable memmap: pages written through a shared mapping
    count in the process RSS until unmapped, which would grow with the output size.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: Tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.rows = 0
        self.file = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": shape}
        np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, array: np.ndarray) -> None:
        if self.rows + len(array) > self.shape[0]:
            raise AssertionError(f"{self.path}: more rows than the {self.shape[0]} counted")
        self.file.write(np.ascontiguousarray(array, dtype=self.dtype).data)
        self.rows += len(array)

    def close(self) -> None:
        self.file.close()


class _SplitWriter:
    """Routes consecutive rows to the train, test and val files (in file order)."""

    def __init__(self, folder: Path, sizes: Mapping[str, int], with_users: bool) -> None:
        self.sizes = dict(sizes)
        self.row = 0
        self.ranges: List[Tuple[str, int, int]] = []
        start = 0
        for name in FILE_ORDER:
            self.ranges.append((name, start, start + sizes[name]))
            start += sizes[name]
        self.writers: Dict[str, Dict[str, _NpyWriter]] = {}
        for name in SPLIT_NAMES:
            n = sizes[name]
            (folder / name).mkdir(exist_ok=True)
            files = {
                "dense": _NpyWriter(folder / name / "dense.npy", np.float32, (n, NUM_DENSE)),
                "sparse": _NpyWriter(folder / name / "sparse.npy", np.int32, (n, NUM_SPARSE)),
                "label": _NpyWriter(folder / name / "label.npy", np.float32, (n,)),
            }
            if with_users:
                files["user"] = _NpyWriter(folder / name / "user.npy", np.int64, (n,))
            self.writers[name] = files

    def write(self, arrays: Mapping[str, np.ndarray]) -> None:
        n = len(arrays["label"])
        for name, start, stop in self.ranges:
            lo, hi = max(start, self.row), min(stop, self.row + n)
            if lo < hi:
                for key, writer in self.writers[name].items():
                    writer.write(arrays[key][lo - self.row:hi - self.row])
        self.row += n

    def close(self) -> None:
        for files in self.writers.values():
            for writer in files.values():
                writer.close()


class _UserIds:
    """Latent user ids, one per line, read sequentially (no memmap: RSS stays flat)."""

    def __init__(self, path: Path, lines: int) -> None:
        self.path = path
        self.file = open(path, "rb")
        try:
            version = np.lib.format.read_magic(self.file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _fortran_order, dtype = read_header(self.file)
        except ValueError as err:
            self.file.close()
            raise DataError(f"users file {path}: not a .npy file ({err})") from None
        if len(shape) != 1 or dtype.kind not in "iu" or dtype.hasobject:
            self.file.close()
            raise DataError(f"users file {path}: expected a 1-D integer array, got {dtype} {shape}")
        if shape[0] != lines:
            self.file.close()
            raise DataError(f"users file {path} has {shape[0]} ids but the data file has {lines} lines")
        self.dtype = dtype

    def read(self, n: int) -> np.ndarray:
        data = self.file.read(n * self.dtype.itemsize)
        if len(data) != n * self.dtype.itemsize:
            raise DataError(f"users file {self.path} is truncated")
        return np.frombuffer(data, dtype=self.dtype).astype(np.int64)

    def close(self) -> None:
        self.file.close()


@dataclass
class _Written:
    rows: int
    bad_lines: int
    splits: Dict[str, int]
    max_index: List[int]  # largest index written per column (-1: no rows)


def _write_pass(path: Path, folder: Path, parser: _ChunkParser, encoder: _Encoder,
                users_path: Optional[Path], lines: int, sizes: Mapping[str, int],
                chunk_bytes: int, progress: bool) -> _Written:
    """Second pass: parse, encode and append each block to the split files."""
    writer = _SplitWriter(folder, sizes, users_path is not None)
    users = _UserIds(users_path, lines) if users_path is not None else None
    bar = _progress_bar(path.stat().st_size, f"{path.name}: write", progress)
    seen = bad = 0
    max_index = np.full(NUM_SPARSE, -1, dtype=np.int64)
    try:
        with contextlib.closing(_blocks(path, parser, chunk_bytes, bar=bar)) as blocks:
            for block, block_lines, table in blocks:
                rows = parser.parse(block, block_lines, seen + 1, table)
                arrays = {"dense": rows.dense, "sparse": encoder.encode(rows), "label": rows.label}
                if writer.row + len(rows) > sum(sizes.values()) or seen + block_lines > lines:
                    raise DataError(f"{path} changed while it was being preprocessed")
                if users is not None:
                    ids = users.read(block_lines)
                    arrays["user"] = ids if rows.kept is None else ids[rows.kept]
                writer.write(arrays)
                if len(rows):
                    np.maximum(max_index, arrays["sparse"].max(axis=0), out=max_index)
                seen += block_lines
                bad += rows.bad_lines
    finally:
        writer.close()
        if users is not None:
            users.close()
        if bar is not None:
            bar.close()
    if seen != lines:
        raise DataError(f"{path} changed while it was being preprocessed ({seen} lines, {lines} before)")
    return _Written(writer.row, bad, {name: int(sizes[name]) for name in SPLIT_NAMES},
                    [int(m) for m in max_index])
