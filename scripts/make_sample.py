"""Rebuild the real-image sample bundled in ``data/`` from the full sets in ``../shared/data``.

The sample is small on purpose (a few hundred images) so that the quickstart and the tests run
on a fresh clone with no other data.  It keeps the WebDataset layout of the source: gzipped tar
shards of ``<key>.jpg`` + ``<key>.cls`` and a ``dataset.json`` with class names and split sizes.

    python scripts/make_sample.py --src ../shared/data --dst data
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

# (source folder, sample name, {split: images per class, or in all for unlabelled image–text data})
SAMPLES = [("cifar10", "cifar10-sample", {"train": 100, "test": 50}),
           ("flickr8k", "flickr8k-sample", {"train": 200, "test": 100}),
           ("imagenette96", "imagenette96-sample", {"train": 40, "val": 10})]


def _read_pairs(shard: Path):
    """Yield (key, {ext: bytes}) for each sample of a (gzipped) tar shard, in file order."""
    group: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(shard, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            if key not in group:
                group[key] = {}
                order.append(key)
            group[key][ext] = tar.extractfile(member).read()
    for key in order:
        yield key, group[key]


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:  # reproducible bytes
        for key, files in samples:
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(files[ext])
                info.mtime = 0
                tar.addfile(info, io.BytesIO(files[ext]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("../shared/data"))
    ap.add_argument("--dst", type=Path, default=Path("data"))
    ap.add_argument("--only", nargs="*", default=None, help="sample names to rebuild (default: all)")
    args = ap.parse_args()
    for src_name, dst_name, per_class in SAMPLES:
        if args.only and dst_name not in args.only:
            continue
        src = args.src / src_name
        meta = json.loads((src / "dataset.json").read_text())
        out = args.dst / dst_name
        out.mkdir(parents=True, exist_ok=True)
        splits = {}
        for split, k in per_class.items():
            taken: dict[int, int] = defaultdict(int)
            chosen = []
            for shard in meta["splits"][split]["shards"]:
                for key, files in _read_pairs(src / shard):
                    c = int(files["cls"]) if "cls" in files else 0  # image–text data: one bucket
                    if taken[c] < k:
                        taken[c] += 1
                        chosen.append((key, files))
            _write_shard(out / f"{split}-00000.tar.gz", chosen)
            splits[split] = {"n": len(chosen), "shards": [f"{split}-00000.tar.gz"]}
            if "classes" in meta:
                splits[split]["per_class"] = [taken[c] for c in range(len(meta["classes"]))]
        sample_meta = {"name": dst_name, **({"classes": meta["classes"]} if "classes" in meta else {}),
                       "splits": splits,
                       "derived_from": {k: meta[k] for k in ("name", "source", "commit", "encoding", "license")
                                        if k in meta}}
        (out / "dataset.json").write_text(json.dumps(sample_meta, indent=1) + "\n")
        print(f"{out}: " + ", ".join(f"{s} {v['n']}" for s, v in splits.items()))


if __name__ == "__main__":
    main()
