"""Data stream: robust decode, skip counting, exact resume, per-process shards, parquet, held-out validation."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_klvae.data import (
    check_image_column,
    load_image_dataset,
    load_validation_images,
    make_train_stream,
    take_validation_images,
)
from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor

RES = 64
BAD_FILES = ("aaa_truncated.jpg", "aab_text.png")  # sort first, so the stored order meets them before any photo


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, photo_paths):
    """The 7 bundled photos plus a truncated JPEG and a text file named .png."""
    root = tmp_path_factory.mktemp("images")
    for path in photo_paths:
        shutil.copy(path, root / path.name)
    data = photo_paths[0].read_bytes()
    (root / BAD_FILES[0]).write_bytes(data[: len(data) // 3])
    (root / BAD_FILES[1]).write_text("this is not an image\n")
    return root


@pytest.fixture(scope="module")
def folder_dataset(image_dir, tmp_path_factory):
    return load_image_dataset(train_data_dir=image_dir, cache_dir=str(tmp_path_factory.mktemp("hf_cache")))


@pytest.fixture(scope="module")
def reference(photo_paths):
    """Center crops computed straight from the files with imaging's helpers, keyed by file name."""
    return {p.name: to_tensor(resize_and_crop(load_image(p), RES, center_crop=True)) for p in photo_paths}


def one_epoch(stream):
    """Images of the stream's current epoch (the loop stops at the first image of the next one)."""
    epoch, images = stream.epoch, []
    for example in stream.examples():
        if stream.epoch != epoch:
            break
        images.append(example["pixel_values"])
    return images


def match(image, reference):
    """Name of the reference image equal to ``image`` (exactly), or None."""
    return next((name for name, ref in reference.items() if torch.equal(image, ref)), None)


def test_folder_stream_skips_bad_files_counts_them_and_matches_center_crops(folder_dataset, reference, caplog):
    stream = make_train_stream(folder_dataset, resolution=RES, batch_size=1, center_crop=True, random_flip=False, shuffle_buffer_size=1, min_size=0)
    with caplog.at_level(logging.WARNING, logger="diffusers_klvae.data"):
        first = next(stream.examples())["pixel_values"]
    # both bad files come first in the stored order: skipped, counted and named before the first photo
    assert stream.skipped == 2 and stream.seen == 1
    assert all(any(bad in record.getMessage() for record in caplog.records) for bad in BAD_FILES)
    images = [first] + one_epoch(stream)
    assert len(images) == 7 and stream.skipped == 2
    for image, name in zip(images, sorted(reference)):  # stored order = sorted file names
        assert image.shape == (3, RES, RES) and image.dtype == torch.float32
        assert -1.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
        assert torch.equal(image, reference[name]), name


def test_center_crop_matches_independent_resize_and_crop(photo_paths, reference):
    # independent of imaging.resize_and_crop: numpy crop of the PIL bicubic resize (chelsea is 451x300, landscape)
    path = next(p for p in photo_paths if p.name == "chelsea.jpg")
    img = Image.open(path).convert("RGB")
    w, h = img.size
    resized = np.asarray(img.resize((round(w * RES / h), RES), Image.BICUBIC), dtype=np.float32)
    left = (resized.shape[1] - RES) // 2
    expected = torch.from_numpy(resized[:, left : left + RES]).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(reference["chelsea.jpg"], expected)


def test_missing_image_column_lists_existing_columns(tmp_path, photo_paths):
    from datasets import Dataset

    path = tmp_path / "data.parquet"
    Dataset.from_dict({"picture": [photo_paths[0].read_bytes()], "caption": ["a"]}).to_parquet(str(path))
    dataset = load_image_dataset(data_files=[str(path)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"'image' not in the dataset; its columns are \['picture', 'caption'\]"):
        check_image_column(dataset, "image")
    with pytest.raises(ValueError, match=r"no image column found among the dataset's columns \['picture', 'caption'\]"):
        make_train_stream(dataset, resolution=RES, batch_size=1)
    assert check_image_column(dataset, "picture") == "picture"
    # a plain binary column (not an Image feature) decodes too
    stream = make_train_stream(dataset, image_column="picture", resolution=RES, batch_size=1, center_crop=True, random_flip=False)
    assert torch.equal(next(iter(stream))["pixel_values"][0], to_tensor(resize_and_crop(load_image(photo_paths[0]), RES)))


def test_parquet_files_load(tmp_path, photo_paths, reference):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rows = [{"bytes": p.read_bytes(), "path": p.name} for p in photo_paths]
    table = Dataset.from_dict({"img": rows, "caption": [p.stem for p in photo_paths]}, features=Features({"img": ImageFeature(), "caption": Value("string")}))
    files = [str(tmp_path / "part-0.parquet"), str(tmp_path / "part-1.parquet")]
    table.select(range(4)).to_parquet(files[0])
    table.select(range(4, 7)).to_parquet(files[1])
    dataset = load_image_dataset(data_files=files, cache_dir=str(tmp_path / "cache"))
    assert check_image_column(dataset) == "img"  # auto-detected
    stream = make_train_stream(dataset, resolution=RES, batch_size=1, center_crop=True, random_flip=False, shuffle_buffer_size=3)
    names = [match(image, reference) for image in one_epoch(stream)]
    assert sorted(names) == sorted(reference)  # every row once, decoded from the embedded bytes
    streamed = load_image_dataset(dataset_name="parquet", data_files=files, cache_dir=str(tmp_path / "cache"))  # streaming path
    assert type(streamed).__name__ == "IterableDataset" and check_image_column(streamed) == "img"


def batches(stream, n):
    iterator = iter(stream)
    return [next(iterator)["pixel_values"] for _ in range(n)]


def test_resume_is_exact(folder_dataset):
    kwargs = dict(resolution=RES, batch_size=2, center_crop=False, random_flip=True, shuffle_buffer_size=4, seed=3, min_size=0)
    straight = make_train_stream(folder_dataset, **kwargs)
    expected = batches(straight, 9)  # 18 images: crosses two epoch boundaries (7 photos per epoch)

    first = make_train_stream(folder_dataset, **kwargs)
    head = batches(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert all(torch.equal(a, b) for a, b in zip(head, expected[:4]))
    assert state["seen"] == 8 and state["epoch"] == 1 and state["skipped"] == 2

    resumed = make_train_stream(folder_dataset, **kwargs)
    resumed.load_state_dict(state)
    tail = batches(resumed, 5)
    assert all(torch.equal(a, b) for a, b in zip(tail, expected[4:]))
    assert (resumed.seen, resumed.skipped, resumed.epoch) == (straight.seen, straight.skipped, straight.epoch)

    # the sequence really is random (crops, flips, order), so the equality above is not trivial
    other = batches(make_train_stream(folder_dataset, **{**kwargs, "seed": 4}), 9)
    assert not all(torch.equal(a, b) for a, b in zip(other, expected))
    # decode threads read ahead but hand out the same batches
    threaded = batches(make_train_stream(folder_dataset, **kwargs, num_threads=2), 9)
    assert all(torch.equal(a, b) for a, b in zip(threaded, expected))


def test_resume_refuses_a_different_stream(folder_dataset):
    stream = make_train_stream(folder_dataset, resolution=RES, batch_size=2, seed=0)
    batches(stream, 1)
    state = stream.state_dict()
    other = make_train_stream(folder_dataset, resolution=RES, batch_size=2, seed=0, process_index=0, num_processes=2)
    with pytest.raises(ValueError, match="num_processes: saved 1 != now 2"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)  # restarts the saved epoch, keeps counters
    assert other.seen == 2 and other.state_dict()["offset"] == 0


def test_two_processes_get_disjoint_images(folder_dataset, reference):
    seen = []
    for rank in (0, 1):
        stream = make_train_stream(
            folder_dataset, resolution=RES, batch_size=1, center_crop=True, random_flip=False, seed=0, process_index=rank, num_processes=2
        )
        names = [match(image, reference) for image in one_epoch(stream)]
        assert None not in names and names
        seen.append(set(names))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(reference)


def test_validation_images_are_held_out(folder_dataset, photo_paths, reference):
    val = take_validation_images(folder_dataset, 2, resolution=RES)
    assert val.names == sorted(reference)[:2]  # first decodable images of the stored order
    assert torch.equal(val.pixel_values, torch.stack([reference[n] for n in val.names]))
    stream = make_train_stream(folder_dataset, resolution=RES, batch_size=1, center_crop=True, random_flip=False, exclude=val.keys)
    names = [match(image, reference) for image in one_epoch(stream)]
    assert sorted(names) == sorted(reference)[2:] and stream.excluded == 2
    from_paths = load_validation_images([p for p in photo_paths if p.name in val.names], resolution=RES)
    assert torch.equal(from_paths.pixel_values, val.pixel_values) and from_paths.keys == val.keys


def test_small_images_are_skipped_and_an_unusable_dataset_raises(tmp_path, photo_paths):
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 40), (255, 0, 0)).save(small)
    dataset = load_image_dataset(image_paths=[small, photo_paths[0]])
    stream = make_train_stream(dataset, resolution=RES, batch_size=1, shuffle_buffer_size=1)  # default min_size = RES // 2
    next(iter(stream))
    assert stream.skipped == 1
    with pytest.raises(ValueError, match="had no usable image"):
        next(iter(make_train_stream(dataset, resolution=RES, batch_size=1, min_size=10_000)))


def test_load_image_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        load_image_dataset()
    with pytest.raises(ValueError, match="exactly one of"):
        load_image_dataset(train_data_dir=tmp_path, image_paths=["a.jpg"])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_image_dataset(train_data_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_image_dataset(data_files=["x.csv"])
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image_dataset(image_paths=[tmp_path / "missing.jpg"])


def test_resume_is_exact_on_a_streamed_sharded_dataset(tmp_path, photo_paths):
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    rows = [{"bytes": p.read_bytes(), "path": p.name} for p in photo_paths * 2]  # 14 rows in 2 files
    table = Dataset.from_dict({"image": rows}, features=Features({"image": ImageFeature()}))
    files = [str(tmp_path / f"part-{i}.parquet") for i in range(2)]
    table.select(range(7)).to_parquet(files[0])
    table.select(range(7, 14)).to_parquet(files[1])
    dataset = load_image_dataset(dataset_name="parquet", data_files=files, cache_dir=str(tmp_path / "cache"))
    kwargs = dict(resolution=RES, batch_size=2, shuffle_buffer_size=3, seed=5, process_index=1, num_processes=2)
    expected = batches(make_train_stream(dataset, **kwargs), 8)  # rank 1 holds 7 rows: crosses epoch boundaries
    first = make_train_stream(dataset, **kwargs)
    batches(first, 5)
    resumed = make_train_stream(dataset, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(batches(resumed, 3), expected[5:]))


def test_webdataset_tar_loads(tmp_path, photo_paths, reference):
    import tarfile

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:  # webdataset layout: files of one sample side by side, same key
        for path in photo_paths[:3]:
            tar.add(path, arcname=f"{path.stem}.jpg")
            caption = tmp_path / f"{path.stem}.txt"
            caption.write_text(path.stem)
            tar.add(caption, arcname=caption.name)
    dataset = load_image_dataset(data_files=[str(shard)], cache_dir=str(tmp_path / "cache"))
    assert check_image_column(dataset) == "jpg"
    stream = make_train_stream(dataset, resolution=RES, batch_size=1, center_crop=True, random_flip=False)
    assert sorted(match(image, reference) for image in one_epoch(stream)) == sorted(p.name for p in photo_paths[:3])


def test_a_file_name_that_is_not_utf8_is_read(tmp_path, photo_paths, reference):
    """A Latin-1 name (``caf\\xe9.jpg`` on Linux) reaches Python with surrogate escapes, which Arrow refuses: it used to
    abort the whole dataset ('utf-8' codec can't encode character '\\udce9'); now the file is read like any other."""
    odd = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    try:
        shutil.copy(photo_paths[0], odd)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this filesystem refuses non-UTF-8 file names")
    shutil.copy(photo_paths[1], tmp_path / photo_paths[1].name)
    dataset = load_image_dataset(train_data_dir=tmp_path)
    stream = make_train_stream(dataset, resolution=RES, batch_size=1, center_crop=True, random_flip=False)
    assert sorted(match(image, reference) for image in one_epoch(stream)) == sorted(p.name for p in photo_paths[:2])
    assert stream.skipped == 0
    val = take_validation_images(dataset, 2, resolution=RES)
    assert sorted(val.names) == sorted([odd.name, photo_paths[1].name])  # named by its own (undecoded) name
