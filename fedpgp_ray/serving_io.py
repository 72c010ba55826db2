"""Requests to a served classifier: images in (base64 PNG/JPEG), answers out, and the limits that keep
a server's memory bounded whatever a client sends (see docs/SERVING.md, "Limits").

Every refusal is an MlflowException with error code INVALID_PARAMETER_VALUE: `mlflow models serve`
and `fedpgp-ray serve` answer it with HTTP 400 and the message.
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

IMAGE_COLUMN = "image"
CLASSES_PARAM = "classes"
CLIENT_PARAM = "client_id"
IMAGE_FORMATS = ("PNG", "JPEG")

# Limits (PIL's own bomb check starts at 89 M pixels and refuses at 179 M: 0.5 GB of RGB each).
MAX_IMAGE_BYTES = 8 * 2**20          # one encoded image file
MAX_IMAGE_PIXELS = 4096 * 4096       # one decoded image: 48 MiB as RGB; CLIP resizes to 224 px anyway
MAX_IMAGES_PER_REQUEST = 256
MAX_CLASSES = 1000                   # class names per request (ImageNet has 1000)
MAX_CLASS_NAME_CHARS = 200           # the text encoder reads 77 tokens at most
MAX_BODY_BYTES = 16 * 2**20          # one HTTP request body (`fedpgp-ray serve`; configurable)


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and `message`."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def check_classes(classes: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """The class list to classify into: `default` when None, else `classes` validated and bounded."""
    if classes is None:
        return list(default)
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise bad_request(f"'{CLASSES_PARAM}' must be a list of class names, got {type(classes).__name__}")
    if len(classes) > MAX_CLASSES:
        raise bad_request(f"'{CLASSES_PARAM}' has {len(classes)} names, more than the {MAX_CLASSES} a request may "
                          f"give: split the class list over several requests")
    names = [c.strip() if isinstance(c, str) else c for c in classes]
    if not names:
        raise bad_request(f"'{CLASSES_PARAM}' is an empty list: give at least one class name, or leave it "
                          f"out to classify into the model's {len(default)} classes")
    if not all(isinstance(c, str) and c for c in names):
        raise bad_request(f"'{CLASSES_PARAM}' must hold non-empty strings, got {str(list(classes))[:200]}")
    long = [c for c in names if len(c) > MAX_CLASS_NAME_CHARS]
    if long:
        raise bad_request(f"'{CLASSES_PARAM}': {long[0][:40]!r}... has {len(long[0])} characters, more than "
                          f"{MAX_CLASS_NAME_CHARS}: shorten the class name")
    seen: set[str] = set()
    repeated = sorted({c for c in names if c in seen or seen.add(c)})
    if repeated:
        raise bad_request(f"'{CLASSES_PARAM}' names {', '.join(map(repr, repeated[:5]))} more than once: "
                          f"give each class once")
    return names


def check_image_count(count: int) -> None:
    if count > MAX_IMAGES_PER_REQUEST:
        raise bad_request(f"the request holds {count} images, more than the {MAX_IMAGES_PER_REQUEST} one request "
                          f"may hold: send them in several requests")


def to_pil(image: Image.Image | np.ndarray, index: int = 0) -> Image.Image:
    """An RGB PIL image from a PIL image or a uint8 array [H, W, 3] / [H, W] (as datasets load them)."""
    if isinstance(image, Image.Image):
        check_pixels(image.width, image.height, f"image {index}")
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise bad_request(f"image {index}: expected a uint8 array [H, W, 3], got {array.dtype} {list(array.shape)}")
    check_pixels(array.shape[1], array.shape[0], f"image {index}")
    return Image.fromarray(array).convert("RGB")


def check_pixels(width: int, height: int, where: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise bad_request(f"{where} is {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed: "
                          f"resize it (the classifier sees it at the backbone's input size anyway)")


def decode_image(value: Any, where: str = f"a value of column '{IMAGE_COLUMN}'") -> Image.Image:
    """An RGB image from a base64 string of a PNG or JPEG file (a `data:image/...;base64,` prefix is allowed),
    refused (bad_request) when the file is over MAX_IMAGE_BYTES or the image over MAX_IMAGE_PIXELS: the
    size is read from the file's header, before any pixel is decoded.

    where: what the value is, for the error message (a row of the request, a file).
    """
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{where} is {type(value).__name__} {str(value)[:40]!r}, not an image: send each image "
                          f"as a base64-encoded PNG or JPEG file")
    text = value.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if len(text) * 3 // 4 > MAX_IMAGE_BYTES:
        raise bad_request(f"{where} is a {len(text) * 3 // 4 / 2**20:.1f} MiB file, more than the "
                          f"{MAX_IMAGE_BYTES // 2**20} MiB allowed: send a smaller PNG or JPEG")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where} is not base64: send each image as a base64-encoded PNG or JPEG file") from None
    return decode_image_bytes(data, where)


def decode_image_bytes(data: bytes, where: str) -> Image.Image:
    """An RGB image from the bytes of a PNG or JPEG file, within the limits (see decode_image)."""
    if len(data) > MAX_IMAGE_BYTES:
        raise bad_request(f"{where} is a {len(data) / 2**20:.1f} MiB file, more than the "
                          f"{MAX_IMAGE_BYTES // 2**20} MiB allowed: send a smaller PNG or JPEG")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.format not in IMAGE_FORMATS:
                raise bad_request(f"{where} is a {img.format} image: send PNG or JPEG")
            check_pixels(img.width, img.height, where)
            return img.convert("RGB")
    except MlflowException:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, DecompressionBombError...
        raise bad_request(f"{where} is not a readable PNG or JPEG image ({type(err).__name__}): send each "
                          f"image as a base64-encoded PNG or JPEG file") from None


def read_image_file(path: str | Path) -> Image.Image:
    """An image file from disk, within the limits (its size is checked before it is read)."""
    path = Path(path)
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise bad_request(f"image file {path} is {path.stat().st_size / 2**20:.1f} MiB, more than the "
                          f"{MAX_IMAGE_BYTES // 2**20} MiB allowed: resize it")
    return decode_image_bytes(path.read_bytes(), f"image file {path}")


def encode_image(image: Image.Image | np.ndarray | bytes | str | Path) -> str:
    """base64 text of a PNG (arrays, PIL images) or of a file's bytes (a path, raw bytes): the `image` column."""
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if isinstance(image, bytes):
        return base64.b64encode(image).decode("ascii")
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_column(frame: pd.DataFrame) -> list[Any]:
    """The `image` column of a request, its length checked."""
    if IMAGE_COLUMN not in frame.columns:
        raise bad_request(f"the input has no column '{IMAGE_COLUMN}' (columns: {list(frame.columns)[:10]}): "
                          f"send base64 PNG/JPEG images in a column named '{IMAGE_COLUMN}'")
    check_image_count(len(frame))
    return list(frame[IMAGE_COLUMN])


def result_frame(names: list[str], probs: torch.Tensor, prompt: str | None = None) -> pd.DataFrame:
    """One row per image: top label, its probability, and the full vector (in the order of `names`);
    with `prompt`, a column naming the prompt that answered (`personal` or `global`)."""
    values = probs.double().numpy()
    top = values.argmax(axis=1) if len(values) else np.zeros(0, dtype=int)
    frame = pd.DataFrame({"label": [names[i] for i in top],
                          "probability": values[np.arange(len(values)), top] if len(values) else np.zeros(0),
                          "probabilities": [row.tolist() for row in values]})
    if prompt is not None:
        frame["prompt"] = prompt
    return frame
