"""Image decoding, DICOM, the one preprocessing, and the image readers on their schema fixtures (no Ray)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from ray_med.data import decode_image, read_records, reader_options
from ray_med.data.images import (
    ImageSpec,
    array_to_float,
    encode_record_image,
    open_image,
    pad_to_square,
    preprocess,
    read_dicom,
    read_dicom_header,
    resize,
    to_float_array,
    to_png,
)
from ray_med.errors import ConfigError, DataError

SPEC = ImageSpec(size=32)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _check_output(out: np.ndarray, size: int = 32) -> None:
    assert out.shape == (3, size, size) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= -1.0 and out.max() <= 1.0  # mean = std = 0.5


def _dicom_bytes(name: str, **changes: Any) -> bytes:
    """A pydicom test file with some elements changed, saved back to bytes."""
    ds = pydicom.dcmread(get_testdata_file(name))
    for key, value in changes.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


# ------------------------------------------------------------------------ to_float_array


def test_grey_is_stacked_into_three_equal_channels() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    arr = to_float_array(Image.fromarray(grey))
    assert arr.shape == (3, 4, 3) and arr.dtype == np.float32
    assert np.allclose(arr[..., 0], grey / 255.0) and (arr[..., 0] == arr[..., 2]).all()
    one_bit = to_float_array(Image.fromarray(grey > 100))
    assert set(np.unique(one_bit)) == {0.0, 1.0}
    out = preprocess(Image.fromarray(grey), SPEC)
    _check_output(out)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


def test_alpha_is_composited_onto_black() -> None:
    rgba = np.full((2, 2, 4), 255, dtype=np.uint8)
    rgba[0, 0, 3] = 0  # a fully transparent white pixel
    rgba[0, 1, 3] = 128
    arr = to_float_array(Image.fromarray(rgba))
    assert (arr[0, 0] == 0).all() and (arr[1] == 1).all()
    assert np.allclose(arr[0, 1], 128 / 255)
    la = to_float_array(Image.fromarray(rgba[..., [0, 3]]))  # "LA"
    assert np.allclose(la, arr)
    assert np.allclose(array_to_float(rgba), arr)  # an RGBA array follows the same rule


def test_palette_with_and_without_transparency() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(colors=16)
    assert pal.mode == "P"
    assert np.allclose(to_float_array(pal), np.asarray(pal.convert("RGB")) / 255.0)
    index = int(np.asarray(pal)[0, 0])
    pal.info["transparency"] = index
    arr = to_float_array(pal)
    transparent = np.asarray(pal) == index
    assert (arr[transparent] == 0).all()
    assert np.allclose(arr[~transparent], (np.asarray(pal.convert("RGB")) / 255.0)[~transparent])


def test_sixteen_bit_is_min_max_scaled() -> None:
    # 12-bit detector data in 16-bit words: 0..4000 must span [0, 1], not [0, 0.06].
    grad = np.linspace(0, 4000, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    img = Image.fromarray(grad)
    assert img.mode == "I;16"
    arr = to_float_array(img)
    assert arr.min() == 0.0 and arr.max() == 1.0
    assert np.allclose(arr[..., 0], grad / 4000.0)
    assert len(np.unique(arr)) > 256  # no 8-bit quantisation on the way
    big_endian = Image.frombytes("I;16B", (64, 64), grad.astype(">u2").tobytes())
    assert np.array_equal(to_float_array(big_endian), arr)
    assert np.array_equal(to_float_array(Image.fromarray(grad.astype(np.int32))), arr)  # "I"
    assert (to_float_array(Image.fromarray(np.full((4, 4), 700, np.uint16))) == 0).all()  # constant
    # Through resize too: more than 256 levels survive preprocessing of a smooth ramp.
    assert len(np.unique(preprocess(img, ImageSpec(size=64))[0])) > 256


def test_float_images() -> None:
    hu = np.linspace(-1000, 3000, 16, dtype=np.float32).reshape(4, 4)
    arr = to_float_array(Image.fromarray(hu))  # "F", outside [0, 1]: min-max
    assert np.allclose(arr[..., 0], (hu + 1000) / 4000)
    inside = np.linspace(0.2, 0.7, 16, dtype=np.float32).reshape(4, 4)
    assert np.allclose(to_float_array(Image.fromarray(inside))[..., 0], inside)  # kept as it is
    assert np.allclose(array_to_float(inside.astype(np.float64))[..., 1], inside)
    with pytest.raises(DataError, match="NaN or infinite"):
        array_to_float(np.array([[0.0, np.nan]]))


def test_other_modes_become_rgb() -> None:
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 0, 0))
    assert np.allclose(to_float_array(cmyk)[0, 0], [1.0, 0.0, 1.0])
    ycc = Image.new("RGB", (3, 2), (10, 200, 30)).convert("YCbCr")
    assert np.allclose(to_float_array(ycc)[0, 0], np.array([10, 200, 30]) / 255, atol=0.02)


# ------------------------------------------------------------------------- geometry


def test_pad_to_square_is_symmetric() -> None:
    arr = np.ones((2, 4, 3), dtype=np.float32)
    out = pad_to_square(arr, fill=0.25)
    assert out.shape == (4, 4, 3)
    assert (out[[0, 3]] == 0.25).all() and (out[1:3] == 1).all()
    odd = pad_to_square(np.ones((6, 3, 1), dtype=np.float32))  # 3 columns of padding: 1 left, 2 right
    assert odd.shape == (6, 6, 1)
    assert (odd[:, 0] == 0).all() and (odd[:, 1:4] == 1).all() and (odd[:, 4:] == 0).all()
    square = np.ones((3, 3, 3), dtype=np.float32)
    assert pad_to_square(square) is square


def test_non_square_image_is_centred_on_the_mean_colour() -> None:
    white = Image.new("L", (64, 32), 255)  # wide: bands of the 8-bit mean above and below (LLaVA's padding)
    out = preprocess(white, ImageSpec(size=64))
    _check_output(out, 64)
    pad = (int(0.5 * 255) / 255 - 0.5) / 0.5  # 127/255, normalised: just below zero
    assert np.allclose(out[:, :14], pad) and np.allclose(out[:, 50:], pad)
    assert np.allclose(out[:, 18:46], 1.0)
    assert np.allclose(pad_to_square(np.ones((1, 2, 3), np.float32), (0.1, 0.2, 0.3))[1, 0], [0.1, 0.2, 0.3])
    tall = preprocess(Image.new("L", (32, 64), 255), ImageSpec(size=64))
    assert np.allclose(tall, out.transpose(0, 2, 1))


def test_resize_keeps_float_precision_and_range() -> None:
    ramp = np.linspace(0, 1, 50 * 50, dtype=np.float32).reshape(50, 50, 1)
    out = resize(ramp, 20)
    assert out.shape == (20, 20, 1) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out * 255, np.round(out * 255))  # not quantised to 8 bits
    checker = (np.indices((8, 8)).sum(0) % 2).astype(np.float32)[..., None]
    up = resize(checker, 33)  # bicubic overshoots at sharp edges; clipped
    assert up.min() >= 0 and up.max() <= 1


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 2), (1500, 2000), (2000, 1500)])
def test_tiny_and_large_images(shape: tuple[int, int]) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = preprocess(arr, SPEC)
    _check_output(out)
    if shape == (1, 1):
        expected = arr[0, 0] / 255.0 * 2 - 1  # a single pixel: its colour in the centre
        assert np.allclose(out[:, 16, 16], expected, atol=1e-5)


def test_same_image_as_bytes_pil_and_array() -> None:
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (25, 25, 4), dtype=np.uint8)
    deep = rng.integers(0, 4096, (24, 18), dtype=np.uint16)
    for arr in (grey, rgb, rgba, deep):
        img = Image.fromarray(arr)
        as_pil = preprocess(img, SPEC)
        _check_output(as_pil)
        assert np.array_equal(preprocess(_png(img), SPEC), as_pil)
        assert np.array_equal(preprocess(arr, SPEC), as_pil)
    assert np.array_equal(preprocess(grey[..., None], SPEC), preprocess(grey, SPEC))


def test_normalisation_uses_the_spec() -> None:
    spec = ImageSpec(size=4, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    out = preprocess(np.full((4, 4, 3), 255, np.uint8), spec)
    assert np.allclose(out[:, 0, 0], (1 - np.array(spec.mean)) / np.array(spec.std), atol=1e-6)
    for bad in ({"size": 0}, {"size": 8, "std": (0.5, 0.0, 0.5)}, {"size": 8, "mean": (0.5, 0.5)}):
        with pytest.raises(ConfigError):
            ImageSpec(**bad)


def test_bad_inputs_raise_one_line_data_errors(tmp_path: Path) -> None:
    for data in (b"%PDF-1.4 not a picture", b"", _png(Image.new("L", (8, 8)))[:40]):
        with pytest.raises(DataError) as exc:
            preprocess(data, SPEC)
        msg = str(exc.value)
        assert msg.startswith("image is not a readable image (") and "\n" not in msg
        assert exc.value.__cause__ is None and exc.value.__suppress_context__
    with pytest.raises(DataError, match="unrecognised image format"):
        open_image(b"GIF87 nope", what="upload")
    with pytest.raises(DataError, match=r"^x-ray: cannot read .*missing.png"):
        open_image(tmp_path / "missing.png", what="x-ray")
    with pytest.raises(DataError, match="image is empty"):
        preprocess(np.zeros((0, 5), np.uint8), SPEC)
    with pytest.raises(DataError, match="image is empty"):
        preprocess(Image.new("L", (0, 3)), SPEC)
    for shape in ((4, 4, 2), (4, 4, 5), (2, 4, 4, 3), (7,)):
        with pytest.raises(DataError, match=r"must be \(H, W\), \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\)"):
            preprocess(np.zeros(shape, np.uint8), SPEC)
    with pytest.raises(DataError, match="integer, boolean or float"):
        preprocess(np.array([["a"]]), SPEC)
    with pytest.raises(DataError, match="expected image bytes, a PIL image or a numpy array"):
        preprocess("image.png", SPEC)  # type: ignore[arg-type]


def test_to_png_and_record_encoding(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    back = decode_image(to_png(ramp))
    assert back.dtype == np.uint8 and back.shape == (3, 4)
    assert np.array_equal(back, np.round(ramp * 255).astype(np.uint8))
    assert decode_image(to_png(np.stack([ramp] * 3, -1))).shape == (3, 4, 3)
    with pytest.raises(DataError, match="float array"):
        to_png(np.zeros((2, 2), np.uint8))
    # A PNG is kept as it is; a 16-bit TIFF stays 16-bit; a float TIFF becomes 8-bit grey.
    png = _png(Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)))
    assert encode_record_image(png) == png
    deep = np.arange(16, dtype=np.uint16).reshape(4, 4) * 200
    tiff = tmp_path / "deep.tiff"
    Image.fromarray(deep).save(tiff)
    assert np.array_equal(decode_image(encode_record_image(tiff)), deep)
    floats = tmp_path / "f.tiff"
    Image.fromarray(deep.astype(np.float32)).save(floats)
    assert decode_image(encode_record_image(floats)).dtype == np.uint8
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(jpeg, format="JPEG")
    assert Image.open(io.BytesIO(encode_record_image(jpeg.getvalue()))).format == "PNG"


# ---------------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize(("name", "shape"), [("CT_small.dcm", (128, 128)), ("MR_small.dcm", (64, 64))])
def test_read_dicom_test_files(name: str, shape: tuple[int, int]) -> None:
    path = get_testdata_file(name)
    arr = read_dicom(path)
    assert arr.shape == shape and arr.dtype == np.float32
    assert np.isfinite(arr).all() and arr.min() == 0.0 and arr.max() == 1.0
    data = Path(path).read_bytes()
    assert np.array_equal(read_dicom(data), arr)
    # A DICOM goes through the same preprocessing as any image, from bytes or from its array.
    assert open_image(data).mode == "F"
    assert np.array_equal(preprocess(data, SPEC), preprocess(arr, SPEC))
    _check_output(preprocess(data, SPEC))


def test_dicom_multiframe_and_colour() -> None:
    arr = read_dicom(get_testdata_file("SC_rgb_rle_2frame.dcm"))  # two RGB frames: the first one
    assert arr.shape == (100, 100, 3) and 0 <= arr.min() and arr.max() <= 1
    assert read_dicom(get_testdata_file("examples_palette.dcm")).shape[-1] == 3  # palette -> RGB


def test_monochrome1_is_inverted() -> None:
    mono2 = read_dicom(_dicom_bytes("MR_small.dcm"))
    mono1 = read_dicom(_dicom_bytes("MR_small.dcm", PhotometricInterpretation="MONOCHROME1"))
    assert np.allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_rescale_and_window_are_applied() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw = ds.pixel_array.astype(np.float64)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)

    def expected(slope: float) -> np.ndarray:
        # DICOM PS3.3 C.11.2.1.2.1 (LINEAR): soft-tissue window centre 40 HU, width 400.
        hu = raw * slope - 1024.0
        windowed = np.clip((hu - 39.5) / 399.0 + 0.5, 0.0, 1.0)
        return (windowed - windowed.min()) / (windowed.max() - windowed.min())

    windowed = read_dicom(_dicom_bytes("CT_small.dcm", WindowCenter=40, WindowWidth=400))
    assert np.allclose(windowed, expected(1.0), atol=1e-5)
    steeper = read_dicom(_dicom_bytes("CT_small.dcm", WindowCenter=40, WindowWidth=400, RescaleSlope=2))
    assert np.allclose(steeper, expected(2.0), atol=1e-5)
    assert not np.allclose(steeper, windowed, atol=0.05)


def test_bad_dicom_raises_one_line_data_error(tmp_path: Path) -> None:
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    for bad, reason in (
        (data[:500], "not an image, or the file is truncated"),
        (data[: len(data) - 1000], "pixel data"),
        (b"x" * 200, "no DICOM file header"),
    ):
        with pytest.raises(DataError) as exc:
            read_dicom(bad, what="scan.dcm")
        msg = str(exc.value)
        assert msg.startswith("scan.dcm: not a readable DICOM image (") and reason in msg, msg
        assert "\n" not in msg and exc.value.__suppress_context__
    with pytest.raises(DataError, match="not a readable DICOM image"):
        preprocess(data[:500], SPEC)  # DICM magic: goes to read_dicom
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(_png(Image.new("L", (4, 4))))
    with pytest.raises(DataError, match=r"fake.dcm: not a readable DICOM image \(no DICOM file header\)"):
        open_image(fake, what=str(fake))


def test_dicom_header() -> None:
    header = read_dicom_header(get_testdata_file("CT_small.dcm"))
    assert header["Modality"] == "CT" and header["PhotometricInterpretation"] == "MONOCHROME2"
    assert (header["Rows"], header["Columns"]) == (128, 128)
    assert header["SOPInstanceUID"].startswith("1.3.6.1.4.1.5962")


# -------------------------------------------------------------------------------- readers


def test_vqa_rad_fixture(fixtures: Path) -> None:
    res = read_records("vqa_json", str(fixtures / "vqa_rad/vqa_rad.json"))
    recs = res.records
    assert len(recs) == 8 and res.skipped == 0
    assert [r.id for r in recs] == [str(i) for i in range(1, 9)]
    assert sum(r.meta["answer_type"] == "CLOSED" for r in recs) == 4
    assert recs[0].question == "Is there evidence of an acute infarct?" and recs[0].answer == "No"
    assert recs[0].text == "Is there evidence of an acute infarct?\nAnswer: No"
    assert recs[5].answer == "2"  # a numeric answer in the JSON, kept as text
    assert recs[0].meta["image_organ"] == "HEAD" and recs[0].meta["image_name"] == "synpic90001.jpg"
    assert recs[0].source == "vqa_json" and recs[0].label is None
    image = decode_image(recs[0].image)
    assert image.shape == (64, 64) and image.dtype == np.uint8
    assert recs[0].image == recs[1].image  # two questions on one image
    _check_output(preprocess(recs[0].image, SPEC))


def test_slake_fixture_languages(fixtures: Path) -> None:
    path = str(fixtures / "slake/slake.json")
    english = read_records("vqa_json", path).records  # images found in imgs/ beside the JSON
    assert [r.id for r in english] == ["9001", "9002", "9003"]
    assert english[2].meta["content_type"] == "KG" and english[2].meta["triple"][1] == "main function"
    every = read_records("vqa_json", path, options={"lang": None}).records
    assert len(every) == 4
    chinese = read_records("vqa_json", path, options={"lang": "zh"}).records
    assert [(r.id, r.answer) for r in chinese] == [("9004", "X光")]
    same = read_records("vqa_json", path, options={"image_dir": "imgs"}).records
    assert [r.image for r in same] == [r.image for r in english]
    with pytest.raises(DataError, match="image_dir .*nowhere is not a folder"):
        read_records("vqa_json", path, options={"image_dir": "nowhere"})
    with pytest.raises(DataError, match="option lang must be a language code"):
        read_records("vqa_json", path, options={"lang": 3})


def test_vqa_json_bad_items(tmp_path: Path, fixtures: Path) -> None:
    folder = tmp_path / "vqa"
    shutil.copytree(fixtures / "vqa_rad", folder)
    items = json.loads((folder / "vqa_rad.json").read_text())
    items[2]["image_name"] = "synpic00000.jpg"  # not on disk
    items[4]["answer"] = ""
    (folder / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    items[6]["image_name"] = "broken.jpg"
    items.append("not an object")
    path = folder / "vqa_rad.json"
    path.write_text(json.dumps(items))
    with pytest.raises(DataError) as exc:
        read_records("vqa_json", str(path))
    assert str(path) in str(exc.value) and "item 3 (qid 3): image file not found" in str(exc.value)
    res = read_records("vqa_json", str(path), on_error="skip")
    assert [r.id for r in res.records] == ["1", "2", "4", "6", "8"] and res.skipped == 4
    assert res.reasons[1] == "item 5 (qid 5): missing or empty 'answer'"
    assert res.reasons[2].startswith("item 7 (qid 7): image broken.jpg is not a readable image (")
    assert res.reasons[3] == "item 9: expected a JSON object, got str"
    (folder / "obj.json").write_text('{"qid": 1}')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        read_records("vqa_json", str(folder / "obj.json"))


def test_mimic_cxr_reports_fixture(fixtures: Path, tmp_path: Path) -> None:
    path = fixtures / "mimic_cxr/reports.json"
    recs = read_records("report_json", str(path)).records
    assert len(recs) == 6
    first = recs[0]
    assert first.id == "0a1b2c3d-4e5f6a7b-8c9d0e1f-2a3b4c5d-6e7f8a9b"
    assert first.text == (
        "FINDINGS: The lungs are clear without focal consolidation. No pleural effusion or pneumothorax. "
        "The cardiomediastinal silhouette is normal. IMPRESSION: No acute cardiopulmonary process."
    )
    assert first.answer == first.text and first.question is None
    assert first.meta["study_id"] == 50000001 and first.meta["subject_id"] == 10000101
    assert first.meta["view_position"] == "PA"
    assert first.meta["impression"] == "No acute cardiopulmonary process."
    assert recs[3].text == "IMPRESSION: No acute intrathoracic process."  # empty findings
    assert recs[4].text.startswith("FINDINGS: Endotracheal tube") and "IMPRESSION" not in recs[4].text
    assert decode_image(first.image).shape == (64, 64)
    # JSONL works too; a study without report text or without its image is a bad record.
    items = json.loads(path.read_text())
    items[1]["findings"], items[1]["impression"] = "  ", None
    items[2]["image_path"] = "files/p10/missing.jpg"
    del items[3]["dicom_id"]
    jsonl = tmp_path / "reports.jsonl"
    jsonl.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    res = read_records("report_json", str(jsonl), on_error="skip", options={"image_dir": str(path.parent)})
    assert [r.id for r in res.records] == [recs[0].id, "50000004", recs[4].id, recs[5].id]
    assert res.skipped == 2 and "neither 'findings' nor 'impression' has text" in res.reasons[0]
    assert res.reasons[1].startswith(f"line 3 (id {items[2]['dicom_id']}): image file not found")


def test_image_csv_fixture_modes(fixtures: Path) -> None:
    path = fixtures / "image_csv/labels.csv"
    recs = read_records("image_csv", str(path)).records
    assert [(r.id, r.label) for r in recs] == [
        ("cxr-001", "normal"),
        ("cxr-002", "pneumonia"),
        ("cxr-003", "normal"),
        ("cxr-004", "pneumonia"),
        ("cxr-005", "normal"),
    ]
    assert recs[0].meta == {"view": "PA", "sex": "F", "image_path": "images/grey_L.png"}
    modes = [Image.open(io.BytesIO(r.image)).mode for r in recs]
    assert modes == ["L", "RGB", "RGBA", "P", "I;16"]  # PNGs are kept exactly
    for r in recs:
        original = (path.parent / r.meta["image_path"]).read_bytes()
        assert np.array_equal(preprocess(r.image, SPEC), preprocess(original, SPEC))
        _check_output(preprocess(r.image, SPEC))


def test_image_csv_options_and_bad_rows(tmp_path: Path, fixtures: Path) -> None:
    shutil.copytree(fixtures / "image_csv/images", tmp_path / "images")
    ct = get_testdata_file("CT_small.dcm")
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    csv_path = tmp_path / "index.csv"
    csv_path.write_text(
        "image,finding\n"
        "images/grey_L.png,normal\n"
        "images/none.png,normal\n"
        f"{ct},pneumonia\n"
        "images/bad.png,normal\n"
        ",normal\n"
        "images/grey_L.png,\n"
    )
    opts = {"label_column": "finding"}
    with pytest.raises(DataError, match=r"data row 2: image file not found: .*none.png"):
        read_records("image_csv", str(csv_path), options=opts)
    res = read_records("image_csv", str(csv_path), on_error="skip", options=opts)
    assert [(r.id, r.label) for r in res.records] == [("1", "normal"), ("3", "pneumonia")]
    assert res.skipped == 4
    assert res.reasons[1].startswith("data row 4: image images/bad.png is not a readable image (")
    assert res.reasons[2:] == ["data row 5: empty image", "data row 6: empty finding"]
    assert decode_image(res.records[1].image).shape == (128, 128)  # the DICOM, as 8-bit grey PNG
    assert "Modality" not in res.records[1].meta  # the header goes to meta with the dicom reader only
    unlabelled = read_records("image_csv", str(csv_path), on_error="skip", options={"label_column": None})
    assert len(unlabelled.records) == 3 and unlabelled.records[2].label is None
    with pytest.raises(DataError, match=r"missing CSV column\(s\) \['label'\]"):
        read_records("image_csv", str(csv_path))
    (tmp_path / "other.csv").write_text("file,label\nimages/grey_L.png,normal\n")
    with pytest.raises(DataError, match="needs a 'path' or 'image' column"):
        read_records("image_csv", str(tmp_path / "other.csv"))
    named = read_records("image_csv", str(tmp_path / "other.csv"), options={"path_column": "file"})
    assert named.records[0].meta == {"image_path": "images/grey_L.png"}


def test_dicom_reader_single_file_and_index(tmp_path: Path) -> None:
    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    (rec,) = read_records("dicom", ct).records
    assert rec.id == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322" and rec.label is None
    assert {"Modality", "PhotometricInterpretation", "Rows", "Columns"} <= set(rec.meta)
    assert np.array_equal(decode_image(rec.image), np.round(read_dicom(ct) * 255).astype(np.uint8))
    # Without a SOPInstanceUID the id is the file's stem.
    ds = pydicom.dcmread(mr)
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "scan01.dcm")
    assert read_records("dicom", str(tmp_path / "scan01.dcm")).records[0].id == "scan01"
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(Path(ct).read_bytes()[:500])
    with pytest.raises(DataError, match=r"truncated.dcm: not a readable DICOM image"):
        read_records("dicom", str(truncated), on_error="skip")  # a bad file, not a bad record
    index = tmp_path / "index.csv"
    index.write_text(f"id,path,label\nct1,{ct},normal\nmr1,{mr},abnormal\nbad,truncated.dcm,normal\n")
    res = read_records("dicom", str(index), on_error="skip")
    got = [(r.id, r.label, r.meta["Modality"]) for r in res.records]
    assert got == [("ct1", "normal", "CT"), ("mr1", "abnormal", "MR")]
    assert res.skipped == 1
    assert "data row 3 (id bad): image truncated.dcm: not a readable DICOM" in res.reasons[0]


def test_medmnist_single_split_is_read_whole(tmp_path: Path) -> None:
    images = np.random.default_rng(3).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    path = str(tmp_path / "pneumoniamnist_test.npz")
    np.savez(path, test_images=images, test_labels=np.array([[0], [1], [1], [0]]))
    res = read_records("medmnist", path)
    assert [(r.id, r.label) for r in res.records] == [
        ("test-0", "normal"),
        ("test-1", "pneumonia"),
        ("test-2", "pneumonia"),
        ("test-3", "normal"),
    ]
    assert np.array_equal(decode_image(res.records[2].image), images[2])


def test_image_reader_options() -> None:
    assert reader_options("image_csv") == ["path_column", "label_column"]
    assert reader_options("dicom") == ["path_column", "label_column"]
    assert reader_options("vqa_json") == ["image_dir", "lang"]
    assert reader_options("report_json") == ["image_dir"]
