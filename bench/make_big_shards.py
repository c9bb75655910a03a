"""Write an N-sample WebDataset data set by repeating the real CIFAR-10 train shards under new keys.

For memory benchmarks of training and embedding at sizes the real data does not reach (1M images): copy
``c`` of a sample ``KEY`` is ``{c:03d}_{KEY}`` (every member: ``.jpg``, ``.cls``, ...; bytes unchanged), in
uncompressed ``.tar`` shards of ``--per-shard`` samples (10,000), with a ``dataset.json`` like the source's
(classes, a ``train`` split listing its shards and ``n``). Streams: memory holds one sample.
About 3 KB per CIFAR sample on disk (a 1M set ≈ 3 GB).

    python bench/make_big_shards.py --n 1000000 --out bench/out/cifar1m
    sslhub embed --model M --data bench/out/cifar1m --out bench/out/cifar1m-emb
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "cifar10"


def source_samples(src: Path, split: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """``(key, [(extension, bytes), ...])`` per sample of ``src``'s ``split`` shards, in order (adjacent members)."""
    meta = json.loads((src / "dataset.json").read_text())
    for shard in meta["splits"][split]["shards"]:
        key, members = None, []
        with tarfile.open(src / shard, "r:*") as tar:
            for m in tar:
                if not m.isfile() or "." not in m.name.rsplit("/", 1)[-1]:
                    continue
                k, ext = m.name[: m.name.rfind(".")], m.name[m.name.rfind(".") + 1:]
                if k != key and key is not None:
                    yield key, members
                    members = []
                key = k
                members.append((ext, tar.extractfile(m).read()))
        if key is not None:
            yield key, members


def make(n: int, out: Path, src: Path = SOURCE, split: str = "train", per_shard: int = 10_000) -> dict:
    """Write ``n`` samples to ``out`` (replacing the shards and dataset.json there); returns the dataset.json."""
    if n < 1 or per_shard < 1:
        raise SystemExit("--n and --per-shard must be at least 1")
    meta = json.loads((src / "dataset.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("train-*.tar"):
        old.unlink()
    shards: list[str] = []
    tar = None
    written, copy = 0, 0
    while written < n:
        for key, members in source_samples(src, split):
            if written == n:
                break
            if written % per_shard == 0:
                if tar is not None:
                    tar.close()
                shards.append(f"train-{len(shards):05d}.tar")
                tar = tarfile.open(out / shards[-1], "w", format=tarfile.USTAR_FORMAT)
            new_key = f"{copy:03d}_{key.rsplit('/', 1)[-1]}"
            for ext, data in members:
                info = tarfile.TarInfo(f"{new_key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            written += 1
        copy += 1
    tar.close()
    dataset = {"name": f"{meta.get('name', src.name)}-x{copy}", "source": f"{src} ({split}) repeated by "
               f"bench/make_big_shards.py, keys <copy>_<key>", "encoding": meta.get("encoding"),
               "classes": meta.get("classes"), "license": meta.get("license"),
               "splits": {"train": {"n": n, "shards": shards,  # per-shard counts: streaming need not count them
                                    "counts": [min(per_shard, n - i * per_shard) for i in range(len(shards))]}}}
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1) + "\n")
    return dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, required=True, help="samples to write")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. bench/out/cifar1m")
    p.add_argument("--src", type=Path, default=SOURCE, help="a WebDataset folder with a dataset.json")
    p.add_argument("--split", default="train", help="the source split to repeat")
    p.add_argument("--per-shard", type=int, default=10_000)
    args = p.parse_args(argv)
    if not (args.src / "dataset.json").is_file():
        raise SystemExit(f"{args.src}/dataset.json not found: pass --src (a WebDataset folder with a dataset.json)")
    t = time.perf_counter()
    meta = make(args.n, args.out, args.src, args.split, args.per_shard)
    print(json.dumps({"out": str(args.out), "n": args.n, "shards": len(meta["splits"]["train"]["shards"]),
                      "seconds": round(time.perf_counter() - t, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
