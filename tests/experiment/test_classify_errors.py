"""Tests of metajax.experiment.classify on folders a user can get wrong: each is refused with one
line naming the folder or file and what is allowed, before any model is needed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metajax.experiment import classify

INPUT_SHAPE = (28, 28, 1)
ALLOWED = ", ".join(sorted(classify.IMAGE_EXTENSIONS))


def _png(seed: int = 0) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _folders(root: Path, classes: int = 2, queries: int = 1) -> tuple[Path, Path]:
  """support/c<i>/a.png for each class, query/q<j>.png."""
  support, query = root / "support", root / "query"
  for c in range(classes):
    (support / f"c{c}").mkdir(parents=True)
    (support / f"c{c}" / "a.png").write_bytes(_png(c))
  query.mkdir()
  for q in range(queries):
    (query / f"q{q}.png").write_bytes(_png(100 + q))
  return support, query


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


def test_good_folders_are_listed_by_class(tmp_path):
  support, query = _folders(tmp_path, classes=3, queries=2)
  (support / ".ipynb_checkpoints").mkdir()  # hidden folders and files are no classes or images
  (support / "c0" / ".a.png").write_bytes(b"not an image")
  folders = classify.list_folders(support, query, ways=5)
  assert folders.class_names == ["c0", "c1", "c2"]
  assert [p.name for p in folders.support] == ["a.png"] * 3
  np.testing.assert_array_equal(folders.labels, [0, 1, 2])
  assert [p.name for p in folders.queries] == ["q0.png", "q1.png"]
  assert classify.load_images(folders.support, INPUT_SHAPE).shape == (3, *INPUT_SHAPE)


def test_one_class(tmp_path):
  support, query = _folders(tmp_path, classes=1)
  with pytest.raises(classify.InputError) as error:
    classify.list_folders(support, query, ways=5)
  assert _one_line(error) == (f"the support folder {str(support)!r} needs one sub-folder of images "
                              "per class, 2 to 5; found 1: 'c0'")


def test_images_without_class_folders_say_how_to_arrange_them(tmp_path):
  support, query = _folders(tmp_path, classes=0)
  support.mkdir()
  (support / "a.png").write_bytes(_png())
  with pytest.raises(classify.InputError) as error:
    classify.list_folders(support, query)
  assert _one_line(error).endswith("at least 2; found 0; put each class's images in a sub-folder "
                                   "named after the class")


def test_more_classes_than_the_model_has_ways(tmp_path):
  support, query = _folders(tmp_path, classes=6)
  with pytest.raises(classify.InputError) as error:
    classify.list_folders(support, query, ways=5)
  assert _one_line(error) == (f"the support folder {str(support)!r} has 6 classes but the model "
                              "was trained for 5-way tasks (at most 5 classes)")
  assert classify.list_folders(support, query).class_names[-1] == "c5"  # no model, no bound


def test_a_class_folder_without_images(tmp_path):
  support, query = _folders(tmp_path, classes=2)
  (support / "c1" / "a.png").unlink()
  for name in ("notes.txt", "more.txt"):
    (support / "c1" / name).write_text("not an image")
  with pytest.raises(classify.InputError) as error:
    classify.list_folders(support, query, ways=5)
  assert _one_line(error) == (f"the support class folder {str(support / 'c1')!r} has no images "
                              f"(found 2 other files: more.txt, notes.txt); images are {ALLOWED}")


def test_an_empty_query_folder(tmp_path):
  support, query = _folders(tmp_path, queries=0)
  with pytest.raises(classify.InputError) as error:
    classify.list_folders(support, query, ways=5)
  assert _one_line(error) == (f"the query folder {str(query)!r} has no images (it is empty); "
                              f"images are {ALLOWED}")


def test_a_missing_query_folder(tmp_path):
  support, _ = _folders(tmp_path)
  with pytest.raises(FileNotFoundError, match="query folder '.*nowhere' is not a directory"):
    classify.list_folders(support, tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not_an_image"])
def test_an_unreadable_image_is_named(tmp_path, damage):
  support, query = _folders(tmp_path, queries=2)
  bad = query / "q1.png"
  raw = bad.read_bytes()
  if damage == "truncated":
    bad.write_bytes(raw[: len(raw) // 2])
  elif damage == "corrupt":  # the pixel data's bytes replaced: the deflate stream is broken
    start = raw.index(b"IDAT") + 4
    bad.write_bytes(raw[:start] + bytes(len(raw) - start - 12) + raw[-12:])
  else:
    bad.write_text("hello")
  with pytest.raises(classify.InputError) as error:
    # the same check the binary reaches once the model is restored (no model is used before it)
    classify.classify_folders(None, None, INPUT_SHAPE, 5, support, query)
  message = _one_line(error)
  assert message.startswith(f"cannot read the image {str(bad)!r} (")
  assert message.endswith("); replace or remove it")
