"""Tests of mnist-predict (pipeline/predict.py): turning image files into MNIST-like pixels, and the command.

The image functions are tested on drawn digits, without TensorFlow. The command runs for real as a
subprocess with a real Keras model made by the pipeline's own code (untrained: these tests are about
the command's behaviour; tests/test_model_use.py measures its predictions with the trained model).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_module, stage_env
from PIL import Image, ImageDraw

from pipeline import predict
from pipeline.predict import ImageError, centre_by_mass, fit_box, mnist_pixels


def drawn_seven(width: int = 300, height: int = 400, ink: int = 20, paper: int = 240, rgb=None) -> Image.Image:
    """A thick 7 drawn off-centre on a page, dark ink on light paper (or the reverse)."""
    image = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(image)
    draw.line([(60, 80), (200, 80), (110, 320)], fill=ink, width=24)
    if rgb is None:
        return image.convert("RGB")
    # The page seen through a coloured filter: each channel scaled by the colour's share.
    grey = np.asarray(image, dtype=np.uint16)[..., None]
    return Image.fromarray((grey * np.array(rgb, dtype=np.uint16) // 255).astype(np.uint8), "RGB")


def encoded(image: Image.Image, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    field = pixels.reshape(28, 28).astype(float)
    rows, columns = np.indices(field.shape)
    return float((field * rows).sum() / field.sum()), float((field * columns).sum() / field.sum())


def huge_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` × ``height`` pixels, with no pixel data worth decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_a_page_becomes_white_ink_on_black_in_a_20_pixel_box_centred_by_mass():
    pixels = mnist_pixels(encoded(drawn_seven()))
    assert pixels.dtype == np.uint8 and pixels.shape == (784,)
    field = pixels.reshape(28, 28)
    rows, columns = np.nonzero(field)
    # The 7 is taller than wide: 20 pixels high, its width scaled by the same factor.
    assert rows.max() - rows.min() + 1 == 20 and columns.max() - columns.min() + 1 < 20
    assert field.max() == 255 and field[0].sum() == 0 and field[:, 0].sum() == 0
    row, column = centre_of_mass(pixels)
    assert abs(row - 14) <= 0.5 and abs(column - 14) <= 0.5


def test_ink_is_found_whichever_way_round_and_on_any_colour():
    reference = mnist_pixels(encoded(drawn_seven()))
    variants = {
        "light on dark": drawn_seven(ink=235, paper=15),
        "on yellow paper": drawn_seven(rgb=(255, 230, 90)),
        "grey": drawn_seven().convert("L"),
        "jpeg": Image.open(io.BytesIO(encoded(drawn_seven(), "JPEG", quality=80))),
    }
    for name, image in variants.items():
        pixels = mnist_pixels(encoded(image))
        difference = np.abs(pixels.astype(int) - reference.astype(int))
        # Rendered the same, up to contrast and JPEG noise.
        assert difference.mean() < 8, name


def test_transparent_background_counts_as_paper():
    image = Image.new("RGBA", (120, 160), (0, 0, 0, 0))
    ImageDraw.Draw(image).line([(30, 20), (30, 140)], fill=(0, 0, 0, 255), width=12)
    pixels = mnist_pixels(encoded(image)).reshape(28, 28)
    rows, _ = np.nonzero(pixels)
    assert rows.max() - rows.min() + 1 == 20


def test_fit_box_keeps_the_aspect_ratio():
    assert fit_box(np.full((300, 100), 255.0)).shape == (20, 7)
    assert fit_box(np.full((10, 40), 255.0)).shape == (5, 20)
    assert fit_box(np.full((1, 400), 255.0)).shape == (1, 20)


def test_centre_by_mass_moves_the_mass_to_the_centre_but_keeps_the_digit_inside():
    digit = np.zeros((20, 10), dtype=np.float32)
    digit[:, :3] = 255  # all the mass on the left
    field = centre_by_mass(digit)
    assert field.sum() == digit.sum()
    assert abs(centre_of_mass(field)[1] - 14) <= 0.5
    lopsided = np.zeros((20, 20), dtype=np.float32)
    lopsided[0, 0] = 255
    lopsided[19, 19] = 1
    assert centre_by_mass(lopsided).sum() == lopsided.sum()


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        (b"", "is not an image"),
        (b"just some text, not a picture", "is not an image"),
        (encoded(Image.new("RGB", (200, 300), "white")), "shows no ink"),
        (encoded(Image.new("RGB", (200, 300), (30, 90, 200))), "shows no ink"),
        (encoded(drawn_seven())[:400], "damaged or truncated"),
        (huge_png(20_000, 20_000), "decompression-bomb limit"),
        # Between Pillow's limit and twice that it only warns; refused all the same.
        (huge_png(10_000, 10_000), "decompression-bomb limit"),
    ],
)
def test_unusable_images_are_refused_with_a_reason(data, phrase):
    with pytest.raises(ImageError, match=phrase):
        mnist_pixels(data)


def test_text_and_json_renderings_name_the_model():
    probabilities = np.array([0.01, 0.0, 0.02, 0.05, 0.0, 0.0, 0.0, 0.9, 0.0, 0.02], dtype=np.float32)
    answer = predict.Answer("seven.png", probabilities)
    model = {"name": "mnist-softmax", "version": "3", "aliases": ["champion", "latest-good"]}
    results = [answer, "bad.png is not an image."]
    assert predict.render_text(results, model) == (
        "model: mnist-softmax version 3, alias champion, alias latest-good\n"
        "seven.png: 7  (7: 90.0%, 3: 5.0%, 2: 2.0%)\n"
    )
    assert predict.render_text(["bad.png is not an image."], {}) == ""
    assert predict.render_text([answer], {"file": "/p/model.keras"}).startswith("model: file /p/model.keras\n")
    assert predict.render_text([answer], {"uri": "runs:/abc/model"}).startswith("model: runs:/abc/model\n")
    items = json.loads(predict.render_json(["seven.png", "bad.png"], results, model))
    assert items == [
        {
            "image": "seven.png",
            "digit": 7,
            "top": [
                {"digit": 7, "probability": pytest.approx(0.9)},
                {"digit": 3, "probability": pytest.approx(0.05)},
                {"digit": 2, "probability": pytest.approx(0.02)},
            ],
            "model": model,
        },
        {"image": "bad.png", "error": "bad.png is not an image."},
    ]


# ---------------------------------------------------------------------------------------------
# The command, as a user runs it.


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A real raw-pixel Keras model, saved as train saves it (untrained weights from the seed)."""
    path = tmp_path_factory.mktemp("model") / "model.keras"
    script = (
        "import sys; from pathlib import Path; from pipeline.model import build_model, raw_pixel_model, save_model; "
        "save_model(raw_pixel_model(build_model(0)), Path(sys.argv[1]))"
    )
    made = subprocess.run([sys.executable, "-c", script, str(path)], env=stage_env(), capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    return path


@pytest.mark.slow
def test_the_command_answers_good_images_and_explains_bad_ones(model_file, tmp_path):
    good = tmp_path / "seven.png"
    good.write_bytes(encoded(drawn_seven()))
    photo = tmp_path / "seven.jpg"
    photo.write_bytes(encoded(drawn_seven(ink=235, paper=15), "JPEG"))
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    blank = tmp_path / "blank.png"
    blank.write_bytes(encoded(Image.new("L", (50, 50), 255)))
    bomb = tmp_path / "huge.png"
    bomb.write_bytes(huge_png(20_000, 20_000))
    missing = tmp_path / "missing.png"

    images = [good, not_image, blank, bomb, missing, photo]
    result = run_module("pipeline.predict", *map(str, images), "--model", str(model_file), cwd=tmp_path)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    model, *lines = result.stdout.splitlines()
    assert model == f"model: file {model_file}"
    assert [line.split(":")[0] for line in lines] == [str(good), str(photo)]
    assert all(len(line.split("(")[1].split(",")) == 3 for line in lines)
    errors = result.stderr.split("error: ")[1:]
    assert len(errors) == 4
    for path, phrase in (
        (not_image, "is not an image"),
        (blank, "shows no ink"),
        (bomb, "decompression-bomb limit"),
        (missing, "does not exist"),
    ):
        assert any(str(path) in error and phrase in " ".join(error.split()) for error in errors), (path, errors)

    # JSON: every image in order, with its answer or its error.
    result = run_module("pipeline.predict", "--json", *map(str, images), "--model", str(model_file), cwd=tmp_path)
    items = json.loads(result.stdout)
    assert [item["image"] for item in items] == list(map(str, images))
    assert [("digit" in item) for item in items] == [True, False, False, False, False, True]
    assert items[0]["model"] == items[-1]["model"] == {"file": str(model_file)}
    assert sum(entry["probability"] for entry in items[0]["top"]) <= 1.0 + 1e-6


@pytest.mark.slow
def test_the_command_reads_stdin_and_names_a_model_that_cannot_be_loaded(model_file, tmp_path):
    # TensorFlow prints its oneDNN start-up lines on CPUs where it enables oneDNN; forced on here, they
    # must not reach stderr, which holds only the command's own errors.
    env = stage_env(TF_ENABLE_ONEDNN_OPTS="1")
    data = encoded(drawn_seven())
    command = [sys.executable, "-m", "pipeline.predict", "-", "--model", str(model_file), "--json"]
    result = subprocess.run(command, input=data, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    (item,) = json.loads(result.stdout)
    assert item["image"] == "<stdin>" and 0 <= item["digit"] <= 9

    image = tmp_path / "seven.png"
    image.write_bytes(data)
    # No store holds this model: one paragraph naming it, no traceback.
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for model, phrase in (
        ("models:/mnist-softmax@champion", f"there is no MLflow store at {tmp_path / 'mlflow.db'} yet"),
        (str(tmp_path / "nowhere.keras"), "does not exist"),
    ):
        result = run_module("pipeline.predict", str(image), "--model", model, cwd=tmp_path, env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and phrase in " ".join(result.stderr.split()), result.stderr
        assert result.stdout == ""
        # Asking a store that does not exist does not create one.
        assert not (tmp_path / "mlflow.db").exists()
    # A store that exists but has no such model, nor a champion to answer by default.
    (tmp_path / "mlflow.db").touch()
    for args, phrase in (
        (["--model", "models:/mnist-softmax@champion"], "cannot load the model models:/mnist-softmax@champion"),
        ([], "the registry has no champion of mnist-softmax yet, so there is no default model"),
    ):
        result = run_module("pipeline.predict", str(image), *args, cwd=tmp_path, env=env)
        assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
        message = " ".join(result.stderr.split())
        assert phrase in message and ("not found" in message or "mnist-check --champion --promote" in message)
