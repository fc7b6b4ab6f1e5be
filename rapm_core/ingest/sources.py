"""Reading prompt files (plain text, CSV, JSONL or COCO captions): format, decoding, fields,
normalisation and de-duplication.

Everything a user can get wrong in a source file stops the ingest with one ``SourceError`` naming
the file, the line and the problem, before anything is written.
"""

from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path
from typing import Iterable, Iterator

from rapm_core.ingest.config import SourceFormat
from storage.errors import SourceError

FORMAT_BY_SUFFIX = {".txt": "txt", ".csv": "csv", ".jsonl": "jsonl", ".json": "coco"}
DEFAULT_FIELDS = ("prompt", "caption", "text")
UTF8_BOM = b"\xef\xbb\xbf"
# Longest first: the UTF-32-LE mark starts with the UTF-16-LE one.
OTHER_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _refuse_utf16_or_32(path: Path, head: bytes) -> None:
    """A UTF-16/32 file (as Windows tools save "Unicode" text) is named as such, not as bad UTF-8."""
    for bom, name in OTHER_BOMS:
        if head.startswith(bom):
            raise SourceError(path, f"the file is {name} (it starts with a {name} byte-order mark); "
                                    f"re-save it as UTF-8", 1)


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _json_problem(err: json.JSONDecodeError) -> str:
    # Some of json's messages end in "at" ("Unterminated string starting at"), meant to be
    # followed by a position.
    return f"invalid JSON: {err.msg.removesuffix(' at')} at column {err.colno}"


# Far past any text encoder's context (CLIP reads 77 tokens); a longer "prompt" is a broken file.
MAX_PROMPT_CHARS = 10_000
# Characters that print nothing and are not whitespace to str.split (zero-width space, joiners,
# word joiner, BOM): a prompt of only these is blank.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def normalize_prompt(text: str) -> str:
    text = " ".join(text.split())
    return text if text.translate(INVISIBLE).strip() else ""


def detect_format(path: str | Path, fmt: SourceFormat = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMAT_BY_SUFFIX:
        raise SourceError(path, f"cannot tell the format from the extension {suffix or '(none)'!r}; "
                                f"pass --format txt, csv, jsonl or coco")
    return FORMAT_BY_SUFFIX[suffix]


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Lines with their endings kept (csv needs them); a BOM is dropped, bad UTF-8 named by line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                _refuse_utf16_or_32(path, raw)
                raw = raw.removeprefix(UTF8_BOM)
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SourceError(path, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                                        f"re-save the file as UTF-8", lineno) from None


def _bounded(path: Path, text: str, line: int | None, where: str = "") -> str:
    if len(text) > MAX_PROMPT_CHARS and len(text.strip()) > MAX_PROMPT_CHARS:
        raise SourceError(path, f"{where}prompt of {len(text.strip()):,} characters; prompts are limited to "
                                f"{MAX_PROMPT_CHARS:,} (a text encoder reads far fewer)", line)
    return text


def _read_txt(path: Path) -> Iterator[str]:
    for lineno, line in _decoded_lines(path):
        yield _bounded(path, line, lineno)


def _pick_field(path: Path, available: Iterable[str], column: str | None, what: str, line: int | None,
                defaults: tuple[str, ...] = DEFAULT_FIELDS) -> str:
    available = list(available)
    if column is not None:
        if column in available:
            return column
        raise SourceError(path, f"no {what} {column!r}; {what}s here: {', '.join(map(repr, available)) or 'none'}", line)
    for name in defaults:
        if name in available:
            return name
    wanted = ", ".join(map(repr, defaults[:-1])) + f" or {defaults[-1]!r}" if len(defaults) > 1 else repr(defaults[0])
    raise SourceError(path, f"no {wanted} {what}; {what}s here: {', '.join(map(repr, available)) or 'none'}; "
                            f"choose one with --column", line)


def _read_csv(path: Path, column: str | None) -> Iterator[str]:
    lines = (line for _lineno, line in _decoded_lines(path))
    reader = csv.reader(lines, strict=True)
    header, name, index = None, None, None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise SourceError(path, f"malformed CSV: {err}", start) from None
        if header is None:
            if not row:
                continue
            header = row
            name = _pick_field(path, header, column, "column", start)
            index = header.index(name)
            continue
        if not row:
            yield ""
        elif index >= len(row):
            raise SourceError(path, f"row has {len(row)} fields, the header has {len(header)} (no {name!r})", start)
        else:
            yield _bounded(path, row[index], start)


def _jsonl_object(path: Path, line: str, lineno: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise SourceError(path, _json_problem(err), lineno) from None
    if not isinstance(obj, dict):
        raise SourceError(path, f"expected a JSON object, got {type(obj).__name__}", lineno)
    return obj


def _text_value(path: Path, value, name: str, line: int | None, where: str = "") -> str:
    # A null caption is an empty one (counted as blank); any other non-string is a broken file.
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SourceError(path, f"{where}field {name!r} is a {type(value).__name__}, expected a string", line)
    return value


def _read_jsonl(path: Path, column: str | None) -> Iterator[str]:
    name = column
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            yield ""
            continue
        obj = _jsonl_object(path, line, lineno)
        # Without --column the first record picks the field; every later record must have it.
        name = _pick_field(path, obj, name, "field", lineno)
        yield _bounded(path, _text_value(path, obj[name], name, lineno), lineno)


def _read_coco(path: Path, column: str | None) -> Iterator[str]:
    data = path.read_bytes()
    _refuse_utf16_or_32(path, data)
    data = data.removeprefix(UTF8_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SourceError(path, "not valid UTF-8; re-save the file as UTF-8", data[:err.start].count(b"\n") + 1) from None
    if not text.strip():
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceError(path, _json_problem(err), err.lineno) from None
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if isinstance(doc, dict) and "annotations" in doc and not isinstance(annotations, list):
        raise SourceError(path, f"not a COCO captions file: 'annotations' is a JSON "
                                f"{_JSON_TYPES.get(type(annotations), type(annotations).__name__)}, expected a list "
                                f"of {{\"caption\": …}} objects")
    if not isinstance(annotations, list):
        keys = ", ".join(map(repr, doc)) if isinstance(doc, dict) else f"a {type(doc).__name__}"
        raise SourceError(path, f"not a COCO captions file: no 'annotations' list (top level: {keys}); "
                                f"for one JSON object a line use .jsonl or --format jsonl")
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise SourceError(path, f"annotations[{i}] is a {type(ann).__name__}, expected an object")
        name = column or "caption"
        if name not in ann:
            raise SourceError(path, f"annotations[{i}] has no {name!r} field; fields: {', '.join(map(repr, ann))}")
        yield _bounded(path, _text_value(path, ann[name], name, None, f"annotations[{i}]: "), None,
                       f"annotations[{i}]: ")


def read_source(path: str | Path, fmt: SourceFormat = "auto", column: str | None = None) -> Iterator[str]:
    """Raw prompt texts in source order, one per line/row/record, blanks included (as read)."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if fmt == "txt":
        if column is not None:
            raise SourceError(path, "--column applies to csv, jsonl and coco sources, not to plain text")
        return _read_txt(path)
    if fmt == "csv":
        return _read_csv(path, column)
    if fmt == "jsonl":
        return _read_jsonl(path, column)
    return _read_coco(path, column)


def collect_prompts(texts: Iterable[str], limit: int | None = None) -> tuple[list[str], dict[str, int]]:
    """Normalised unique prompts in first-seen order, and how many were read, blank, duplicate.

    With ``limit`` reading stops at the limit-th unique prompt: the rest of the source is not
    looked at (and not counted)."""
    kept: list[str] = []
    seen: set[str] = set()
    counts = {"read": 0, "blank": 0, "duplicates": 0}
    for raw in texts:
        if limit is not None and len(kept) >= limit:
            break
        counts["read"] += 1
        text = normalize_prompt(raw)
        if not text:
            counts["blank"] += 1
        elif text in seen:
            counts["duplicates"] += 1
        else:
            seen.add(text)
            kept.append(text)
    return kept, counts


def check_source(path: Path) -> None:
    if not path.exists():
        raise SourceError(path, "no such file")
    if not path.is_file():
        raise SourceError(path, "not a file; pass a prompt file (.txt, .csv, .jsonl or COCO .json)")

