"""Readers on the real files in ../shared/data, on schema fixtures, and on malformed records."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_med.data import READERS, decode_image, read_records, reader_options
from ray_med.errors import DataError

# ------------------------------------------------------------------------- real data


def test_pubmedqa_real(shared_data: Path) -> None:
    res = read_records("pubmedqa", str(shared_data / "pubmedqa/pqal_trainval.json"))
    assert len(res.records) == 500 and res.skipped == 0
    assert Counter(r.answer for r in res.records) == {"yes": 276, "no": 169, "maybe": 55}
    r = next(x for x in res.records if x.id == "10808977")
    assert r.question == "Can tailored interventions increase mammography use among HMO women?"
    assert r.text == r.context + "\n" + r.meta["long_answer"]
    assert r.meta["year"] == "2000" and "Humans" in r.meta["meshes"]
    assert len(r.meta["labels"]) == r.context.count("\n") + 1  # one label per context section
    # 36 of the 500 items have no YEAR (null in the file): kept, with year None.
    assert sum(x.meta["year"] is None for x in res.records) == 36


def test_mtsamples_real(shared_data: Path) -> None:
    path = str(shared_data / "mtsamples/mtsamples_400.csv")
    res = read_records("mtsamples", path, on_error="skip")
    # The file has 401 data rows (ids 0-400), not 400; 4 of them have an empty transcription.
    assert len(res.records) == 397 and res.skipped == 4
    assert res.reasons == [f"data row {n} (id {n - 1}): empty transcription" for n in (98, 117, 206, 264)]
    labels = Counter(r.label for r in res.records)
    assert labels["Surgery"] == 221 and labels["Urology"] == 156 and sum(labels.values()) == 397
    first = res.records[0]
    assert first.id == "0" and first.text.startswith("SUBJECTIVE:") and first.label == "Allergy / Immunology"
    assert first.meta["sample_name"] == "Allergic Rhinitis"
    with pytest.raises(DataError) as exc:
        read_records("mtsamples", path)
    assert path in str(exc.value) and "data row 98 (id 97): empty transcription" in str(exc.value)


def test_medmnist_real(shared_data: Path) -> None:
    path = str(shared_data / "pneumoniamnist/pneumoniamnist_trainval.npz")
    res = read_records("medmnist", path)
    assert Counter(r.meta["split"] for r in res.records) == {"train": 2428, "val": 270}
    assert res.records[0].id == "train-0" and res.records[2428].id == "val-0"
    assert {r.label for r in res.records} == {"normal", "pneumonia"}
    assert all(r.text == "" for r in res.records)
    raw = np.load(path)
    first = decode_image(res.records[0].image)
    assert first.shape == (28, 28) and first.dtype == np.uint8
    assert np.array_equal(first, raw["train_images"][0])  # PNG is lossless
    val = read_records("medmnist", path, options={"splits": ["val"]}).records
    assert len(val) == 270 and val[0].id == "val-0"
    assert [r.meta["label_index"] for r in val] == raw["val_labels"][:, 0].tolist()
    assert val[0].label == ("pneumonia" if raw["val_labels"][0, 0] == 1 else "normal")


# -------------------------------------------------------------------------- fixtures


def test_medqa_fixture(fixtures: Path) -> None:
    res = read_records("medqa", str(fixtures / "medqa.jsonl"))
    assert len(res.records) == 4 and res.skipped == 0  # the blank line is not a record
    # Ids are line numbers (line 3 is blank).
    assert [(r.id, r.answer) for r in res.records] == [("1", "B"), ("2", "C"), ("4", "C"), ("5", "C")]
    r = res.records[0]
    assert r.source == "medqa" and r.question.startswith("A 23-year-old woman presents with fever")
    assert r.options == {
        "A": "Acute cystitis",
        "B": "Acute pyelonephritis",
        "C": "Nephrolithiasis",
        "D": "Urethritis",
        "E": "Interstitial cystitis",
    }
    assert r.meta == {"meta_info": "step2&3", "answer_text": "Acute pyelonephritis"}
    assert r.text == (
        r.question + "\nA. Acute cystitis\nB. Acute pyelonephritis\nC. Nephrolithiasis\nD. Urethritis"
        "\nE. Interstitial cystitis\nAnswer: B. Acute pyelonephritis"
    )
    four = res.records[2]
    assert list(four.options) == ["A", "B", "C", "D"] and four.options["C"] == "Right coronary artery"


def test_medmcqa_fixture(fixtures: Path) -> None:
    res = read_records("medmcqa", str(fixtures / "medmcqa.jsonl"))
    answers = [(r.id, r.answer) for r in res.records]
    # cop is 1-based in the original release: 1 -> A, 4 -> D, 2 -> B; no cop -> unanswered.
    assert answers == [
        ("a1b2c3d4-0001", "A"),
        ("a1b2c3d4-0002", "D"),
        ("a1b2c3d4-0003", "B"),
        ("a1b2c3d4-0004", None),
    ]
    first = res.records[0]
    assert first.options == {"A": "Putamen", "B": "Thalamus", "C": "Pons", "D": "Cerebellum"}
    assert first.meta == {
        "choice_type": "single",
        "exp": "Putamen is the commonest site of hypertensive bleed.",
        "subject_name": "Medicine",
        "topic_name": "Neurology",
    }
    assert first.text.endswith(
        "Answer: A. Putamen\nExplanation: Putamen is the commonest site of hypertensive bleed."
    )
    test_row = res.records[3]
    assert "Answer:" not in test_row.text and test_row.options["A"] == "Measles"


def test_medmcqa_hf_export_is_zero_based(tmp_path: Path) -> None:
    row = {"id": "h1", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0}
    path = tmp_path / "hf.jsonl"
    rows = [row, dict(row, id="h2", cop=3), dict(row, id="h3", cop=-1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    zero_based = read_records("medmcqa", str(path), options={"cop_base": 0}).records
    assert [r.answer for r in zero_based] == ["A", "D", None]  # -1: an unanswered test row
    # Read as the original 1-based release, cop 0 is out of range.
    with pytest.raises(DataError, match=r"line 1 \(id h1\): 'cop' must be 1..4"):
        read_records("medmcqa", str(path))
    with pytest.raises(DataError, match="cop_base must be 0 or 1"):
        read_records("medmcqa", str(path), options={"cop_base": 2})


def test_mimic_iv_fixture(fixtures: Path) -> None:
    res = read_records("mimic_notes", str(fixtures / "mimic_iv_notes.csv"))
    assert [r.id for r in res.records] == ["10000001-DS-1", "10000002-DS-3", "10000003-RR-12"]
    first = res.records[0]
    assert '""green""' not in first.text and '"green" sputum, and fevers' in first.text  # CSV quoting undone
    assert first.text.startswith("Name:") and first.text.endswith(
        "COPD exacerbation, community-acquired pneumonia"
    )
    assert first.meta == {
        "subject_id": "10000001",
        "hadm_id": "20000001",
        "note_type": "DS",
        "note_seq": "1",
        "charttime": "2180-05-07 00:00:00",
        "storetime": "2180-05-09 15:26:00",
    }
    assert res.records[2].meta["note_type"] == "RR"
    assert res.records[2].text.endswith("IMPRESSION:  Right lower lobe pneumonia.")


def test_mimic_iii_fixture(fixtures: Path) -> None:
    res = read_records("mimic_notes", str(fixtures / "mimic_iii_noteevents.csv"), source="mimic3")
    assert [r.id for r in res.records] == ["174", "175", "176"]
    first = res.records[0]
    assert first.source == "mimic3" and first.meta["note_type"] == "Discharge summary"
    # Other columns keep their (lower-cased) names; the CATEGORY is also the note_type.
    assert first.meta["category"] == "Discharge summary" and first.meta["subject_id"] == "22532"
    assert first.meta["iserror"] == "" and first.meta["charttime"] == ""
    assert "atrial fibrillation, on warfarin" in first.text
    radiology = res.records[2]
    assert (
        radiology.meta["note_type"] == "Radiology" and radiology.meta["description"] == "CHEST (PORTABLE AP)"
    )
    assert 'Reason: "r/o infiltrate", fever, cough' in radiology.text


def test_mimic_notes_read_gzipped(tmp_path: Path, fixtures: Path) -> None:
    # MIMIC-IV-Note ships as discharge.csv.gz.
    gz = tmp_path / "discharge.csv.gz"
    gz.write_bytes(gzip.compress((fixtures / "mimic_iv_notes.csv").read_bytes()))
    plain = read_records("mimic_notes", str(fixtures / "mimic_iv_notes.csv")).records
    assert read_records("mimic_notes", str(gz)).records == plain


def test_text_fixture_splits(fixtures: Path) -> None:
    path = str(fixtures / "corpus.txt")
    whole = read_records("text", path).records
    assert len(whole) == 1 and whole[0].id == "corpus.txt:1" and whole[0].source == "text"
    assert whole[0].text.startswith("Clinical practice") and whole[0].text.endswith("do not improve.")
    paragraphs = read_records("text", path, options={"split": "paragraph"}).records
    assert [p.id for p in paragraphs] == ["corpus.txt:1", "corpus.txt:2", "corpus.txt:3"]
    assert paragraphs[0].text == (
        "Clinical practice guidelines recommend amoxicillin as first-line therapy for\n"
        "community-acquired pneumonia in otherwise healthy adults."
    )
    assert paragraphs[2].text == "Follow-up is advised within 48 to 72 hours if symptoms do not improve."
    lines = read_records("text", path, options={"split": "line"}).records
    assert len(lines) == 5 and lines[4].id == "corpus.txt:5" and lines[4].text == paragraphs[2].text


def test_text_paragraphs_split_at_whitespace_only_lines_and_folders(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("one\r\n  \t\r\ntwo\n\n\n\nthree\n")
    (tmp_path / "a.md").write_text("\ufeffalpha")  # a byte-order mark is not text
    (tmp_path / "skip.csv").write_text("not,text")
    res = read_records("text", str(tmp_path), options={"split": "paragraph"})
    assert [(r.id, r.text) for r in res.records] == [
        ("a.md:1", "alpha"),
        ("b.txt:1", "one"),
        ("b.txt:2", "two"),
        ("b.txt:3", "three"),
    ]
    with pytest.raises(DataError, match="split must be one of document, paragraph, line, got 'sentence'"):
        read_records("text", str(tmp_path), options={"split": "sentence"})


def test_jsonl_fixture(fixtures: Path) -> None:
    res = read_records("jsonl", str(fixtures / "corpus.jsonl"), source="guidelines")
    assert [r.id for r in res.records] == ["g1", "g2", "3"]  # the third has no id: its line number
    assert res.records[0].source == "guidelines" and res.records[0].meta == {"url": "guideline/1"}
    assert res.records[0].text.startswith("Hand hygiene is the single most effective")
    no_ids = read_records("jsonl", str(fixtures / "corpus.jsonl"), options={"id_field": None}).records
    assert [r.id for r in no_ids] == ["1", "2", "3"] and no_ids[0].meta == {"id": "g1", "url": "guideline/1"}


def test_jsonl_keeps_line_separators_inside_strings(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False) writes U+2028 and form feeds raw inside strings;
    # str.splitlines would cut such a line in two.
    rows = [{"id": "a", "text": "first\u2028second\x0cthird"}, {"id": "b", "text": "plain"}]
    path = tmp_path / "sep.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    res = read_records("jsonl", str(path))
    assert [r.text for r in res.records] == ["first\u2028second\x0cthird", "plain"]


def test_parquet_generic_corpus(tmp_path: Path) -> None:
    pq.write_table(pa.table({"doc": ["a b c", "", "d e"], "year": [1, 2, 3]}), tmp_path / "c.parquet")
    res = read_records("parquet", str(tmp_path / "c.parquet"), on_error="skip", options={"text_field": "doc"})
    assert [(r.id, r.text) for r in res.records] == [("1", "a b c"), ("3", "d e")] and res.skipped == 1
    assert res.records[1].meta == {"year": 3} and res.records[1].source == "parquet"
    with pytest.raises(DataError, match=r"no column 'text'.*\['doc', 'year'\]"):
        read_records("parquet", str(tmp_path / "c.parquet"))


def test_mtsamples_kaggle_export_with_unnamed_index_and_bom(tmp_path: Path) -> None:
    # The Kaggle CSV starts with an unnamed pandas index column; Excel adds a BOM.
    text = (
        "\ufeff,description,medical_specialty,sample_name,transcription,keywords\n"
        '7,d,Urology,Cystoscopy,"PROCEDURE:,  Cystoscopy.\x0cNo stones, no tumour.",k\n'
    )
    path = tmp_path / "kaggle.csv"
    path.write_text(text, encoding="utf-8")
    (r,) = read_records("mtsamples", str(path)).records
    assert (
        r.id == "7" and r.label == "Urology" and r.text == "PROCEDURE:,  Cystoscopy.\x0cNo stones, no tumour."
    )
    assert r.meta == {"description": "d", "sample_name": "Cystoscopy", "keywords": "k"}


# ------------------------------------------------------------------ malformed records


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _both_modes(
    reader: str, path: str, locator: str, reason: str, good: list[str], options: dict[str, Any] | None = None
) -> None:
    """Raise mode names the file, record and reason; skip mode counts one and keeps the ``good`` ids."""
    with pytest.raises(DataError) as exc:
        read_records(reader, path, options=options)
    msg = str(exc.value)
    assert path in msg and locator in msg and reason in msg, msg
    res = read_records(reader, path, on_error="skip", options=options)
    assert res.skipped == 1 and [r.id for r in res.records] == good
    assert res.reasons == [f"{locator}: {res.reasons[0].split(': ', 1)[1]}"] and reason in res.reasons[0]


def test_pubmedqa_malformed(tmp_path: Path) -> None:
    good = {"QUESTION": "q?", "CONTEXTS": ["c"], "LONG_ANSWER": "a", "final_decision": "yes"}
    path = _write(
        tmp_path, "p.json", json.dumps({"1": good, "2": dict(good, final_decision="probably"), "3": good})
    )
    _both_modes("pubmedqa", path, "PMID 2", "final_decision must be one of", good=["1", "3"])
    path = _write(tmp_path, "c.json", json.dumps({"1": good, "2": dict(good, CONTEXTS="c"), "3": good}))
    _both_modes("pubmedqa", path, "PMID 2", "CONTEXTS must be a non-empty list of strings", good=["1", "3"])
    path = _write(tmp_path, "n.json", json.dumps({"1": good, "2": [good], "3": good}))
    _both_modes("pubmedqa", path, "PMID 2", "expected an object, got list", good=["1", "3"])
    broken = _write(tmp_path, "broken.json", '{"1": {"QUESTION": "q"},\n "2": }')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON at line 2, column 7"):
        read_records("pubmedqa", broken)


def test_mtsamples_malformed(tmp_path: Path) -> None:
    header = "id,description,medical_specialty,sample_name,transcription,keywords\n"
    rows = '0,d,Surgery,s,"note one",k\n1,d,,s,"note two",k\n2,d,Urology,s,x,k\n'
    path = _write(tmp_path, "m.csv", header + rows)
    _both_modes("mtsamples", path, "data row 2 (id 1)", "empty medical_specialty", good=["0", "2"])
    rows = '0,d,Surgery,s,"note one",k\n1,d,Surgery,s,  ,k\n2,d,Urology,s,x,k\n'
    path = _write(tmp_path, "e.csv", header + rows)
    _both_modes("mtsamples", path, "data row 2 (id 1)", "empty transcription", good=["0", "2"])
    rows = '0,d,Surgery,s,"note one",k\n1,d,Surgery,s,note, two,k\n2,d,Urology,s,x,k\n'
    path = _write(tmp_path, "x.csv", header + rows)
    _both_modes("mtsamples", path, "data row 2 (id 1)", "7 fields but the header has 6", good=["0", "2"])
    no_col = _write(tmp_path, "n.csv", "id,description\n0,d\n")
    with pytest.raises(
        DataError,
        match=r"n.csv: missing CSV column\(s\) \['medical_specialty', 'transcription'\]; the header has",
    ):
        read_records("mtsamples", no_col)


def test_medqa_malformed(tmp_path: Path) -> None:
    ok = {"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "A", "answer": "x"}
    lines = [json.dumps(ok), json.dumps(dict(ok, answer_idx="E")), json.dumps(ok)]
    path = _write(tmp_path, "q.jsonl", "\n".join(lines) + "\n")
    _both_modes(
        "medqa", path, "line 2", "'answer_idx' 'E' is not one of the options ['A', 'B']", good=["1", "3"]
    )
    path = _write(tmp_path, "j.jsonl", json.dumps(ok) + "\n{not json\n" + json.dumps(ok) + "\n")
    _both_modes("medqa", path, "line 2", "invalid JSON", good=["1", "3"])
    lines = [json.dumps(ok), json.dumps({k: v for k, v in ok.items() if k != "question"}), json.dumps(ok)]
    path = _write(tmp_path, "m.jsonl", "\n".join(lines))
    _both_modes("medqa", path, "line 2", "missing or empty 'question'", good=["1", "3"])
    path = _write(tmp_path, "o.jsonl", "\n".join([json.dumps(ok), json.dumps(dict(ok, options=["x", "y"]))]))
    _both_modes("medqa", path, "line 2", "'options' must be an object", good=["1"])


def test_medmcqa_malformed(tmp_path: Path) -> None:
    ok = {"id": "x1", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}
    path = _write(
        tmp_path, "m.jsonl", "\n".join([json.dumps(ok), json.dumps(dict(ok, id="x2", cop=5))]) + "\n"
    )
    _both_modes("medmcqa", path, "line 2 (id x2)", "'cop' must be 1..4 (cop_base=1), got 5", good=["x1"])
    missing = {k: v for k, v in ok.items() if k != "opc"}
    path = _write(tmp_path, "o.jsonl", "\n".join([json.dumps(dict(missing, id="x0")), json.dumps(ok)]) + "\n")
    _both_modes("medmcqa", path, "line 1 (id x0)", "options 'opa'..'opd' must all be strings", good=["x1"])


def test_mimic_notes_malformed(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "n.csv", 'note_id,note_type,text\nn1,DS,"text one"\nn2,DS,""\nn3,RR,"text three"\n'
    )
    _both_modes("mimic_notes", path, "data row 2 (note_id n2)", "empty note text", good=["n1", "n3"])
    path = _write(tmp_path, "i.csv", 'ROW_ID,CATEGORY,TEXT\n1,Nursing,"a"\n,Nursing,"b"\n3,Nursing,"c"\n')
    _both_modes("mimic_notes", path, "data row 2", "empty ROW_ID", good=["1", "3"])
    wrong = _write(tmp_path, "w.csv", "subject_id,body\n1,x\n")
    with pytest.raises(DataError, match=r"w.csv: not a MIMIC notes CSV.*\['subject_id', 'body'\]"):
        read_records("mimic_notes", wrong)
    unclosed = _write(tmp_path, "u.csv", 'note_id,text\nn1,"a"\nn2,"open quote\n')
    with pytest.raises(DataError, match=r"u.csv: malformed CSV near data row 2"):
        read_records("mimic_notes", unclosed)


def test_text_malformed(tmp_path: Path) -> None:
    # Plain text has no records to skip: a file that is not UTF-8 is a file-level error.
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\nfi\u00e8vre".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(bad byte at offset 5\)"):
        read_records("text", str(path), options={"split": "line"})
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(bad byte at offset 5\)"):
        read_records("text", str(path), on_error="skip")
    csv_path = tmp_path / "notes.csv"
    csv_path.write_bytes(b"note_id,text\nn1,ok\nn2,fi\xe8vre\n")
    with pytest.raises(DataError, match=r"notes.csv: not UTF-8 text \(bad byte at offset 24\)"):
        read_records("mimic_notes", str(csv_path))


def test_jsonl_malformed(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.jsonl", '{"text": "a"}\n{"text": 5}\n{"text": "b"}\n')
    _both_modes("jsonl", path, "line 2", "non-string 'text'", good=["1", "3"])
    path = _write(tmp_path, "l.jsonl", '{"text": "a"}\n["text"]\n{"text": "b"}\n')
    _both_modes("jsonl", path, "line 2", "expected a JSON object, got list", good=["1", "3"])
    path = _write(tmp_path, "b.jsonl", '{"text": "a"}\n{"text": "b",}\n')
    _both_modes("jsonl", path, "line 2", "invalid JSON", good=["1"])


def test_parquet_malformed(tmp_path: Path) -> None:
    path = str(tmp_path / "c.parquet")
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["one", None, "three"]}), path)
    _both_modes("parquet", path, "row 2", "missing, empty or non-string 'text'", good=["a", "c"])
    fake = _write(tmp_path, "fake.parquet", "this is not parquet")
    with pytest.raises(DataError, match=r"fake.parquet: not a readable Parquet file"):
        read_records("parquet", fake)


def test_medmnist_malformed(tmp_path: Path) -> None:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    path = str(tmp_path / "pneumoniamnist_x.npz")
    np.savez(path, train_images=images, train_labels=np.array([[0], [7], [1]], dtype=np.uint8))
    _both_modes(
        "medmnist", path, "train_images[1]", "label 7 is not one of [0, 1]", good=["train-0", "train-2"]
    )
    floats = str(tmp_path / "floats.npz")
    np.savez(floats, train_images=images.astype(np.float32), train_labels=np.zeros((3, 1), np.uint8))
    with pytest.raises(
        DataError, match=r"floats.npz: malformed record at train_images\[0\]: image dtype float32"
    ):
        read_records("medmnist", floats)
    assert read_records("medmnist", floats, on_error="skip").skipped == 3


def test_medmnist_file_level_errors(tmp_path: Path) -> None:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    labels = np.zeros((3, 1), dtype=np.uint8)
    cases = {
        "mismatch": (
            {"train_images": images, "train_labels": labels[:2]},
            "has 3 images but 'train_labels' has 2",
        ),
        "nolabels": ({"train_images": images}, "'train_images' has no matching 'train_labels'"),
        "noimages": ({"x": labels}, r"no '<split>_images' arrays; the file holds \['x'\]"),
        "multilabel": (
            {"train_images": images, "train_labels": np.zeros((3, 14), np.uint8)},
            r"'train_labels' must be \(N, 1\) integer class indices.*multi-label",
        ),
        "badshape": (
            {"train_images": images[..., None].repeat(2, -1), "train_labels": labels},
            "(N, H, W, 1|3)",
        ),
    }
    for name, (arrays, message) in cases.items():
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, **arrays)
        with pytest.raises(DataError, match=message) as exc:
            read_records("medmnist", path, on_error="skip")
        assert path in str(exc.value)
    not_npz = _write(tmp_path, "image.npz", "GIF89a not an archive")
    with pytest.raises(DataError, match="image.npz: not a readable .npz file"):
        read_records("medmnist", not_npz)
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, images)
    with pytest.raises(
        DataError, match=r"single.npz: not an .npz archive \(a single array of shape \(3, 28, 28\)\)"
    ):
        read_records("medmnist", str(npy))
    ok = str(tmp_path / "ok.npz")
    np.savez(ok, train_images=images, train_labels=labels)
    with pytest.raises(DataError, match=r"ok.npz: split 'test' not in the file; it has \['train'\]"):
        read_records("medmnist", ok, options={"splits": ["test"]})


def test_medmnist_splits_order_rgb_and_label_names(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    path = str(tmp_path / "dermamnist.npz")
    np.savez(
        path,
        test_images=rgb[:1],
        test_labels=np.array([[1]]),
        train_images=rgb,
        train_labels=np.array([[0], [1]]),
    )
    res = read_records("medmnist", path)
    # Every split, in train/val/test order; an unknown set's labels are their index.
    assert [(r.id, r.label) for r in res.records] == [("train-0", "0"), ("train-1", "1"), ("test-0", "1")]
    assert np.array_equal(decode_image(res.records[0].image), rgb[0])
    # Label names from a JSON or YAML config may have string keys.
    named = read_records(
        "medmnist", path, options={"splits": "test", "label_names": {"0": "benign", "1": "mal"}}
    )
    assert [(r.id, r.label, r.meta) for r in named.records] == [
        ("test-0", "mal", {"split": "test", "label_index": 1})
    ]
    with pytest.raises(DataError, match="label_names: keys must be label indices"):
        read_records("medmnist", path, options={"label_names": {"zero": "benign"}})


# ----------------------------------------------------------------------- entry point


def test_reader_entry_point_errors(tmp_path: Path, fixtures: Path) -> None:
    with pytest.raises(DataError, match=r"unknown reader 'pubmed_qa'. Did you mean 'pubmedqa'\?"):
        read_records("pubmed_qa", "x")
    with pytest.raises(DataError, match=r"unknown reader 'xml'. Valid readers: pubmedqa, mtsamples"):
        read_records("xml", "x")
    with pytest.raises(DataError, match=r"missing.json: file not found"):
        read_records("pubmedqa", str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match=r"is a folder; the 'jsonl' reader takes a file"):
        read_records("jsonl", str(tmp_path))
    with pytest.raises(
        DataError,
        match=r"reader 'jsonl' has no option\(s\) \['txt_field'\]; valid options: text_field, id_field",
    ):
        read_records("jsonl", str(fixtures / "corpus.jsonl"), options={"txt_field": "x"})
    with pytest.raises(
        DataError, match=r"reader 'pubmedqa' has no option\(s\) \['split'\]; valid options: none"
    ):
        read_records("pubmedqa", str(fixtures / "corpus.jsonl"), options={"split": "line"})
    with pytest.raises(DataError, match="on_error must be"):
        read_records("jsonl", str(fixtures / "corpus.jsonl"), on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="jsonl option text_field must be a column/field name"):
        read_records("jsonl", str(fixtures / "corpus.jsonl"), options={"text_field": 3})
    assert list(READERS) == [
        "pubmedqa",
        "mtsamples",
        "medqa",
        "medmcqa",
        "mimic_notes",
        "mimic_outcomes",
        "text",
        "jsonl",
        "parquet",
        "medmnist",
        "image_csv",
        "dicom",
        "vqa_json",
        "report_json",
        "breast_cancer_csv",
        "mitbih_csv",
]
    assert reader_options("medmnist") == ["splits", "label_names"]
    assert read_records("jsonl", Path(fixtures / "corpus.jsonl")).records[0].id == "g1"  # type: ignore[arg-type]
