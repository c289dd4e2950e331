"""Few-shot classification of your own images with a meta-trained model.

    support/<class name>/*.png    one sub-folder per class (2 to `ways` classes), any shots
    query/*.png                   the images to classify (sub-folders are searched too)

Images of any size and mode are converted to the model's input: grayscale or RGB, resized to the
model's input size (Lanczos), scaled to [0, 1], and, for models trained on dark-background data
such as Omniglot (strokes 1 on 0), inverted when they are light-background drawings (`invert`:
"auto" decides per image by its mean brightness; True or False forces it).

Folders that cannot be used as given (too few or too many classes, a class or a query folder
without images, an image that does not decode) raise `InputError`, whose message names the
folder or file and what is allowed; `list_folders` checks the folders before a model is loaded.
Hidden files and folders (names starting with ".") are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from metajax.platform import xla
from metajax.types import Array

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
Invert = bool | Literal["auto"]
_SHOWN = 3  # file names quoted in a message


class InputError(ValueError):
  """Support or query images that cannot be used as given; the message names the folder or file
  and what is allowed."""


class Folders(NamedTuple):
  """The images of a support and a query folder (`list_folders`).

  Attributes:
    support: the support images, class by class, each class's sorted by path.
    labels: `[len(support)]` int32, label i meaning `class_names[i]`.
    class_names: the support sub-folders' names, sorted.
    queries: the query images, sorted by path.
  """

  support: list[Path]
  labels: np.ndarray
  class_names: list[str]
  queries: list[Path]


def _visible(path: Path, root: Path) -> bool:
  return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _allowed() -> str:
  return ", ".join(sorted(IMAGE_EXTENSIONS))


def _others(files: Sequence[Path]) -> str:
  """`found 2 other files: a.txt, b.txt` (at most `_SHOWN` names), or `it is empty`."""
  if not files:
    return "it is empty"
  names = ", ".join(p.name for p in files[:_SHOWN]) + (", ..." if len(files) > _SHOWN else "")
  return f"found {len(files)} other file{'s' * (len(files) > 1)}: {names}"


def _files(folder: Path) -> list[Path]:
  return sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p, folder))


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
  """Image files under `folder` (recursively, by extension, hidden ones skipped), sorted by path.

  Raises:
    FileNotFoundError: `folder` is not a directory.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"{str(folder)!r} is not a directory")
  return [p for p in _files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]


def _no_images(what: str, folder: Path) -> InputError:
  return InputError(f"{what} {str(folder)!r} has no images ({_others(_files(folder))}); images "
                    f"are {_allowed()}")


def list_support(folder: str | os.PathLike[str], *, ways: int | None = None
                 ) -> tuple[list[Path], np.ndarray, list[str]]:
  """`(paths, labels, class_names)` of a support folder with one sub-folder per class.

  Classes are the sub-folders in sorted order; label i is `class_names[i]`.

  Args:
    folder: the support folder.
    ways: the most classes the model can tell apart (None: no upper bound).

  Raises:
    FileNotFoundError: no such folder.
    InputError: fewer than 2 classes or more than `ways`, or a class folder without images.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"support folder {str(folder)!r} is not a directory")
  classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
  allowed = "at least 2" if ways is None else f"2 to {ways}"
  if len(classes) < 2:
    found = f"found {len(classes)}" + "".join(f": {c.name!r}" for c in classes)
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    hint = "; put each class's images in a sub-folder named after the class" if loose else ""
    raise InputError(f"the support folder {str(folder)!r} needs one sub-folder of images per "
                     f"class, {allowed}; {found}{hint}")
  if ways is not None and len(classes) > ways:
    raise InputError(f"the support folder {str(folder)!r} has {len(classes)} classes but the "
                     f"model was trained for {ways}-way tasks (at most {ways} classes)")
  paths, labels = [], []
  for label, class_dir in enumerate(classes):
    images = list_images(class_dir)
    if not images:
      raise _no_images("the support class folder", class_dir)
    paths += images
    labels += [label] * len(images)
  return paths, np.asarray(labels, np.int32), [c.name for c in classes]


def list_folders(support_dir: str | os.PathLike[str], query_dir: str | os.PathLike[str], *,
                 ways: int | None = None) -> Folders:
  """Lists and checks a support and a query folder (cheap: no image is decoded).

  Raises:
    FileNotFoundError: a folder that does not exist.
    InputError: see `list_support`; or a query folder without images.
  """
  paths, labels, names = list_support(support_dir, ways=ways)
  if not Path(query_dir).is_dir():
    raise FileNotFoundError(f"query folder {str(query_dir)!r} is not a directory")
  queries = list_images(query_dir)
  if not queries:
    raise _no_images("the query folder", Path(query_dir))
  return Folders(paths, labels, names, queries)


def to_model_input(images: Sequence[Image.Image], input_shape: Sequence[int], *,
                   invert: Invert = False) -> np.ndarray:
  """PIL images -> float32 `[N, H, W, C]` in [0, 1] for a model whose input is `input_shape`.

  Args:
    images: PIL images of any size and mode.
    input_shape: `(H, W, C)` with C = 1 (grayscale) or 3 (RGB).
    invert: True to invert (1 - x), "auto" to invert the images whose mean is above 0.5 (light
      background), False to keep them.
  """
  height, width, channels = (int(d) for d in input_shape)
  if channels not in (1, 3):
    raise ValueError(f"input_shape {tuple(input_shape)} must have 1 or 3 channels")
  out = np.empty((len(images), height, width, channels), np.float32)
  for i, image in enumerate(images):
    image = image.convert("L" if channels == 1 else "RGB")
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    x = np.asarray(image, np.float32).reshape(height, width, channels) / 255.0
    if invert is True or (invert == "auto" and x.mean() > 0.5):
      x = 1.0 - x
    out[i] = x
  return out


def load_images(paths: Sequence[str | os.PathLike[str]], input_shape: Sequence[int], *,
                invert: Invert = False) -> np.ndarray:
  """`to_model_input` of image files.

  Raises:
    InputError: a file that does not decode as an image (naming it).
  """
  images = []
  for path in paths:
    try:
      with Image.open(path) as image:
        image.load()  # decode fully now, so that a truncated file fails here
        images.append(image)
    # PIL raises these for files that are not images, truncated or with broken chunks
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
      raise InputError(f"cannot read the image {str(path)!r} ({e}); replace or remove it") from e
  return to_model_input(images, input_shape, invert=invert)


def predict(learner: Any, meta_params: Any, support_x: Array, support_y: Array, query_x: Array,
            num_classes: int) -> tuple[Array, Array]:
  """Adapts on the support set, then classifies the queries among the first `num_classes` outputs.

  Returns:
    `(labels [Q] int32, probabilities [Q, num_classes])`.
  """
  adapted = learner.adapt(meta_params, support_x, support_y)
  logits = learner.apply_fn(adapted, query_x)[:, :num_classes]
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.argmax(probs, axis=-1).astype(jnp.int32), probs


def classify_folders(learner: Any, meta_params: Any, input_shape: Sequence[int], ways: int,
                     support_dir: str | os.PathLike[str], query_dir: str | os.PathLike[str], *,
                     invert: Invert = False) -> list[dict[str, Any]]:
  """Classifies every image of `query_dir` after adapting on `support_dir`.

  Returns:
    One `{"image": path, "label": class name, "probability": p}` per query image, in path order.

  Raises:
    FileNotFoundError: a folder that does not exist.
    InputError: see `list_folders` (with the model's `ways`) and `load_images`.
  """
  folders = list_folders(support_dir, query_dir, ways=ways)
  support_x = load_images(folders.support, input_shape, invert=invert)
  query_x = load_images(folders.queries, input_shape, invert=invert)
  fn = xla.jit(predict, static_argnums=(0, 5))
  predicted, probs = jax.device_get(fn(learner, meta_params, support_x, folders.labels, query_x,
                                       len(folders.class_names)))
  return [{"image": str(q), "label": folders.class_names[int(k)], "probability": float(p[k])}
          for q, k, p in zip(folders.queries, predicted, probs)]
