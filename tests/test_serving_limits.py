"""Hostile input to a served classifier stays bounded: oversized images are refused from their header
(before any pixel is decoded), class lists and image counts are capped, and `predict` says so in one line."""
from __future__ import annotations

import base64
import io
import resource

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from fedpgp_ray import serving_io
from fedpgp_ray.predict import main as predict_main


def _png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 5,000 x 5,000 grey PNG of zeros: 25 M pixels (75 MB as RGB) in about 25 KB."""
    return _png(5000, 5000)


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(bomb):
    assert len(bomb) < 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MlflowException, match=r"row 0 .* 5000 x 5000 pixels, more than the 16,777,216 allowed"):
        serving_io.decode_image(base64.b64encode(bomb).decode(), "row 0")
    # no 75 MB RGB copy was ever made (the peak RSS of this process did not grow by it)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 40_000
    assert serving_io.decode_image(base64.b64encode(_png(64, 48, "RGB")).decode()).size == (64, 48)


def test_oversized_files_arrays_and_non_images_are_400s():
    big = "A" * (serving_io.MAX_IMAGE_BYTES * 4 // 3 + 8)
    with pytest.raises(MlflowException, match="MiB allowed") as err:
        serving_io.decode_image(big)
    assert err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="pixels, more than"):
        serving_io.to_pil(np.zeros((5000, 4000, 3), dtype=np.uint8))
    with pytest.raises(MlflowException, match="not a readable PNG or JPEG"):
        serving_io.decode_image(base64.b64encode(b"GIF89a not really").decode())


def test_class_lists_and_image_counts_are_capped():
    many = [f"class {i}" for i in range(10_000)]
    with pytest.raises(MlflowException, match="10000 names, more than the 1000"):
        serving_io.check_classes(many, ["a"])
    assert len(serving_io.check_classes(many[:1000], ["a"])) == 1000
    with pytest.raises(MlflowException, match="characters, more than 200"):
        serving_io.check_classes(["x" * 10_000], ["a"])
    with pytest.raises(MlflowException, match="more than once"):
        serving_io.check_classes(["a", "b", "a"], ["a"])
    with pytest.raises(MlflowException, match="a list of class names"):
        serving_io.check_classes("a,b", ["a"])
    frame = pd.DataFrame({"image": ["x"] * (serving_io.MAX_IMAGES_PER_REQUEST + 1)})
    with pytest.raises(MlflowException, match="257 images, more than the 256"):
        serving_io.image_column(frame)


def test_predict_refuses_a_bomb_file_in_one_line_before_loading_a_model(bomb, tmp_path, capsys):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    # no run directory exists: the image is refused first
    assert predict_main(["--run", str(tmp_path / "no-run"), str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "5000 x 5000 pixels" in err and "resize it" in err, err
    assert predict_main(["--run", str(tmp_path / "no-run"), "--classes",
                         ",".join(f"c{i}" for i in range(1001)), str(path)]) == 2
    assert "more than the 1000" in capsys.readouterr().err
