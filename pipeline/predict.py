"""``mnist-predict``: the digit in each image (anything Pillow opens; ``-``: stdin), and the model that answered.

Each image is made MNIST-like as MNIST was made (ink cropped, scaled into 20×20, centred by mass in 28×28)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import files
from pipeline.cli import PipelineError, format_error, native_stderr_silenced, redact, run
from pipeline.data import IMAGE_SHAPE, NUM_CLASSES, NUM_PIXELS

STDIN = "-"
# MNIST's digits were scaled to fit a 20×20 box, then centred by mass at this pixel (row, column).
DIGIT_BOX, CENTRE = 20, (14.0, 14.0)
# Ink differs from the paper by more than this share of the strongest ink (JPEG noise does not); less contrast is blank.
INK_THRESHOLD, MIN_CONTRAST = 0.3, 32
NO_INK = "shows no ink: it is empty or all one colour"
Results = list[tuple[str, Any]]  # Each image's name, and its pixels, probabilities or error.


class ImageError(ValueError):
    """One image cannot be turned into a digit; the others can still be answered."""


def grey_levels(data: bytes) -> np.ndarray:
    """Decode ``data`` into grey levels 0-255, transparent parts on white paper, within Pillow's pixel limit."""
    with warnings.catch_warnings():
        # Warnings about damaged metadata would clutter the errors; past the pixel limit Pillow may only warn.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))  # Phone photos are often stored sideways.
            if image.has_transparency_data:
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            if image.mode.startswith("I;16"):
                return np.asarray(image, dtype=np.float32) / 257  # Converting to 8 bits would clip it to white.
            # Pillow converts LAB to no other mode, but its L band is the lightness.
            return np.asarray(image.getchannel("L") if image.mode == "LAB" else image.convert("L"), np.float32)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(
                f"has more pixels than the {Image.MAX_IMAGE_PIXELS:,} this tool reads (Pillow's "
                "decompression-bomb limit); scale it down first"
            ) from None
        except UnidentifiedImageError:
            raise ImageError("is not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF, WebP…)") from None
        # Pillow's decoders report damage with whatever exception they meet; it must not stop the other images.
        except Exception as error:
            raise ImageError(f"is a damaged or truncated image ({error or type(error).__name__})") from None


def mnist_pixels(data: bytes) -> np.ndarray:
    """An image file's bytes as one MNIST-like row of 784 uint8 pixels, white ink on black."""
    grey = grey_levels(data)
    # The ink, 0 (paper) to 255; the border is mostly paper, whichever way round the page is.
    paper = float(np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])))
    amount = np.clip(paper - grey if paper >= 128 else grey - paper, 0, None)
    strongest = float(amount.max())
    if strongest < MIN_CONTRAST:
        raise ImageError(NO_INK)
    # What is below half the threshold is paper texture or noise, which would pull the centre of mass away.
    amount[amount < INK_THRESHOLD * strongest / 2] = 0
    rows, columns = np.nonzero(amount > INK_THRESHOLD * strongest)
    amount = amount[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1] * (255.0 / strongest)
    # Cropped to the ink, its longer side scaled to DIGIT_BOX (ImageOps.contain can round a thin side to 0).
    size = [max(1, round(side * DIGIT_BOX / max(amount.shape))) for side in reversed(amount.shape)]
    image = Image.fromarray(amount.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    digit = np.asarray(image, dtype=np.float32).clip(0, 255)
    if digit.sum() == 0:
        raise ImageError(NO_INK)
    # Its centre of mass on CENTRE (whole pixels), yet wholly inside MNIST's field.
    top, left = (
        min(max(round(target - np.average(np.arange(size), weights=digit.sum(axis=1 - axis))), 0), field - size)
        for axis, (size, field, target) in enumerate(zip(digit.shape, IMAGE_SHAPE, CENTRE))
    )
    field = np.zeros(IMAGE_SHAPE, dtype=np.float32)
    field[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    pixels = np.rint(field).astype(np.uint8).reshape(NUM_PIXELS)
    if not pixels.any():
        raise ImageError(NO_INK)
    return pixels


def top(probabilities: np.ndarray) -> list[tuple[int, float]]:
    return [(int(digit), float(probabilities[digit])) for digit in np.argsort(-probabilities, kind="stable")[:3]]


def render_text(results: Results, model: dict[str, Any]) -> str:
    """The model that answered, then one line per answered image."""
    named = model.get("uri") or f"file {model.get('file')}"
    if "version" in model:
        named = f"{model['name']} version {model['version']}" + "".join(f", alias {a}" for a in model["aliases"])
    lines = [
        f"{name}: {answer.argmax()}  ({', '.join(f'{d}: {p:.1%}' for d, p in top(answer))})\n"
        for name, answer in results
        if not isinstance(answer, str)
    ]
    return "".join([f"model: {named}\n", *lines]) if lines else ""


def render_json(results: Results, model: dict[str, Any]) -> str:
    """Every image in the order given: its digit, top three and the model that answered, or its error."""

    def entry(name: str, answer: Any) -> dict[str, Any]:
        if isinstance(answer, str):
            return {"image": name, "error": answer}
        best = [{"digit": digit, "probability": round(p, 6)} for digit, p in top(answer)]
        return {"image": name, "digit": int(answer.argmax()), "model": model, "top": best}

    return json.dumps([entry(name, answer) for name, answer in results], indent=2) + "\n"


def load_mlflow_model(model: str | None):
    """The predictor for an MLflow model URI (None: the registry's champion), and which model it is."""
    import mlflow
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    # Here, not at the top: a .keras file needs neither pydantic's settings nor the tracking helpers.
    from pipeline.params import tracking_settings
    from pipeline.tracking import registry, store

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # Its notes (downloading artifacts) are no answers.
    # The store of the project around the current folder, else of the clone this package is installed from.
    roots = (store.store_root(), store.project_root(Path(__file__).parent))
    root = next((root for root in roots if (root / "dvc.yaml").exists()), roots[0])
    uri = store.tracking_uri(tracking_settings().uri, root)
    store.check_reachable(uri)
    store.require_existing(uri)
    mlflow.set_tracking_uri(uri)
    client, name = mlflow.MlflowClient(), registry.registered_name(root / "params.yaml")
    wanted = model or registry.alias_uri(name, registry.CHAMPION)
    described: dict[str, Any] = {"uri": wanted}
    try:
        if model is None and registry.version_by_alias(client, name, registry.CHAMPION) is None:
            raise PipelineError(
                f"the registry has no {registry.CHAMPION} of {name} yet, so there is no default model: promote a "
                "version with `mnist-check --champion --promote`, or pass --model models/model.keras (the "
                f"workspace's latest training) or --model models:/{name}/<version>."
            )
        found = get_model_name_and_version(client, wanted) if wanted.startswith("models:/") else ()
        if len(found) == 2:
            # Loaded by its number, so the version named in the answers is the one that gave them.
            version = client.get_model_version(*found)
            described = {"name": version.name, "version": str(version.version), "aliases": list(version.aliases)}
        loaded = mlflow.pyfunc.load_model(registry.version_uri(*found) if len(found) == 2 else wanted)
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise PipelineError(f"cannot load the model {wanted} from {redact(uri)}: {store.short(str(error))}") from None
    return (lambda pixels: np.array([answer["probabilities"] for answer in loaded.predict(pixels)])), described


def load_predictor(model: str | None):
    """A function from uint8 rows of 784 pixels to probabilities, and which model it is."""
    path = None if model is None or (":" in model and not Path(model).exists()) else Path(model)
    try:  # Before TensorFlow's import. Keras would wait forever on a FIFO, and calls what is no zip "File not found".
        if path is not None:
            zipfile.ZipFile(io.BytesIO(files.read_bytes(path))).close()
    except OSError as error:
        raise PipelineError(f"cannot read the model file {path}: {error.strerror or error}.") from None
    except zipfile.BadZipFile as error:
        raise PipelineError(f"the model file {path} is not a sound .keras file (a zip archive): {error}.") from None
    with native_stderr_silenced():
        import keras
    keras.config.disable_interactive_logging()  # Keras' progress bar, shown by MLflow's TensorFlow flavour too.
    if path is None:
        return load_mlflow_model(model)
    try:
        loaded = keras.saving.load_model(path)
    # Keras reports a damaged or foreign model with whatever exception its parsing met (TypeError, KeyError…).
    except Exception as error:
        from pipeline.tracking.store import short

        raise PipelineError(f"cannot load the model file {path}: {short(str(error))}") from None
    inputs, outputs = ([tuple(tensor.shape) for tensor in getattr(loaded, side, [])] for side in ("inputs", "outputs"))
    if [inputs, outputs] != [[(None, NUM_PIXELS)], [(None, NUM_CLASSES)]]:
        raise PipelineError(
            f"the model {path} takes {inputs} and answers {outputs}, but an MNIST model takes "
            f"rows of {NUM_PIXELS} pixels and answers {NUM_CLASSES} probabilities."
        )
    return (lambda pixels: np.asarray(loaded(pixels))), {"file": str(path.resolve())}


def main(argv: Sequence[str] | None = None) -> int:
    """Answer every image; return 1 if any could not be answered."""
    parser = argparse.ArgumentParser(prog="mnist-predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or - for stdin")
    parser.add_argument("--model", help="a .keras file or an MLflow model URI (default: models:/<name>@champion)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    args = parser.parse_args(argv)
    if args.images.count(STDIN) > 1:
        parser.error("stdin (-) can be read only once")
    results: Results = []
    for name in args.images:
        shown = "<stdin>" if name == STDIN else name
        try:
            if name == STDIN and sys.stdin.isatty():
                raise ImageError("is the terminal; pipe an image in, as in mnist-predict - < digit.png")
            data = files.read_bounded(sys.stdin.buffer) if name == STDIN else files.read_bytes(name)
            results.append((shown, mnist_pixels(data)))
        except FileNotFoundError:
            results.append((shown, f"{shown} does not exist."))
        except (OSError, ImageError) as error:
            reason = f"cannot be read: {error.strerror or error}" if isinstance(error, OSError) else error
            results.append((shown, f"{shown} {reason}."))
    model: dict[str, Any] = {}
    if usable := [pixels for _, pixels in results if not isinstance(pixels, str)]:
        predictor, model = load_predictor(args.model)
        answers = iter(predictor(np.stack(usable)))
        results = [(name, item if isinstance(item, str) else next(answers)) for name, item in results]
    for _, item in results:
        if isinstance(item, str):
            print(format_error(item), file=sys.stderr)
    sys.stdout.write((render_json if args.json else render_text)(results, model))
    return 1 if any(isinstance(item, str) for _, item in results) else 0


def cli() -> None:
    run(lambda: sys.exit(main(sys.argv[1:])))


if __name__ == "__main__":
    cli()
