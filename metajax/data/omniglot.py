"""Omniglot (Lake et al., 2015): archives -> preprocessed class pools -> named class splits.

Reads the canonical archives `images_background.zip`, `images_evaluation.zip`,
`images_background_small1.zip` and `images_background_small2.zip` (layout
`images_*/<Alphabet>/characterNN/NNNN_DD.png`, 105x105 1-bit PNGs; NNNN the global character id
0001-1623, DD the drawer), or directories with the same layout already extracted from them, from
`data_dir`, else `$METAJAX_OMNIGLOT_DIR`, else the folder `download=True` downloads to
(`metajax.data.download.default_omniglot_dir()`, in the user's cache directory) when an earlier
download put them there. The archives are published in the dataset's official repository,
https://github.com/brendenlake/omniglot (folder `python/`); `load_omniglot(download=True)` fetches
the missing ones and checks their published sha256 (`metajax.data.download`); nothing is ever
downloaded unless asked.

Preprocessing (as the MAML literature, version `PREPROCESSING_VERSION`): the 1-bit image is
converted to 8-bit grey, resized to `image_size` x `image_size` with an antialiasing filter
(Lanczos by default, box optional), inverted so strokes are 1 on a 0 background, and stored as
uint8 (returned as float32 in [0, 1] by default). Note that resizing the 1-bit PNG directly,
as Finn et al.'s `resize_images.py` did (`Image.open(f).resize((28, 28), Image.LANCZOS)`), is
silently a nearest-neighbour resize: PIL ignores the filter for mode "1" images. Pass
`resample="nearest"` to reproduce that.

An archive is checked against what was published (`PUBLISHED_ALPHABETS`) before anything is
decoded: one that holds some of its alphabets but not all, or not all their characters (an
interrupted extraction or copy), is refused with the missing ones named, and nothing is cached;
`allow_partial=True` reads what is there. A folder of alphabets of your own in Omniglot's layout
(none of the published names) is read as it is.

The result is cached (see `metajax.data.cache`: `$METAJAX_CACHE_DIR` or the user's cache
directory, never the data folder unless passed as `cache_dir`): a second load takes well under a
second.

Class order of `load_omniglot`: archive by archive in the order asked for (background first by
default), within an archive alphabets sorted, within an alphabet `characterNN` sorted; images
within a class sorted by file name (i.e. by drawer).
"""

from __future__ import annotations

import io
import os
import random
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from metajax.data import cache as cache_lib
from metajax.data import download as download_lib
from metajax.data.samplers import ClassPool, concatenate_pools

OMNIGLOT_DIR_ENV = "METAJAX_OMNIGLOT_DIR"

BACKGROUND = "images_background"
EVALUATION = "images_evaluation"
SMALL1 = "images_background_small1"
SMALL2 = "images_background_small2"
ARCHIVES = (BACKGROUND, EVALUATION, SMALL1, SMALL2)

# archive -> (alphabets, characters, images), as published by Lake et al.
PUBLISHED_COUNTS = {
  BACKGROUND: (30, 964, 19_280),
  EVALUATION: (20, 659, 13_180),
  SMALL1: (5, 136, 2_720),
  SMALL2: (5, 156, 3_120),
}
_BACKGROUND_ALPHABETS = {
  "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
  "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46,
  "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14, "Braille": 26, "Burmese_(Myanmar)": 34,
  "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43, "Greek": 24, "Gujarati": 48,
  "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16, "Japanese_(hiragana)": 52,
  "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26, "Malay_(Jawi_-_Arabic)": 40,
  "Mkhedruli_(Georgian)": 41, "N_Ko": 33, "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14,
  "Sanskrit": 42, "Syriac_(Estrangelo)": 23, "Tagalog": 17, "Tifinagh": 55,
}
# archive -> {alphabet: its number of characters (character01 to characterNN)}, as published
PUBLISHED_ALPHABETS: dict[str, dict[str, int]] = {
  BACKGROUND: _BACKGROUND_ALPHABETS,
  EVALUATION: {
    "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26,
    "Ge_ez": 26, "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47,
    "Manipuri": 40, "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46,
    "Sylheti": 28, "Syriac_(Serto)": 23, "Tengwar": 25, "Tibetan": 42, "ULOG": 26,
  },
  # the small archives are subsets of the background one
  SMALL1: {a: _BACKGROUND_ALPHABETS[a]
           for a in ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")},
  SMALL2: {a: _BACKGROUND_ALPHABETS[a]
           for a in ("Greek", "Japanese_(katakana)", "Latin", "Sanskrit", "Tagalog")},
}
_SHOWN = 5  # names quoted in a message
NUM_CHARACTERS = 1623
IMAGES_PER_CHARACTER = 20

PREPROCESSING_VERSION = 1
_RESAMPLE = {
  "lanczos": Image.Resampling.LANCZOS,
  "box": Image.Resampling.BOX,
  "bilinear": Image.Resampling.BILINEAR,
  "nearest": Image.Resampling.NEAREST,
}
_NAME_RE = re.compile(r"^(\d{4})_(\d{2})\.png$")

SPLITS = ("finn", "kao", "lake")


class CorruptDataError(ValueError):
  """A data file exists but cannot be read: a truncated archive, an unreadable image."""


def _how_to_get_data() -> str:
  return (f"pass data_dir=... or set ${OMNIGLOT_DIR_ENV} to a folder holding "
          f"{BACKGROUND}.zip and {EVALUATION}.zip (or their extracted folders; published at "
          f"{download_lib.OMNIGLOT_URL}), or let metajax download and verify them into "
          f"{str(download_lib.default_omniglot_dir())!r} with load_omniglot(download=True) "
          f"(binaries: --config.download=True)")


def find_omniglot_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
  """Returns the Omniglot directory: `data_dir`, else `$METAJAX_OMNIGLOT_DIR`, else the folder
  `download=True` downloads to, when it holds the archives.

  Raises:
    FileNotFoundError: none of them given or there, or `data_dir` does not exist; the message
      says how to get the data (a path, or the download).
  """
  if data_dir is None:
    env = os.environ.get(OMNIGLOT_DIR_ENV)
    if env:
      data_dir = env
    else:
      downloaded = download_lib.default_omniglot_dir()
      if any((downloaded / f"{a}.zip").is_file() for a in ARCHIVES):
        return downloaded
      raise FileNotFoundError(f"no Omniglot data: {_how_to_get_data()}")
  path = Path(data_dir).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(
      f"Omniglot directory {str(path)!r} does not exist or is not a directory; "
      f"{_how_to_get_data()}"
    )
  return path


def find_source(root: Path, archive: str) -> Path:
  """Returns `root/archive.zip`, else the extracted `root/archive/`, else raises."""
  if archive not in ARCHIVES:
    raise ValueError(f"unknown Omniglot archive {archive!r}; allowed: {', '.join(ARCHIVES)}")
  zip_path = root / f"{archive}.zip"
  if zip_path.is_file():
    return zip_path
  dir_path = root / archive
  if dir_path.is_dir():
    return dir_path
  raise FileNotFoundError(
    f"Omniglot archive {archive!r} not found in {str(root)!r}: expected {zip_path.name} or an "
    f"extracted folder {archive}/ (download=True fetches the published archive; binaries: "
    f"--config.download=True)"
  )


# An entry: (alphabet, character, file name, reader of its bytes).
_Entry = tuple[str, str, str, Callable[[], bytes]]


def zip_entries(path: Path, archive: str, zf: zipfile.ZipFile) -> Iterator[_Entry]:
  """The PNG entries `(alphabet, character, file name, reader)` of an Omniglot zip."""
  for info in zf.infolist():
    parts = info.filename.split("/")
    if info.is_dir() or parts[0] != archive or len(parts) != 4 or parts[-1].startswith("."):
      continue  # folders, __MACOSX/, .DS_Store and the like
    _, alphabet, character, name = parts
    if alphabet.startswith(".") or not name.lower().endswith(".png"):
      continue
    yield alphabet, character, name, (lambda info=info: zf.read(info))


def dir_entries(path: Path) -> Iterator[_Entry]:
  """The PNG entries of an extracted Omniglot folder, in sorted order."""
  for alphabet in sorted(os.listdir(path)):
    alphabet_dir = path / alphabet
    if alphabet.startswith(".") or not alphabet_dir.is_dir():
      continue
    for character in sorted(os.listdir(alphabet_dir)):
      character_dir = alphabet_dir / character
      if character.startswith(".") or not character_dir.is_dir():
        continue
      for name in sorted(os.listdir(character_dir)):
        if name.startswith(".") or not name.lower().endswith(".png"):
          continue
        yield alphabet, character, name, (lambda p=character_dir / name: p.read_bytes())


def decode_image(raw: bytes, where: str, image_size: int, resample: str) -> np.ndarray:
  """Decodes one Omniglot PNG to a `[S, S]` uint8 image with strokes 255 on background 0."""
  try:
    with Image.open(io.BytesIO(raw)) as image:
      image.load()  # decode fully now, so a truncated file fails here
      if resample != "nearest":
        image = image.convert("L")  # PIL resizes mode "1" images with NEAREST whatever is asked
      if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), _RESAMPLE[resample])
      array = np.asarray(image.convert("L"), dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptDataError(f"unreadable image {where}: {e}") from e
  return 255 - array


def _read_archive(
  source: Path, archive: str, image_size: int, resample: str, allow_partial: bool = False
) -> dict[str, np.ndarray]:
  """Reads and preprocesses one archive (zip or extracted folder) into pool arrays."""
  if source.is_dir():
    return _read_entries(source, archive, dir_entries(source), image_size, resample,
                         allow_partial)
  try:
    with zipfile.ZipFile(source) as zf:
      return _read_entries(source, archive, zip_entries(source, archive, zf), image_size,
                           resample, allow_partial)
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
    raise CorruptDataError(
      f"corrupt Omniglot archive {str(source)!r}: {e}; replace it with an intact copy of "
      f"{archive}.zip"
    ) from e
  except OSError as e:
    if isinstance(e, (FileNotFoundError, PermissionError)):
      raise
    raise CorruptDataError(f"cannot read Omniglot archive {str(source)!r}: {e}") from e


def _names(names: Sequence[str]) -> str:
  """`a, b, c` (at most `_SHOWN` names, then how many more)."""
  more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
  return ", ".join(names[:_SHOWN]) + more


def _check_complete(source: Path, archive: str, characters: Iterable[tuple[str, str]]) -> None:
  """Raises unless `characters` ((alphabet, characterNN) pairs) are all of the published
  `archive`, or none of its alphabets at all (alphabets of your own in Omniglot's layout).

  Raises:
    CorruptDataError: naming the missing alphabets and characters.
  """
  published = PUBLISHED_ALPHABETS[archive]
  found: dict[str, set[str]] = {}
  for alphabet, character in characters:
    found.setdefault(alphabet, set()).add(character)
  if not found.keys() & published.keys():
    return
  alphabets = [a for a in published if a not in found]
  missing = [f"{a}/character{i:02d}" for a, n in published.items() if a in found
             for i in range(1, n + 1) if f"character{i:02d}" not in found[a]]
  if not alphabets and not missing:
    return
  problems = []
  if alphabets:
    problems.append(f"it has {len(published) - len(alphabets)} of the {len(published)} published "
                    f"alphabets (missing {_names(alphabets)})")
  if missing:
    problems.append(f"missing {len(missing)} character{'s' * (len(missing) > 1)} of its alphabets "
                    f"({_names(missing)})")
  raise CorruptDataError(
    f"incomplete Omniglot archive {str(source)!r}: {'; '.join(problems)}; replace it with a "
    f"complete copy of {archive}.zip (load_omniglot(allow_partial=True) reads only what is there)"
  )


def _read_entries(
  source: Path, archive: str, entries: Iterator[_Entry], image_size: int, resample: str,
  allow_partial: bool = False,
) -> dict[str, np.ndarray]:
  by_character: dict[tuple[str, str], list[tuple[str, Callable[[], bytes]]]] = {}
  for alphabet, character, name, read in entries:
    by_character.setdefault((alphabet, character), []).append((name, read))
  if not by_character:
    raise CorruptDataError(
      f"no images found in {str(source)!r}: expected {archive}/<Alphabet>/characterNN/NNNN_DD.png"
    )
  if not allow_partial:  # before anything is decoded
    _check_complete(source, archive, by_character)
  keys = sorted(by_character)
  images = np.empty((len(keys), IMAGES_PER_CHARACTER, image_size, image_size), np.uint8)
  char_index = np.empty(len(keys), np.int32)
  for c, (alphabet, character) in enumerate(keys):
    files = sorted(by_character[(alphabet, character)])
    where = f"{archive}/{alphabet}/{character}"
    if len(files) != IMAGES_PER_CHARACTER:
      raise CorruptDataError(
        f"{where} in {str(source)!r} has {len(files)} images; every Omniglot character has "
        f"{IMAGES_PER_CHARACTER}"
      )
    ids = set()
    for i, (name, read) in enumerate(files):
      match = _NAME_RE.match(name)
      if match is None:
        raise CorruptDataError(
          f"unexpected file name {where}/{name} in {str(source)!r}: expected NNNN_DD.png"
        )
      ids.add(int(match.group(1)))
      try:
        raw = read()
      # a damaged member: a failed CRC check, a corrupt deflate stream, a mangled header
      except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
          raise
        raise CorruptDataError(
          f"cannot read {where}/{name} from {str(source)!r} ({e}); replace it with an "
          f"intact copy of {source.name}"
        ) from e
      images[c, i] = decode_image(raw, f"{where}/{name} in {str(source)!r}", image_size, resample)
    if len(ids) != 1:
      raise CorruptDataError(f"{where} in {str(source)!r} mixes character ids {sorted(ids)}")
    char_index[c] = ids.pop() - 1
  return {
    "images": images[..., None],
    "alphabet": np.array([a for a, _ in keys]),
    "character": np.array([ch for _, ch in keys]),
    "char_index": char_index,
    "archive": np.array([archive] * len(keys)),
  }


def load_omniglot(
  data_dir: str | os.PathLike[str] | None = None,
  *,
  archives: Sequence[str] = (BACKGROUND, EVALUATION),
  image_size: int = 28,
  resample: str = "lanczos",
  dtype: np.dtype | type | str = np.float32,
  cache_dir: str | os.PathLike[str] | None = None,
  use_cache: bool = True,
  download: bool = False,
  allow_partial: bool = False,
) -> ClassPool:
  """Loads Omniglot archives as one preprocessed `ClassPool` (cached on disk).

  Args:
    data_dir: folder holding the archives (`images_background.zip`, ...) or their extracted
      folders; default `$METAJAX_OMNIGLOT_DIR`, else where `download=True` puts them.
    archives: which archives, in order; any of `ARCHIVES`. The default, background then
      evaluation, is all 1623 characters (what `omniglot_split` needs).
    image_size: side of the square output images (28 as in MAML; 105 keeps the originals).
    resample: "lanczos" (default, antialiased), "box", "bilinear", or "nearest".
    dtype: float32 (values in [0, 1], strokes 1) or uint8 (values in [0, 255], 4x smaller; the
      episode samplers scale it to [0, 1]).
    cache_dir: where to keep the decoded cache; default `$METAJAX_CACHE_DIR`, else the user's
      cache directory (`metajax.data.cache.resolve_cache_dir`); never the data folder unless
      named here.
    use_cache: False to neither read nor write a cache.
    download: fetch the archives of `archives` that the folder lacks from the dataset's
      official repository (`metajax.data.download.download_omniglot`, sha256-verified) into
      `data_dir`, else `$METAJAX_OMNIGLOT_DIR`, else `default_omniglot_dir()` (the user's cache
      directory). Off by default: nothing is downloaded unless asked.
    allow_partial: read an archive that holds only some of its published alphabets or
      characters (`PUBLISHED_ALPHABETS`); by default such an archive is refused.

  Returns:
    A `ClassPool` with images `[C, 20, image_size, image_size, 1]` and metadata columns
    `alphabet` (str), `character` (e.g. "character01"), `char_index` (int32, the global character
    id 0-1622 from the file names), `archive` (str) and `rotation` (int32 degrees, all 0).
    Class names are "<Alphabet>/characterNN".

  Raises:
    FileNotFoundError: no such directory or archive (the message says how to get them).
    metajax.data.download.DownloadError (an OSError): with `download=True`, a failed, truncated
      or corrupted download (nothing is left behind).
    CorruptDataError (a ValueError): a truncated/corrupt archive, an unreadable image, or an
      archive with only some of its published alphabets or characters (naming the missing ones).
    ValueError: an unknown archive or resample name, or an image size that is not an int >= 1.
  """
  archives = tuple(archives)
  if not archives:
    raise ValueError(f"archives must name at least one of {', '.join(ARCHIVES)}")
  if len(set(archives)) != len(archives):
    raise ValueError(f"archives {archives} lists an archive twice")
  if resample not in _RESAMPLE:
    raise ValueError(f"resample={resample!r} is not one of {', '.join(_RESAMPLE)}")
  if (
    isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1
  ):
    raise ValueError(
      f"image_size={image_size!r} must be a positive int (28 as in MAML, 105 native)"
    )
  image_size = int(image_size)
  if download:  # after the checks: a bad argument costs no download
    _download_missing(data_dir, archives)
  root = find_omniglot_dir(data_dir)
  sources = [find_source(root, archive) for archive in archives]

  def build() -> dict[str, np.ndarray]:
    parts = [_read_archive(s, a, image_size, resample, allow_partial)
             for s, a in zip(sources, archives)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  if use_cache:
    key = cache_lib.make_key(
      dataset="omniglot",
      version=PREPROCESSING_VERSION,
      archives=archives,
      image_size=image_size,
      resample=resample,
      source=cache_lib.fingerprint(sources),
    )
    name = f"metajax-omniglot-{'+'.join(a.removeprefix('images_') for a in archives)}"
    path = (
      cache_lib.resolve_cache_dir(cache_dir)
      / f"{name}-{image_size}px-{resample}-{key[:16]}.npz"
    )
    arrays = cache_lib.cached_arrays(path, key=key, build=build)
  else:
    arrays = build()
  if not allow_partial:  # also a cache that an earlier version built from a partial copy
    for source, archive in zip(sources, archives):
      rows = arrays["archive"] == archive
      _check_complete(source, archive, zip(arrays["alphabet"][rows], arrays["character"][rows]))
  return pool_from_arrays(arrays, dtype)


def _download_missing(data_dir: str | os.PathLike[str] | None, archives: Sequence[str]) -> None:
  """Downloads those of `archives` that the folder `load_omniglot` would read lacks."""
  for archive in archives:
    if archive not in ARCHIVES:
      raise ValueError(f"unknown Omniglot archive {archive!r}; allowed: {', '.join(ARCHIVES)}")
  folder = data_dir if data_dir is not None else os.environ.get(OMNIGLOT_DIR_ENV)
  root = Path(folder).expanduser() if folder else download_lib.default_omniglot_dir()
  missing = [a for a in archives
             if not (root / f"{a}.zip").is_file() and not (root / a).is_dir()]
  if missing:
    download_lib.download_omniglot(root, archives=missing)


def pool_from_arrays(arrays: dict[str, np.ndarray], dtype: np.dtype | type | str) -> ClassPool:
  """The cached Omniglot arrays (images + per-class columns) as an unrotated `ClassPool`."""
  pool = ClassPool(
    images=arrays["images"],
    class_names=np.char.add(np.char.add(arrays["alphabet"], "/"), arrays["character"]),
    metadata={
      "alphabet": arrays["alphabet"],
      "character": arrays["character"],
      "char_index": arrays["char_index"].astype(np.int32),
      "archive": arrays["archive"],
      "rotation": np.zeros(len(arrays["alphabet"]), np.int32),
    },
  )
  return pool.astype(dtype)


def add_rotations(pool: ClassPool, degrees: Sequence[int] = (0, 90, 180, 270)) -> ClassPool:
  """Returns `pool` with every class rotated by each of `degrees`, each rotation a new class.

  Rotations are counter-clockwise (`np.rot90`, like `tf.image.rot90` in Finn et al.'s code). The
  result is rotation-major: all classes at `degrees[0]`, then all at `degrees[1]`, ... Class names
  get a "/rot90"-style suffix for non-zero total rotations; the `rotation` metadata column holds
  the total rotation in degrees.

  Raises:
    ValueError: a rotation that is not a multiple of 90, a repeated rotation, non-square images.
  """
  degrees = tuple(int(d) for d in degrees)
  if not degrees or any(d % 90 for d in degrees) or len({d % 360 for d in degrees}) != len(degrees):
    raise ValueError(f"degrees={degrees} must be distinct multiples of 90 (mod 360)")
  if pool.images.shape[2] != pool.images.shape[3]:
    raise ValueError(f"rotating needs square images, got {pool.images.shape[2:4]}")
  base_rotation = np.asarray(pool.metadata.get("rotation", np.zeros(pool.num_classes, np.int32)))
  parts = []
  for d in degrees:
    total = (base_rotation + d) % 360
    names = np.array([n if t == 0 else f"{n}/rot{t}" for n, t in zip(pool.class_names, total)])
    metadata = dict(pool.metadata)
    metadata["rotation"] = total.astype(np.int32)
    parts.append(
      ClassPool(
        images=np.ascontiguousarray(np.rot90(pool.images, k=(d // 90) % 4, axes=(2, 3))),
        class_names=names,
        metadata=metadata,
      )
    )
  return concatenate_pools(parts)


def _canonical_order(pool: ClassPool) -> np.ndarray:
  """Indices sorting a full pool by (archive: background first, alphabet, character)."""
  archive_rank = np.array([ARCHIVES.index(str(a)) for a in pool.metadata["archive"]])
  return np.lexsort((pool.metadata["character"], pool.metadata["alphabet"], archive_rank))


def finn_character_order(pool: ClassPool, seed: int = 1) -> np.ndarray:
  """Returns pool indices in the order of Finn et al.'s MAML code (cbfinn/maml, data_generator.py).

  That code lists `omniglot_resized/<Alphabet>/<characterNN>` (both archives merged into one
  folder) with `os.listdir`, then calls `random.seed(1); random.shuffle(character_folders)`.
  This function lists the characters sorted by (alphabet, character) and applies the same Python
  `random.Random(seed).shuffle`, so it reproduces Finn's order exactly when their `os.listdir`
  returned sorted names and ran under Python 3 (Python 2's shuffle draws differently).
  `os.listdir` order is filesystem-dependent, so the original order is not knowable in general.
  """
  _require_full(pool, "finn")
  base = np.flatnonzero(np.asarray(pool.metadata.get("rotation", np.zeros(len(pool)))) == 0)
  order = sorted(
    base, key=lambda i: (str(pool.metadata["alphabet"][i]), str(pool.metadata["character"][i]))
  )
  random.Random(seed).shuffle(order)
  return np.asarray(order, dtype=np.int64)


def _require_full(pool: ClassPool, split: str) -> None:
  for column in ("alphabet", "character", "archive", "char_index"):
    if column not in pool.metadata:
      raise ValueError(f"split {split!r} needs an Omniglot pool with metadata {column!r}")
  rotation = np.asarray(pool.metadata.get("rotation", np.zeros(len(pool))))
  ids = np.asarray(pool.metadata["char_index"])[rotation == 0]
  if len(ids) != NUM_CHARACTERS or len(np.unique(ids)) != NUM_CHARACTERS:
    raise ValueError(
      f"split {split!r} needs all {NUM_CHARACTERS} Omniglot characters (load_omniglot with "
      f"archives=({BACKGROUND!r}, {EVALUATION!r})), got {len(np.unique(ids))} distinct characters"
    )


def omniglot_split(
  pool: ClassPool,
  name: str,
  *,
  rotations: bool | None = None,
  seed: int = 1,
) -> dict[str, ClassPool]:
  """Splits the 1623 Omniglot characters into named meta-train/val/test class pools.

  Splits:
    * "finn" (Finn et al. 2017, cbfinn/maml): characters in `finn_character_order(pool, seed)`;
      the first 1100 meta-train, the next 100 meta-val, the last 423 meta-test. By default the
      training characters are augmented with 90/180/270 degree rotations as new classes
      (1100 x 4 = 4400 classes). Finn's code instead rotates each sampled class at random inside
      the episode, for test episodes too, and never puts two rotations of one character in the
      same episode; expanded classes are the standard reading ("rotations as new classes").
      Also note Finn's `--test_set` flag evaluates on `character_folders[1100:1200]`: the code's
      "val" and "test" slices are swapped relative to their names; here "val" is [1100:1200] and
      "test" is [1200:].
    * "kao" (Kao et al., "MAML is a noisy contrastive learner", whose code follows
      dragen1860/MAML-Pytorch `OmniglotNShot`): the first 1200 characters of the merged, sorted
      character list (background archive first, then evaluation; alphabets and characters
      sorted) for meta-training and the remaining 423 for meta-testing. Their code orders classes
      by `os.walk` order (filesystem-dependent); this is its sorted, reproducible counterpart.
    * "lake" (Lake et al. 2015): the 964 background characters train, the 659 evaluation
      characters test.

  Args:
    pool: all 1623 characters, unrotated, e.g. `load_omniglot()` with the default archives.
    name: "finn", "kao" or "lake".
    rotations: add the 90/180/270 degree rotations of the *training* characters as new classes;
      default True for "finn", False otherwise.
    seed: the shuffle seed of the "finn" split (1 as in Finn's code).

  Returns:
    dict split name -> `ClassPool`: "train", "val", "test" for finn; "train", "test" for kao and
    lake.

  Raises:
    ValueError: an unknown split name, or a pool that is not all 1623 unrotated characters.
  """
  if name not in SPLITS:
    raise ValueError(f"unknown Omniglot split {name!r}; allowed: {', '.join(SPLITS)}")
  if np.any(np.asarray(pool.metadata.get("rotation", 0)) != 0):
    raise ValueError("omniglot_split needs an unrotated pool; use rotations=True instead")
  _require_full(pool, name)
  if rotations is None:
    rotations = name == "finn"
  if name == "finn":
    order = finn_character_order(pool, seed)
    splits = {"train": order[:1100], "val": order[1100:1200], "test": order[1200:]}
  elif name == "kao":
    order = _canonical_order(pool)
    splits = {"train": order[:1200], "test": order[1200:]}
  else:
    archive = np.asarray(pool.metadata["archive"])
    order = _canonical_order(pool)
    splits = {
      "train": order[archive[order] == BACKGROUND],
      "test": order[archive[order] == EVALUATION],
    }
  result = {split: pool.take(indices) for split, indices in splits.items()}
  if rotations:
    result["train"] = add_rotations(result["train"])
  return result
