"""mnist-predict: images made MNIST-like (drawn digits, no TensorFlow), then the command with a real untrained
Keras model made by the pipeline's own code (tests/test_model_use.py measures it with the trained model)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import secrets
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import run_module, stage_env
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from pipeline import predict
from pipeline.files import READ_LIMIT
from pipeline.predict import ImageError, mnist_pixels


def seven(width=300, height=400, ink=20, paper=240, rgb=(255, 255, 255), mode="RGB") -> Image.Image:
    """A thick 7 drawn off-centre on a page, dark ink on light paper (or the reverse), seen through a filter."""
    image = Image.new("L", (width, height), paper)
    ImageDraw.Draw(image).line([(60, 80), (200, 80), (110, 320)], fill=ink, width=24)
    grey = np.asarray(image, dtype=np.uint16)[..., None]
    return Image.fromarray((grey * np.array(rgb, dtype=np.uint16) // 255).astype(np.uint8), "RGB").convert(mode)


def encoded(image: Image.Image, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def test_a_page_becomes_white_ink_on_black_in_a_20_pixel_box_centred_by_mass():
    field = mnist_pixels(encoded(seven())).reshape(28, 28)
    rows, columns = np.nonzero(field)
    # The 7 is taller than wide: 20 pixels high, its width scaled by the same factor.
    assert rows.max() - rows.min() + 1 == 20 and columns.max() - columns.min() + 1 < 20
    assert field.dtype == np.uint8 and field.max() == 255 and field[0].sum() == field[:, 0].sum() == 0
    mass = field.astype(float) / field.sum()
    assert abs((mass.sum(1) * np.arange(28)).sum() - 14) <= 0.5 and abs((mass.sum(0) * np.arange(28)).sum() - 14) <= 0.5
    # A one-pixel stroke stays one pixel high (ImageOps.contain would round it to nothing).
    stroke = Image.new("L", (400, 50), 255)
    ImageDraw.Draw(stroke).line([(0, 25), (399, 25)], fill=0)
    rows, columns = np.nonzero(mnist_pixels(encoded(stroke)).reshape(28, 28))
    assert len(set(rows)) == 1 and len(set(columns)) == 20
    # Ink heavy in one corner: its centre of mass would put the box outside the field, which stops it.
    corner = Image.new("L", (100, 100), 255)
    ImageDraw.Draw(corner).rectangle([0, 0, 49, 49], fill=0)
    corner.putpixel((99, 99), 0)
    field = mnist_pixels(encoded(corner)).reshape(28, 28)
    assert field[8:18, 8:18].all() and not field[:8].any() and not field[:, :8].any()


deep = Image.fromarray(np.asarray(seven(mode="L"), dtype=np.uint16) * 257)
transparent = seven(mode="RGBA")
transparent.putalpha(Image.fromarray(255 - np.asarray(seven(mode="L"))))  # The paper almost transparent.


@pytest.mark.parametrize(
    ("image", "kind"),
    [
        (seven(ink=235, paper=15), "PNG"),
        (seven(rgb=(255, 230, 90)), "PNG"),
        (seven(mode="L"), "PNG"),
        (seven(), "JPEG"),
        (seven(mode="LAB"), "TIFF"),
        (deep, "PNG"),
        (deep, "TIFF"),
        (transparent, "PNG"),
    ],
    ids=["light-on-dark", "yellow-paper", "grey", "jpeg", "lab", "16-bit-png", "16-bit-tiff", "transparent"],
)
def test_ink_is_found_whichever_way_round_in_any_mode(image, kind):
    difference = np.abs(mnist_pixels(encoded(image, kind)).astype(int) - mnist_pixels(encoded(seven())))
    assert difference.mean() < 8  # The same digit, up to contrast and JPEG noise.


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        (b"", "is not an image"),
        (encoded(Image.new("RGB", (200, 300), (30, 90, 200))), "shows no ink"),
        (encoded(seven())[:400], "damaged or truncated"),
        (encoded(seven(1500, 1500)), "decompression-bomb limit"),
        (encoded(seven(1100, 1100)), "decompression-bomb limit"),  # Pillow only warns, up to twice its limit.
    ],
)
def test_unusable_images_are_refused_with_a_reason(data, phrase, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ImageError, match=phrase):
        mnist_pixels(data)


KINDS = (("RGB", "PNG"), ("L", "JPEG"), ("RGB", "TIFF"), ("LAB", "TIFF"), ("P", "GIF"), ("RGB", "WEBP"), ("RGB", "BMP"))
SAMPLES = [encoded(seven(60, 80, mode=mode), kind) for mode, kind in KINDS]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    st.floats(0.05, 1),
)
def test_any_damaged_image_gives_pixels_or_its_own_error(sample, changes, keep):
    """A damaged image fails alone (ImageError), never with another exception that would stop the batch."""
    data = bytearray(sample)
    for where, value in changes:
        data[int(where * len(data))] = value
    with contextlib.suppress(ImageError):
        assert mnist_pixels(bytes(data[: max(1, int(keep * len(data)))])).shape == (784,)


def test_text_and_json_name_the_model():
    answer = np.array([0.01, 0.0, 0.02, 0.05, 0.0, 0.0, 0.0, 0.9, 0.0, 0.02], dtype=np.float32)
    model = {"name": "mnist-softmax", "version": "3", "aliases": ["champion", "latest-good"]}
    results = [("seven.png", answer), ("bad.png", "bad.png is not an image.")]
    assert predict.render_text(results, model) == (
        "model: mnist-softmax version 3, alias champion, alias latest-good\n"
        "seven.png: 7  (7: 90.0%, 3: 5.0%, 2: 2.0%)\n"
    )
    assert predict.render_text(results[1:], {}) == ""
    assert predict.render_text(results, {"uri": "runs:/abc/model"}).startswith("model: runs:/abc/model\n")
    top = [{"digit": 7, "probability": 0.9}, {"digit": 3, "probability": 0.05}, {"digit": 2, "probability": 0.02}]
    assert json.loads(predict.render_json(results, model)) == [
        {"image": "seven.png", "digit": 7, "top": top, "model": model},
        {"image": "bad.png", "error": "bad.png is not an image."},
    ]


def test_unusable_files_huge_inputs_and_a_terminal_are_refused_each_alone(tmp_path):
    """Missing files, text, devices, FIFOs, directories, files or pipes over the limit: one error each, no hang."""
    (tmp_path / "notes.txt").write_text("hello")
    os.mkfifo(fifo := tmp_path / "pipe.png")
    (folder := tmp_path / "folder.png").mkdir()
    with open(huge := tmp_path / "huge.png", "wb") as handle:
        handle.truncate(READ_LIMIT + 1)
    command = [sys.executable, "-m", "pipeline.predict"]
    options = {"cwd": tmp_path, "env": stage_env(), "capture_output": True, "text": True, "timeout": 120}
    names = ["missing.png", "notes.txt", "/dev/zero", str(fifo), str(folder), str(huge), "-"]
    with open("/dev/zero", "rb") as zeros:
        results = [subprocess.run([*command, *names], stdin=zeros, **options)]
    main, terminal = pty.openpty()
    results.append(subprocess.run([*command, "-"], stdin=terminal, **options))
    os.close(main)
    os.close(terminal)
    assert [(result.returncode, result.stdout) for result in results] == [(1, ""), (1, "")]
    assert [" ".join(error.split()) for result in results for error in result.stderr.split("error: ")[1:]] == [
        "missing.png does not exist.",
        "notes.txt is not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF, WebP…).",
        "/dev/zero cannot be read: it is a device, not a regular file.",
        f"{fifo} cannot be read: it is a FIFO, not a regular file.",
        f"{folder} cannot be read: it is a directory, not a regular file.",
        f"{huge} cannot be read: it holds more than the 67,108,864 bytes this command reads.",
        "<stdin> cannot be read: it holds more than the 67,108,864 bytes this command reads.",
        "<stdin> is the terminal; pipe an image in, as in mnist-predict - < digit.png.",
    ]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A real raw-pixel Keras model saved as train saves it (untrained), and two that are no MNIST model."""
    import keras

    from pipeline.model import build_model, raw_pixel_model, save_model

    folder = tmp_path_factory.mktemp("models")
    save_model(raw_pixel_model(build_model(0)), folder / "model.keras")
    for name, shape, classes in (("grid", (28, 28), 10), ("five", (784,), 5)):
        pixels = keras.Input(shape=shape, dtype="uint8")
        output = keras.layers.Dense(classes, activation="softmax")(keras.layers.Flatten()(pixels))
        keras.Model(pixels, output).save(folder / f"{name}.keras")
    return folder


@pytest.mark.slow
def test_the_command_answers_with_a_model_file_and_refuses_models_that_cannot_be_used(models, tmp_path):
    (tmp_path / "seven.png").write_bytes(encoded(seven()))
    (tmp_path / "notes.txt").write_text("hello")
    os.mkfifo(tmp_path / "fifo.keras")
    model = str(models / "model.keras")
    # Files and stdin answered, a bad image explained; TensorFlow's oneDNN start-up lines, forced on, not on stderr.
    command = [sys.executable, "-m", "pipeline.predict", "seven.png", "notes.txt", "-", "--model", model]
    stdin = encoded(seven(ink=235, paper=15), "JPEG")
    options = {"cwd": tmp_path, "env": stage_env(TF_ENABLE_ONEDNN_OPTS="1"), "capture_output": True, "timeout": 300}
    result = subprocess.run(command, input=stdin, **options)
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 1 and lines[0] == f"model: file {model}"
    assert [line.split(":")[0] for line in lines[1:]] == ["seven.png", "<stdin>"]
    message = "notes.txt is not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF, WebP…)."
    assert " ".join(result.stderr.decode().split()) == f"error: {message}"

    env = stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    weights = zipfile.ZipFile(models / "model.keras").getinfo("model.weights.h5")
    damaged = bytearray((models / "model.keras").read_bytes())
    # One byte of the stored weights: the archive opens, but their CRC-32 fails.
    damaged[weights.header_offset + 30 + len(weights.filename) + weights.file_size // 2] ^= 0xFF
    (tmp_path / "damaged.keras").write_bytes(damaged)
    with zipfile.ZipFile(tmp_path / "foreign.keras", "w") as archive:  # an archive Keras opens but cannot rebuild
        archive.writestr("config.json", json.dumps({"class_name": "Nope", "config": {}}))
    champion = ["--model", "models:/mnist-softmax@champion"]
    for args, phrase in (
        # The file is read before TensorFlow is imported: Keras would wait forever on a FIFO.
        (["--model", "missing.keras"], "cannot read the model file missing.keras: No such file or directory"),
        (["--model", "fifo.keras"], "cannot read the model file fifo.keras: it is a FIFO, not a regular file"),
        (["--model", "notes.txt"], "is not a sound .keras file (a zip archive): File is not a zip file"),
        (["--model", str(models / "grid.keras")], "takes [(None, 28, 28)] and answers [(None, 10)], but an MNIST"),
        (["--model", str(models / "five.keras")], "takes [(None, 784)] and answers [(None, 5)], but an MNIST"),
        (["--model", "damaged.keras"], "cannot load the model file damaged.keras: Bad CRC-32 for file"),
        (["--model", "foreign.keras"], "cannot load the model file foreign.keras: Could not locate class 'Nope'"),
        (champion, "mlflow.db?timeout=60 does not exist yet; run the pipeline first (dvc repro)."),
        (champion, "cannot load the model models:/mnist-softmax@champion"),  # from a store without it
        ([], "the registry has no champion of mnist-softmax yet, so there is no default model: promote a version"),
    ):
        if phrase.startswith("cannot load the model models:/"):
            assert not (tmp_path / "mlflow.db").exists()  # Asking a store that does not exist does not create it.
            (tmp_path / "mlflow.db").touch()
        result = run_module("pipeline.predict", "seven.png", *args, cwd=tmp_path, env=env)
        assert result.returncode == 1 and result.stdout == "" and result.stderr.startswith("error: "), result.stderr
        assert phrase in " ".join(result.stderr.split()), result.stderr

    from test_tracking_server import FakeServer

    # A server whose health checks pass and whose API answers 401, as MLflow's basic-auth app does.
    server = FakeServer(health_status=200, other_status=401)
    password = secrets.token_hex(8)
    env.update(MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME="someone", MLFLOW_TRACKING_PASSWORD=password)
    try:
        result = run_module("pipeline.predict", "seven.png", *champion, cwd=tmp_path, env=env)
    finally:
        server.close()
    message = " ".join(result.stderr.split())
    assert result.returncode == 1 and result.stdout == "" and password not in result.stderr, result.stderr
    assert message.startswith("error: cannot load the model models:/mnist-softmax@champion") and "401" in message
