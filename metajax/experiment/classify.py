"""Few-shot classification of your own images with a meta-trained model.

    support/<class name>/*.png    one sub-folder per class (at most `ways` classes), any shots
    query/*.png                   the images to classify (sub-folders are searched too)

Images of any size and mode are converted to the model's input: grayscale or RGB, resized to the
model's input size (Lanczos), scaled to [0, 1], and, for models trained on dark-background data
such as Omniglot (strokes 1 on 0), inverted when they are light-background drawings (`invert`:
"auto" decides per image by its mean brightness; True or False forces it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from metajax.platform import xla
from metajax.types import Array

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
Invert = bool | Literal["auto"]


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
  """Image files under `folder` (recursively), sorted by path."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"{str(folder)!r} is not a directory")
  return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_support(folder: str | os.PathLike[str]) -> tuple[list[Path], np.ndarray, list[str]]:
  """`(paths, labels, class_names)` of a support folder with one sub-folder per class.

  Classes are the sub-folders in sorted order; label i is `class_names[i]`.

  Raises:
    FileNotFoundError / ValueError: no such folder, fewer than 2 classes, or an empty class.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"support folder {str(folder)!r} is not a directory")
  classes = sorted(p for p in folder.iterdir() if p.is_dir())
  if len(classes) < 2:
    raise ValueError(f"the support folder {str(folder)!r} needs one sub-folder per class, at least "
                     f"2; found {len(classes)}")
  paths, labels = [], []
  for label, class_dir in enumerate(classes):
    images = list_images(class_dir)
    if not images:
      raise ValueError(f"support class folder {str(class_dir)!r} has no images "
                       f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    paths += images
    labels += [label] * len(images)
  return paths, np.asarray(labels, np.int32), [c.name for c in classes]


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
  """`to_model_input` of image files."""
  images = []
  for path in paths:
    try:
      with Image.open(path) as image:
        image.load()
        images.append(image)
    except OSError as e:
      raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
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
    ValueError: more classes than the model's `ways`, or no query images.
  """
  paths, labels, names = list_support(support_dir)
  if len(names) > ways:
    raise ValueError(f"the support folder has {len(names)} classes but the model was trained for "
                     f"{ways}-way tasks (at most {ways} classes)")
  queries = list_images(query_dir)
  if not queries:
    raise ValueError(f"no query images in {str(query_dir)!r}")
  support_x = load_images(paths, input_shape, invert=invert)
  query_x = load_images(queries, input_shape, invert=invert)
  fn = xla.jit(predict, static_argnums=(0, 5))
  predicted, probs = jax.device_get(fn(learner, meta_params, support_x, labels, query_x,
                                       len(names)))
  return [{"image": str(q), "label": names[int(k)], "probability": float(p[k])}
          for q, k, p in zip(queries, predicted, probs)]
