"""Data: readers for every source format, the uniform record schema, and packing.

Core (no Ray, no DeepSpeed). Readers turn PubMedQA, MTSamples, MedQA/MedMCQA JSONL,
MIMIC notes CSV, text/JSONL/Parquet corpora and MedMNIST ``.npz`` files into
:class:`Record` s; :func:`iter_records` streams one file's records, which the Ray
edges cut into Arrow blocks (:func:`records_to_arrow`) of Ray Datasets. :mod:`ray_med.data.packing` tokenizes and packs.
"""

from ray_med.data.config import CorpusConfig, SourceConfig
from ray_med.data.packing import Packer, pack, tokenize_texts
from ray_med.data.policy import RecordErrors
from ray_med.data.readers import (
    READERS,
    ReadResult,
    check_options,
    iter_records,
    read_records,
    reader_options,
)
from ray_med.data.records import (
    ARROW_SCHEMA,
    Record,
    arrow_to_records,
    decode_image,
    encode_png,
    records_to_arrow,
)

__all__ = [
    "ARROW_SCHEMA",
    "READERS",
    "CorpusConfig",
    "Packer",
    "ReadResult",
    "Record",
    "RecordErrors",
    "SourceConfig",
    "arrow_to_records",
    "check_options",
    "decode_image",
    "encode_png",
    "iter_records",
    "pack",
    "read_records",
    "reader_options",
    "records_to_arrow",
    "tokenize_texts",
]
