"""Data stream throughput at 256²: ImageStream vs a bare decode+crop loop over the same files, and resume cost.

Run: .venv/bin/python benchmarks/bench_data.py   (photos: ../shared/data/photos when present, else assets/photos)
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusers_klvae.data import load_image_dataset, make_train_stream
from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor

ROOT = Path.cwd()  # run from the repository root
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
PHOTOS = PHOTOS if PHOTOS.is_dir() else ROOT / "assets" / "photos"
RES, BATCH, N_BATCHES, RUNS = 256, 8, 10, 5


def bare_loop(paths, n_images):
    """Reference: the least work per image (read, decode, resize, random crop, to [-1, 1]), no dataset machinery."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(n_images):
        out.append(to_tensor(resize_and_crop(load_image(paths[i % len(paths)]), RES, center_crop=False, generator=generator)))
        if len(out) == BATCH:
            torch.stack(out)
            out = []


def stream_run(dataset, n_batches, **kwargs):
    iterator = iter(make_train_stream(dataset, resolution=RES, batch_size=BATCH, min_size=0, **kwargs))
    for _ in range(n_batches):
        next(iterator)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main():
    paths = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    with tempfile.TemporaryDirectory() as cache:
        dataset = load_image_dataset(train_data_dir=PHOTOS, cache_dir=cache)
        n_images = N_BATCHES * BATCH
        bare_loop(paths, BATCH), stream_run(dataset, 1), stream_run(dataset, 1, num_threads=2)  # burn-in
        t_bare, t_stream, t_threads = [], [], []
        for _ in range(RUNS):  # interleaved, so load from other processes hits all three alike
            t_bare.append(timed(bare_loop, paths, n_images))
            t_stream.append(timed(stream_run, dataset, N_BATCHES))
            t_threads.append(timed(stream_run, dataset, N_BATCHES, num_threads=2))
        bare, stream, threads = (n_images / statistics.median(t) for t in (t_bare, t_stream, t_threads))

        # resume: fresh first batch vs first batch after load_state_dict at the far end of a 64-example block
        kwargs = dict(resolution=RES, batch_size=BATCH, min_size=0, shuffle_buffer_size=64)
        first, resumed = [], []
        for _ in range(RUNS):
            source = make_train_stream(dataset, **kwargs)
            it = iter(source)
            first.append(timed(next, it))
            for _ in range(6):
                next(it)  # 56 images into the first 64-example block
            state = source.state_dict()
            target = make_train_stream(dataset, **kwargs)
            target.load_state_dict(state)
            resumed.append(timed(next, iter(target)))
    print(f"photos: {PHOTOS} ({len(paths)} files), {RES}², batch {BATCH}, {n_images} images per run, median of {RUNS}")
    print(f"bare decode+crop loop   {bare:7.1f} img/s   (reference)")
    print(f"ImageStream, 0 threads  {stream:7.1f} img/s   ratio {stream / bare:.2f}")
    print(f"ImageStream, 2 threads  {threads:7.1f} img/s   ratio {threads / bare:.2f}")
    print(f"first batch: fresh {statistics.median(first) * 1e3:.0f} ms, resumed mid-block {statistics.median(resumed) * 1e3:.0f} ms")
    print(f"verdict: stream overhead  {'PASS' if stream / bare >= 0.8 else 'MISS'} (target: >= 0.80x the bare loop, got {stream / bare:.2f}x)")
    print(f"verdict: resume cost      {'PASS' if statistics.median(resumed) <= 3 * statistics.median(first) else 'MISS'} "
          f"(target: resumed first batch <= 3x a fresh one, got {statistics.median(resumed) / statistics.median(first):.2f}x)")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help only
    main()
