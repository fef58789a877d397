"""Readers: each source format in, uniform :class:`~ray_med.data.records.Record` out.

Every reader is a generator ``read_x(path, errors, *, source, **options)``. It yields
records in the one schema, and hands each record it cannot use to ``errors.bad``,
which raises with the file and record named, or counts and skips
(:mod:`ray_med.data.policy`). Problems with the file as a whole (missing, not JSON,
missing columns) always raise: there is nothing to skip to.

Text formats (JSON, JSONL, CSV, plain text) may also be gzip-compressed (``.gz``), as
MIMIC ships its notes. :func:`read_records` is the one entry point the rest of the
project uses on a small file; it checks the reader name and its options, and returns the
records with the skip count. :func:`iter_records` is the same as a stream, which the Ray
Data read tasks of :mod:`ray_med.corpus.build` cut into blocks.

The image readers (image CSVs, DICOM, VQA-RAD/SLAKE, MIMIC-CXR reports) find image files
relative to the data file's folder and keep each image as PNG bytes
(:func:`ray_med.data.images.encode_record_image`); a missing or unreadable image is a
bad record, like a missing field.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import inspect
import json
import os
import re
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_med.data.images import encode_record_image, is_dicom_file, read_dicom_header
from ray_med.data.numeric import read_breast_cancer_csv, read_mitbih_csv
from ray_med.data.policy import OnError, RecordErrors
from ray_med.data.records import ARROW_SCHEMA, Record, encode_png
from ray_med.errors import DataError

ReaderFn = Callable[..., Iterator[Record]]

PUBMEDQA_ANSWERS = ("yes", "no", "maybe")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
TEXT_SPLITS = ("document", "paragraph", "line")
MEDMNIST_SPLITS = ("train", "val", "test")
# MedMNIST label names per data set; unknown sets fall back to the label index.
MEDMNIST_LABELS: dict[str, dict[int, str]] = {"pneumoniamnist": {0: "normal", 1: "pneumonia"}}

_BOM = "\ufeff"
# Distinct images a VQA read keeps decoded: many questions share an image (VQA-RAD asks
# about 7 per image), but a whole data set of PNGs must not pile up in memory.
_IMAGE_CACHE_SIZE = 64
# What reading a plain or gzipped file can raise: I/O errors, a truncated or corrupt .gz.
_READ_ERRORS = (OSError, EOFError, zlib.error)
# A paragraph break is a line holding nothing but white space, not only an empty one.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f\v]*\n")


# ------------------------------------------------------------------------- file helpers


def _open_binary(path: str) -> IO[bytes]:
    """The file's bytes, gunzipped when the name ends in ``.gz``."""
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from None


def _decode(path: str, data: bytes, offset: int) -> str:
    """UTF-8 text of ``data`` (which starts at byte ``offset`` of the file), or a DataError."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {offset + exc.start})") from None


def _read_text(path: str) -> str:
    """The whole file as text (a leading byte-order mark dropped)."""
    try:
        with _open_binary(path) as f:
            data = f.read()
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    return _decode(path, data, 0).removeprefix(_BOM)


def _text_lines(path: str) -> Iterator[str]:
    """The file's lines, decoded one by one, with their line ends.

    Streams, so multi-GB note files are never held as one string. Lines end at ``\\n``
    only: ``str.splitlines`` would also cut at form feeds and U+2028, which occur inside
    scraped clinical text and inside JSON strings, and would split one record in two.
    """
    offset = 0
    try:
        with _open_binary(path) as f:
            for raw in f:
                line = _decode(path, raw, offset)
                if offset == 0:
                    line = line.removeprefix(_BOM)
                offset += len(raw)
                yield line
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _csv_rows(path: str) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """Header and (1-based data row number, row) pairs of a CSV file.

    A row with more fields than the header gets the extra values under the key ``None``
    (``csv.DictReader``'s restkey); callers report it with :func:`_field_count_problem`.
    """
    # Clinical notes easily exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # strict: an unclosed quote at the end of the file is an error, not a silently
    # swallowed tail of the file (the non-strict reader ends the field at EOF).
    reader = csv.DictReader(_text_lines(path), strict=True)
    try:
        header = list(reader.fieldnames or [])
    except csv.Error as exc:
        raise DataError(f"{path}: unreadable CSV header ({exc})") from None
    if not header:
        raise DataError(f"{path}: empty CSV file (no header)")

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        n = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"{path}: malformed CSV near data row {n + 1} ({exc})") from None
            n += 1
            yield n, row

    return header, rows()


def _field_count_problem(row: dict[Any, Any], header: list[str]) -> str | None:
    """Why a CSV row does not fit the header (too many fields), or None if it does."""
    extra = row.get(None)
    if extra:
        return f"{len(header) + len(extra)} fields but the header has {len(header)} (an unquoted comma?)"
    return None


def _require_columns(path: str, header: list[str], needed: list[str]) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{path}: missing CSV column(s) {missing}; the header has {header}")


def _jsonl(path: str, errors: RecordErrors) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; bad JSON goes to ``errors``."""
    for n, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.bad(f"line {n}", f"invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            errors.bad(f"line {n}", f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield n, obj


def _str_field(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _check_str_option(reader: str, name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        kind = "a column/field name or null" if optional else "a column/field name"
        raise DataError(f"{reader} option {name} must be {kind}, got {value!r}")


# ------------------------------------------------------------------------------ readers


def read_pubmedqa(path: str, errors: RecordErrors, *, source: str = "pubmedqa") -> Iterator[Record]:
    """PubMedQA ``ori_pqal.json``: ``{PMID: {QUESTION, CONTEXTS, LONG_ANSWER, final_decision, ...}}``.

    ``text`` is the abstract as the paper had it (contexts, then the conclusion in
    LONG_ANSWER), for language modelling; ``context`` is the contexts alone, which is
    what the reasoning-required QA setting sees.
    """
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise DataError(f"{path}: invalid JSON at {where} ({exc.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object keyed by PMID, got {type(data).__name__}")
    for pmid, item in data.items():
        where = f"PMID {pmid}"
        if not isinstance(item, dict):
            errors.bad(where, f"expected an object, got {type(item).__name__}")
            continue
        question = _str_field(item, "QUESTION")
        contexts = item.get("CONTEXTS")
        decision = item.get("final_decision")
        long_answer = item.get("LONG_ANSWER") if isinstance(item.get("LONG_ANSWER"), str) else ""
        if question is None:
            errors.bad(where, "missing or empty QUESTION")
        elif not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
            errors.bad(where, "CONTEXTS must be a non-empty list of strings")
        elif decision not in PUBMEDQA_ANSWERS:
            errors.bad(where, f"final_decision must be one of {PUBMEDQA_ANSWERS}, got {decision!r}")
        else:
            context = "\n".join(c.strip() for c in contexts)
            yield Record(
                id=str(pmid),
                source=source,
                text=f"{context}\n{long_answer.strip()}".strip(),
                question=question,
                context=context,
                answer=decision,
                meta={
                    "long_answer": long_answer.strip(),
                    "labels": item.get("LABELS"),
                    "meshes": item.get("MESHES"),
                    "year": item.get("YEAR"),
                },
            )


def read_mtsamples(path: str, errors: RecordErrors, *, source: str = "mtsamples") -> Iterator[Record]:
    """MTSamples CSV: ``id, description, medical_specialty, sample_name, transcription, keywords``.

    The id comes from the ``id`` column, or from the unnamed first column that the
    Kaggle export has (a pandas index), or else is the 1-based data row number.
    """
    header, rows = _csv_rows(path)
    _require_columns(path, header, ["medical_specialty", "transcription"])
    id_col = "id" if "id" in header else ("" if header[0] == "" else None)
    for n, row in rows:
        rid = (row.get(id_col) or "").strip() if id_col is not None else ""
        rid = rid or str(n)
        where = f"data row {n} (id {rid})"
        text = (row.get("transcription") or "").strip()
        specialty = (row.get("medical_specialty") or "").strip()
        problem = _field_count_problem(row, header)
        if problem:
            errors.bad(where, problem)
        elif not text:
            errors.bad(where, "empty transcription")
        elif not specialty:
            errors.bad(where, "empty medical_specialty")
        else:
            yield Record(
                id=rid,
                source=source,
                text=text,
                label=specialty,
                meta={k: (row.get(k) or "").strip() for k in ("description", "sample_name", "keywords")},
            )


def _options_text(question: str, options: dict[str, str]) -> str:
    return question + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())


def read_medqa(path: str, errors: RecordErrors, *, source: str = "medqa") -> Iterator[Record]:
    """MedQA JSONL (USMLE): ``{question, answer, options{A..}, answer_idx, meta_info, metamap_phrases}``."""
    for n, obj in _jsonl(path, errors):
        where = f"line {n}"
        question = _str_field(obj, "question")
        options = obj.get("options")
        idx = obj.get("answer_idx")
        if question is None:
            errors.bad(where, "missing or empty 'question'")
        elif (
            not isinstance(options, dict)
            or len(options) < 2
            or not all(isinstance(v, str) and v.strip() for v in options.values())
        ):
            errors.bad(where, "'options' must be an object of at least two non-empty answer texts")
        elif not isinstance(idx, str) or idx not in options:
            errors.bad(where, f"'answer_idx' {idx!r} is not one of the options {sorted(options)}")
        else:
            options = {str(k): v.strip() for k, v in options.items()}
            answer_text = _str_field(obj, "answer") or options[idx]
            rid = obj.get("id")
            yield Record(
                id=str(rid if rid is not None else n),
                source=source,
                text=f"{_options_text(question, options)}\nAnswer: {idx}. {options[idx]}",
                question=question,
                options=options,
                answer=idx,
                meta={"meta_info": obj.get("meta_info"), "answer_text": answer_text},
            )


def read_medmcqa(
    path: str, errors: RecordErrors, *, source: str = "medmcqa", cop_base: int = 1
) -> Iterator[Record]:
    """MedMCQA JSONL: ``{id, question, opa, opb, opc, opd, cop, choice_type, exp, subject_name, topic_name}``.

    ``cop`` is 1-4 in the original release (``cop_base=1``) and 0-3 in the Hugging Face
    export (``cop_base=0``). Test-split rows have no answer (no ``cop``, or -1): they are
    kept with ``answer=None``.
    """
    if cop_base not in (0, 1) or isinstance(cop_base, bool):
        raise DataError(f"medmcqa option cop_base must be 0 or 1, got {cop_base!r}")
    letters = ("A", "B", "C", "D")
    for n, obj in _jsonl(path, errors):
        rid = obj.get("id")
        where = f"line {n}" + (f" (id {rid})" if rid is not None else "")
        question = _str_field(obj, "question")
        texts = [obj.get(k) for k in ("opa", "opb", "opc", "opd")]
        cop = obj.get("cop")
        if question is None:
            errors.bad(where, "missing or empty 'question'")
            continue
        if not all(isinstance(t, str) for t in texts):
            errors.bad(where, "options 'opa'..'opd' must all be strings")
            continue
        answer = None
        if cop is not None and cop != -1:
            if not isinstance(cop, int) or isinstance(cop, bool) or not 0 <= cop - cop_base < 4:
                valid = f"{cop_base}..{cop_base + 3}"
                errors.bad(where, f"'cop' must be {valid} (cop_base={cop_base}), got {cop!r}")
                continue
            answer = letters[cop - cop_base]
        options = dict(zip(letters, (t.strip() for t in texts), strict=True))
        text = _options_text(question, options)
        if answer is not None:
            text += f"\nAnswer: {answer}. {options[answer]}"
        if _str_field(obj, "exp"):
            text += f"\nExplanation: {obj['exp'].strip()}"
        yield Record(
            id=str(rid if rid is not None else n),
            source=source,
            text=text,
            question=question,
            options=options,
            answer=answer,
            meta={k: obj.get(k) for k in ("choice_type", "exp", "subject_name", "topic_name")},
        )


# MIMIC-IV-Note (discharge.csv, radiology.csv) and MIMIC-III NOTEEVENTS.csv.
_MIMIC_ID = ("note_id", "row_id")
_MIMIC_TYPE = ("note_type", "category")


def _note_rows(
    path: str, errors: RecordErrors, id_names: tuple[str, ...], what: str, needs: str = ""
) -> tuple[dict[str, str], Iterator[tuple[str, str, str, dict[str, str]]]]:
    """The note-per-row CSVs of MIMIC: the header by lower-case name, and (where, id, text, row).

    Rows with too many fields, an empty id or an empty text go to ``errors``.
    """
    header, rows = _csv_rows(path)
    lower = {h.lower(): h for h in header}
    id_col = next((lower[c] for c in id_names if c in lower), None)
    text_col = lower.get("text")
    if id_col is None or text_col is None:
        raise DataError(
            f"{path}: not a {what}: needs a note id column ({' or '.join(id_names)}) and 'text'{needs}; "
            f"the header has {header}"
        )

    def notes() -> Iterator[tuple[str, str, str, dict[str, str]]]:
        for n, row in rows:
            rid = (row.get(id_col) or "").strip()
            where = f"data row {n}" + (f" ({id_col} {rid})" if rid else "")
            text = (row.get(text_col) or "").strip()
            problem = _field_count_problem(row, header)
            if problem:
                errors.bad(where, problem)
            elif not rid:
                errors.bad(where, f"empty {id_col}")
            elif not text:
                errors.bad(where, "empty note text")
            else:
                yield where, rid, text, {k: v for k, v in row.items() if k not in (id_col, text_col)}

    return lower, notes()


def read_mimic_notes(path: str, errors: RecordErrors, *, source: str = "mimic_notes") -> Iterator[Record]:
    """MIMIC notes CSV (or ``.csv.gz``): MIMIC-IV-Note or MIMIC-III NOTEEVENTS.

    MIMIC-IV-Note: ``note_id, subject_id, hadm_id, note_type, note_seq, charttime,
    storetime, text``; MIMIC-III: ``ROW_ID, SUBJECT_ID, ..., CATEGORY, DESCRIPTION, CGID,
    ISERROR, TEXT``. Columns are matched case-insensitively; every other column goes to
    ``meta`` under its lower-case name, and ``meta["note_type"]`` holds the note type
    (MIMIC-III's CATEGORY) for both. MIMIC-III rows flagged ISERROR are kept (with
    ``meta["iserror"]``): dropping them is the user's call, not the reader's.
    """
    lower, notes = _note_rows(path, errors, _MIMIC_ID, "MIMIC notes CSV")
    type_col = next((lower[c] for c in _MIMIC_TYPE if c in lower), None)
    for _, note_id, text, rest in notes:
        meta = {k.lower(): v for k, v in rest.items()}
        note_type = (rest.get(type_col) or "").strip() if type_col else None
        yield Record(id=note_id, source=source, text=text, meta={**meta, "note_type": note_type})


def read_mimic_outcomes(path: str, errors: RecordErrors, *, source: str = "mimic_outcomes") -> Iterator[Record]:
    """A MIMIC-style outcome CSV for the clinical outcome tasks: ``id, text`` plus ``label`` or ``labels``.

    The layout of the clinical-outcome-prediction benchmarks (van Aken et al., 2021) used
    by Clinical LLaMA-LoRA: one admission note per row, a single ``label`` (mortality,
    prolonged ventilation: 0/1; length of stay: bucket 0-3) or ``labels``, the ICD-9
    codes separated by ``;`` or ``,`` (diagnoses, procedures). ``hadm_id`` or ``note_id``
    may stand for ``id``.
    """
    lower, notes = _note_rows(path, errors, ("id", "hadm_id", "note_id"), "outcome CSV", ", and label or labels")
    label_col, labels_col = lower.get("label"), lower.get("labels")
    if label_col is None and labels_col is None:
        raise DataError(f"{path}: not an outcome CSV: needs a 'label' or 'labels' column; the header has "
                        f"{list(lower.values())}")
    for where, rid, text, rest in notes:
        label = (rest.get(label_col) or "").strip() if label_col else None
        if label_col is not None and not label:
            errors.bad(where, "empty label")
            continue
        labels = None
        if labels_col is not None:
            raw = (rest.get(labels_col) or "").replace(",", ";")
            labels = [c.strip() for c in raw.split(";") if c.strip()]
        yield Record(id=rid, source=source, text=text, label=label, labels=labels)


def read_text(
    path: str, errors: RecordErrors, *, source: str = "text", split: str = "document"
) -> Iterator[Record]:
    """A plain UTF-8 text file, or a folder of them (.txt/.md/.rst, in name order).

    Each file's whole ``document``, each ``paragraph`` (separated by blank lines) or
    each ``line`` is a record, with id ``<file name>:<n>``. Empty parts are dropped:
    blank lines are layout, not malformed records.
    """
    if split not in TEXT_SPLITS:
        raise DataError(f"text option split must be one of {', '.join(TEXT_SPLITS)}, got {split!r}")
    files = [Path(path)]
    if files[0].is_dir():
        files = sorted(p for p in files[0].iterdir() if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: a folder with no {'/'.join(TEXT_SUFFIXES)} files")
    for file in files:
        text = _read_text(str(file)).replace("\r\n", "\n")
        if split == "document":
            parts = [text]
        elif split == "paragraph":
            parts = _PARAGRAPH_BREAK.split(text)
        else:
            parts = text.split("\n")
        n = 0
        for part in parts:
            if part.strip():
                n += 1
                yield Record(id=f"{file.name}:{n}", source=source, text=part.strip())


def _corpus_record(
    obj: dict[str, Any],
    n: int,
    where: str,
    errors: RecordErrors,
    source: str,
    text_field: str,
    id_field: str | None,
) -> Record | None:
    """A text record from one JSONL object or Parquet row, or None if it is malformed."""
    text = obj.get(text_field)
    if not isinstance(text, str) or not text.strip():
        errors.bad(where, f"missing, empty or non-string '{text_field}'")
        return None
    rid = obj.get(id_field) if id_field else None
    meta = {k: v for k, v in obj.items() if k != text_field and k != id_field}
    return Record(id=str(rid if rid is not None else n), source=source, text=text.strip(), meta=meta)


def read_jsonl(
    path: str,
    errors: RecordErrors,
    *,
    source: str = "jsonl",
    text_field: str = "text",
    id_field: str | None = "id",
) -> Iterator[Record]:
    """A JSONL corpus with the text in ``text_field`` (and an optional id in ``id_field``).

    Records without an id are numbered by line; the other fields go to ``meta``.
    """
    _check_str_option("jsonl", "text_field", text_field)
    _check_str_option("jsonl", "id_field", id_field, optional=True)
    for n, obj in _jsonl(path, errors):
        record = _corpus_record(obj, n, f"line {n}", errors, source, text_field, id_field)
        if record is not None:
            yield record


def read_parquet(
    path: str,
    errors: RecordErrors,
    *,
    source: str = "parquet",
    text_field: str = "text",
    id_field: str | None = "id",
) -> Iterator[Record]:
    """A Parquet corpus; files in the record schema (as ray_med writes them) come back as they were.

    A file holding every :data:`ARROW_SCHEMA` column is read as records (extra columns,
    such as a pandas index, are ignored, and each record keeps its own ``source``).
    Any other file is a text corpus: ``text_field`` and ``id_field`` as for JSONL, rows
    numbered from 1.
    """
    _check_str_option("parquet", "text_field", text_field)
    _check_str_option("parquet", "id_field", id_field, optional=True)
    try:
        pfile = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    columns = pfile.schema_arrow.names
    as_records = set(ARROW_SCHEMA.names) <= set(columns)
    if not as_records and text_field not in columns:
        raise DataError(f"{path}: no column '{text_field}' (set text_field); columns are {columns}")
    for n, row in _parquet_rows(pfile, path, ARROW_SCHEMA.names if as_records else None):
        if not as_records:
            record = _corpus_record(row, n, f"row {n}", errors, source, text_field, id_field)
            if record is not None:
                yield record
            continue
        try:
            yield Record.from_row(row)
        except (ValueError, TypeError, KeyError, pa.ArrowException) as exc:  # e.g. meta that is not JSON
            errors.bad(f"row {n}", f"not a valid record row ({type(exc).__name__}: {exc})")


def _parquet_rows(pfile: Any, path: str, columns: list[str] | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row number, row) of a Parquet file, read batch by batch.

    Batches, so a large corpus is never one Python list of rows.
    """
    n = 0
    try:
        for batch in pfile.iter_batches(columns=columns):
            rows = batch.to_pylist()
            for row in rows:
                n += 1
                yield n, row
    except (OSError, pa.ArrowException) as exc:  # a corrupt page or column chunk
        raise DataError(f"{path}: cannot read Parquet data after row {n} ({exc})") from None


def _npz_array(npz: Any, key: str, path: str) -> np.ndarray:
    try:
        return npz[key]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # object arrays, corrupt members
        raise DataError(f"{path}: cannot read array '{key}' ({exc})") from None


def _medmnist_label_names(path: str, label_names: dict[Any, Any] | None) -> dict[int, str] | None:
    """Index -> name: the given mapping (keys may be strings, as JSON has them), or the built-in one."""
    if label_names is None:
        stem = Path(path).name.split("_")[0].split(".")[0].lower()
        return MEDMNIST_LABELS.get(stem)
    if not isinstance(label_names, dict):
        raise DataError(f"medmnist option label_names must map label index to name, got {label_names!r}")
    try:
        return {int(k): str(v) for k, v in label_names.items()}
    except (TypeError, ValueError):
        raise DataError(
            f"medmnist option label_names: keys must be label indices, got {list(label_names)}"
        ) from None


def _open_npz(path: str) -> Any:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a single .npy array under an .npz name
        raise DataError(f"{path}: not an .npz archive (a single array of shape {npz.shape})")
    return npz


def _npz_splits(npz: Any) -> list[str]:
    in_file = [k.removesuffix("_images") for k in npz.files if k.endswith("_images")]
    # The MedMNIST splits first, in their natural order; any others after, by name.
    present = [s for s in MEDMNIST_SPLITS if s in in_file]
    return present + sorted(s for s in in_file if s not in MEDMNIST_SPLITS)


def medmnist_splits(path: str) -> list[str]:
    """The splits a MedMNIST ``.npz`` holds (``train``, ``val``, ``test`` first), without reading the images."""
    with _open_npz(path) as npz:
        return _npz_splits(npz)


def read_medmnist(
    path: str,
    errors: RecordErrors,
    *,
    source: str = "medmnist",
    splits: list[str] | None = None,
    label_names: dict[int, str] | None = None,
) -> Iterator[Record]:
    """A MedMNIST ``.npz``: ``{split}_images`` (N, H, W[, C]) uint8 and ``{split}_labels`` (N, 1).

    ``splits`` defaults to every split in the file (train, val, test first). Labels are
    named by ``label_names``, or by the built-in names of a known set (from the file
    name, e.g. ``pneumoniamnist_*.npz``), or else are the label index as a string.
    Multi-label sets (ChestMNIST's (N, 14) labels) are not supported.
    """
    if isinstance(splits, str):
        splits = [splits]
    names = _medmnist_label_names(path, label_names)
    with _open_npz(path) as npz:
        present = _npz_splits(npz)
        if not present:
            raise DataError(f"{path}: no '<split>_images' arrays; the file holds {npz.files}")
        wanted = list(splits) if splits is not None else present
        for split in wanted:
            if split not in present:
                raise DataError(f"{path}: split '{split}' not in the file; it has {present}")
            if f"{split}_labels" not in npz.files:
                raise DataError(f"{path}: '{split}_images' has no matching '{split}_labels'")
        for split in wanted:
            images = _npz_array(npz, f"{split}_images", path)
            labels = _npz_array(npz, f"{split}_labels", path)
            if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
                raise DataError(
                    f"{path}: '{split}_images' must be (N, H, W) or (N, H, W, 1|3), got shape {images.shape}"
                )
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(
                    f"{path}: '{split}_labels' must be (N, 1) integer class indices, got shape "
                    f"{labels.shape} {labels.dtype} (multi-label sets are not supported)"
                )
            if len(labels) != len(images):
                raise DataError(
                    f"{path}: '{split}_images' has {len(images)} images "
                    f"but '{split}_labels' has {len(labels)} labels"
                )
            for i, (img, lab) in enumerate(zip(images, labels.tolist(), strict=True)):
                where = f"{split}_images[{i}]"
                if img.dtype != np.uint8:
                    errors.bad(where, f"image dtype {img.dtype}, expected uint8")
                elif names is not None and lab not in names:
                    errors.bad(where, f"label {lab} is not one of {sorted(names)}")
                else:
                    yield Record(
                        id=f"{split}-{i}",
                        source=source,
                        image=encode_png(img),
                        label=names[lab] if names is not None else str(lab),
                        meta={"split": split, "label_index": lab},
                    )


# ------------------------------------------------------------------------------ images

ImageResult = tuple[bytes | None, str | None]


def _base_dir(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def _resolve(base: str, rel: str) -> str:
    return rel if os.path.isabs(rel) else os.path.join(base, rel)


def _image_folder(reader: str, path: str, image_dir: Any, default: str) -> str:
    """Where image names point: ``image_dir`` (relative to the data file's folder), or ``default``."""
    if image_dir is None:
        return default
    if not isinstance(image_dir, str) or not image_dir:
        raise DataError(f"{reader} option image_dir must be a folder path or null, got {image_dir!r}")
    folder = _resolve(_base_dir(path), image_dir)
    if not os.path.isdir(folder):
        raise DataError(f"{path}: image_dir {folder} is not a folder")
    return folder


def _record_image(file: str, shown: str) -> ImageResult:
    """(PNG bytes, None) of an image file, or (None, why it cannot be used)."""
    if not os.path.isfile(file):
        return None, f"image file not found: {file}"
    try:
        return encode_record_image(file, what=f"image {shown}"), None
    except DataError as exc:
        return None, str(exc)


def _image_loader(size: int) -> Callable[[str, str], ImageResult]:
    """:func:`_record_image` remembering the last ``size`` files, for sources that reuse images."""
    cache: OrderedDict[str, ImageResult] = OrderedDict()

    def load(file: str, shown: str) -> ImageResult:
        if file in cache:
            cache.move_to_end(file)
            return cache[file]
        result = cache[file] = _record_image(file, shown)
        if len(cache) > size:
            cache.popitem(last=False)
        return result

    return load


def _json_items(path: str, errors: RecordErrors) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(number, where, object) of a JSON list of objects, or of a ``.jsonl`` file's lines."""
    if path.removesuffix(".gz").endswith(".jsonl"):
        for n, obj in _jsonl(path, errors):
            yield n, f"line {n}", obj
        return
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise DataError(f"{path}: invalid JSON at {where} ({exc.msg})") from None
    if not isinstance(data, list):
        kind = type(data).__name__
        raise DataError(f"{path}: expected a JSON list of objects (or a .jsonl file), got {kind}")
    for n, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            errors.bad(f"item {n}", f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield n, f"item {n}", obj


def _image_csv_records(
    path: str,
    errors: RecordErrors,
    *,
    reader: str,
    source: str,
    path_column: str | None,
    label_column: str | None,
    dicom_meta: bool,
) -> Iterator[Record]:
    """The records of an image CSV (shared by the ``image_csv`` and ``dicom`` readers)."""
    _check_str_option(reader, "path_column", path_column, optional=True)
    _check_str_option(reader, "label_column", label_column, optional=True)
    header, rows = _csv_rows(path)
    if path_column is None:
        path_column = next((c for c in ("path", "image") if c in header), None)
        if path_column is None:
            raise DataError(
                f"{path}: not an image CSV: needs a 'path' or 'image' column (or set path_column); "
                f"the header has {header}"
            )
    _require_columns(path, header, [path_column] + ([label_column] if label_column else []))
    id_col = "id" if "id" in header and "id" not in (path_column, label_column) else None
    base = _base_dir(path)
    for n, row in rows:
        rid = (row.get(id_col) or "").strip() if id_col else ""
        where = f"data row {n}" + (f" (id {rid})" if rid else "")
        rel = (row.get(path_column) or "").strip()
        label = (row.get(label_column) or "").strip() if label_column else None
        problem = _field_count_problem(row, header)
        if problem:
            errors.bad(where, problem)
            continue
        if not rel:
            errors.bad(where, f"empty {path_column}")
            continue
        if label_column and not label:
            errors.bad(where, f"empty {label_column}")
            continue
        file = _resolve(base, rel)
        image, why = _record_image(file, rel)
        if image is None:
            errors.bad(where, why or "unreadable image")
            continue
        meta: dict[str, Any] = {
            k: (v or "").strip() for k, v in row.items() if k not in (id_col, path_column, label_column)
        }
        meta["image_path"] = rel
        if dicom_meta and is_dicom_file(file):
            try:
                meta = {**read_dicom_header(file, what=f"image {rel}"), **meta}
            except DataError as exc:
                errors.bad(where, str(exc))
                continue
        yield Record(id=rid or str(n), source=source, label=label, image=image, meta=meta)


def read_image_csv(
    path: str,
    errors: RecordErrors,
    *,
    source: str = "image_csv",
    path_column: str | None = None,
    label_column: str | None = "label",
) -> Iterator[Record]:
    """An image classification CSV: an image path column, a label column, and any others.

    The path column is ``path_column``, or else ``path`` or ``image``; paths are
    relative to the CSV's folder unless absolute, and may name PNG, JPEG, TIFF, ... or
    DICOM files. ``label_column=None`` reads images without labels. The id is the
    ``id`` column, or the 1-based data row number; every other column goes to ``meta``,
    with the path as ``image_path``. A missing or unreadable image is a bad record.
    """
    yield from _image_csv_records(
        path,
        errors,
        reader="image_csv",
        source=source,
        path_column=path_column,
        label_column=label_column,
        dicom_meta=False,
    )


def read_dicom_files(
    path: str,
    errors: RecordErrors,
    *,
    source: str = "dicom",
    path_column: str | None = None,
    label_column: str | None = "label",
) -> Iterator[Record]:
    """One DICOM file, or a CSV index of DICOM files (as for ``image_csv``).

    A single file (named ``.dcm``, or with the DICM header) is one record: id its
    SOPInstanceUID (or the file name's stem), no label, and the header fields of
    :data:`~ray_med.data.images.DICOM_META_FIELDS` it has (Modality,
    PhotometricInterpretation, Rows, Columns, ...) in ``meta``; a bad file raises, as
    there is nothing to skip to. Any other file is read as a CSV index, whose DICOM
    rows also get those header fields in ``meta``. The image is the display-ready
    first frame (:func:`~ray_med.data.images.read_dicom`) as an 8-bit PNG.
    """
    if not is_dicom_file(path):
        yield from _image_csv_records(
            path,
            errors,
            reader="dicom",
            source=source,
            path_column=path_column,
            label_column=label_column,
            dicom_meta=True,
        )
        return
    image = encode_record_image(path, what=path)
    header = read_dicom_header(path, what=path)
    rid = header.get("SOPInstanceUID") or Path(path).name.removesuffix(".dcm").removesuffix(".DCM")
    yield Record(id=str(rid), source=source, image=image, meta=header)


def read_vqa_json(
    path: str,
    errors: RecordErrors,
    *,
    source: str = "vqa_json",
    image_dir: str | None = None,
    lang: str | None = "en",
) -> Iterator[Record]:
    """Medical VQA JSON in the VQA-RAD or SLAKE schema: a list of question objects.

    VQA-RAD: ``qid, image_name, image_organ, question, answer, answer_type (CLOSED/OPEN),
    question_type, phrase_type, ...``; SLAKE: ``qid, img_id, img_name, question, answer,
    q_lang, location, modality, answer_type, base_type, content_type, triple``. The
    image is ``image_name`` or ``img_name`` in ``image_dir`` (relative to the JSON's
    folder), by default the ``images`` or ``imgs`` folder beside the JSON (SLAKE's
    layout) if there is one, else the JSON's own folder. Questions whose ``q_lang`` is
    not ``lang`` (SLAKE's Chinese half, by default) are left out, not counted as bad;
    ``lang=None`` keeps every language. ``answer`` may be a number in VQA-RAD: it is
    kept as text. ``text`` is ``question\nAnswer: answer``; every other field goes to
    ``meta``.
    """
    if lang is not None and (not isinstance(lang, str) or not lang):
        raise DataError(f"vqa_json option lang must be a language code (en, zh) or null, got {lang!r}")
    base = _base_dir(path)
    beside = [os.path.join(base, d) for d in ("images", "imgs")]
    default = next((d for d in beside if os.path.isdir(d)), base)
    folder = _image_folder("vqa_json", path, image_dir, default)
    load = _image_loader(_IMAGE_CACHE_SIZE)
    for n, where, obj in _json_items(path, errors):
        qid = obj.get("qid")
        where += f" (qid {qid})" if qid is not None else ""
        if lang is not None and obj.get("q_lang", lang) != lang:
            continue
        question = _str_field(obj, "question")
        answer = obj.get("answer")
        answer_text = str(answer).strip() if isinstance(answer, str | int | float) else ""
        name = _str_field(obj, "image_name") or _str_field(obj, "img_name")
        if question is None:
            errors.bad(where, "missing or empty 'question'")
            continue
        if not answer_text:
            errors.bad(where, "missing or empty 'answer'")
            continue
        if name is None:
            errors.bad(where, "missing 'image_name' (VQA-RAD) or 'img_name' (SLAKE)")
            continue
        image, why = load(_resolve(folder, name), name)
        if image is None:
            errors.bad(where, why or "unreadable image")
            continue
        yield Record(
            id=str(qid if qid is not None else n),
            source=source,
            text=f"{question}\nAnswer: {answer_text}",
            question=question,
            answer=answer_text,
            image=image,
            meta={k: v for k, v in obj.items() if k not in ("qid", "question", "answer")},
        )


def _report_section(obj: dict[str, Any], key: str) -> str | None:
    """A report section with its line breaks and runs of spaces collapsed, or None if empty."""
    value = obj.get(key)
    if not isinstance(value, str):
        return None
    return " ".join(value.split()) or None


def read_report_json(
    path: str, errors: RecordErrors, *, source: str = "report_json", image_dir: str | None = None
) -> Iterator[Record]:
    """Radiology reports with their image, MIMIC-CXR style: a JSON list (or ``.jsonl``) of studies.

    Each object: ``study_id, subject_id, dicom_id, image_path, view_position, findings,
    impression``; ``image_path`` is relative to ``image_dir`` (relative to the file's
    folder; default the file's folder), e.g. MIMIC-CXR-JPG's
    ``files/p10/p10000032/s50414267/<dicom_id>.jpg``. The record's ``text`` and
    ``answer`` are the report a model should write, ``FINDINGS: ... IMPRESSION: ...``
    (a missing section left out, white space collapsed); the id is ``dicom_id``, else
    ``study_id``, else the item number. A study with neither findings nor impression
    is a bad record.
    """
    folder = _image_folder("report_json", path, image_dir, _base_dir(path))
    for n, where, obj in _json_items(path, errors):
        dicom_id, study_id = obj.get("dicom_id"), obj.get("study_id")
        rid = dicom_id if dicom_id not in (None, "") else study_id if study_id not in (None, "") else n
        where += f" (id {rid})" if rid != n else ""
        findings, impression = _report_section(obj, "findings"), _report_section(obj, "impression")
        rel = _str_field(obj, "image_path")
        if findings is None and impression is None:
            errors.bad(where, "neither 'findings' nor 'impression' has text")
            continue
        if rel is None:
            errors.bad(where, "missing 'image_path'")
            continue
        image, why = _record_image(_resolve(folder, rel), rel)
        if image is None:
            errors.bad(where, why or "unreadable image")
            continue
        sections = [("FINDINGS", findings), ("IMPRESSION", impression)]
        report = " ".join(f"{name}: {text}" for name, text in sections if text)
        yield Record(
            id=str(rid),
            source=source,
            text=report,
            answer=report,
            image=image,
            meta={
                "findings": findings,
                "impression": impression,
                "study_id": study_id,
                "subject_id": obj.get("subject_id"),
                "dicom_id": dicom_id,
                "view_position": obj.get("view_position"),
                "image_path": rel,
            },
        )


READERS: dict[str, ReaderFn] = {
    "pubmedqa": read_pubmedqa,
    "mtsamples": read_mtsamples,
    "medqa": read_medqa,
    "medmcqa": read_medmcqa,
    "mimic_notes": read_mimic_notes,
    "mimic_outcomes": read_mimic_outcomes,
    "text": read_text,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "medmnist": read_medmnist,
    "image_csv": read_image_csv,
    "dicom": read_dicom_files,
    "vqa_json": read_vqa_json,
    "report_json": read_report_json,
    "breast_cancer_csv": read_breast_cancer_csv,
    "mitbih_csv": read_mitbih_csv,
}


@dataclass
class ReadResult:
    """The records of one file, and what was skipped."""

    records: list[Record]
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


def _check_reader(reader: str) -> None:
    if reader not in READERS:
        close = difflib.get_close_matches(reader, list(READERS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DataError(f"unknown reader '{reader}'.{hint} Valid readers: {', '.join(READERS)}")


def reader_options(reader: str) -> list[str]:
    """The keyword options a reader takes (beyond ``source``)."""
    _check_reader(reader)
    params = inspect.signature(READERS[reader]).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "source"]


def check_options(reader: str, options: dict[str, Any] | None) -> None:
    """Fail on an unknown reader or an option it does not take (cheap: no file is opened)."""
    _check_reader(reader)
    valid = reader_options(reader)
    unknown = sorted(set(options or {}) - set(valid))
    if unknown:
        raise DataError(
            f"reader '{reader}' has no option(s) {unknown}; valid options: {', '.join(valid) or 'none'}"
        )


def iter_records(
    reader: str,
    path: str,
    errors: RecordErrors,
    *,
    source: str | None = None,
    options: dict[str, Any] | None = None,
) -> Iterator[Record]:
    """The records of one file, as a stream: what a Ray Data read task turns into blocks.

    Malformed records go to ``errors`` (raise, or count and skip); read its ``skipped``
    and ``reasons`` once the stream is exhausted.
    """
    check_options(reader, options)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path) and reader != "text":
        raise DataError(f"{path}: is a folder; the '{reader}' reader takes a file")
    return READERS[reader](path, errors, source=source or reader, **dict(options or {}))


def read_records(
    reader: str,
    path: str,
    *,
    source: str | None = None,
    on_error: OnError = "raise",
    options: dict[str, Any] | None = None,
) -> ReadResult:
    """Read a whole file with the named reader into memory (small files; see :func:`iter_records`)."""
    check_options(reader, options)
    errors = RecordErrors(path=os.fspath(path), on_error=on_error)
    records = list(iter_records(reader, path, errors, source=source, options=options))
    return ReadResult(records=records, skipped=errors.skipped, reasons=errors.reasons)
