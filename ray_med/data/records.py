"""The one record schema every reader yields, and its Arrow form.

A :class:`Record` carries whatever a source has: plain text for language modelling, a
question with context and options for QA, a class label or a set of labels for
classification, and an image (PNG bytes) for the vision sources. Fields a source does
not have stay ``None``, so records from every reader can be mixed, written to one
Parquet file, or turned into one Ray Dataset with the same columns.

Images are stored as PNG bytes rather than arrays so that every row has the same
column types whatever the image size, and so the same decoding path serves files,
Parquet shards and base64 images sent to a Serve endpoint.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from ray_med.errors import DataError


@dataclass
class Record:
    """One example from any source, in the uniform schema."""

    id: str
    """Identifier unique within its source (PMID, note id, row number, ...)."""
    source: str
    """Name of the source it came from (the config's source name, or the reader name)."""
    text: str = ""
    """The text a language model trains on; empty for image-only records."""
    question: str | None = None
    """QA question, when the source is a QA set."""
    context: str | None = None
    """QA context (for PubMedQA, the abstract's sections joined)."""
    options: dict[str, str] | None = None
    """Answer options by letter (``{"A": ..., "B": ...}``) for multiple-choice QA."""
    answer: str | None = None
    """Gold answer: an option letter, or yes/no/maybe for PubMedQA."""
    label: str | None = None
    """Class label for single-label classification (specialty, outcome, finding)."""
    labels: list[str] | None = None
    """Label set for multi-label classification (ICD codes)."""
    image: bytes | None = None
    """PNG-encoded image, for the vision sources."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Everything else the source has that is worth keeping (year, MeSH terms, ...)."""

    def to_row(self) -> dict[str, Any]:
        """The record as a flat row matching :data:`ARROW_SCHEMA`."""
        return {
            "id": self.id,
            "source": self.source,
            "text": self.text,
            "question": self.question,
            "context": self.context,
            "options": json.dumps(self.options) if self.options is not None else None,
            "answer": self.answer,
            "label": self.label,
            "labels": self.labels,
            "image": self.image,
            "meta": json.dumps(self.meta, default=str),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Record:
        """Inverse of :meth:`to_row`."""
        options = row.get("options")
        labels = row.get("labels")
        return cls(
            id=row["id"],
            source=row["source"],
            text=row.get("text") or "",
            question=row.get("question"),
            context=row.get("context"),
            options=json.loads(options) if options else None,
            answer=row.get("answer"),
            label=row.get("label"),
            labels=list(labels) if labels is not None else None,
            image=row.get("image"),
            meta=json.loads(row["meta"]) if row.get("meta") else {},
        )


# Options and meta travel as JSON strings: their keys differ between sources, and a
# struct column would give each source a different schema.
ARROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("text", pa.string()),
        ("question", pa.string()),
        ("context", pa.string()),
        ("options", pa.string()),
        ("answer", pa.string()),
        ("label", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("image", pa.binary()),
        ("meta", pa.string()),
    ]
)


def records_to_arrow(records: Iterable[Record]) -> pa.Table:
    """Collect records into one Arrow table with :data:`ARROW_SCHEMA`."""
    return pa.Table.from_pylist([r.to_row() for r in records], schema=ARROW_SCHEMA)


def arrow_to_records(table: pa.Table) -> list[Record]:
    """Turn a table with :data:`ARROW_SCHEMA` columns back into records."""
    return [Record.from_row(row) for row in table.to_pylist()]


def encode_png(array: np.ndarray) -> bytes:
    """Encode a uint8 grey (H, W) or RGB (H, W, 3) array as PNG bytes."""
    if array.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise DataError(f"images must be (H, W) or (H, W, C), got shape {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, *, what: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/... bytes to a uint8 array; a clear error when it isn't an image.

    ``what`` names the input in the error message (a file and record, or a request field).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img)
    except Image.DecompressionBombError as exc:  # a small file that decodes to gigabytes
        raise DataError(f"{what} is too large to decode ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{what} is not a readable image ({exc})") from None
