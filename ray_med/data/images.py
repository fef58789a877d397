"""Images: decoding (PNG/JPEG/... and DICOM) and the one preprocessing of the vision model.

This module owns how a picture becomes model input. :func:`preprocess` is the only
image preprocessing in ray_med: training, evaluation and serving all call it, so a
model never sees pixels prepared differently from the ones it was trained on. It
takes a decoded image, an array or raw file bytes, and returns a float32
``(3, size, size)`` array: colours to [0, 1] (:func:`to_float_array`), padded to a
square (:func:`pad_to_square`, so anatomy keeps its aspect ratio), resized
(:func:`resize`), then normalised with the :class:`ImageSpec`'s mean and std.

It also owns turning image files into the PNG bytes records carry
(:func:`encode_record_image`), and reading DICOM (:func:`read_dicom`), the format
radiographs and CT/MR slices come in. Core: numpy, Pillow and (only when a DICOM is
read) pydicom; no Ray, no torch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ray_med.data.records import encode_png
from ray_med.errors import ConfigError, DataError

# A DICOM Part 10 file: a 128-byte preamble, then the magic b"DICM".
_DICOM_MAGIC_AT = 128
_DICOM_MAGIC = b"DICM"
# Modes with more than 8 bits per sample, scaled per image (see to_float_array).
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Modes a PNG holds losslessly, so a record can keep the image exactly as it was.
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")
# The DICOM header fields kept in a record's meta.
DICOM_META_FIELDS = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BodyPartExamined",
    "ViewPosition",
    "NumberOfFrames",
)


@dataclass(frozen=True)
class ImageSpec:
    """What a vision encoder expects: a square input of ``size`` pixels, normalised per channel.

    The defaults are SigLIP's (mean = std = 0.5, so inputs lie in [-1, 1]).
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        # A YAML or JSON config gives lists; keep tuples, so specs compare and hash as values.
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple):
                raise ConfigError(f"image {name} must be three numbers (R, G, B), got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ConfigError(f"image size must be a positive integer, got {self.size!r}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(isinstance(v, int | float) for v in values):
                raise ConfigError(f"image {name} must be three numbers (R, G, B), got {values!r}")
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"image std must be positive, got {self.std!r}")


# ------------------------------------------------------------------------------ decoding


def _is_dicom(data: bytes) -> bool:
    return data[_DICOM_MAGIC_AT : _DICOM_MAGIC_AT + len(_DICOM_MAGIC)] == _DICOM_MAGIC


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file is DICOM: named ``.dcm``, or with ``DICM`` after the 128-byte preamble."""
    if _has_dcm_suffix(path):
        return True
    try:
        with open(path, "rb") as f:
            return _is_dicom(f.read(_DICOM_MAGIC_AT + len(_DICOM_MAGIC)))
    except OSError:
        return False


def _has_dcm_suffix(source: bytes | str | os.PathLike[str]) -> bool:
    return not isinstance(source, bytes) and os.fspath(source).lower().endswith(".dcm")


def _reason(exc: BaseException) -> str:
    """One short line saying why decoding failed (library messages can span lines, e.g. the
    list of codec plugins pydicom would need for a compressed file)."""
    text = " ".join(str(exc).split())
    text = text[:300] + ("..." if len(text) > 300 else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_bytes(source: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"{what}: cannot read {os.fspath(source)} ({exc.strerror or exc})") from None


def _dicom_image(arr: np.ndarray) -> Image.Image:
    """A PIL image of :func:`read_dicom`'s output: grey stays float ("F"); colour becomes 8-bit RGB."""
    if arr.ndim == 2:
        return Image.fromarray(arr.astype(np.float32))
    # Pillow has no float colour mode; colour DICOMs are 8-bit per channel nearly always.
    return Image.fromarray(np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8))


def open_image(data: bytes | str | os.PathLike[str], *, what: str = "image") -> Image.Image:
    """Decode an image from its bytes or its file, fully (``load()``), or raise a one-line DataError.

    DICOM files (``.dcm``, or bytes with the ``DICM`` magic after the 128-byte preamble)
    go through :func:`read_dicom`; a grey DICOM comes back as a float ("F") image in
    [0, 1], a colour one as 8-bit RGB. ``what`` names the input in the message (a file
    and record, or a request field).
    """
    if _has_dcm_suffix(data):
        return _dicom_image(read_dicom(data, what=what))
    raw = data if isinstance(data, bytes) else _read_bytes(data, what)
    if _is_dicom(raw):
        return _dicom_image(read_dicom(raw, what=what))
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except UnidentifiedImageError:
        # Pillow's message names the BytesIO object: noise, and different on every call.
        raise DataError(f"{what} is not a readable image (unrecognised image format)") from None
    except Image.DecompressionBombError as exc:  # a small file that decodes to gigabytes
        raise DataError(f"{what} is not a readable image (too large to decode: {_reason(exc)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise DataError(f"{what} is not a readable image ({_reason(exc)})") from None
    return img


# ----------------------------------------------------------------------------- to arrays


def _minmax(arr: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's own minimum and maximum; a constant array becomes zeros."""
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _channels_to_float(arr: np.ndarray) -> np.ndarray:
    """Colour/grey samples of one dtype to float32 in [0, 1] (the rules of :func:`to_float_array`)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.integer):
        return _minmax(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError("image holds NaN or infinite values")
        if arr.min() >= 0.0 and arr.max() <= 1.0:
            return arr.astype(np.float32)  # already intensities in [0, 1] (e.g. read_dicom's output)
        return _minmax(arr)
    raise DataError(f"image arrays must be integer, boolean or float, got {arr.dtype}")


def _alpha_to_float(alpha: np.ndarray) -> np.ndarray:
    """An alpha channel as opacity in [0, 1]: integers by their type's maximum, floats clipped."""
    if np.issubdtype(alpha.dtype, np.integer):
        return alpha.astype(np.float32) / float(np.iinfo(alpha.dtype).max)
    return np.clip(alpha.astype(np.float32), 0.0, 1.0)


def array_to_float(arr: np.ndarray) -> np.ndarray:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as float32 (H, W, 3) in [0, 1].

    The same rules as :func:`to_float_array` (which calls this): uint8 divided by 255,
    wider integers and floats outside [0, 1] min-max scaled per image, a fourth channel
    is alpha composited onto black.
    """
    if not isinstance(arr, np.ndarray):
        raise DataError(f"expected a numpy array, got {type(arr).__name__}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image is empty ({arr.shape[1]}x{arr.shape[0]} pixels)")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))  # big-endian 16-bit (I;16B)
    colour = _channels_to_float(arr[..., :3] if arr.shape[-1] == 4 else arr)
    if arr.shape[-1] == 4:
        # Composite onto black: radiographs have black backgrounds, so a transparent
        # margin should look like one rather than like a white frame.
        colour = colour * _alpha_to_float(arr[..., 3:])
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    return np.ascontiguousarray(colour, dtype=np.float32)


def to_float_array(img: Image.Image) -> np.ndarray:
    """A decoded image as float32 (H, W, 3) in [0, 1], whatever its mode.

    Rules:

    - "1" and "L" (and other 8-bit modes): samples divided by 255; grey is repeated
      into three identical channels.
    - Transparency ("LA", "RGBA", "PA", a palette or grey/RGB image with a transparent
      colour): converted to RGBA and composited onto black (colour times alpha), since
      radiographs have black backgrounds.
    - "P" (palette) without transparency, "CMYK", "YCbCr", ...: converted to RGB.
    - More than 8 bits per sample ("I;16", "I;16B", "I" 32-bit integers) and "F"
      (float): min-max scaled per image to [0, 1], since the bit depth a file is
      stored in says little about the range its values use (12-bit data in 16-bit
      words, CT numbers). A constant image becomes all zeros. A float image already
      within [0, 1] is kept as it is.
    """
    if img.width == 0 or img.height == 0:
        raise DataError(f"image is empty ({img.width}x{img.height} pixels)")
    if img.mode in _HIGH_DEPTH_MODES:
        return array_to_float(np.asarray(img))
    if img.mode == "1":
        img = img.convert("L")
    elif img.has_transparency_data:
        try:
            img = img.convert("RGBA")
        except ValueError as exc:  # a mode Pillow cannot convert ("La")
            raise DataError(f"unsupported image mode {img.mode} ({exc})") from None
    elif img.mode not in ("L", "RGB"):
        try:
            img = img.convert("RGB")
        except ValueError as exc:
            raise DataError(f"unsupported image mode {img.mode} ({exc})") from None
    return array_to_float(np.asarray(img))


# ------------------------------------------------------------------------ preprocessing


def pad_to_square(arr: np.ndarray, fill: float | Sequence[float] = 0.0) -> np.ndarray:
    """Pad (H, W, C) to (S, S, C), S = max(H, W), with the image centred.

    The padding is split evenly; an odd remainder goes to the bottom or right. ``fill``
    is one value or one per channel.
    """
    h, w = arr.shape[:2]
    side = max(h, w)
    if h == w:
        return arr
    top, left = (side - h) // 2, (side - w) // 2
    out = np.full((side, side, *arr.shape[2:]), fill, dtype=arr.dtype)
    out[top : top + h, left : left + w] = arr
    return out


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize float (H, W, C) to float32 (size, size, C), bicubic, clipped to [0, 1].

    Each channel is resized as a Pillow float ("F") image, so nothing is quantised to
    8 bits on the way; Pillow widens the bicubic kernel when shrinking, which
    antialiases. Clipping removes the small over- and undershoot bicubic adds at edges.
    """
    h, w, c = arr.shape
    if (h, w) == (size, size):
        return np.clip(arr, 0.0, 1.0).astype(np.float32)

    def one(channel: np.ndarray) -> np.ndarray:
        img = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))
        return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))

    if c == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        out = np.repeat(one(arr[..., 0])[..., None], 3, axis=-1)  # grey: one resize, not three
    else:
        out = np.stack([one(arr[..., i]) for i in range(c)], axis=-1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def preprocess(image: Image.Image | np.ndarray | bytes, spec: ImageSpec) -> np.ndarray:
    """THE image preprocessing of ray_med: float32 (3, size, size), channels first.

    ``image`` is a decoded PIL image, an array ((H, W), (H, W, 1), (H, W, 3) or
    (H, W, 4); uint8, wider integers or float) or the bytes of an image file (PNG,
    JPEG, DICOM, ...). Steps: :func:`to_float_array` (or :func:`array_to_float`),
    :func:`pad_to_square` with the normalisation mean (as 8-bit values, LLaVA's
    convention, so the padding normalises to about zero and the processor saved with
    the model, which vLLM uses, pads the same), :func:`resize` to ``spec.size``, then
    ``(x - mean) / std`` per channel. The same picture as bytes, PIL image or array
    gives the same output.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        arr = to_float_array(open_image(bytes(image)))
    elif isinstance(image, Image.Image):
        arr = to_float_array(image)
    elif isinstance(image, np.ndarray):
        arr = array_to_float(image)
    else:
        raise DataError(f"expected image bytes, a PIL image or a numpy array, got {type(image).__name__}")
    fill = [int(m * 255) / 255 for m in spec.mean]
    arr = resize(pad_to_square(arr, fill if len(set(fill)) > 1 else fill[0]), spec.size)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1), dtype=np.float32)


# ---------------------------------------------------------------------------------- DICOM


def _dicom_dataset(source: str | os.PathLike[str] | bytes, what: str, *, pixels: bool) -> Any:
    # lazy: pydicom is only needed when a DICOM file is actually read, and most runs read none.
    import pydicom

    try:
        src = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
        return pydicom.dcmread(src, force=False, stop_before_pixels=not pixels)
    except pydicom.errors.InvalidDicomError:  # its message suggests force=True, which is no fix here
        raise DataError(f"{what}: not a readable DICOM image (no DICOM file header)") from None
    except Exception as exc:  # pydicom raises many types for a file that is not (valid) DICOM
        raise DataError(f"{what}: not a readable DICOM image ({_reason(exc)})") from None


def _dicom_pixels(ds: Any) -> np.ndarray:
    # lazy: as above, pydicom only when a DICOM is read.
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ValueError("no pixel data element: not an image, or the file is truncated")
    # The first frame only: a multi-frame file (a cine loop, a CT volume) is one image here.
    arr = pixel_array(ds, index=0)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        # Stored values -> modality values (e.g. Hounsfield units), then the window the
        # file says to display (first one if there are several).
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds, index=0)
        if photometric == "MONOCHROME1":  # low values are bright: flip, so high = bright everywhere
            arr = -arr.astype(np.float64)
    # YBR colour data was converted to RGB by pixel_array.
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"unexpected pixel array shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError("pixel data holds NaN or infinite values")
    return _minmax(arr)


def read_dicom(source: str | os.PathLike[str] | bytes, *, what: str = "DICOM file") -> np.ndarray:
    """A DICOM image as float32 (H, W) in [0, 1] ((H, W, 3) for colour), ready for display.

    Grey images get the modality LUT (Rescale Slope/Intercept, or a Modality LUT
    Sequence), then the first VOI LUT or window (Window Center/Width), then MONOCHROME1
    is inverted so that high values are bright; palette images are expanded to RGB.
    The result is min-max scaled to [0, 1] (a constant image becomes zeros). Of a
    multi-frame file only the first frame is read. Anything that is not a decodable
    DICOM image (another format, no pixel data, truncated, compressed with a codec
    that is not installed) raises a one-line DataError.
    """
    ds = _dicom_dataset(source, what, pixels=True)
    try:
        return _dicom_pixels(ds)
    except Exception as exc:  # decoders and LUT code raise many types for bad pixel data
        raise DataError(f"{what}: not a readable DICOM image ({_reason(exc)})") from None


def read_dicom_header(source: str | os.PathLike[str] | bytes, *, what: str = "DICOM file") -> dict[str, Any]:
    """The :data:`DICOM_META_FIELDS` a file has (strings, or ints for Rows/Columns/NumberOfFrames).

    Reads the header only, not the pixel data.
    """
    ds = _dicom_dataset(source, what, pixels=False)
    out: dict[str, Any] = {}
    for name in DICOM_META_FIELDS:
        value = ds.get(name)
        if value is None or value == "":
            continue
        out[name] = int(value) if name in ("Rows", "Columns", "NumberOfFrames") else str(value)
    return out


# ------------------------------------------------------------------------------ encoding


def to_png(arr_float01: np.ndarray) -> bytes:
    """Float (H, W), (H, W, 1) or (H, W, 3) in [0, 1] as 8-bit PNG bytes (grey or RGB)."""
    arr = np.asarray(arr_float01)
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"to_png takes a float array in [0, 1], got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise DataError("to_png: the array holds NaN or infinite values")
    return encode_png(np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8))


def _save_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_record_image(source: bytes | str | os.PathLike[str], *, what: str = "image") -> bytes:
    """An image file (its path or bytes) as the PNG bytes a :class:`Record` carries.

    Lossless where PNG allows: a PNG file is kept byte for byte; other files in a mode
    PNG holds (1, L, LA, P, RGB, RGBA, 16-bit grey) are re-encoded unchanged, so
    :func:`preprocess` gives the same result on the record as on the file. DICOM
    becomes the 8-bit grey (or RGB) PNG of :func:`read_dicom`; 32-bit and float images
    the 8-bit PNG of their min-max scaled values; other modes (CMYK, ...) 8-bit RGB.
    """
    raw = source if isinstance(source, bytes) else None
    if _has_dcm_suffix(source) or (raw is not None and _is_dicom(raw)):
        return to_png(read_dicom(source, what=what))
    raw = raw if raw is not None else _read_bytes(source, what)
    if _is_dicom(raw):
        return to_png(read_dicom(raw, what=what))
    img = open_image(raw, what=what)
    if img.format == "PNG":
        return raw
    if img.mode in _PNG_MODES:
        return _save_png(img)
    if img.mode in ("I;16B", "I;16L", "I;16N") or (img.mode == "I" and _fits_uint16(img)):
        return _save_png(Image.fromarray(np.asarray(img).astype(np.uint16)))
    if img.mode in _HIGH_DEPTH_MODES:
        return to_png(to_float_array(img)[..., 0])
    return to_png(to_float_array(img))


def _fits_uint16(img: Image.Image) -> bool:
    arr = np.asarray(img)
    return arr.size > 0 and int(arr.min()) >= 0 and int(arr.max()) <= 65535
