"""Streaming readers for conversation files: JSONL (also .gz), JSON lists / objects, and Parquet.

What other modules use:

- `iter_records(path, max_row_bytes)` yields `(line, obj)` per record of one file, where `obj` is the
  parsed JSON value or a `BadRow` (code + message) for a record that could not be read. `line` is the
  1-based line number where the record starts (JSONL, JSON) or its 1-based row number (Parquet).
- `iter_rows(paths, max_row_bytes, report)` yields rows already normalised to our schema
  (`schema.normalize_row`), after converting preset source schemas (`convert="auto"`); every record
  that cannot be used is counted in `report` (a `SkipReport`) with its file and line, never raised.
- `read_rows(path)` is the same, as a list (small files, tests, the GUI).
- `SkipReport` counts skips by reason code and keeps the first examples; a `sink` callback sees
  every skip (prepare-data writes them all to `<name>_skipped.jsonl`).

Everything streams: a JSONL line longer than `max_row_bytes` is skipped (`too_large`) while reading
at most `max_row_bytes` of it, JSON lists are parsed element by element over a sliding buffer, and
Parquet is read one record batch at a time, so a 1.4 M-row file never sits in memory.

Reason codes produced here (beside those of `schema.RowError`): `bad_json`, `bad_utf8`, `too_large`,
`convert_failed`.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from .presets import auto_convert
from .schema import RowError, normalize_row

try:  # orjson is ~3x faster on the hot path; json is the fallback and the lenient second try
    import orjson as _orjson

    _fast_loads = _orjson.loads
except ImportError:  # pragma: no cover - orjson is normally installed
    _orjson = None
    _fast_loads = json.loads

DEFAULT_MAX_ROW_BYTES = 16 * 1024 * 1024
SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz", ".parquet")
_BOM = b"\xef\xbb\xbf"
_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")
# Bytes that were not UTF-8, as `surrogateescape` decoding leaves them.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")

PathLike = Union[str, Path]


@dataclass(frozen=True)
class BadRow:
    """A record that could not be read (not JSON, not UTF-8, too large). Yielded, never raised."""

    code: str
    message: str


# ------------------------------------------------------------------------------------------------
# Skip accounting
# ------------------------------------------------------------------------------------------------
@dataclass
class SkipReport:
    """Counts skipped rows by reason code; keeps the first `max_examples` as
    `{"file", "line", "code", "message"}`; passes every skip to `sink` when one is given."""

    max_examples: int = 20
    sink: Optional[Callable[[dict], None]] = None
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def add(self, file: PathLike, line: int, code: str, message: str) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1
        rec = {"file": str(file), "line": line, "code": code, "message": message}
        if len(self.examples) < self.max_examples:
            self.examples.append(rec)
        if self.sink is not None:
            self.sink(rec)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())), "examples": list(self.examples)}

    def summary(self) -> str:
        if not self.total:
            return "no rows skipped"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return f"{self.total} row(s) skipped: {parts}"


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def file_format(path: PathLike) -> str:
    """`jsonl`, `json` or `parquet` from the file name; ValueError for anything else."""
    name = Path(path).name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return "jsonl"
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def expand_paths(paths: Union[PathLike, Iterable[PathLike]]) -> list[Path]:
    """Files to read, in order: a directory stands for its supported files (recursive, sorted).
    A missing path is a FileNotFoundError naming it; an unsupported file is a ValueError."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and f.name.lower().endswith(SUPPORTED_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no {', '.join(SUPPORTED_SUFFIXES)} files")
            out.extend(found)
        elif p.exists():
            file_format(p)
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file")
    return out


def _open_binary(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def iter_records(path: PathLike, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[tuple[int, Any]]:
    """Yield `(line, value_or_BadRow)` for each record of one file (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise IsADirectoryError(f"{p}: is a directory; pass its files (or use iter_rows, which expands it)")
    fmt = file_format(p)
    if fmt == "jsonl":
        return _iter_jsonl(p, max_row_bytes)
    if fmt == "json":
        return _iter_json(p, max_row_bytes)
    return _iter_parquet(p)


# -- JSONL -----------------------------------------------------------------------------------------
def _iter_jsonl(path: Path, max_row_bytes: int) -> Iterator[tuple[int, Any]]:
    limit = max_row_bytes + 1
    chunk = min(limit, 1 << 20)
    with _open_binary(path) as f:
        lineno = 0
        while True:
            raw: Any = f.readline(chunk)
            if not raw:
                return
            lineno += 1
            if len(raw) == chunk and not raw.endswith(b"\n"):
                # A long line: gather it into one growing buffer up to the limit (readline(limit)
                # would hold the line twice while building it).
                buf = bytearray(raw)
                raw = None
                while len(buf) < limit:
                    piece = f.readline(min(chunk, limit - len(buf)))
                    if not piece:
                        break
                    buf += piece
                    if piece.endswith(b"\n"):
                        break
                if len(buf) >= limit and not buf.endswith(b"\n"):
                    size = len(buf)
                    del buf  # drop the head before reading on: only one bounded piece is ever alive
                    while True:
                        piece = f.readline(1 << 20)
                        if not piece:
                            break
                        size += len(piece)
                        if piece.endswith(b"\n"):
                            break
                    yield lineno, BadRow("too_large", f"row of {size} bytes is larger than max_row_bytes="
                                         f"{max_row_bytes}; skipped without reading it")
                    continue
                raw = buf
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            if not raw.isspace():
                yield from _parse_line(raw, lineno)


def _parse_line(s: Any, lineno: int) -> Iterator[tuple[int, Any]]:
    try:
        yield lineno, _fast_loads(s)
        return
    except (ValueError, RecursionError):
        pass
    try:
        text = bytes(s).decode("utf-8")
    except UnicodeDecodeError as e:
        yield lineno, BadRow("bad_utf8", f"invalid UTF-8 at byte {e.start} of the line ({e.reason})")
        return
    # The stdlib decoder accepts what orjson refuses (ints over 64 bits, NaN, lone surrogates) and
    # reads several values on one line: `cat a.jsonl b.jsonl` where a.jsonl lacked its final newline.
    pos, n = _WS.match(text).end(), len(text.rstrip(" \t\n\r"))
    while pos < n:
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield lineno, BadRow("bad_json", f"not valid JSON: {e.msg} (column {e.colno})")
            return
        except RecursionError:
            yield lineno, BadRow("bad_json", "JSON nested too deeply")
            return
        yield lineno, value
        pos = _WS.match(text, end).end()


# -- JSON (a list, one object, or several concatenated values) --------------------------------------
class _Scanner:
    """Finds where one JSON value ends without parsing it, across buffer refills: used to step over
    an element that is broken or too large, so one bad element does not lose the rest of the list."""

    _IN_STR = re.compile(r'["\\\n]')
    _OUT_STR = re.compile(r'["{}\[\],\n]')

    _NEXT_ELEMENT = re.compile(r"\n([ \t]*)[{\]]")

    def __init__(self, in_array: bool, indent: int = 0):
        self.in_array = in_array
        self.indent = indent
        self.depth = 0
        self.in_str = False
        self.escape = False
        self.resync = False

    def feed(self, text: str, pos: int) -> tuple[Optional[int], int]:
        """Scan text[pos:]; return (end, pos): end is the index just past the value (None: not yet),
        pos is where to resume scanning after the buffer grows."""
        n = len(text)
        while pos < n:
            if self.resync:
                # Quotes no longer pair up, so depth means nothing: the element ends before the next
                # line that opens an element at its indentation (or closes the list).
                m = self._NEXT_ELEMENT.search(text, pos)
                while m and len(m.group(1)) > self.indent:
                    m = self._NEXT_ELEMENT.search(text, m.end())
                if m:
                    return m.start() + 1, m.start() + 1
                nl = text.rfind("\n", pos)
                return None, (nl if nl >= 0 else n)
            if self.escape:
                self.escape = False
                pos += 1
                continue
            if self.in_str:
                m = self._IN_STR.search(text, pos)
                if not m:
                    return None, n
                c, pos = m.group(), m.end()
                if c == "\\":
                    self.escape = True
                elif c == "\n":  # a raw newline cannot be inside a JSON string: a quote is broken
                    self.in_str = False
                    self.resync = True
                    pos -= 1
                else:
                    self.in_str = False
                continue
            m = self._OUT_STR.search(text, pos)
            if not m:
                return None, n
            c, i = m.group(), m.start()
            pos = m.end()
            if c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                if self.depth == 0:  # the list's own "]" ends the element; a stray bracket is eaten
                    return (i if self.in_array and c == "]" else i + 1), pos
                self.depth -= 1
                if self.depth == 0:
                    return pos, pos
            elif self.depth == 0 and (c == "," or (c == "\n" and not self.in_array)):
                return i, pos
        return None, pos


class _JsonStream:
    """A sliding text buffer over a binary file, with line numbers for positions in it."""

    def __init__(self, f, chunk_size: int):
        self.f = f
        self.chunk_size = chunk_size
        self.dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.line = 1      # line number at buffer index `counted`
        self.counted = 0
        self.first = True

    def read(self, at_least: int = 0) -> int:
        """Append more text, dropping what lies before `pos`; return how far indices shifted."""
        if self.eof:
            return 0
        shift = self.pos
        if shift:
            self.line += self.buf.count("\n", self.counted, shift)
            self.counted = 0
            self.buf = self.buf[shift:]
            self.pos = 0
        data = self.f.read(max(self.chunk_size, at_least))
        if self.first:
            self.first = False
            if data.startswith(_BOM):
                data = data[3:]
        if not data:
            self.eof = True
            self.buf += self.dec.decode(b"", final=True)
        else:
            self.buf += self.dec.decode(data)
        return shift

    def line_at(self, i: int) -> int:
        if i > self.counted:
            self.line += self.buf.count("\n", self.counted, i)
            self.counted = i
        return self.line

    def skip_ws(self) -> bool:
        """Move past whitespace; False at the end of the file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return True
            if self.eof:
                return False
            self.read()


def _iter_json(path: Path, max_row_bytes: int, chunk_size: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    with _open_binary(path) as f:
        s = _JsonStream(f, chunk_size)
        in_array = False
        while s.skip_ws():
            c = s.buf[s.pos]
            if not in_array and c == "[":
                in_array = True  # several lists one after another (`cat a.json b.json`) read as one
                s.pos += 1
                continue
            if in_array and c == "]":
                in_array = False
                s.pos += 1
                continue
            if c == ",":  # separators are not checked: a missing or doubled comma costs nothing
                s.pos += 1
                continue
            yield from _json_value(s, in_array, max_row_bytes)
        if in_array:
            yield s.line_at(s.pos), BadRow("bad_json", "JSON list is not closed with ']' (truncated file?)")


def _json_value(s: _JsonStream, in_array: bool, max_row_bytes: int) -> Iterator[tuple[int, Any]]:
    line = s.line_at(s.pos)
    try:
        value, end = _DECODER.raw_decode(s.buf, s.pos)
        # A number at the very end of the buffer may continue in the next chunk.
        if end < len(s.buf) or s.eof or isinstance(value, (dict, list, str)):
            yield line, _checked(s, value, end, max_row_bytes)
            return
    except (json.JSONDecodeError, RecursionError):
        pass
    # Either the value is cut by the buffer end or it is broken: find its end without parsing.
    nl = s.buf.rfind("\n", 0, s.pos)
    scanner = _Scanner(in_array, indent=s.pos - nl - 1)
    scan = s.pos
    while True:
        end, scan = scanner.feed(s.buf, scan)
        if end is not None:
            end = max(end, s.pos + 1)  # always make progress
            break
        if len(s.buf) - s.pos > max_row_bytes:
            # Too large: stream over the rest of it, keeping nothing.
            size = len(s.buf) - s.pos
            while end is None and not s.eof:
                s.pos = len(s.buf)
                s.read()
                size += len(s.buf)
                end, scan = scanner.feed(s.buf, 0)
            s.pos = end if end is not None else len(s.buf)
            yield line, BadRow("too_large", f"element of {size} characters or more is larger than "
                               f"max_row_bytes={max_row_bytes}; skipped")
            return
        if s.eof:
            s.pos = len(s.buf)
            yield line, BadRow("bad_json", "JSON value is cut off at the end of the file")
            return
        shift = s.read(at_least=len(s.buf) - s.pos)  # grow geometrically: linear time for big values
        scan -= shift
    try:
        value, dec_end = _DECODER.raw_decode(s.buf[:end], s.pos)
        if _WS.match(s.buf, dec_end, end).end() != end:
            raise json.JSONDecodeError("extra data after the value", s.buf, dec_end)
    except json.JSONDecodeError as e:
        err_line = s.line_at(max(s.pos, min(e.pos, end)))
        s.pos = end
        yield line, BadRow("bad_json", f"not valid JSON: {e.msg} (at line {err_line})")
        return
    except RecursionError:
        s.pos = end
        yield line, BadRow("bad_json", "JSON nested too deeply")
        return
    yield line, _checked(s, value, end, max_row_bytes)


def _checked(s: _JsonStream, value: Any, end: int, max_row_bytes: int) -> Any:
    start = s.pos
    s.pos = end
    if end - start > max_row_bytes:
        return BadRow("too_large", f"element of {end - start} characters is larger than max_row_bytes={max_row_bytes}")
    m = _ESCAPED_BYTE.search(s.buf, start, end)
    if m:
        return BadRow("bad_utf8", f"invalid UTF-8 byte 0x{ord(m.group()) - 0xDC00:02x} in this element")
    return value


# -- Parquet ---------------------------------------------------------------------------------------
def _iter_parquet(path: Path, batch_size: int = 1024) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a non-Parquet file
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
    n = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for rec in batch.to_pylist():
            n += 1
            yield n, _drop_null_turn_keys(rec)


def _drop_null_turn_keys(rec: dict) -> dict:
    # Parquet stores turns as structs over the union of all keys, so a ShareGPT turn comes back as
    # {"from": ..., "value": ..., "role": None, ...}; drop the None fields so the turn reads as written.
    for k in ("conversations", "messages", "conversation"):
        turns = rec.get(k)
        if isinstance(turns, list):
            rec[k] = [{a: b for a, b in t.items() if b is not None} if isinstance(t, dict) else t for t in turns]
    return rec


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
Converter = Callable[[dict], dict]


def _resolve_convert(convert: Union[str, Converter, None]) -> Optional[Converter]:
    if convert == "auto":
        return auto_convert
    if convert is None or callable(convert):
        return convert
    raise ValueError(f"convert must be 'auto', None or a function, not {convert!r}")


def normalize_records(records: Iterable[tuple[str, int, Any]], report: Optional[SkipReport] = None,
                      convert: Union[str, Converter, None] = "auto", require_assistant: bool = True,
                      with_location: bool = False) -> Iterator[Any]:
    """Turn `(file, line, value_or_BadRow)` records from any source into normalised rows; skips go to
    `report`. Yields rows, or `(file, line, row)` with `with_location`."""
    conv = _resolve_convert(convert)
    report = report if report is not None else SkipReport()
    for file, line, obj in records:
        if isinstance(obj, BadRow):
            report.add(file, line, obj.code, obj.message)
            continue
        try:
            if conv is not None and isinstance(obj, dict):
                try:
                    obj = conv(obj)
                except RowError:
                    raise
                except (KeyError, TypeError, AttributeError, ValueError) as e:
                    raise RowError("convert_failed", f"source row does not fit the converter: "
                                   f"{type(e).__name__}: {e}") from None
            row = normalize_row(obj, require_assistant=require_assistant)
        except RowError as e:
            report.add(file, line, e.code, e.message)
            continue
        yield (str(file), line, row) if with_location else row


def iter_rows(paths: Union[PathLike, Iterable[PathLike]], max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
              report: Optional[SkipReport] = None, convert: Union[str, Converter, None] = "auto",
              require_assistant: bool = True, with_location: bool = False) -> Iterator[Any]:
    """Normalised rows from one or more files (directories expand to their files), in order.

    convert: "auto" recognises preset source schemas row by row (e.g. Daring-Anteater's top-level
    `system`, Magpie's `instruction`/`response`); None reads our schema only; or a function
    source-row -> row. Unusable records are counted in `report` with file and line.
    Missing files and unsupported types raise before any row is read."""
    files = expand_paths(paths)

    def records():
        for p in files:
            for line, obj in iter_records(p, max_row_bytes):
                yield str(p), line, obj

    return normalize_records(records(), report, convert, require_assistant, with_location)


def read_rows(paths: Union[PathLike, Iterable[PathLike]], max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
              report: Optional[SkipReport] = None, convert: Union[str, Converter, None] = "auto",
              require_assistant: bool = True) -> list[dict]:
    """All normalised rows of the file(s) as a list (skips counted in `report` when given)."""
    return list(iter_rows(paths, max_row_bytes, report, convert, require_assistant))


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def dumps_line(row: Any) -> bytes:
    """One JSONL line (UTF-8, newline included)."""
    if _orjson is not None:
        try:
            return _orjson.dumps(row) + b"\n"
        except TypeError:
            pass  # lone surrogates or odd types: the stdlib escapes them instead of failing
    return (json.dumps(row, ensure_ascii=True, default=str) + "\n").encode("ascii")
