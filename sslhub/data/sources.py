"""Where images come from: WebDataset shards, ImageFolder trees and flat folders of images.

``open_source(spec, split)`` returns a :class:`Source` — a list of samples (encoded bytes or a file
path, an integer label or -1, an optional caption) and the class names when known.  ``spec`` is:

- a folder with a ``dataset.json`` (the layout of ``../shared/data``): the shards of ``split``;
- a folder of ``*.tar`` / ``*.tar.gz`` shards (those starting with ``{split}-`` if any do);
- a shard file, or a brace pattern such as ``data/train-{00000..00004}.tar.gz``;
- an ImageFolder tree (``root/<class>/<image>``): labels from sorted class folder names;
- a flat folder of images (no labels);
- a CSV of image–text pairs with a header naming ``filepath`` and ``caption`` columns (open_clip's
  ``--csv-img-key`` / ``--csv-caption-key`` layout; relative paths are relative to the CSV file).

Shards hold ``<key>.jpg|png|webp`` plus optional ``<key>.cls`` (class index), ``<key>.txt``
(caption) and ``<key>.json``; the members of a sample are adjacent (the WebDataset convention).
``open_source`` reads shards whole into memory (encoded bytes, not pixels); ``iter_shard`` streams one
shard sample by sample (``sslhub.data.stream``).
"""
from __future__ import annotations

import csv
import glob
import json
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from braceexpand import braceexpand

from sslhub import formats
from sslhub.errors import SslhubError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
SHARD_EXTS = (".tar", ".tar.gz", ".tgz")


class DataError(SslhubError, ValueError):
    """A data source is missing, empty or malformed; the message names the path."""


@dataclass
class Sample:
    key: str  # shard-relative key or file path, used in error messages
    data: Optional[bytes] = None  # encoded image (shards)
    path: Optional[str] = None  # image file (folders)
    label: int = -1
    text: Optional[str] = None
    meta: Optional[dict] = None


@dataclass
class Source:
    spec: str
    samples: list[Sample]
    classes: Optional[list[str]] = None
    skipped: list[str] = field(default_factory=list)  # "key: reason" for samples dropped while reading

    def __len__(self) -> int:
        return len(self.samples)


def _is_shard(p: Path) -> bool:
    return p.name.endswith(SHARD_EXTS)


def _sample_of(where: str, files: dict[str, bytes], skipped: list[str]) -> Optional[Sample]:
    img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
    if img_ext is None:
        skipped.append(f"{where}: no image file in sample (has {', '.join(sorted(files))})")
        return None
    label = -1
    if "cls" in files:
        try:
            label = int(files["cls"].decode().strip())
        except ValueError:
            skipped.append(f"{where}: .cls is not an integer ({files['cls'][:20]!r})")
            return None
    meta = None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:
            meta = None
    text = files["txt"].decode("utf-8", "replace") if "txt" in files else None
    return Sample(key=where, data=files[img_ext], label=label, text=text, meta=meta)


def iter_shard(path: str | Path, skipped: Optional[list[str]] = None) -> Iterator[Sample]:
    """The samples of one shard, read member by member: memory holds one sample, never the shard.

    A sample is the run of adjacent members sharing a key (the WebDataset convention); samples without an
    image or with a bad ``.cls`` are appended to ``skipped`` and not yielded."""
    path = Path(path)
    skipped = [] if skipped is None else skipped
    key, files = None, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base = name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                k, ext = name[: name.rfind(".")], name[name.rfind(".") + 1 :].lower()
                if k != key and key is not None:
                    sample = _sample_of(f"{path.name}:{key}", files, skipped)
                    if sample is not None:
                        yield sample
                    files = {}
                key = k
                f = tar.extractfile(member)
                files[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable tar shard ({e}); re-create it or remove it from the data") from None
    if key is not None:
        sample = _sample_of(f"{path.name}:{key}", files, skipped)
        if sample is not None:
            yield sample


def _read_shard(path: Path, skipped: list[str]) -> list[Sample]:
    return list(iter_shard(path, skipped))


def count_shard(path: str | Path) -> int:
    """The number of keys with an image member in a shard, from the tar headers (no image is read; a gzipped
    shard is still inflated).  An upper bound of what :func:`iter_shard` yields (a bad ``.cls`` is skipped there)."""
    path = Path(path)
    keys: set[str] = set()
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name
                if member.isfile() and name[name.rfind(".") + 1 :].lower() in ("jpg", "jpeg", "png", "webp"):
                    keys.add(name[: name.rfind(".")])
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable tar shard ({e}); re-create it or remove it from the data") from None
    return len(keys)


def list_shards(spec: str | Path, split: str = "train") -> tuple[list[Path], Optional[list[str]]]:
    """The shard files of ``spec`` and its class names, or ``([], None)`` when ``spec`` is not shards (an image
    folder, a CSV, one image).  ``spec`` is a shards folder (with a ``dataset.json`` or ``{split}-*`` shards),
    one shard file or a brace pattern.  Missing shards raise :class:`DataError`."""
    spec = str(spec)
    if not spec:
        raise DataError("no data given: set data.train in the recipe or pass a path")
    p = Path(spec)
    if p.is_dir():
        if not ((p / formats.DATASET_JSON).is_file() or any(_is_shard(c) for c in p.iterdir())):
            return [], None
        shards, classes = _shards_from_folder(p, split)
    elif p.is_file():
        if not _is_shard(p):
            return [], None
        shards, classes = [p], _classes_from_json(p.parent)
    else:
        shards = [Path(s) for pat in braceexpand(spec) for s in (sorted(glob.glob(pat)) or [pat])]
        if not any(_is_shard(s) for s in shards):
            raise DataError(f"data {spec!r} not found: expected a folder of images or shards, a .tar/.tar.gz shard "
                            "or a brace pattern like data/train-{00000..00004}.tar.gz")
        classes = _classes_from_json(shards[0].parent) if shards else None
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise DataError(f"shard(s) not found: {', '.join(missing[:3])}" + (" …" if len(missing) > 3 else ""))
    return shards, classes


def _shards_from_folder(folder: Path, split: str) -> tuple[list[Path], Optional[list[str]]]:
    meta_file = folder / formats.DATASET_JSON
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError as e:
            raise DataError(f"{meta_file}: not valid JSON ({e})") from None
        splits = meta.get("splits", {})
        if split not in splits:
            raise DataError(f"{meta_file}: no split {split!r} (splits: {', '.join(splits) or 'none'})")
        return [folder / s for s in splits[split]["shards"]], meta.get("classes")
    shards = sorted(p for p in folder.iterdir() if _is_shard(p))
    of_split = [p for p in shards if p.name.startswith(f"{split}-")]
    return (of_split or shards), None


def has_split(spec: str | Path, split: str) -> bool:
    """Whether ``spec`` is a shards folder that holds a ``split`` of its own (listed in its ``dataset.json``,
    or shards named ``{split}-*``); an ImageFolder or a flat folder has no splits."""
    p = Path(str(spec))
    if not p.is_dir():
        return False
    meta_file = p / formats.DATASET_JSON
    if meta_file.is_file():
        try:
            return split in json.loads(meta_file.read_text()).get("splits", {})
        except ValueError:
            return False
    return any(_is_shard(c) and c.name.startswith(f"{split}-") for c in p.iterdir())


def _classes_from_json(folder: Path) -> Optional[list[str]]:
    meta = folder / formats.DATASET_JSON
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("classes")
        except ValueError:
            return None
    return None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def open_source(spec: str | Path, split: str = "train") -> Source:
    """Resolve ``spec`` (see module docstring) into a :class:`Source` (shards are read whole: encoded bytes)."""
    spec = str(spec)
    shards, classes = list_shards(spec, split)
    skipped: list[str] = []
    p = Path(spec)
    if not shards and p.is_dir():
        subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        if subdirs and any(_images_in(d) for d in subdirs):
            classes = [d.name for d in subdirs]
            samples = [Sample(key=str(f), path=str(f), label=i) for i, d in enumerate(subdirs) for f in _images_in(d)]
            return _non_empty(Source(spec, samples, classes, skipped))
        samples = [Sample(key=str(f), path=str(f)) for f in _images_in(p)]
        return _non_empty(Source(spec, samples, None, skipped))
    if not shards and p.is_file() and p.suffix.lower() in IMAGE_EXTS:
        return Source(spec, [Sample(key=str(p), path=str(p))])
    if not shards and p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        return _non_empty(_read_csv(p, skipped))
    if not shards:
        raise DataError(f"data {spec!r} is not images, shards or a CSV: expected a folder of images or shards, a "
                        ".tar/.tar.gz shard, a brace pattern like data/train-{00000..00004}.tar.gz or a "
                        "filepath,caption CSV")
    samples = []
    for shard in shards:
        samples.extend(_read_shard(shard, skipped))
    return _non_empty(Source(spec, samples, classes, skipped))


CSV_IMAGE_KEY, CSV_CAPTION_KEY = "filepath", "caption"


def _read_csv(path: Path, skipped: list[str]) -> Source:
    """``filepath,caption`` rows → samples (a missing file or empty caption is skipped and counted)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            columns = reader.fieldnames or []
            missing = [c for c in (CSV_IMAGE_KEY, CSV_CAPTION_KEY) if c not in columns]
            if missing:
                raise DataError(f"{path}: no {' and no '.join(repr(c) for c in missing)} column (header: "
                                f"{', '.join(columns) or 'empty'}); the first line must name the columns, "
                                f"e.g. '{CSV_IMAGE_KEY},{CSV_CAPTION_KEY}'")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    samples = []
    for line, row in enumerate(rows, start=2):
        where = f"{path.name}:{line}"
        image = (row.get(CSV_IMAGE_KEY) or "").strip()
        if not image:
            skipped.append(f"{where}: empty {CSV_IMAGE_KEY}")
            continue
        file = Path(image) if Path(image).is_absolute() else path.parent / image
        if not file.is_file():
            skipped.append(f"{where}: {file} not found")
            continue
        samples.append(Sample(key=f"{where}:{image}", path=str(file), text=row.get(CSV_CAPTION_KEY) or ""))
    return Source(str(path), samples, None, skipped)


def captions_of(sample: Sample) -> list[str]:
    """The non-empty captions of a sample: ``.json`` ``captions`` (Flickr/COCO style) or the ``.txt``."""
    caps = (sample.meta or {}).get("captions") if isinstance(sample.meta, dict) else None
    if not isinstance(caps, list):
        caps = [sample.text] if sample.text is not None else []
    return [c.strip() for c in caps if isinstance(c, str) and c.strip()]


def with_captions(src: Source) -> Source:
    """Keep the samples that have at least one non-empty caption; the others are skipped and counted."""
    kept = []
    for s in src.samples:
        if captions_of(s):
            kept.append(s)
        else:
            has = (s.meta or {}).get("captions") if isinstance(s.meta, dict) else s.text
            src.skipped.append(f"{s.key}: {'empty caption' if has is not None else 'no caption (.txt or .json captions)'}")
    if not kept:
        raise DataError(f"{src.spec}: no sample has a caption ({len(src.samples)} samples; first: "
                        f"{src.skipped[-1] if src.skipped else '-'}): image–text training needs .txt or .json "
                        "'captions' per image in shards, or a filepath,caption CSV")
    return Source(src.spec, kept, src.classes, src.skipped)


def _non_empty(src: Source) -> Source:
    if not src.samples:
        extra = f" ({len(src.skipped)} samples skipped: {src.skipped[0]})" if src.skipped else ""
        raise DataError(f"no images found in {src.spec!r}{extra}; expected {', '.join(IMAGE_EXTS[:4])} files or shards")
    return src
