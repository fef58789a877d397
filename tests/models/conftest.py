"""Fixtures for the models tests: a small medical corpus, a tokenizer trained once, the MiniLM folder."""

from __future__ import annotations

from typing import Any

import pytest

MEDICAL_TEXTS = [
    "Patient is a 54-year-old male with community-acquired pneumonia, T 38.5°C, SpO2 91%.",
    "Amoxicillin 500 mg three times daily for 5 days; reassess in 48–72 h.",
    "Chest X-ray shows right lower lobe consolidation without effusion.",
    "Does aspirin reduce the risk of colorectal adenoma recurrence? Yes, modestly.",
    "Paracetamol 15 mg/kg every 6 h, maximum 60 mg/kg/day; monitor liver function.",
    "HbA1c 8.2% despite metformin 1 g twice daily; add a GLP-1 receptor agonist.",
] * 20


@pytest.fixture(scope="session")
def medical_texts() -> list[str]:
    return list(MEDICAL_TEXTS)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on the medical texts (the tests only read it)."""
    from ray_med.models import train_bpe_tokenizer

    return train_bpe_tokenizer(MEDICAL_TEXTS, vocab_size=400, min_frequency=2)
