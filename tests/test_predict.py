"""Tests of mnist-predict (pipeline/predict.py): turning image files into MNIST-like pixels, and the command.

The image functions are tested on drawn digits, without TensorFlow. The command runs for real as a
subprocess with a real Keras model made by the pipeline's own code (untrained: these tests are about
the command's behaviour; tests/test_model_use.py measures its predictions with the trained model).
"""

from __future__ import annotations

import io
import json
import os
import pty
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_module, stage_env
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from pipeline import predict
from pipeline.cli import PipelineError
from pipeline.files import READ_LIMIT
from pipeline.predict import ImageError, centre_by_mass, check_model_file, fit_box, mnist_pixels, shape_problem


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


def test_a_lab_image_and_a_16_bit_image_are_read_like_the_8_bit_one():
    reference = mnist_pixels(encoded(drawn_seven()))
    lab = drawn_seven().convert("LAB")
    deep = Image.fromarray(np.asarray(drawn_seven().convert("L"), dtype=np.uint16) * 257)
    assert deep.mode.startswith("I;16")
    for image, kind in ((lab, "TIFF"), (deep, "PNG"), (deep, "TIFF")):
        difference = np.abs(mnist_pixels(encoded(image, kind)).astype(int) - reference.astype(int))
        assert difference.mean() < 8, (image.mode, kind)


SAMPLES = [
    encoded(drawn_seven(60, 80).convert(mode), kind, **options)
    for mode, kind, options in (
        ("RGB", "PNG", {}),
        ("L", "JPEG", {}),
        ("RGB", "TIFF", {"compression": "tiff_lzw"}),
        ("LAB", "TIFF", {}),
        ("P", "GIF", {}),
        ("RGB", "WEBP", {}),
        ("RGB", "BMP", {}),
    )
]


@settings(max_examples=300, deadline=None)
@given(
    sample=st.sampled_from(SAMPLES),
    changes=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    keep=st.floats(0.05, 1),
)
def test_any_damaged_image_gives_pixels_or_its_own_error(sample, changes, keep):
    """A damaged image fails alone (ImageError), never with another exception that would stop the batch."""
    data = bytearray(sample)
    for where, value in changes:
        data[int(where * len(data))] = value
    try:
        pixels = mnist_pixels(bytes(data[: max(1, int(keep * len(data)))]))
    except ImageError:
        return
    assert pixels.shape == (784,) and pixels.dtype == np.uint8


def keras_archive(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def declaring(archive: bytes, size: int) -> bytes:
    """``archive`` with its one member's uncompressed size declared as ``size``: a zip bomb as zipfile sees it."""
    data = bytearray(archive)
    central = data.rindex(b"PK\x01\x02")
    data[central + 24 : central + 28] = struct.pack("<I", size)
    return bytes(data)


SOUND = keras_archive(**{"config.json": b"{}", "model.weights.h5": bytes(1000)})


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (None, "does not exist"),
        ("/dev/zero", "cannot read the model file /dev/zero: it is a device, not a regular file"),
        ("fifo", "it is a FIFO, not a regular file"),
        ("directory", "it is a directory, not a regular file"),
        (b"just text", "is not a sound .keras file (a zip archive): File is not a zip file"),
        (SOUND[: len(SOUND) // 2], "is not a sound .keras file (a zip archive)"),
        (SOUND, None),
        (declaring(SOUND, 2**31), "would unpack to 2,147,483,650 bytes, more than the 1,073,741,824"),
    ],
    ids=["missing", "device", "fifo", "directory", "not-zip", "truncated", "sound", "bomb"],
)
def test_a_model_file_is_checked_before_tensorflow_loads_it(tmp_path, content, phrase):
    path = tmp_path / "model.keras"
    if content == "/dev/zero":
        path = Path(content)
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    if phrase is None:
        check_model_file(path)
        return
    with pytest.raises(PipelineError) as raised:
        check_model_file(path)
    assert phrase in str(raised.value)


def test_a_model_member_that_fails_its_checksum_is_named(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("model.weights.h5", b"weights " * 100)
    # One byte of the stored member changed (after its 30-byte header and its name): the archive
    # still opens, but the member's CRC fails, which Keras reports as a bare BadZipFile.
    data = bytearray(buffer.getvalue())
    data[30 + len("model.weights.h5") + 10] ^= 0xFF
    path = tmp_path / "model.keras"
    path.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="is damaged: its member model.weights.h5 fails its checksum"):
        check_model_file(path)


def test_a_model_must_take_784_pixels_and_answer_10_probabilities():
    assert shape_problem("m", [(None, 784)], [(None, 10)]) is None
    assert shape_problem("m", [(-1, 784)], [(-1, 10)]) is None
    for inputs, outputs in (([(None, 28, 28)], [(None, 10)]), ([(None, 784)], [(None, 5)]), ([], []),
                            ([(None, 784), (None, 1)], [(None, 10)])):  # fmt: skip
        problem = shape_problem("m", inputs, outputs)
        assert problem is not None and "an MNIST model takes rows of 784 pixels" in problem
    assert "takes (None, 28, 28) and answers with (None, 10)" in shape_problem("m", [(None, 28, 28)], [(None, 10)])


def test_special_files_and_huge_inputs_are_refused_each_alone(tmp_path):
    """Devices, FIFOs, directories and files or pipes over the limit: one error each, no hang, no model loaded."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as handle:
        handle.truncate(READ_LIMIT + 1)
    names = ["/dev/zero", str(fifo), str(folder), str(huge), "-"]
    with open("/dev/zero", "rb") as zeros:
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.predict", *names], stdin=zeros, cwd=tmp_path, env=stage_env(),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    errors = [" ".join(error.split()) for error in result.stderr.split("error: ")[1:]]
    assert errors == [
        "/dev/zero cannot be read: it is a device, not a regular file.",
        f"{fifo} cannot be read: it is a FIFO, not a regular file.",
        f"{folder} cannot be read: it is a directory, not a regular file.",
        f"{huge} cannot be read: it holds more than the 67,108,864 bytes this command reads.",
        "<stdin> cannot be read: it holds more than the 67,108,864 bytes this command reads.",
    ]


def test_stdin_from_a_terminal_is_refused_instead_of_waiting(tmp_path):
    main, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.predict", "-"], stdin=terminal, cwd=tmp_path, env=stage_env(),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(main)
        os.close(terminal)
    assert result.returncode == 1, result.stderr
    assert " ".join(result.stderr.split()) == (
        "error: <stdin> is the terminal; pipe an image in, as in mnist-predict - < digit.png."
    )


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
    # A LAB TIFF once stopped the whole batch with Pillow's "conversion not supported"; a damaged one must not.
    lab = tmp_path / "seven.tif"
    lab.write_bytes(encoded(drawn_seven().convert("LAB"), "TIFF"))
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(encoded(drawn_seven(), "TIFF")[:300])

    images = [good, not_image, blank, bomb, missing, damaged, photo, lab]
    result = run_module("pipeline.predict", *map(str, images), "--model", str(model_file), cwd=tmp_path)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    model, *lines = result.stdout.splitlines()
    assert model == f"model: file {model_file}"
    assert [line.split(":")[0] for line in lines] == [str(good), str(photo), str(lab)]
    assert all(len(line.split("(")[1].split(",")) == 3 for line in lines)
    errors = result.stderr.split("error: ")[1:]
    assert len(errors) == 5
    for path, phrase in (
        (not_image, "is not an image"),
        (blank, "shows no ink"),
        (bomb, "decompression-bomb limit"),
        (missing, "does not exist"),
        (damaged, "is a damaged or truncated image"),
    ):
        assert any(str(path) in error and phrase in " ".join(error.split()) for error in errors), (path, errors)

    # JSON: every image in order, with its answer or its error.
    result = run_module("pipeline.predict", "--json", *map(str, images), "--model", str(model_file), cwd=tmp_path)
    items = json.loads(result.stdout)
    assert [item["image"] for item in items] == list(map(str, images))
    assert [("digit" in item) for item in items] == [True, False, False, False, False, False, True, True]
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


def error_paragraph(stderr: str) -> str:
    """The one 'error:' paragraph on stderr, on one line (TensorFlow's C++ start-up lines may come first)."""
    return " ".join(stderr.partition("error: ")[2].split())


@pytest.mark.slow
def test_a_model_that_is_not_an_mnist_model_or_cannot_be_loaded_is_a_clear_error(tmp_path):
    script = (
        "import sys, keras\n"
        "for name, shape, classes in (('grid', (28, 28), 10), ('five', (784,), 5)):\n"
        "    pixels = keras.Input(shape=shape, dtype='uint8')\n"
        "    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(pixels))\n"
        "    output = keras.layers.Dense(classes, activation='softmax')(flat)\n"
        "    keras.Model(pixels, output).save(f'{sys.argv[1]}/{name}.keras')\n"
    )
    made = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=stage_env(), capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    # An archive Keras opens but cannot rebuild: a layer class it does not know.
    (tmp_path / "foreign.keras").write_bytes(
        keras_archive(
            **{"config.json": json.dumps({"class_name": "Nope", "config": {}}).encode(), "metadata.json": b"{}"}
        )
    )
    image = tmp_path / "seven.png"
    image.write_bytes(encoded(drawn_seven()))
    for model, phrase in (
        ("grid.keras", "takes (None, 28, 28) and answers with (None, 10), but an MNIST model takes rows of 784"),
        ("five.keras", "takes (None, 784) and answers with (None, 5), but an MNIST model"),
        ("foreign.keras", "cannot load the model file foreign.keras: Could not locate class 'Nope'"),
    ):
        result = run_module("pipeline.predict", str(image), "--model", model, cwd=tmp_path)
        assert result.returncode == 1 and result.stdout == "", result.stdout
        assert "Traceback" not in result.stderr and phrase in error_paragraph(result.stderr), result.stderr


@pytest.mark.slow
def test_a_store_that_refuses_the_credentials_is_a_clear_error(tmp_path):
    from test_tracking_server import FakeServer

    image = tmp_path / "seven.png"
    image.write_bytes(encoded(drawn_seven()))
    # Health checks pass, every API call answers 401, as MLflow's basic-auth app does for a wrong password.
    server = FakeServer(health_status=200, other_status=401)
    try:
        env = stage_env(
            MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME="someone", MLFLOW_TRACKING_PASSWORD="wrong"
        )
        result = run_module(
            "pipeline.predict", str(image), "--model", "models:/mnist-softmax@champion", cwd=tmp_path, env=env
        )
    finally:
        server.close()
    message = error_paragraph(result.stderr)
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stdout == "", result.stderr
    assert message.startswith("cannot load the model models:/mnist-softmax@champion") and "401" in message
    assert "wrong" not in result.stderr
