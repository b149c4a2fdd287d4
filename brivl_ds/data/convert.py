"""Convert image-text data to Parquet shards (the format in shards.py), on every core, restartable.

  python -m brivl_ds.data.convert official --jsonl example.jsonl --image-root imgs/ --out shards/
  python -m brivl_ds.data.convert pairs --input crawl.csv --image-root crawl/ --out shards/ --dedup

Inputs (subcommands)
  official  BriVL JSONL: {"image_id": path, "sentences": [[kind, text], ...], "bbox": [[x1, y1, x2, y2], ...]}, boxes
            in original pixels. `image_id` paths are relative to where the official scripts ran, so an image is
            looked up as <image-root>/<image_id>, then as <image-root>/<file name>. `text` is the --text-kind
            sentence (default sur_text), stripped; `texts` keeps every sentence with its kind.
  pairs     CSV or TSV with a header row, or JSONL (by file suffix): an image path (relative to --image-root, or
            absolute), a caption and optional boxes (--image-column / --text-column / --boxes-column; in CSV the
            boxes are a JSON string such as "[[1, 2, 30, 40]]", empty = none). TSV is read without quoting.

How it runs
  The parent streams the input once and only notes where each chunk of --rows-per-shard input rows starts (a byte
  offset); chunk n becomes part-{n:05d}.parquet, written by a worker process that reads its own rows. The output is
  byte-identical whatever --workers is. A finished shard gets a sidecar part-{n:05d}.json (manifest entry and
  counts per reason), written after the shard; a re-run skips chunks whose shard and sidecar agree, and refuses to
  run if the input (path, size, mtime) or an option that changes the output differs from convert-settings.json.
  Partial files (*.tmp) are discarded. manifest.json is written last, with the total report. One converter per --out.

What is kept
  Images are stored as read for JPEG (MPO too: a JPEG with extra frames after it), PNG and WebP; GIF, BMP and TIFF
  are re-encoded to PNG (first frame; counted as "re-encoded to PNG"); any other file is "undecodable" (PIL's other
  plugins are not even tried: EPS would run Ghostscript on crawled bytes). Pixel orientation stays raw, no EXIF
  transpose: the official code and the detector boxes use the raw orientation. Every image is decoded once to catch
  truncation (JPEGs at 1/8 scale with PIL's draft, about twice as fast; it still entropy-decodes every byte).
  width * height is checked from the header before decoding (--max-pixels). The default is PIL's own limit
  (89,478,485): every kept image then opens in PIL without a DecompressionBombWarning, photos up to ~9,400 px square
  are kept, and the worst full decode (a non-JPEG at the limit) needs ~270 MB of RGB per worker; lower it on hosts
  with little memory per core. PIL itself refuses images over twice its limit, whatever --max-pixels says.

Report (printed at the end, returned by main() and the API, stored in manifest.json)
  Bad rows never stop a run: each is dropped and counted under one reason (keys starting with "dropped: ").
  "zero-size image" is an empty file; PIL rejects a 0-pixel JPEG/PNG header itself, counted as undecodable.
  Boxes are clipped to the image and dropped when not 4 numbers, NaN/inf, inverted (x2 < x1 or y2 < y1: another
  convention such as xywh, not something to repair silently), or under 1 px wide or high after clipping; the row
  stays. Box counts cover the rows that passed the row checks, before --dedup.

When a worker dies
  A decoder that segfaults, or the OOM killer, kills a worker process, not the run: the pool is replaced, and each
  chunk it held (the pool does not say which one killed it) is redone by a thread of the parent in fresh processes
  of its own, one after the other, each recording the input row it is decoding. A process that dies on a row is
  followed by one decoding that row alone; if that one dies too, the row is dropped and counted under its real
  signal, "dropped: worker crashed (SIGSEGV)" or "dropped: worker killed (SIGKILL, OOM?)", listed in the sidecar's
  "crashed rows", and the chunk is redone without it. Its shard is then byte-identical to one whose bad rows were
  dropped for any other reason; a chunk of only such rows ends with all of them dropped (each try drops one more
  row). Rows that kill a worker only in company (memory growing over a chunk) are not dropped: after 3 such deaths
  of one chunk the run stops with an error, and a restart resumes it. --workers 1 runs in-process and has no such
  isolation: a crash there ends the converter (restart it with --workers 2 or more).
  Fault drill: --fault-crash-rows 2,9 makes the process decoding input rows 2 and 9 (counted from 1 after any
  header, blank lines not counted) kill itself with --fault-crash-signal (default SIGSEGV) just before the decoder
  runs: the real recovery above follows. A row dropped before its image is decoded (missing file, empty text) does
  not crash. It needs --workers 2 or more. It is not a setting that restarts compare, as real crashes are not: it
  stands in for a fault of the machine, and a drilled shard counts its dropped rows in its sidecar as a real crash
  does. Drill on a scratch --out.

--dedup drops exact duplicates (same image_sha256), keeping the first occurrence in input order, after all shards
exist: one pass reads only the image_sha256 column of every shard and rewrites the shards holding later copies
(peak ~250 bytes of memory per row, ~7.5 GB for 30M rows). It is idempotent, so restarts simply run it again.

Python API (for scripts and the benchmark): convert_official(jsonl, image_root, out, workers=None, **options) and
convert_pairs(input, image_root, out, workers=None, **options) take Options fields as keywords and return the
report, which also has "seconds" and "rows/s" (input rows converted by this run per second). workers > 1 spawns
processes, so call them from a script under `if __name__ == "__main__":`; workers=1 runs in-process.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections import Counter, deque
from concurrent.futures import (FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor,
                                as_completed, wait)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from brivl_ds.data.shards import MANIFEST, ROW_GROUP_BYTES, Row, ShardWriter, write_manifest

log = logging.getLogger(__name__)

VERSION = 1  # bump when the same input and options would give different shards
MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS
SETTINGS = "convert-settings.json"
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # the only PIL plugins tried (JPEG also opens MPO)
STORED_AS_IS = {"JPEG", "MPO", "PNG", "WEBP"}
PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}

READ, WRITTEN = "rows read", "rows written"
BAD_UTF8 = "dropped: invalid UTF-8"
BAD_JSON = "dropped: invalid JSON"
MALFORMED = "dropped: malformed row"
NO_TEXT = "dropped: empty text"
MISSING = "dropped: missing image file"
UNREADABLE = "dropped: unreadable image file"
ZERO_SIZE = "dropped: zero-size image"
TOO_LARGE = "dropped: image too large"
UNDECODABLE = "dropped: undecodable image"
DUPLICATE = "dropped: duplicate image"
UNEXPECTED = "dropped: unexpected error"
REENCODED = "re-encoded to PNG"
BAD_BOXES_FIELD = "rows with an invalid boxes field"
BOXES_READ, BOXES_KEPT, BOXES_CLIPPED = "boxes read", "boxes kept", "boxes clipped"
BOX_NOT_NUMBERS = "boxes dropped: not 4 numbers"
BOX_NOT_FINITE = "boxes dropped: NaN/inf"
BOX_INVERTED = "boxes dropped: inverted"
BOX_EMPTY = "boxes dropped: under 1 px after clipping"
CRASH_SIGNALS = ("SIGSEGV", "SIGKILL", "SIGABRT", "SIGBUS")  # what --fault-crash-signal offers
UNCONFIRMED_DEATHS = 3  # a chunk's worker may die this often on rows that then decode fine alone
COUNTS = [READ, WRITTEN, BAD_UTF8, BAD_JSON, MALFORMED, NO_TEXT, MISSING, UNREADABLE, ZERO_SIZE, TOO_LARGE,
          UNDECODABLE, DUPLICATE, UNEXPECTED, REENCODED, BAD_BOXES_FIELD, BOXES_READ, BOXES_KEPT, BOXES_CLIPPED,
          BOX_NOT_NUMBERS, BOX_NOT_FINITE, BOX_INVERTED, BOX_EMPTY]


class Drop(Exception):
    """A row that cannot be converted; `reason` is its report key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ConvertError(Exception):
    """A problem with the command itself (input, columns, --out): reported without a traceback."""


class SettingsMismatch(ConvertError):
    """--out holds a conversion made with other settings: resuming it would mix two outputs."""


@dataclass(frozen=True)
class Options:
    kind: str  # "official" or "pairs"
    input: Path
    image_root: Path
    out: Path
    text_kind: str = "sur_text"  # official
    image_column: str = "image"  # pairs
    text_column: str = "caption"
    boxes_column: str = "boxes"
    rows_per_shard: int = 10_000
    dedup: bool = False
    max_pixels: int = MAX_PIXELS
    row_group_bytes: int = ROW_GROUP_BYTES
    source: str = ""  # default: the input's file name
    header: tuple[str, ...] = ()  # CSV/TSV column names, read by the parent
    data_offset: int = 0  # where the rows start (after a CSV header)
    fault_crash_rows: tuple[int, ...] = ()  # the fault drill: input rows (from 1) whose decode kills the worker
    fault_crash_signal: str = "SIGSEGV"

    @property
    def format(self) -> str:
        if self.kind == "official":
            return "jsonl"
        suffix = self.input.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return suffix[1:]
        if suffix in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        raise ConvertError(f"pairs input must end in .csv, .tsv or .jsonl: {self.input}")


@dataclass(frozen=True)
class Chunk:
    n: int  # shard number
    offset: int  # byte offset of its first row
    rows: int  # input rows in it


@dataclass
class Pair:
    """One parsed input row, before its image is read."""
    id: str
    images: list[Path]  # candidate paths, first existing one wins
    text: str
    texts: list[dict]
    boxes: object  # raw boxes value, cleaned once the image size is known


# ---------------------------------------------------------------- reading input rows

def _jsonl_rows(f, offset: int) -> Iterator[tuple[int, bytes]]:
    """(end offset, line) of every non-blank line from `offset`."""
    f.seek(offset)
    end = offset
    for line in f:
        end += len(line)
        if line.strip():
            yield end, line


def _csv_rows(f, offset: int, tsv: bool) -> Iterator[tuple[int, list[str] | None]]:
    """(end offset, fields) of every CSV record from `offset`; fields is None for a record csv cannot parse.
    Lines are decoded with surrogateescape so one bad byte only spoils its own row."""
    end = offset

    def lines():
        nonlocal end
        for raw in f:
            end += len(raw)  # the reader pulls exactly the lines of one record, so `end` is where it stops
            yield raw.decode("utf-8", "surrogateescape")

    f.seek(offset)
    reader = csv.reader(lines(), delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(lines())
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error:  # e.g. a quote left open ran past the field size limit; the reader restarts cleanly
            yield end, None
            continue
        if fields:  # blank lines are not rows
            yield end, fields


def input_rows(opts: Options, f, offset: int) -> Iterator[tuple[int, object]]:
    if opts.format == "jsonl":
        return _jsonl_rows(f, offset)
    return _csv_rows(f, offset, opts.format == "tsv")


def read_header(opts: Options) -> Options:
    """For CSV/TSV: the column names and where the rows start; checks the named columns exist."""
    if opts.format == "jsonl":
        return opts
    with open(opts.input, "rb") as f:
        end, header = next(input_rows(opts, f, 0), (0, None))
    if not header:
        raise ConvertError(f"{opts.input}: no header row")
    header = [header[0].removeprefix("\ufeff"), *header[1:]]  # a BOM from spreadsheet exports
    missing = [c for c in (opts.image_column, opts.text_column) if c not in header]
    if missing:
        raise ConvertError(f"{opts.input}: no column {missing} in header {header}")
    return replace(opts, header=tuple(header), data_offset=end)


def scan_chunks(opts: Options) -> Iterator[Chunk]:
    """Every chunk of rows_per_shard input rows, streaming the input once."""
    with open(opts.input, "rb") as f:
        n, count, start = 0, 0, opts.data_offset
        for end, _ in input_rows(opts, f, opts.data_offset):
            count += 1
            if count == opts.rows_per_shard:
                yield Chunk(n, start, count)
                n, count, start = n + 1, 0, end
        if count:
            yield Chunk(n, start, count)


# ---------------------------------------------------------------- parsing rows

def _json_object(raw: bytes) -> dict:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Drop(BAD_UTF8) from None
    try:
        record = json.loads(line.lstrip("\ufeff"))
    except (ValueError, RecursionError):
        raise Drop(BAD_JSON) from None
    if not isinstance(record, dict):
        raise Drop(MALFORMED)
    return record


def _is_sentences(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s) for s in value)


def parse_official(raw: bytes, opts: Options) -> Pair:
    record = _json_object(raw)
    image_id, sentences = record.get("image_id"), record.get("sentences")
    if not isinstance(image_id, str) or not image_id or not _is_sentences(sentences):
        raise Drop(MALFORMED)
    text = next((t for kind, t in sentences if kind == opts.text_kind), "")
    texts = [{"kind": kind, "text": t} for kind, t in sentences]
    candidates = [opts.image_root / image_id, opts.image_root / Path(image_id).name]
    return Pair(image_id, candidates, text, texts, record.get("bbox"))


def _pair(opts: Options, path, caption, boxes) -> Pair:
    if not isinstance(path, str) or not path:
        raise Drop(MALFORMED)
    caption = "" if caption is None else caption
    if not isinstance(caption, str):
        raise Drop(MALFORMED)
    texts = [{"kind": opts.text_column, "text": caption}]
    return Pair(path, [opts.image_root / path], caption, texts, boxes)


def parse_pairs_jsonl(raw: bytes, opts: Options) -> Pair:
    record = _json_object(raw)
    return _pair(opts, record.get(opts.image_column), record.get(opts.text_column), record.get(opts.boxes_column))


def parse_pairs_csv(fields: list[str] | None, opts: Options) -> Pair:
    if fields is None or len(fields) != len(opts.header):
        raise Drop(MALFORMED)
    if not all(_valid_utf8(f) for f in fields):
        raise Drop(BAD_UTF8)
    record = dict(zip(opts.header, fields))
    return _pair(opts, record[opts.image_column], record[opts.text_column], record.get(opts.boxes_column) or None)


def parse(record, opts: Options) -> Pair:
    if opts.kind == "official":
        return parse_official(record, opts)
    return parse_pairs_jsonl(record, opts) if opts.format == "jsonl" else parse_pairs_csv(record, opts)


def _valid_utf8(s: str) -> bool:
    """False for lone surrogates: bytes that were not UTF-8 (surrogateescape) or JSON escapes such as \\ud800."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ---------------------------------------------------------------- images

def read_image(candidates: list[Path]) -> bytes:
    for path in candidates:
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:  # permission denied, a directory, I/O error
            raise Drop(UNREADABLE) from None
        except ValueError:  # a NUL byte in the path
            raise Drop(MALFORMED) from None
    raise Drop(MISSING)


def check_image(data: bytes, max_pixels: int) -> tuple[bytes, int, int, bool]:
    """(bytes to store, width, height, re-encoded) of an image that fully decodes; raises Drop otherwise."""
    if not data:
        raise Drop(ZERO_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError:
            raise Drop(TOO_LARGE) from None
        except Exception:
            raise Drop(UNDECODABLE) from None
        with image:
            width, height = image.size  # raw orientation, from the header
            if width <= 0 or height <= 0:
                raise Drop(ZERO_SIZE)
            if width * height > max_pixels:
                raise Drop(TOO_LARGE)
            try:
                if image.format in ("JPEG", "MPO"):
                    image.draft(image.mode, (1, 1))  # decode at 1/8 scale: truncation still raises
                image.load()
                if image.format in STORED_AS_IS:
                    return data, width, height, False
                return _png(image), width, height, True
            except Exception:
                raise Drop(UNDECODABLE) from None


def _png(image: Image.Image) -> bytes:
    if image.mode not in PNG_MODES:
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- boxes

def clean_box(box, width: int, height: int) -> tuple[list[float] | None, str | None]:
    """A box clipped to the image: (box, None), (clipped box, BOXES_CLIPPED), or (None, the reason it is dropped)."""
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        return None, BOX_NOT_NUMBERS
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except OverflowError:  # an integer too large for a float
        return None, BOX_NOT_FINITE
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, BOX_NOT_FINITE
    if x2 < x1 or y2 < y1:
        return None, BOX_INVERTED
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        return None, BOX_EMPTY
    return clipped, BOXES_CLIPPED if clipped != [x1, y1, x2, y2] else None


def clean_boxes(raw, width: int, height: int, report: Counter) -> list[list[float]]:
    if isinstance(raw, str):  # CSV, or a JSONL file that stores boxes as a JSON string
        try:
            raw = json.loads(raw) if raw.strip() else None
        except (ValueError, RecursionError):
            report[BAD_BOXES_FIELD] += 1
            return []
    if raw is None:
        return []
    if not isinstance(raw, list):
        report[BAD_BOXES_FIELD] += 1
        return []
    kept = []
    for box in raw:
        report[BOXES_READ] += 1
        box, note = clean_box(box, width, height)
        if note:
            report[note] += 1
        if box is not None:
            report[BOXES_KEPT] += 1
            kept.append(box)
    return kept


# ---------------------------------------------------------------- one chunk -> one shard (in a worker)

def to_row(pair: Pair, opts: Options, report: Counter, row: int = 0) -> Row:
    strings = [pair.id, *(t[k] for t in pair.texts for k in ("kind", "text"))]
    if not all(_valid_utf8(s) for s in strings):
        raise Drop(BAD_UTF8)
    text = pair.text.strip()
    if not text:
        raise Drop(NO_TEXT)
    data = read_image(pair.images)
    if row in opts.fault_crash_rows:  # the fault drill: die right where a decoder crash would, with a real signal
        os.kill(os.getpid(), signal.Signals[opts.fault_crash_signal])
    image, width, height, reencoded = check_image(data, opts.max_pixels)
    report[REENCODED] += reencoded
    boxes = clean_boxes(pair.boxes, width, height, report)
    return Row(id=pair.id, image=image, width=width, height=height, text=text, boxes=boxes, texts=pair.texts,
               source=opts.source)


def shard_name(n: int) -> str:
    return f"part-{n:05d}.parquet"


def sidecar_path(out: Path, n: int) -> Path:
    return out / f"part-{n:05d}.json"


def _finish(writer: ShardWriter) -> dict | None:
    """Close a shard; an empty one is removed (None) so readers never see a file without row groups."""
    entry = writer.close()
    if entry["rows"] == 0:
        writer.path.unlink()
        return None
    return entry


def _write_json(path: Path, body: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


_progress = None  # in a worker: the shared row counter the parent shows in its progress bar
_row_now = None  # in a process of _run_alone: where it writes the input row it is converting (0: none)


def _init_worker(counter) -> None:
    global _progress
    _progress = counter
    pa.set_cpu_count(1)  # one process per core already


def _tick(rows: int) -> None:
    if _progress is not None and rows:
        with _progress.get_lock():
            _progress.value += rows


def _row_or_none(record, opts: Options, report: Counter, row: int) -> Row | None:
    """The converted input row, or None with the reason counted."""
    if _row_now is not None:
        _row_now.value = row
    try:
        return to_row(parse(record, opts), opts, report, row)
    except Drop as drop:
        report[drop.reason] += 1
    except Exception as err:  # a bug must not cost a 30M-row run: counted, logged, visible in the report
        log.warning("input row %d: unexpected %r", row, err)
        report[UNEXPECTED] += 1
    finally:
        if _row_now is not None:  # a death from here on (writing the shard) is no row's fault
            _row_now.value = 0
    return None


def convert_chunk(opts: Options, chunk: Chunk, crashed: dict[int, str] | None = None) -> dict:
    """Convert one chunk to its shard and sidecar; returns the sidecar. `crashed`: {input row: reason} of rows
    that kill the process decoding them (found by _isolate), dropped undecoded."""
    crashed = crashed or {}
    report: Counter = Counter()
    writer = ShardWriter(opts.out / shard_name(chunk.n), opts.row_group_bytes)
    first = chunk.n * opts.rows_per_shard  # input rows before this chunk: every chunk but the last is full
    with open(opts.input, "rb") as f:
        for i, (_, record) in enumerate(islice(input_rows(opts, f, chunk.offset), chunk.rows), 1):
            if i % 64 == 0:
                _tick(64)
            report[READ] += 1
            if first + i in crashed:
                report[crashed[first + i]] += 1
                continue
            row = _row_or_none(record, opts, report, first + i)
            if row is not None:
                writer.add(row)
                report[WRITTEN] += 1
    _tick(chunk.rows % 64)
    sidecar = {"chunk": chunk.n, "offset": chunk.offset, "input_rows": chunk.rows, "entry": _finish(writer),
               "report": dict(report), "crashed rows": sorted(crashed)}
    _write_json(sidecar_path(opts.out, chunk.n), sidecar)  # after the shard: a sidecar means the shard is done
    return sidecar


def convert_row(opts: Options, chunk: Chunk, row: int) -> None:
    """Decode one input row of a chunk, write nothing: does it kill the process on its own?"""
    with open(opts.input, "rb") as f:
        _, record = next(islice(input_rows(opts, f, chunk.offset), row - chunk.n * opts.rows_per_shard - 1, None))
    _row_or_none(record, opts, Counter(), row)


# ---------------------------------------------------------------- when a worker dies

def crash_reason(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == signal.SIGKILL:  # what the OOM killer sends; nothing in the process itself raises it
        return f"dropped: worker killed ({name}, OOM?)"
    return f"dropped: worker crashed ({name})"


def _alone(row_now, fn, *args) -> None:
    global _row_now
    _row_now = row_now
    pa.set_cpu_count(1)
    fn(*args)


def _run_alone(context, fn, *args) -> tuple[int, int]:
    """fn(*args) in a fresh process of its own: (exit code, -signal if it died; the input row it died on or 0)."""
    row_now = context.RawValue("q", 0)  # one writer, read after it exits: no lock needed
    process = context.Process(target=_alone, args=(row_now, fn, *args), daemon=True)
    process.start()
    process.join()
    return process.exitcode, row_now.value


def _isolate(opts: Options, chunk: Chunk, context) -> dict:
    """Convert a chunk whose pool broke under it (runs in a parent thread; returns the sidecar). Each try is a
    fresh process; one that dies on a row is followed by one decoding only that row: if that dies too, the row is
    dropped under its signal and the chunk tried again without it. Bounded: every try drops one more row of the
    chunk or counts toward UNCONFIRMED_DEATHS; a try that skips every row decodes nothing."""
    crashed: dict[int, str] = {}
    unconfirmed = 0
    while True:
        code, row = _run_alone(context, convert_chunk, opts, chunk, crashed)
        if code == 0:
            return json.loads(sidecar_path(opts.out, chunk.n).read_text())
        if code > 0:  # a Python error, not a death: multiprocessing printed its traceback
            raise RuntimeError(f"chunk {chunk.n}: converting it in a process of its own failed (exit code {code})")
        alone = _run_alone(context, convert_row, opts, chunk, row)[0] if row else 0
        if alone < 0:
            crashed[row] = crash_reason(-alone)
            log.warning("input row %d %s decoding it, on its own too", row, crashed[row])
            continue
        unconfirmed += 1
        if unconfirmed == UNCONFIRMED_DEATHS:
            raise ConvertError(f"chunk {chunk.n}: its worker died {unconfirmed} times ({crash_reason(-code)}), but no "
                               f"row kills a process on its own: out of memory (try fewer --workers)? A restart "
                               f"resumes the conversion.")


def finished_sidecar(out: Path, chunk: Chunk) -> dict | None:
    """The chunk's sidecar when it and the shard on disk agree (the chunk needs no redoing), else None."""
    try:
        sidecar = json.loads(sidecar_path(out, chunk.n).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if (sidecar.get("offset"), sidecar.get("input_rows")) != (chunk.offset, chunk.rows):
        return None
    shard, entry = out / shard_name(chunk.n), sidecar.get("entry")
    if entry is None:
        return None if shard.exists() else sidecar
    return sidecar if shard.is_file() and shard.stat().st_size == entry["bytes"] else None


# ---------------------------------------------------------------- exact-duplicate removal

def find_duplicates(out: Path, sidecars: dict[int, dict]) -> dict[int, list[int]]:
    """{shard number: row indices} of every row whose image_sha256 appeared earlier in input order."""
    parts = []
    for n in sorted(sidecars):
        if sidecars[n]["entry"]:
            sha = pq.read_table(out / sidecars[n]["entry"]["path"], columns=["image_sha256"]).column(0)
            order = pa.array((n << 32) + np.arange(len(sha), dtype=np.int64))  # shard, then row: input order
            parts.append(pa.table({"sha": sha, "order": order}))
    if not parts:
        return {}
    table = pa.concat_tables(parts)
    first = table.group_by("sha").aggregate([("order", "min")]).column("order_min")
    later = table.filter(pc.invert(pc.is_in(table["order"], value_set=first)))["order"].to_numpy()
    shards, starts = np.unique(later >> 32, return_index=True)  # `later` is sorted: one run per shard
    rows = np.split(later & 0xFFFFFFFF, starts[1:])
    return {int(n): r.tolist() for n, r in zip(shards, rows)}


def drop_rows(opts: Options, sidecar: dict, rows: list[int]) -> dict:
    """Rewrite one shard without the given rows (one row group in memory at a time); returns the new sidecar."""
    path, drop = opts.out / sidecar["entry"]["path"], set(rows)
    writer = ShardWriter(path, opts.row_group_bytes)
    index = 0
    with pq.ParquetFile(path) as shard:
        for g in range(shard.num_row_groups):
            for record in shard.read_row_group(g).to_pylist():
                if index not in drop:
                    writer.add(Row(**record))
                index += 1
    report = Counter(sidecar["report"])
    report[DUPLICATE] += len(drop)
    report[WRITTEN] -= len(drop)
    new = {**sidecar, "entry": _finish(writer), "report": dict(report)}
    _write_json(sidecar_path(opts.out, sidecar["chunk"]), new)
    return new


# ---------------------------------------------------------------- the run

class _Inline(Executor):
    """--workers 1: run in this process (simple tracebacks, a debugger works)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:
            future.set_exception(err)
        return future


def settings_of(opts: Options) -> dict:
    """What the output depends on: the input file as it is now and every option except --out, --workers and the
    fault drill (which stands in for a machine fault, as real crashes do not enter the settings either)."""
    stat = opts.input.stat()
    options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()
               if k not in ("out", "fault_crash_rows", "fault_crash_signal")}
    options["header"] = list(opts.header)
    return {"converter": VERSION, **options, "input_bytes": stat.st_size, "input_mtime_ns": stat.st_mtime_ns}


def prepare_out(opts: Options) -> dict:
    """Create or resume --out: refuse other settings, discard partial files and the (now stale) manifest."""
    out, settings = opts.out, settings_of(opts)
    out.mkdir(parents=True, exist_ok=True)
    if (out / SETTINGS).exists():
        old = json.loads((out / SETTINGS).read_text())
        changed = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(old.keys() | settings.keys())
                   if old.get(k) != settings.get(k)]
        if changed:
            raise SettingsMismatch(f"{out} was converted with other settings ({'; '.join(changed)}); resuming "
                                   f"would mix two outputs. Use a new --out, or delete {out} to start over.")
    elif any(out.glob("part-*")) or (out / MANIFEST).exists():
        raise SettingsMismatch(f"{out} holds shards but no {SETTINGS}: not a conversion this tool can resume. "
                               f"Use an empty --out.")
    else:
        _write_json(out / SETTINGS, settings)
    for leftover in out.glob("*.tmp"):
        leftover.unlink()
    (out / MANIFEST).unlink(missing_ok=True)
    return settings


def _convert_chunks(opts: Options, workers: int, pools: list[Executor], new_pool, context, counter, bar: tqdm,
                    run: Counter) -> dict[int, dict]:
    """Convert every unfinished chunk, at most `workers` at a time: when a worker dies, every chunk its pool held
    is a suspect (the pool does not say which one killed it), so few are in flight. pools[-1] is the live pool."""
    sidecars, backlog, running = {}, deque(), {}  # running: future -> (chunk, its pool; None: _isolate)
    chunks, total = scan_chunks(opts), 0
    isolate = ThreadPoolExecutor(workers)  # a thread per suspect chunk, waiting on one process at a time
    try:
        while chunks or backlog or running:
            if chunks:  # scan on while the workers convert
                chunk = next(chunks, None)
                total += chunk.rows if chunk else 0
                if chunk is None:
                    chunks, bar.total = None, total
                    bar.refresh()
                elif (done := finished_sidecar(opts.out, chunk)) is None:
                    backlog.append(chunk)
                else:
                    sidecars[chunk.n], run["shards reused"] = done, run["shards reused"] + 1
                    with counter.get_lock():
                        counter.value += chunk.rows
            while backlog and len(running) < workers:
                chunk = backlog.popleft()
                try:
                    future = pools[-1].submit(convert_chunk, opts, chunk)
                except BrokenProcessPool:  # broke before any of its futures told us
                    pools.append(new_pool())
                    future = pools[-1].submit(convert_chunk, opts, chunk)
                running[future] = chunk, pools[-1]
            finished, _ = wait(running, timeout=0 if chunks else 0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                chunk, pool = running.pop(future)
                try:
                    sidecar = future.result()
                except BrokenProcessPool:  # a worker died (segfault, OOM kill): the pool is gone with its chunks
                    if pool is pools[-1]:
                        pools.append(new_pool())
                    running[isolate.submit(_isolate, opts, chunk, context)] = chunk, None
                    continue
                sidecars[sidecar["chunk"]] = sidecar
                run["shards converted"] += 1
                run["shards redone in isolation"] += pool is None
                run["converted rows"] += sidecar["input_rows"]
            bar.update(counter.value - bar.n)
    finally:
        isolate.shutdown(wait=True, cancel_futures=True)
    return sidecars


def _dedup(opts: Options, pool: Executor, sidecars: dict[int, dict], run: Counter, progress: bool) -> None:
    duplicates = find_duplicates(opts.out, sidecars)
    futures = [pool.submit(drop_rows, opts, sidecars[n], rows) for n, rows in duplicates.items()]
    for future in tqdm(as_completed(futures), total=len(futures), desc="dedup", unit="shard", disable=not progress):
        sidecar = future.result()
        sidecars[sidecar["chunk"]] = sidecar
        run["shards rewritten by dedup"] += 1


def total_report(sidecars: dict[int, dict]) -> dict:
    totals: Counter = Counter()
    for sidecar in sidecars.values():
        totals.update(sidecar["report"])
    return {**{key: totals[key] for key in COUNTS}, **{k: v for k, v in sorted(totals.items()) if k not in COUNTS}}


def default_workers() -> int:
    """Every core this process may run on (a batch scheduler's CPU set, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _process_pool(workers: int, context, counter) -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(counter,))
    # Start every worker now, with a no-op each. CPython 3.11's pool spawns a worker after waking its manager
    # thread, which then may watch only the older workers for deaths until its next result: a crash went unnoticed
    # until another worker finished its chunk (which then was not redone). A result after all spawns closes that.
    for _ in range(workers):
        pool.submit(int)
    return pool


def _spawnable() -> bool:
    """Spawned workers re-import __main__ from its file; a script piped to python on stdin has none."""
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    return main_file is None or os.path.exists(main_file)


def convert(opts: Options, workers: int | None = None, progress: bool = True) -> dict:
    """Convert (or resume converting) `opts.input` into `opts.out`; returns the report."""
    started = time.perf_counter()
    opts = replace(opts, input=opts.input.resolve(), image_root=opts.image_root.resolve(), out=Path(opts.out),
                   source=opts.source or opts.input.name)
    if not opts.input.is_file():
        raise ConvertError(f"no such input file: {opts.input}")
    if not opts.image_root.is_dir():
        raise ConvertError(f"no such image root: {opts.image_root}")
    if not _valid_utf8(opts.source):
        raise ConvertError(f"--source must be valid UTF-8: {opts.source!r}")
    workers = workers or default_workers()
    if workers > 1 and not _spawnable():
        raise ConvertError("workers > 1 spawns processes, which re-import __main__, and __main__ is not a file "
                           "here (stdin?): run from a script file, or use workers=1")
    if opts.fault_crash_rows and workers == 1:
        raise ConvertError("the fault drill needs worker processes (--workers 2 or more): with --workers 1 the "
                           "converter itself would die")
    if opts.fault_crash_signal not in CRASH_SIGNALS:
        raise ConvertError(f"fault_crash_signal must be one of {CRASH_SIGNALS}: {opts.fault_crash_signal!r}")
    opts = read_header(opts)
    settings = prepare_out(opts)
    context = multiprocessing.get_context("spawn")  # fork after pyarrow started threads can deadlock
    counter = context.Value("q", 0)
    new_pool = _Inline if workers == 1 else partial(_process_pool, workers, context, counter)
    pools = [new_pool()]  # the last one is live; a worker's death breaks a pool and _convert_chunks adds one
    run: Counter = Counter()
    try:
        with tqdm(desc="convert", unit="rows", disable=not progress, smoothing=0.05) as bar:
            sidecars = _convert_chunks(opts, workers, pools, new_pool, context, counter, bar, run)
        if opts.dedup:
            _dedup(opts, pools[-1], sidecars, run, progress)
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
    report = total_report(sidecars)
    entries = [sidecars[n]["entry"] for n in sorted(sidecars) if sidecars[n]["entry"]]
    write_manifest(opts.out, entries, report=report, converter=settings)
    seconds = time.perf_counter() - started
    return {**report, "shards": len(entries), **{k: run[k] for k in
            ("shards converted", "shards redone in isolation", "shards reused", "shards rewritten by dedup")},
            "seconds": round(seconds, 3), "rows/s": round(run["converted rows"] / seconds, 1)}


def convert_official(jsonl: str | Path, image_root: str | Path, out: str | Path, *, workers: int | None = None,
                     progress: bool = False, **options) -> dict:
    """Official BriVL JSONL -> shards; options are Options fields (text_kind, rows_per_shard, dedup, ...)."""
    return convert(Options("official", Path(jsonl), Path(image_root), Path(out), **options), workers, progress)


def convert_pairs(input: str | Path, image_root: str | Path, out: str | Path, *, workers: int | None = None,
                  progress: bool = False, **options) -> dict:
    """CSV/TSV/JSONL image-caption pairs -> shards; options are Options fields (image_column, dedup, ...)."""
    return convert(Options("pairs", Path(input), Path(image_root), Path(out), **options), workers, progress)


def format_report(report: dict) -> str:
    return "\n".join(f"{key:<42} {value:>14,}" if isinstance(value, int) else f"{key:<42} {value:>14,.1f}"
                     for key, value in report.items())


# ---------------------------------------------------------------- command line

def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return number


def _rows(value: str) -> tuple[int, ...]:
    return tuple(sorted({_positive(v) for v in value.split(",")}))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--image-root", type=Path, required=True, help="image paths are relative to this")
    common.add_argument("--out", type=Path, required=True, help="shard directory (created; resumed if it exists)")
    common.add_argument("--workers", type=_positive, default=default_workers(), help="processes (default: every core)")
    common.add_argument("--rows-per-shard", type=_positive, default=10_000, help="input rows per shard")
    common.add_argument("--dedup", action="store_true", help="drop exact duplicate images, keep the first")
    common.add_argument("--max-pixels", type=_positive, default=MAX_PIXELS, help="drop larger images undecoded")
    common.add_argument("--row-group-bytes", type=_positive, default=ROW_GROUP_BYTES, help="image bytes per row group")
    common.add_argument("--source", default="", help="the `source` column (default: the input file name)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--fault-crash-rows", type=_rows, default=(), metavar="ROW[,ROW...]",
                        help="fault drill: the worker decoding these input rows (from 1) kills itself")
    common.add_argument("--fault-crash-signal", choices=CRASH_SIGNALS, default="SIGSEGV",
                        help="the signal of --fault-crash-rows (default: SIGSEGV)")
    parser = argparse.ArgumentParser(prog="python -m brivl_ds.data.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True)
    official = kinds.add_parser("official", parents=[common], help="official BriVL JSONL")
    official.add_argument("--jsonl", type=Path, required=True)
    official.add_argument("--text-kind", default="sur_text", help="the sentence kind the text tower reads")
    pairs = kinds.add_parser("pairs", parents=[common], help="CSV/TSV/JSONL of image path, caption, boxes")
    pairs.add_argument("--input", type=Path, required=True, help=".csv, .tsv or .jsonl")
    pairs.add_argument("--image-column", default="image")
    pairs.add_argument("--text-column", default="caption")
    pairs.add_argument("--boxes-column", default="boxes")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    common = dict(rows_per_shard=args.rows_per_shard, dedup=args.dedup, max_pixels=args.max_pixels,
                  row_group_bytes=args.row_group_bytes, source=args.source, fault_crash_rows=args.fault_crash_rows,
                  fault_crash_signal=args.fault_crash_signal)
    if args.kind == "official":
        opts = Options("official", args.jsonl, args.image_root, args.out, text_kind=args.text_kind, **common)
    else:
        opts = Options("pairs", args.input, args.image_root, args.out, image_column=args.image_column,
                       text_column=args.text_column, boxes_column=args.boxes_column, **common)
    try:
        report = convert(opts, args.workers, progress=not args.no_progress)
    except ConvertError as err:
        parser.exit(2, f"error: {err}\n")
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
