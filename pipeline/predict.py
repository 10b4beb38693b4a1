"""Which digit is in an image? ``mnist-predict`` (also ``python -m pipeline.predict``) asks the model.

Reads image files (PNG, JPEG or anything else Pillow opens; any size; dark ink on light paper or
light ink on dark; colour or grey), or one image from stdin for ``-``, and prints per image the
predicted digit and the three most probable digits (``--json``: a JSON list for machines), after
the model that gave the answers (a file's path, or a registered model's name, version and aliases).
The model is the registry's champion by default (``models:/mnist-softmax@champion``), or any MLflow
model URI (``models:/mnist-softmax/3``, ``runs:/<run id>/model``) or ``.keras`` file. MLflow URIs are
looked up in the store the pipeline logs to ($MLFLOW_TRACKING_URI, or the project's mlflow.db), the
project being the one around the current folder or else the one this package is installed from, so
the command works from any folder.

Each image becomes an MNIST-like input the way MNIST itself was made (LeCun et al.: size-normalised
into a 20×20 box keeping the aspect ratio, then centred by centre of mass in 28×28): grey levels;
the ink told from the paper by the border, which is mostly paper, and made white on black; the
paper's own level subtracted; cropped to the ink's bounding box; scaled to fit 20×20 with
anti-aliasing; placed so that its centre of mass is at the centre of the 28×28 field. The model
takes those raw 0-255 pixels (it scales them itself).

An image that cannot be used (not an image, damaged, no ink on it, more pixels than Pillow's
decompression-bomb limit, a missing file, a directory or device, more than 64 MiB) gets a
one-paragraph error on stderr; the others are still answered, and the exit status is 1. A model
that cannot be loaded, or that does not take MNIST's 784 pixels and answer with 10 probabilities,
stops everything (exit 1).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import files
from pipeline.cli import PipelineError, format_error, native_stderr_silenced, redact, run
from pipeline.data import IMAGE_SHAPE, NUM_CLASSES, NUM_PIXELS

logger = logging.getLogger(__name__)

# The registered model's name when no params.yaml says otherwise.
STDIN = "-"
# MNIST's digits were scaled to fit this box, then centred by centre of mass in IMAGE_SHAPE; their
# centre of mass sits at pixel (14, 14) (row, column, counted from 0), within ±0.3 on the test set.
DIGIT_BOX = 20
CENTRE = (14.0, 14.0)
# Ink is what stands out from the paper by more than this share of the strongest ink, which keeps
# JPEG noise and paper texture out of the bounding box.
INK_THRESHOLD = 0.3
# Fewer grey levels than this between paper and ink means there is no ink at all (a blank page).
MIN_CONTRAST = 32
TOP = 3
# The most a .keras file may unpack to: far above any model of the series (a few MB), far below
# what would strain memory. A zip bomb declares more and is refused before Keras opens it.
MODEL_LIMIT = 2**30


class ImageError(ValueError):
    """One image cannot be turned into a digit; the others can still be answered."""


@dataclass(frozen=True)
class Answer:
    name: str
    probabilities: np.ndarray

    @property
    def digit(self) -> int:
        return int(self.probabilities.argmax())

    def top(self, count: int = TOP) -> list[tuple[int, float]]:
        order = np.argsort(-self.probabilities, kind="stable")[:count]
        return [(int(digit), float(self.probabilities[digit])) for digit in order]


# ---------------------------------------------------------------------------------------------
# Pure functions: from an image to MNIST's 784 pixels.


def open_image(data: bytes) -> np.ndarray:
    """Decode ``data`` with Pillow into grey levels, refusing images larger than its decompression-bomb limit."""
    with warnings.catch_warnings():
        # Pillow's warnings about damaged metadata would only clutter the one-paragraph errors; it
        # only warns between its pixel limit and twice that, and here both are refused.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            # Phone photos are often stored sideways with an EXIF note saying how to turn them.
            return grey_levels(ImageOps.exif_transpose(image))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            limit = Image.MAX_IMAGE_PIXELS or 0
            raise ImageError(
                f"has more pixels than the {limit:,} this tool reads (Pillow's decompression-bomb limit); "
                "scale it down first"
            ) from None
        except UnidentifiedImageError:
            raise ImageError("is not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF, WebP…)") from None
        # Pillow's decoders report damage with whatever exception they meet (its own fuzzing
        # harness catches Exception for that reason); one damaged image must not stop the others.
        except Exception as error:
            raise ImageError(f"is a damaged or truncated image ({error or type(error).__name__})") from None


def grey_levels(image: Image.Image) -> np.ndarray:
    """The image in grey levels 0-255 (float32), transparent parts shown on white paper."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        paper = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    if image.mode == "LAB":
        # Pillow converts LAB to no other mode, but its L band is the lightness already.
        image = image.getchannel("L")
    if image.mode.startswith("I;16"):
        # 16-bit grey, which converting to 8 bits would clip to white.
        return np.asarray(image, dtype=np.float32) / 257
    return np.asarray(image.convert("L"), dtype=np.float32)


def ink(grey: np.ndarray) -> np.ndarray:
    """How much ink each pixel holds, 0 (paper) to 255 (the strongest ink), whichever way round the image is.

    The border is mostly paper, so its median is the paper's level: ink is what differs from it,
    darker on light paper, lighter on dark paper.
    """
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    paper = float(np.median(border))
    amount = paper - grey if paper >= 128 else grey - paper
    amount = np.clip(amount, 0, None)
    strongest = float(amount.max())
    if strongest < MIN_CONTRAST:
        raise ImageError("shows no ink: it is empty or all one colour")
    # Paper texture and JPEG noise, far fainter than the ink, would add mass around the digit and
    # pull its centre away; what is below half the ink threshold is paper.
    amount[amount < INK_THRESHOLD * strongest / 2] = 0
    return amount * (255.0 / strongest)


def crop_to_ink(amount: np.ndarray) -> np.ndarray:
    """The smallest rectangle holding every pixel with more than INK_THRESHOLD of the strongest ink."""
    rows, columns = np.nonzero(amount > INK_THRESHOLD * 255.0)
    return amount[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]


def fit_box(amount: np.ndarray, box: int = DIGIT_BOX) -> np.ndarray:
    """Scale so that the longer side is ``box`` pixels, keeping the aspect ratio, with anti-aliasing."""
    height, width = amount.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(np.clip(amount, 0, 255).astype(np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32).clip(0, 255)


def centre_by_mass(digit: np.ndarray, shape: tuple[int, int] = IMAGE_SHAPE, centre=CENTRE) -> np.ndarray:
    """Place ``digit`` in a field of ``shape`` so that its centre of mass lands on ``centre`` (whole pixels)."""
    height, width = digit.shape
    rows, columns = np.indices(digit.shape)
    mass = float(digit.sum())
    if mass <= 0:
        raise ImageError("shows no ink: it is empty or all one colour")
    offsets = []
    for coordinates, target, size, field_size in (
        (rows, centre[0], height, shape[0]),
        (columns, centre[1], width, shape[1]),
    ):
        offset = round(target - float((digit * coordinates).sum()) / mass)
        # A lopsided digit still has to fit in the field.
        offsets.append(min(max(offset, 0), field_size - size))
    field = np.zeros(shape, dtype=np.float32)
    field[offsets[0] : offsets[0] + height, offsets[1] : offsets[1] + width] = digit
    return field


def mnist_pixels(data: bytes) -> np.ndarray:
    """An image file's bytes as one MNIST-like row of 784 uint8 pixels, white ink on black."""
    digit = fit_box(crop_to_ink(ink(open_image(data))))
    pixels = np.rint(centre_by_mass(digit)).astype(np.uint8).reshape(NUM_PIXELS)
    if not pixels.any():
        raise ImageError("shows no ink: it is empty or all one colour")
    return pixels


def model_text(model: dict[str, Any]) -> str:
    """The model that answered, as the text output's first line names it."""
    if "file" in model:
        return f"file {model['file']}"
    if "version" in model:
        aliases = "".join(f", alias {alias}" for alias in model["aliases"])
        return f"{model['name']} version {model['version']}{aliases}"
    return model["uri"]


def render_text(results: Sequence[Answer | str], model: dict[str, Any]) -> str:
    """The model that answered, then one line per answered image: its digit and the three most probable digits."""
    lines = []
    for result in results:
        if isinstance(result, Answer):
            top = ", ".join(f"{digit}: {probability:.1%}" for digit, probability in result.top())
            lines.append(f"{result.name}: {result.digit}  ({top})\n")
    return "".join([f"model: {model_text(model)}\n", *lines]) if lines else ""


def render_json(names: Sequence[str], results: Sequence[Answer | str], model: dict[str, Any]) -> str:
    """A JSON list with every image in the order given: its digit, top three and the model that answered,
    or its error."""
    items: list[dict] = []
    for name, result in zip(names, results):
        if isinstance(result, Answer):
            top = [{"digit": digit, "probability": round(probability, 6)} for digit, probability in result.top()]
            items.append({"image": name, "digit": result.digit, "top": top, "model": model})
        else:
            items.append({"image": name, "error": result})
    return json.dumps(items, indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# Loading the model and reading the images: the only code that touches disk and MLflow.


def project_root() -> Path:
    """The project whose store answers models:/ URIs: the one around the current folder, else the one
    this package was installed from (the editable install a clone's ``uv sync`` makes), else the current folder."""
    from pipeline.tracking import store

    for root in (store.store_root(), store.project_root(Path(__file__).parent)):
        if (root / "dvc.yaml").exists():
            return root
    return store.store_root()


def tracking(root: Path) -> tuple[str, str]:
    """The store the pipeline logs to ($MLFLOW_TRACKING_URI, else ``root``'s mlflow.db) and the model's name."""
    from pipeline.params import tracking_settings
    from pipeline.tracking import store

    settings = tracking_settings()
    return store.tracking_uri(settings.uri, root), settings.registered_model


def load_mlflow_model(model: str | None):
    """The predictor for an MLflow model URI (None: the registry's champion), and which model it is."""
    import mlflow
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from pipeline.tracking import registry, store

    # MLflow's notes (creating an empty store's tables, downloading artifacts) are not answers.
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    uri, name = tracking(project_root())
    store.check_reachable(uri)
    database = store.sqlite_path(uri)
    if database is not None and not database.exists():
        raise PipelineError(
            f"there is no MLflow store at {database} yet: run the pipeline there first (dvc repro), or set "
            "MLFLOW_TRACKING_URI to the store that holds the model (sqlite:////path/to/project/mlflow.db, or "
            "the team's tracking server); or pass --model with a .keras file."
        )
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    requested = wanted = model or registry.alias_uri(name, registry.CHAMPION)
    described: dict[str, Any] = {"uri": wanted}
    try:
        if model is None and registry.version_by_alias(client, name, registry.CHAMPION) is None:
            raise PipelineError(
                f"the registry has no {registry.CHAMPION} of {name} yet, so there is no default model: promote a "
                f"version with `mnist-check --champion --promote`, or pass --model models/model.keras (the "
                f"workspace's latest training) or --model models:/{name}/<version>."
            )
        found = get_model_name_and_version(client, wanted) if wanted.startswith("models:/") else ()
        if len(found) == 2:
            # Loaded by its number, so the version named in the answers is the one that gave them.
            version = client.get_model_version(*found)
            wanted = f"models:/{version.name}/{version.version}"
            described = {"name": version.name, "version": str(version.version), "aliases": list(version.aliases)}
        loaded = mlflow.pyfunc.load_model(wanted)
    except mlflow.exceptions.MlflowException as error:
        raise PipelineError(
            f"cannot load the model {requested} from {redact(uri)}: {store.short(error.message)}"
        ) from None
    except OSError as error:
        raise PipelineError(
            f"cannot load the model {requested} from {redact(uri)}: {store.short(str(error))}"
        ) from None

    # Versions logged with a tensor signature (before pipeline.serving) state their shapes.
    signature = [loaded.metadata.get_input_schema(), loaded.metadata.get_output_schema()]
    if all(schema is not None and schema.is_tensor_spec() for schema in signature):
        inputs, outputs = ([spec.shape for spec in schema.inputs] for schema in signature)
        if problem := shape_problem(requested, inputs, outputs):
            raise PipelineError(problem)

    def predict(pixels: np.ndarray) -> np.ndarray:
        predictions = loaded.predict(pixels)
        if isinstance(predictions, list):
            return np.array([prediction["probabilities"] for prediction in predictions])
        # Versions logged before pipeline.serving give the bare probabilities.
        return np.asarray(predictions)

    return predict, described


def shape_problem(model: str, inputs: Sequence[tuple], outputs: Sequence[tuple]) -> str | None:
    """Why a model with these input and output shapes (None or -1 for any batch) is no MNIST model, or None."""
    shapes = [tuple(None if size == -1 else size for size in shape) for shape in (*inputs, *outputs)]
    if shapes == [(None, NUM_PIXELS), (None, NUM_CLASSES)]:
        return None
    return (
        f"the model {model} takes {' and '.join(map(str, inputs)) or 'no input'} and answers with "
        f"{' and '.join(map(str, outputs)) or 'nothing'}, but an MNIST model takes rows of {NUM_PIXELS} pixels "
        f"(None, {NUM_PIXELS}) and answers {NUM_CLASSES} digit probabilities (None, {NUM_CLASSES})."
    )


def check_model_file(path: Path) -> None:
    """Refuse a model file that is missing, special, or no sound .keras archive (a zip) of a sane size.

    Done before TensorFlow is imported. Keras reads a damaged archive as "File not found", and
    unpacks a zip bomb until memory runs out, so the archive's members and their declared sizes
    (which Python's zipfile never reads past) are checked here first.
    """
    try:
        data = files.read_bytes(path, MODEL_LIMIT)
    except FileNotFoundError:
        hint = " (run the pipeline first: dvc repro)" if path.name == "model.keras" else ""
        raise PipelineError(
            f"the model file {path} does not exist{hint}; or pass --model models:/<name>@<alias>."
        ) from None
    except OSError as error:
        raise PipelineError(f"cannot read the model file {path}: {error.strerror or error}.") from None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(member.file_size for member in archive.infolist())
            damaged = None if unpacked > MODEL_LIMIT else archive.testzip()
    # zipfile reports damage with whatever exception it meets (zlib's, EOF, an unknown method).
    except Exception as error:
        raise PipelineError(f"the model file {path} is not a sound .keras file (a zip archive): {error}.") from None
    if unpacked > MODEL_LIMIT:
        raise PipelineError(
            f"the model file {path} would unpack to {unpacked:,} bytes, more than the {MODEL_LIMIT:,} this tool "
            "allows a model; it is no model of this project."
        )
    if damaged is not None:
        raise PipelineError(f"the model file {path} is damaged: its member {damaged} fails its checksum.")


def load_predictor(model: str | None):
    """A function from uint8 rows of 784 pixels to probabilities, and which model it is: a .keras file,
    an MLflow model URI, or (None) the registry's champion."""
    is_uri = model is None or (":" in model and not Path(model).exists())
    if not is_uri:
        check_model_file(Path(str(model)))
    with native_stderr_silenced():
        import keras

    # Versions logged with MLflow's TensorFlow flavour predict through Keras, whose progress bar would show.
    keras.config.disable_interactive_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)
    if is_uri:
        return load_mlflow_model(model)
    path = Path(str(model))
    try:
        loaded = keras.saving.load_model(path)
    # Keras reports a damaged or foreign model with whatever exception its parsing met (TypeError
    # for an unknown class, KeyError for a missing member).
    except Exception as error:
        from pipeline.tracking import store

        raise PipelineError(f"cannot load the model file {path}: {store.short(str(error))}") from None
    inputs, outputs = ([tuple(tensor.shape) for tensor in getattr(loaded, side, [])] for side in ("inputs", "outputs"))
    if problem := shape_problem(str(path), inputs, outputs):
        raise PipelineError(problem)
    return (lambda pixels: np.asarray(loaded(pixels))), {"file": str(path.resolve())}


def read_input(name: str) -> bytes:
    try:
        if name != STDIN:
            return files.read_bytes(name)
        if sys.stdin.isatty():
            raise ImageError("is the terminal; pipe an image in, as in mnist-predict - < digit.png")
        return files.read_bounded(sys.stdin.buffer)
    except FileNotFoundError:
        raise ImageError("does not exist") from None
    except OSError as error:
        raise ImageError(f"cannot be read: {error.strerror or error}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mnist-predict",
        description="Predict the digit in each image file (PNG, JPEG, any size; - reads one image from stdin).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or - for stdin")
    parser.add_argument(
        "--model",
        help="a .keras file or an MLflow model URI such as models:/mnist-softmax/3 "
        "(default: the registry's champion, models:/<registered model>@champion)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    args = parser.parse_args(argv)
    if args.images.count(STDIN) > 1:
        parser.error("stdin (-) can be read only once")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Answer every image; return 1 if any could not be answered."""
    args = parse_args(argv)
    names = [("<stdin>" if name == STDIN else name) for name in args.images]
    # Each image's pixels, or the reason it has none.
    inputs: list[np.ndarray | str] = []
    for name, shown in zip(args.images, names):
        try:
            inputs.append(mnist_pixels(read_input(name)))
        except ImageError as error:
            inputs.append(f"{shown} {error}.")
    usable = [pixels for pixels in inputs if isinstance(pixels, np.ndarray)]
    model: dict[str, Any] = {}
    probabilities: Iterator[np.ndarray] = iter([])
    if usable:
        predictor, model = load_predictor(args.model)
        probabilities = iter(predictor(np.stack(usable)))
    results: list[Answer | str] = [
        Answer(name, next(probabilities)) if isinstance(item, np.ndarray) else item for name, item in zip(names, inputs)
    ]
    for result in results:
        if isinstance(result, str):
            print(format_error(result), file=sys.stderr)
    sys.stdout.write(render_json(names, results, model) if args.json else render_text(results, model))
    return 0 if all(isinstance(result, Answer) for result in results) else 1


def cli() -> None:
    """Entry point of ``mnist-predict`` and ``python -m pipeline.predict``."""
    run(lambda: sys.exit(main(sys.argv[1:])))


if __name__ == "__main__":
    cli()
