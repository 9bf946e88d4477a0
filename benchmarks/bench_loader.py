"""Loader throughput against a bare PIL loop, and s3:// (local SeaweedFS) against a local folder.

    python benchmarks/bench_loader.py [--images 3000] [--workers 2] [--resolution 256] [--small]

Builds a dataset of real JPEG photos (crops of the photos shipped with scikit-learn and
scikit-image, 320-640 px, like LAION thumbnails), then measures on the same cores:

* bare:  ``--workers`` processes that only decode (PIL, draft mode) and resize/crop the same image
         bytes, already in memory, to ``--resolution``;
* local: the whole streaming loader (list, read tars, shuffle buffer, decode, crop/resize,
         collate, worker→main transfer) over the local folder, delivering the uint8 batches that a
         GPU run copies to the device (where they become float);
* local_float_cpu: the same plus the uint8→float [-1, 1] conversion on this CPU's main process;
* s3:    the same loader over the same shards uploaded to a SeaweedFS S3 endpoint on 127.0.0.1.

Rates are steady state: timing starts at the first batch (worker start-up is reported apart).
Prints a table and the two ratios (targets: loader/bare >= 0.9, s3/local >= 0.9) and writes JSON.
``--small`` (what CI runs, tests/test_benchmarks.py): 120 images at 64 px, one round of one pass
with one worker, S3 included; it checks that every mode delivers every image, not a rate.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import write_json  # noqa: E402
from data_pipeline import storage  # noqa: E402
from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.demo import PHOTOS, load_photo  # noqa: E402
from data_pipeline.images import image_loader  # noqa: E402
from data_pipeline.shards import ShardWriter, iter_shard  # noqa: E402


def build_dataset(root: str, n: int, per_shard: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    photos = [load_photo(p, f) for p, f, *_ in PHOTOS]
    w = ShardWriter(root, prefix="bench", max_samples=per_shard)
    for i in range(n):
        photo = photos[i % len(photos)]
        pw, ph = photo.size
        cw, ch = int(rng.integers(pw // 3, pw + 1)), int(rng.integers(ph // 3, ph + 1))
        x, y = int(rng.integers(pw - cw + 1)), int(rng.integers(ph - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        long_side = int(rng.integers(320, 641))
        s = long_side / max(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * s)), max(1, round(crop.size[1] * s))), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        w.write(f"{i:08d}", {"jpg": buf.getvalue(), "txt": b"a photo", "cls": str(i % len(photos)).encode(),
                             "json": json.dumps({"width": crop.size[0], "height": crop.size[1]}).encode()})
    w.close()


def _bare_worker(args):
    blobs, resolution = args
    t = time.perf_counter()
    for data in blobs:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        s = resolution / min(w, h)
        img.draft("RGB", (int(np.ceil(w * s)), int(np.ceil(h * s))))
        img = img.convert("RGB")
        w, h = img.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
        x, y = (nw - resolution) // 2, (nh - resolution) // 2
        np.asarray(img.crop((x, y, x + resolution, y + resolution)))
    return len(blobs), time.perf_counter() - t


def bench_bare(root: str, workers: int, resolution: int, epochs: int) -> dict:
    blobs = [files["jpg"] for name in sorted(storage.listdir(root)) if name.endswith(".tar")
             for _i, _k, files in iter_shard(storage.join(root, name))] * epochs
    chunks = [blobs[i::workers] for i in range(workers)]
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        pool.map(_bare_worker, [([blobs[0]], resolution)] * workers)  # warm up the processes
        t = time.perf_counter()
        parts = pool.map(_bare_worker, [(c, resolution) for c in chunks])
        wall = time.perf_counter() - t
    n = sum(p[0] for p in parts)
    return {"images": n, "seconds": round(wall, 3), "images_per_s": round(n / wall, 1)}


def bench_loader(url: str, workers: int, resolution: int, batch: int, epochs: int, to_float: bool = False) -> dict:
    cfg = DataConfig(url=url, resolution=resolution, num_workers=workers, crop="random",
                     shuffle_buffer=500, interleave=4, pin_memory=False)
    loader = image_loader(cfg, batch, seed=0, max_epochs=epochs, to_float=to_float)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    n = 0
    for b in it:
        n += len(b["key"])
    wall = time.perf_counter() - t1
    assert first["image"].dtype.is_floating_point == to_float
    return {"images": n, "seconds": round(wall, 3), "images_per_s": round(n / wall, 1),
            "startup_s": round(t1 - t0, 3), "defects": loader.defects.total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--per-shard", type=int, default=150)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="loader passes over the data (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each mode is kept")
    ap.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS measurement")
    ap.add_argument("--small", action="store_true",
                    help="CI form: 120 images at 64 px in shards of 30, 1 worker, 1 pass, 1 round")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "bench_loader.json"))
    args = ap.parse_args()
    if args.small:
        args.images, args.per_shard, args.workers, args.resolution = 120, 30, 1, 64
        args.batch, args.epochs, args.repeats = 16, 1, 1

    tmp = tempfile.mkdtemp(prefix="vqscale-bench-")
    root = os.path.join(tmp, "data")
    t = time.perf_counter()
    build_dataset(root, args.images, args.per_shard)
    mb = sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root)) / 1e6
    print(f"dataset: {args.images} JPEGs, {mb:.1f} MB in {len(os.listdir(root)) - 1} shards "
          f"(built in {time.perf_counter() - t:.1f}s)", flush=True)

    # Modes are measured in interleaved rounds and the best round of each is kept, so a burst of
    # load from elsewhere on a shared machine hits every mode alike rather than one.
    runs: dict[str, list[dict]] = {"bare": [], "local": [], "local_float_cpu": [], "s3": []}
    server = None
    if not args.no_s3:
        from tests.s3server import SeaweedS3

        server = SeaweedS3().start()
        os.environ.update(server.env())
        storage.configure("s3")
        bucket = server.create_bucket("bench")
        storage.upload_dir(root, f"{bucket}/data")
    try:
        for r in range(args.repeats):
            runs["bare"].append(bench_bare(root, args.workers, args.resolution, args.epochs))
            runs["local"].append(bench_loader(root, args.workers, args.resolution, args.batch, args.epochs))
            runs["local_float_cpu"].append(bench_loader(root, args.workers, args.resolution, args.batch,
                                                        args.epochs, to_float=True))
            if server is not None:
                runs["s3"].append(bench_loader(f"{bucket}/data", args.workers, args.resolution, args.batch,
                                               args.epochs))
            print(f"round {r + 1}/{args.repeats}: " + ", ".join(
                f"{m} {v[-1]['images_per_s']:.0f}/s" for m, v in runs.items() if v), flush=True)
    finally:
        if server is not None:
            server.stop()
        storage.rmtree(tmp)
    results: dict = {"config": vars(args), "host": platform.node(), "cpus": os.cpu_count(),
                     "rounds": runs}
    for mode, v in runs.items():
        if v:
            results[mode] = max(v, key=lambda x: x["images_per_s"])

    results["loader_vs_bare"] = round(results["local"]["images_per_s"] / results["bare"]["images_per_s"], 3)
    results["loader_float_cpu_vs_bare"] = round(
        results["local_float_cpu"]["images_per_s"] / results["bare"]["images_per_s"], 3)
    if "s3" in results:
        results["s3_vs_local"] = round(results["s3"]["images_per_s"] / results["local"]["images_per_s"], 3)
    print(f"\n{'mode':<16}{'images':>8}{'seconds':>10}{'images/s':>10}{'startup s':>11}")
    for mode in ("bare", "local", "local_float_cpu", "s3"):
        if mode in results:
            r = results[mode]
            print(f"{mode:<16}{r['images']:>8}{r['seconds']:>10.2f}{r['images_per_s']:>10.1f}"
                  f"{r.get('startup_s', float('nan')):>11.2f}")
    print(f"\nloader / bare loop: {results['loader_vs_bare']:.3f}   (target >= 0.90; uint8 batches as they go "
          f"to the device)")
    print(f"loader+float / bare: {results['loader_float_cpu_vs_bare']:.3f}  (the uint8->float step done on "
          f"this CPU, where a GPU run does it on the device)")
    if "s3_vs_local" in results:
        print(f"s3:// / local:      {results['s3_vs_local']:.3f}   (target >= 0.90)")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
