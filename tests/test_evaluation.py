"""Evaluation metrics and the klvae-eval command: values against independent references, files, errors."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from diffusers_klvae import KLVAE
from diffusers_klvae.evaluation import (
    MetricSummary,
    evaluate,
    load_vae,
    lpips_distance,
    main,
    psnr,
    region_psnr,
    reconstruct,
    results_table,
    rfid,
    ssim,
)
from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor, to_uint8

RES = 32  # evaluation resolution in these tests: tiny model, tiny images


@pytest.fixture(scope="module")
def fast_lpips():
    from diffusers_klvae.perceptual import load_lpips

    return load_lpips("alex", weights="random")  # real heads, random backbone: values do not matter here


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, photo_paths):
    """Four small copies of the photos, one corrupt JPEG and a non-image file."""
    folder = tmp_path_factory.mktemp("images")
    for path in photo_paths[:4]:
        img = load_image(path)
        img.thumbnail((64, 64))
        img.save(folder / path.name)
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "notes.txt").write_text("not an image, not counted")
    return folder


def _uint8_pairs(seed=0, shape=(3, 3, 24, 20), noise=40):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(np.int64) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return a, b


class RandomFeatures(torch.nn.Module):
    """A small seeded random CNN with the FID network's interface (uint8 (B, 3, H, W) -> (B, d)): fast tests of the
    FID arithmetic and plumbing, never reported numbers; its ``source`` says so in every result."""

    def __init__(self, num_features: int, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # leave the test's random stream untouched
            torch.manual_seed(seed)
            self.conv1 = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.conv2 = torch.nn.Conv2d(16, num_features, 3, stride=2, padding=1)
        self.num_features = num_features  # read by torchmetrics' FrechetInceptionDistance
        self.source = f"random test CNN (seed {seed}), NOT Inception"
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="bilinear", align_corners=False)
        return self.conv2(torch.relu(self.conv1((x - 128) / 128))).mean(dim=(2, 3))


def _photo_crops(photo_paths, n, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(n):
        img = load_image(photo_paths[i % len(photo_paths)])
        img = resize_and_crop(img, 96, center_crop=True)
        crops.append(to_tensor(resize_and_crop(img, size, center_crop=False, generator=generator)))
    return to_uint8(torch.stack(crops))


# ------------------------------------------------------------------------------------------------ metrics


def test_psnr_matches_numpy_and_identical_is_inf():
    a, b = _uint8_pairs()
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    expected = 10 * np.log10(255.0**2 / mse)
    got = psnr(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)

    b[1] = a[1]  # one identical pair in the batch: +inf for it, the others unchanged
    got = psnr(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert got[1] == np.inf and np.isfinite(got[[0, 2]]).all()
    summary = MetricSummary.of(got.tolist())
    assert summary.mean == np.inf and summary.std is None and summary.count == 3


def test_psnr_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def _ssim_reference(a, b):
    """Wang et al. SSIM, Gaussian 11 / sigma 1.5, C1=(0.01*255)^2, C2=(0.03*255)^2, torchmetrics' border
    (reflect padding, mean over the full image), in numpy float64."""
    taps = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    taps /= taps.sum()

    def blur(x):
        x = np.pad(x, 5, mode="reflect")
        x = np.apply_along_axis(np.convolve, 1, x, taps, mode="valid")
        return np.apply_along_axis(np.convolve, 0, x, taps, mode="valid")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        maps = []
        for xc, yc in zip(x, y):
            mx, my = blur(xc), blur(yc)
            vx, vy, cxy = blur(xc * xc) - mx**2, blur(yc * yc) - my**2, blur(xc * yc) - mx * my
            maps.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        values.append(np.mean(maps))
    return np.array(values)


def test_ssim_matches_reference_and_identical_is_one():
    a, b = _uint8_pairs(seed=1)
    got = ssim(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, _ssim_reference(a, b), atol=1e-5)
    assert got.max() < 0.99  # the noise is visible to SSIM
    same = ssim(torch.from_numpy(a), torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(same, 1.0, atol=1e-6)


def test_lpips_identical_is_zero_and_inputs_mapped_to_signed_range(fast_lpips):
    a, b = _uint8_pairs(seed=2, shape=(2, 3, 32, 32))
    a, b = torch.from_numpy(a), torch.from_numpy(b)
    assert lpips_distance(a, a, fast_lpips).abs().max().item() < 1e-7
    got = lpips_distance(a, b, fast_lpips)
    direct = fast_lpips(a.float() / 127.5 - 1, b.float() / 127.5 - 1).flatten()
    torch.testing.assert_close(got, direct)
    assert (got > 0).all()


def _fid_reference(real, fake, extractor):
    f1, f2 = extractor(real).double().numpy(), extractor(fake).double().numpy()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_rfid_self_is_zero_blur_is_positive_and_matches_scipy(photo_paths):
    extractor = RandomFeatures(num_features=8)
    images = _photo_crops(photo_paths, 24, 32)
    blurred = to_uint8(torch.nn.functional.avg_pool2d(images.float() / 127.5 - 1, 5, stride=1, padding=2, count_include_pad=False))
    batches = lambda x: x.split(10)  # noqa: E731 - streamed in uneven batches like evaluate does
    self_fid = rfid(batches(images), batches(images), extractor)
    blur_fid = rfid(batches(images), batches(blurred), extractor)
    scale = float(np.trace(np.cov(extractor(images).double().numpy(), rowvar=False)))
    assert abs(self_fid) < 1e-6 * scale
    assert blur_fid > 1e-3 * scale
    assert blur_fid == pytest.approx(_fid_reference(images, blurred, extractor), rel=1e-4)


def test_region_psnr_matches_numpy():
    a, b = _uint8_pairs(seed=3, shape=(2, 3, 16, 16))
    region = torch.zeros(2, 1, 16, 16)
    region[:, :, 4:12, 2:10] = 1
    got = region_psnr(torch.from_numpy(a), torch.from_numpy(b), region).numpy()
    diff = (a.astype(np.float64) - b.astype(np.float64))[:, :, 4:12, 2:10]
    np.testing.assert_allclose(got, 10 * np.log10(255.0**2 / (diff**2).reshape(2, -1).mean(1)), rtol=1e-12)


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_follows_the_protocol_and_skips_unreadable(tiny_vae, image_dir):
    result = evaluate(tiny_vae, image_dir, resolution=RES, batch_size=3, metrics=("psnr", "ssim"), progress=False)
    assert result.count == 4 and result.skipped == 1 and result.skipped_names == ["zz_broken.jpg"]
    assert result.image_names == sorted(p.name for p in image_dir.glob("*.jpg"))[:4]
    # independent recomputation: resize + center crop, posterior mode, uint8 quantization, numpy PSNR
    x = torch.stack([to_tensor(resize_and_crop(load_image(image_dir / n), RES)) for n in result.image_names])
    with torch.no_grad():  # same batches as evaluate: float rounding depends on batch composition
        rec = torch.cat([tiny_vae.decode(tiny_vae.encode(chunk).latent_dist.mean).sample for chunk in x.split(3)])
    a, b = to_uint8(x).double().numpy(), to_uint8(rec).double().numpy()
    expected = 10 * np.log10(255.0**2 / ((a - b) ** 2).reshape(4, -1).mean(1))
    np.testing.assert_allclose(result.per_image["psnr"], expected, rtol=1e-9)
    assert result.metrics["psnr"].mean == pytest.approx(expected.mean()) and result.metrics["psnr"].std == pytest.approx(expected.std())
    assert result.protocol.posterior == "mode" and result.protocol.resolution == RES
    assert set(result.timings) >= {"load", "reconstruct", "psnr", "ssim"}


def test_evaluate_max_images_and_pil_list(tiny_vae, photo_paths):
    images = [load_image(p) for p in photo_paths[:3]]
    tiny_vae.train()  # as when training calls evaluate: the model must come back in training mode
    try:
        result = evaluate(tiny_vae, images, resolution=RES, metrics=("psnr",), max_images=2, progress=False)
        assert tiny_vae.training
    finally:
        tiny_vae.eval()
    assert result.count == 2 and result.skipped == 0 and len(result.per_image["psnr"]) == 2


def test_evaluate_reads_hf_datasets_and_skips_undecodable_rows(tiny_vae, image_dir):
    import datasets

    files = sorted(image_dir.glob("*.jpg"))  # 4 photos + the broken one, as raw bytes in an Image column
    table = datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": None} for f in files]})
    stream = table.cast_column("image", datasets.Image()).to_iterable_dataset()  # what a streamed Hub dataset is
    result = evaluate(tiny_vae, stream, resolution=RES, metrics=("psnr",), progress=False)
    folder = evaluate(tiny_vae, image_dir, resolution=RES, metrics=("psnr",), progress=False)
    assert result.count == 4 and result.skipped == 1
    np.testing.assert_allclose(result.per_image["psnr"], folder.per_image["psnr"])  # same images, same order


class _IdentityVAE(torch.nn.Module):
    """encode/decode that return the input: a perfect reconstruction (PSNR inf, SSIM 1, LPIPS 0, rFID 0)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode(self, x):
        class Dist:
            def mode(self_inner):
                return x * self.scale

        return type("Out", (), {"latent_dist": Dist()})()

    def decode(self, z):
        return type("Out", (), {"sample": z})()


def test_perfect_reconstruction_is_handled_cleanly(photo_paths, fast_lpips, tmp_path):
    extractor = RandomFeatures(num_features=4)
    images = [load_image(p) for p in photo_paths]
    result = evaluate(_IdentityVAE(), images, resolution=RES, lpips_model=fast_lpips, fid_extractor=extractor, progress=False)
    assert result.metrics["psnr"].mean == float("inf")
    assert result.metrics["ssim"].mean == pytest.approx(1.0, abs=1e-6)
    assert result.metrics["lpips"].mean == pytest.approx(0.0, abs=1e-7)
    assert abs(result.metrics["rfid"].mean) < 1e-6 and result.metrics["rfid"].count == len(images)
    assert "NOT Inception" in result.protocol.fid_network  # a random extractor can never pass for a real rFID
    result.to_json(tmp_path / "r.json")
    [data] = json.loads((tmp_path / "r.json").read_text())["results"]  # strict JSON: no bare Infinity
    assert data["metrics"]["psnr"]["mean"] == "inf" and data["per_image"]["psnr"][0] == "inf"
    assert "| inf |" in result.to_markdown()


def test_masked_psnr_is_seeded_and_uses_aligned_masks(tiny_vae, photo_paths):
    images = [load_image(p) for p in photo_paths[:2]]
    kwargs = dict(resolution=RES, metrics=("masked_psnr",), progress=False)
    first, second = evaluate(tiny_vae, images, **kwargs), evaluate(tiny_vae, images, **kwargs)
    assert first.per_image == second.per_image  # same masks for every run (and every model)
    assert set(first.metrics) == {"masked_psnr_kept", "masked_psnr_hole"}
    assert all(np.isfinite(v) for v in first.per_image["masked_psnr_kept"] + first.per_image["masked_psnr_hole"])
    other = evaluate(tiny_vae, images, seed=1, **kwargs)
    assert other.per_image != first.per_image


# ------------------------------------------------------------------------------------------------ models, command


def test_load_vae_reads_autoencoderkl_folders_and_explains_failures(tmp_path, tiny_vae):
    from diffusers import AutoencoderKL

    reference = AutoencoderKL(**KLVAE.preset_config("tiny")).eval()
    reference.save_pretrained(tmp_path / "akl")
    loaded = load_vae(tmp_path / "akl")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(reconstruct(loaded, x), reconstruct(reference, x))

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot load model"):
        load_vae(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not an existing folder or file"):
        load_vae("./no/such/model.ckpt")


def test_cli_compares_models_and_writes_files(tmp_path, image_dir, tiny_vae, capsys):
    tiny_vae.save_pretrained(tmp_path / "model_a")
    out = tmp_path / "out"
    code = main(["--model", str(tmp_path / "model_a"), "--model", "tiny", "--data", str(image_dir), "--output", str(out),
                 "--resolution", str(RES), "--metrics", "psnr,ssim", "--grid-images", "2"])
    assert code == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model |")]
    assert [r.split("|")[1].strip() for r in rows] == [str(tmp_path / "model_a"), "tiny"]
    data = json.loads((out / "metrics.json").read_text())
    assert [r["count"] for r in data["results"]] == [4, 4] and data["results"][0]["skipped"] == 1
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and set(rows[0]) == {"model", "image", "psnr", "ssim"}
    assert float(rows[0]["psnr"]) == pytest.approx(data["results"][0]["per_image"]["psnr"][0])
    grid = Image.open(out / "grid.png")
    assert grid.size == (5 * (RES + 2) + 2, 2 * (RES + 2) + 2)  # original | 2 models | 2 errors, 2 rows
    assert "PSNR" in (out / "metrics.md").read_text()


def test_cli_writes_non_utf8_file_names_and_drops_a_stale_grid(tmp_path, photo_paths, capsys):
    data = tmp_path / "data"
    data.mkdir()
    load_image(photo_paths[0]).resize((RES, RES)).save(data / "plain.png")
    with open(os.fsencode(data) + b"/caf\xe9.png", "wb") as f:  # a Latin-1 name, as old archives have
        load_image(photo_paths[1]).resize((RES, RES)).save(f, format="PNG")
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--data", str(data), "--resolution", str(RES), "--metrics", "psnr", "--output", str(out)]
    assert main(argv + ["--grid-images", "2"]) == 0 and (out / "grid.png").is_file()
    with open(out / "per_image.csv", encoding="utf-8") as f:
        assert sorted(row["image"] for row in csv.DictReader(f)) == ["caf\\udce9.png", "plain.png"]
    assert sorted(json.loads((out / "metrics.json").read_text())["results"][0]["image_names"]) == ["caf\udce9.png", "plain.png"]
    assert main(argv + ["--grid-images", "0"]) == 0
    assert not (out / "grid.png").exists()  # the first run's grid does not stay beside the second run's numbers
    capsys.readouterr()


def test_a_model_that_reconstructs_nan_is_refused_not_scored(image_dir):
    vae = KLVAE.from_preset("tiny").eval()
    with torch.no_grad():
        vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")  # NaN pixels would be scored as black ones
    with pytest.raises(ValueError, match=r"the reconstructions of broken contain \d+ NaN/Inf values"):
        evaluate(vae, image_dir, resolution=RES, metrics=("psnr",), name="broken", progress=False)


def test_cli_one_line_errors(tmp_path, image_dir, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--data", str(image_dir), "--metrics", "psnr"]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and len(err.strip().splitlines()) == 1
    assert main(["--model", "tiny", "--data", str(tmp_path / "nothing_here"), "--metrics", "psnr"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["--model", "tiny", "--data", str(image_dir), "--metrics", "psnr,fid50k"]) == 2
    assert "metrics must be" in capsys.readouterr().err
    assert main(["--model", "tiny", "--data", str(image_dir), "--metrics", "psnr", "--output", str(image_dir / "eval")]) == 2
    assert capsys.readouterr().err == (f"klvae-eval: error: --output {str(image_dir / 'eval')!r} is inside --data "
                                       f"{str(image_dir)!r}: its files would mix with the images; expected a folder "
                                       "outside the data\n")  # its grid.png would be read as data, or replace one
    assert not (image_dir / "eval").exists()
    assert main(["--model", "tiny", "--data", str(image_dir), "--metrics", "psnr", "--device", "banana"]) == 2
    assert capsys.readouterr().err == ("klvae-eval: error: device 'banana' is not a torch device: expected e.g. cpu, "
                                       "cuda, cuda:1 or mps\n")


def test_results_table_rows():
    from diffusers_klvae.evaluation import DataSource, EvaluationResult, ProtocolRecord

    protocol, source = ProtocolRecord("klvae", 256, "resize", "mode"), DataSource("folder", path="photos")
    make = lambda name, value: EvaluationResult(name, {"psnr": MetricSummary(value, 1.0, 3)}, 3, protocol, source)  # noqa: E731
    table = results_table([make("a", 24.5), make("b", 30.25)])
    assert "| a | 24.50 ± 1.00 | 3 | 0 |" in table and "| b | 30.25 ± 1.00 | 3 | 0 |" in table


# ------------------------------------------------------------------------------------------------ protocols, data source


def _torchvision_lightningdit(resolution):
    """LightningDiT's evaluate_tokenizer.py transform, with torchvision itself (the reference)."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Resize(resolution), transforms.CenterCrop(resolution),
                               transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])])


def test_lightningdit_preprocessing_matches_torchvision(photo_paths):
    from diffusers_klvae.eval_data import lightningdit_preprocess

    reference = _torchvision_lightningdit(RES)
    photo = load_image(photo_paths[0])
    cases = [load_image(p) for p in photo_paths[:3]] + [photo.resize((45, 33)), photo.resize((33, 61)), photo.resize((RES, 40))]
    for img in cases:  # landscape, portrait, odd sizes, shorter side already RES
        torch.testing.assert_close(lightningdit_preprocess(img, RES), reference(img), rtol=0, atol=0)


def test_lightningdit_protocol_decodes_a_seeded_posterior_sample(tiny_vae, photo_paths):
    images = [load_image(p) for p in photo_paths[:3]]
    result = evaluate(tiny_vae, images, resolution=RES, metrics=("psnr",), protocol="lightningdit", seed=3, progress=False)
    x = torch.stack([_torchvision_lightningdit(RES)(img) for img in images])
    with torch.no_grad():  # independent recomputation: torchvision preprocessing, posterior sample with the seed
        z = tiny_vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
        rec = tiny_vae.decode(z).sample
    a, b = to_uint8(x).double().numpy(), to_uint8(rec).double().numpy()
    expected = 10 * np.log10(255.0**2 / ((a - b) ** 2).reshape(3, -1).mean(1))
    np.testing.assert_allclose(result.per_image["psnr"], expected, rtol=1e-9)
    assert result.protocol.name == "lightningdit" and result.protocol.posterior == "sample (seed 3)"
    assert "LightningDiT" in result.protocol.preprocessing and "Protocol lightningdit" in result.to_markdown()
    assert json.loads(result.to_json())["results"][0]["settings"]["protocol"] == "lightningdit"
    default = evaluate(tiny_vae, images, resolution=RES, metrics=("psnr",), seed=3, progress=False)
    assert default.protocol.name == "klvae" and default.protocol.posterior == "mode"
    assert "Protocol klvae" in default.to_markdown() and default.per_image["psnr"] != result.per_image["psnr"]
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate(tiny_vae, images, resolution=RES, metrics=("psnr",), protocol="dit", progress=False)


def test_cli_writes_the_protocol_into_every_file(tmp_path, image_dir, capsys):
    assert main(["--model", "tiny", "--data", str(image_dir), "--resolution", str(RES), "--metrics", "psnr",
                 "--protocol", "lightningdit", "--output", str(tmp_path)]) == 0
    assert "Protocol lightningdit" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["results"][0]["settings"]["protocol"] == "lightningdit"
    assert "Protocol lightningdit" in (tmp_path / "metrics.md").read_text()


def test_results_record_the_data_source_as_a_dataclass_that_the_card_reads(tiny_vae, image_dir):
    from diffusers_klvae import model_card
    from diffusers_klvae.evaluation import DataSource, EvaluationResult, ImageSource

    source = ImageSource("org/coco-val", split="val")
    assert source.data_source() == DataSource("hf-dataset", name="org/coco-val", split="val")
    result = evaluate(tiny_vae, image_dir, resolution=RES, metrics=("psnr",), progress=False)
    assert result.data_source == DataSource("folder", path=str(image_dir))
    saved = json.loads(result.to_json())["results"][0]["settings"]
    assert saved["data_source"] == {"kind": "folder", "path": str(image_dir)} and saved["data"] == str(image_dir)
    assert EvaluationResult.from_json(result.to_json()).to_dict() == result.to_dict()
    hub_result = EvaluationResult(**{**vars(result), "data_source": source.data_source()})
    [psnr_result] = model_card.eval_results(hub_result)  # the card takes the fields, no string parsed back
    assert (psnr_result.dataset_type, psnr_result.dataset_split, psnr_result.dataset_args) == (
        "org/coco-val", "val", {"resolution": RES, "num_images": result.count})
    listed = evaluate(tiny_vae, [load_image(p) for p in sorted(image_dir.glob("*.jpg"))[:2]], resolution=RES, metrics=("psnr",), progress=False)
    assert listed.data_source.to_dict() == {"kind": "images", "type": "list", "count": 2}


def test_batches_resize_each_photo_as_it_is_read(monkeypatch):
    """A batch of full-size photos is never held at once (64 photos of 12 MP would take GBs): each image is
    preprocessed before the next one is decoded. The klvae protocol pickles (spawned DataLoader workers)."""
    import pickle

    from diffusers_klvae import eval_data

    events = []
    protocol = eval_data.PROTOCOLS["klvae"]

    def recording(img, resolution):
        events.append("preprocess")
        return protocol.preprocess(img, resolution)

    class Photo:  # a list item whose decoding is recorded
        def __init__(self, i):
            self.i = i

    monkeypatch.setitem(eval_data.PROTOCOLS, "klvae", eval_data.Protocol("klvae", recording, False, "recorded"))
    monkeypatch.setattr(eval_data, "_list_entry", lambda i, item: (str(i), lambda: events.append("decode")
                                                                   or Image.new("RGB", (40, 30), (i * 20, 0, 0))))
    batches = list(eval_data.iter_batches(eval_data.ImageSource([Photo(i) for i in range(5)]), resolution=16,
                                          batch_size=3, max_images=None))
    assert [len(names) for names, _ in batches] == [3, 2]
    assert events == ["decode", "preprocess"] * 5
    assert pickle.loads(pickle.dumps(protocol)).preprocess is eval_data.klvae_preprocess
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        eval_data.iter_batches(eval_data.ImageSource([]), resolution=16, batch_size=0, max_images=None)
