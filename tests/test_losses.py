"""KLVAELoss: every term equals its formula, gradients go where they should, GAN terms start at disc_start."""

import math

import pytest
import torch

from diffusers_klvae import KLVAE, DiagonalGaussianDistribution
from diffusers_klvae import losses
from diffusers_klvae.discriminator import ActNorm, NLayerDiscriminator
from diffusers_klvae.losses import KLVAELoss, adaptive_weight, hinge_d_loss, vanilla_d_loss
from diffusers_klvae.perceptual import load_lpips

START = 10  # disc_start of the tests


@pytest.fixture(scope="module")
def perceptual():
    # the values do not matter here, only that LPIPS is a differentiable function of x_rec: a random AlexNet
    return load_lpips("alex", weights="random")


def tiny_vae() -> KLVAE:
    return KLVAE(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def make_loss(perceptual, **kw) -> KLVAELoss:
    kw.setdefault("disc_start", START)
    return KLVAELoss(discriminator=NLayerDiscriminator(ndf=8), perceptual=perceptual, **kw)


def run_vae(vae, x):
    out = vae(x, sample_posterior=True, return_posterior=True, generator=torch.Generator().manual_seed(0))
    return out.sample, out.latent_dist


@pytest.fixture
def batch():
    return torch.rand(2, 3, 32, 32) * 2 - 1


# ---- pure functions


def test_d_losses_at_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.3, 1.5])
    hinge = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.3 + 2.5) / 3)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    vanilla = 0.5 * (sum(sp(-r) for r in [2.0, 0.5, -1.0]) / 3 + sum(sp(f) for f in [-2.0, 0.3, 1.5]) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(hinge, rel=1e-6)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(vanilla, rel=1e-6)


def test_adaptive_weight_matches_two_grad_calls():
    w = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(3), torch.randn(4)
    nll = (w @ a).pow(2).sum()
    g = (b @ w).sin().sum()
    grad_nll = torch.autograd.grad(nll, w, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, w, retain_graph=True)[0]
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)
    got = adaptive_weight(nll, g, w)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
    # a GAN loss with no gradient at W: the ratio explodes and is clamped
    assert adaptive_weight(nll * 1e3, (w * 0).sum(), w).item() == 1e4
    (nll + g).backward()  # both graphs were kept for the caller's backward


# ---- generator loss: each term against its formula


def ldm_nll(x, x_rec, p_loss, *, rec_loss="l2", perceptual_weight=0.5):
    """LDM's ``contperceptual.py`` (``LPIPSWithDiscriminator.forward``, logvar 0, no weights), written out:
    rec_loss = |x - x_rec| (or its square, diffusers' l2); rec_loss = rec_loss + w * p_loss (p_loss (B,1,1,1));
    nll_loss = torch.sum(rec_loss) / rec_loss.shape[0]."""
    rec = (x - x_rec).abs() if rec_loss == "l1" else (x - x_rec) ** 2
    rec = rec + perceptual_weight * p_loss
    return torch.sum(rec) / rec.shape[0]


def ldm_kl(posterior):
    """``kl_loss = posteriors.kl(); kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]``."""
    kl = posterior.kl()
    return torch.sum(kl) / kl.shape[0]


@pytest.mark.parametrize("rec_loss", ["l2", "l1"])
@pytest.mark.parametrize("res", [32, 64])
def test_generator_loss_is_ldms_formula(perceptual, rec_loss, res):
    """At two resolutions: the loss is LDM's, so kl_weight=1e-6 weighs the KL as LDM does at every size."""
    x = torch.rand(2, 3, res, res) * 2 - 1
    x_rec = torch.rand(2, 3, res, res) * 2 - 1
    moments = torch.randn(2, 8, res // 8, res // 8)
    posterior = DiagonalGaussianDistribution(moments)
    loss_fn = make_loss(perceptual, rec_loss=rec_loss)  # defaults: perceptual 0.5, kl 1e-6
    loss, logs = loss_fn.generator_loss(x, x_rec, posterior, global_step=START - 1)

    p_loss = perceptual(x, x_rec)
    nll = ldm_nll(x.double(), x_rec.double(), p_loss.double(), rec_loss=rec_loss)
    kl = ldm_kl(posterior)
    assert loss.item() == pytest.approx((nll + 1e-6 * kl).item(), rel=1e-5)
    assert logs["nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert logs["kl"] == pytest.approx(kl.item(), rel=1e-5)
    diff = (x - x_rec).double()  # the readable logs: per-pixel mean error and mean LPIPS
    assert logs["rec"] == pytest.approx((diff.pow(2) if rec_loss == "l2" else diff.abs()).mean().item(), rel=1e-5)
    assert logs["lpips"] == pytest.approx(p_loss.mean().item(), rel=1e-5)
    assert logs["g"] == 0 and logs["d_weight"] == 0 and logs["disc_factor"] == 0
    assert all(isinstance(v, float) for v in logs.values())


def test_learned_logvar_is_sgms_formula_and_gets_a_gradient(perceptual):
    """--learn_logvar: LDM/sgm's ``nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar`` (per pixel, then
    summed over C, H, W and averaged over the batch), with logvar a trainable scalar starting at 0."""
    x, x_rec = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    loss_fn = make_loss(perceptual, learn_logvar=True)
    assert loss_fn.trainable_parameters() == [loss_fn.logvar] and loss_fn.logvar.item() == 0
    assert make_loss(perceptual).trainable_parameters() == []
    with torch.no_grad():
        loss_fn.logvar.fill_(0.7)
    loss, logs = loss_fn.generator_loss(x, x_rec, posterior, global_step=START - 1)

    rec = (x - x_rec).double() ** 2 + 0.5 * perceptual(x, x_rec).double()
    nll = torch.sum(rec / torch.exp(torch.tensor(0.7, dtype=torch.float64)) + 0.7) / 2
    assert logs["nll"] == pytest.approx(nll.item(), rel=1e-5) and logs["logvar"] == pytest.approx(0.7)
    assert loss.item() == pytest.approx((nll + 1e-6 * ldm_kl(posterior)).item(), rel=1e-5)
    loss.backward()  # d nll / d logvar = sum(1 - rec / exp(logvar)) / B
    expected = torch.sum(1 - rec / torch.exp(torch.tensor(0.7, dtype=torch.float64))) / 2
    assert loss_fn.logvar.grad.item() == pytest.approx(expected.item(), rel=1e-4)


def test_generator_after_start_adds_adaptive_gan_term(perceptual, batch):
    vae = tiny_vae()
    loss_fn = make_loss(perceptual, disc_weight=0.5, disc_factor=0.7)
    x_rec, posterior = run_vae(vae, batch)
    last = vae.decoder.conv_out.weight
    loss, logs = loss_fn.generator_loss(batch, x_rec, posterior, START, last_layer=last)

    # LDM's generator branch, term by term, on the same graph
    nll = ldm_nll(batch, x_rec, perceptual(batch, x_rec))
    g = -torch.mean(loss_fn.discriminator(x_rec))
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = 0.5 * torch.clamp(torch.norm(grad_nll) / (torch.norm(grad_g) + 1e-4), 0.0, 1e4)
    expected = nll + 1e-6 * ldm_kl(posterior) + d_weight * 0.7 * g
    assert logs["g"] == pytest.approx(g.item(), rel=1e-5)
    assert logs["d_weight"] == pytest.approx(d_weight.item(), rel=1e-4)
    assert logs["disc_factor"] == 0.7
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_adaptive_weight_gan_scale_changes_nothing_in_fp32():
    w = torch.randn(4, 3, requires_grad=True)
    nll = (w @ torch.randn(3)).pow(2).sum()
    g = (torch.randn(4) @ w).sin().sum() * 1e-3
    torch.testing.assert_close(adaptive_weight(nll, g, w, g_scale=900.0), adaptive_weight(nll, g, w), rtol=1e-5, atol=0)


def test_perceptual_term_changes_vae_gradient(perceptual, batch):
    # grad(loss, pw=0.5) == grad(loss, pw=0) + 0.5 * 3HW * grad(mean LPIPS): LPIPS counts at every pixel, as in LDM
    vae = tiny_vae()
    params = [vae.decoder.conv_out.weight, vae.encoder.conv_in.weight]

    def grads(loss_fn):
        x_rec, posterior = run_vae(vae, batch)
        loss, _ = loss_fn.generator_loss(batch, x_rec, posterior, 0)
        return torch.autograd.grad(loss, params)

    with_p = grads(make_loss(perceptual, perceptual_weight=0.5))
    without_p = grads(make_loss(None, perceptual_weight=0.0))
    x_rec, _ = run_vae(vae, batch)
    pixels = x_rec[0].numel()
    lpips_grad = torch.autograd.grad(pixels * perceptual(batch, x_rec).mean(), params)
    for w, wo, lp in zip(with_p, without_p, lpips_grad):
        assert not torch.allclose(w, wo)
        # atol: the mean-loss test's 1e-7, scaled as the gradients are (x 3HW)
        torch.testing.assert_close(w, wo + 0.5 * lp, rtol=1e-4, atol=1e-7 * pixels)


def test_validation_under_no_grad_weights_gan_zero(perceptual, batch):
    vae = tiny_vae()
    loss_fn = make_loss(perceptual)
    with torch.no_grad():
        x_rec, posterior = run_vae(vae, batch)
        loss, logs = loss_fn.generator_loss(batch, x_rec, posterior, START, last_layer=vae.decoder.conv_out.weight)
    assert logs["g"] != 0 and logs["d_weight"] == 0
    assert loss.item() == pytest.approx(logs["nll"] + 1e-6 * logs["kl"], rel=1e-6)


# ---- what runs before / after disc_start


def test_nothing_gan_runs_before_start(perceptual, batch, monkeypatch):
    vae = tiny_vae()
    loss_fn = make_loss(perceptual)
    calls = {"disc": 0, "adaptive": 0}
    loss_fn.discriminator.register_forward_pre_hook(lambda *a: calls.__setitem__("disc", calls["disc"] + 1))
    real_adaptive = losses.adaptive_weight

    def spy(*args, **kwargs):
        calls["adaptive"] += 1
        return real_adaptive(*args, **kwargs)

    monkeypatch.setattr(losses, "adaptive_weight", spy)
    last = vae.decoder.conv_out.weight

    assert not loss_fn.discriminator_active(START - 1)
    x_rec, posterior = run_vae(vae, batch)
    loss, logs = loss_fn.generator_loss(batch, x_rec, posterior, START - 1, last_layer=last)
    assert calls == {"disc": 0, "adaptive": 0}
    assert loss.item() == pytest.approx(logs["nll"] + 1e-6 * logs["kl"], rel=1e-6)  # no g term
    with pytest.raises(RuntimeError, match="discriminator_active"):
        loss_fn.discriminator_loss(batch, x_rec, START - 1)

    assert loss_fn.discriminator_active(START)
    loss, logs = loss_fn.generator_loss(batch, x_rec, posterior, START, last_layer=last)
    assert calls == {"disc": 1, "adaptive": 1} and logs["g"] != 0 and logs["d_weight"] > 0
    loss_fn.discriminator_loss(batch, x_rec, START)
    assert calls["disc"] == 3  # real and fake

    assert not make_loss(perceptual, disc_factor=0.0).discriminator_active(10**9)  # disc_factor 0: GAN off


def test_discriminator_step_leaves_vae_grad_untouched(perceptual, batch):
    vae = tiny_vae()
    loss_fn = make_loss(perceptual)
    x_rec, _ = run_vae(vae, batch)
    d_loss, logs = loss_fn.discriminator_loss(batch, x_rec, START)
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    assert set(logs) == {"d_loss", "logits_real", "logits_fake"}
    assert logs["d_loss"] == pytest.approx(d_loss.item())


def test_generator_step_leaves_discriminator_grad_untouched(perceptual, batch):
    vae = tiny_vae()
    loss_fn = make_loss(perceptual)
    x_rec, posterior = run_vae(vae, batch)
    loss, _ = loss_fn.generator_loss(batch, x_rec, posterior, START, last_layer=vae.decoder.conv_out.weight)
    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())  # nothing was toggled
    assert vae.decoder.conv_out.weight.grad is not None and vae.encoder.conv_in.weight.grad is not None


def test_lpips_and_logits_fp32_under_autocast(perceptual, batch):
    vae = tiny_vae()
    loss_fn = make_loss(perceptual)
    seen = []
    perceptual_hook = perceptual.register_forward_hook(lambda m, i, o: seen.append(("lpips", i[0].dtype, o.dtype)))
    loss_fn.discriminator.register_forward_hook(lambda m, i, o: seen.append(("disc", i[0].dtype, o.dtype)))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x_rec, posterior = run_vae(vae, batch)
            loss, logs = loss_fn.generator_loss(batch, x_rec, posterior, START, last_layer=vae.decoder.conv_out.weight)
            d_loss, _ = loss_fn.discriminator_loss(batch, x_rec, START)
    finally:
        perceptual_hook.remove()
    assert x_rec.dtype == torch.bfloat16  # the VAE did run in bf16 ...
    assert seen and all(dt == torch.float32 for _, *dts in seen for dt in dts)  # ... the loss nets in fp32
    assert loss.dtype == torch.float32 and d_loss.dtype == torch.float32
    assert math.isfinite(logs["loss"])
    assert all(p.dtype == torch.float32 for p in vae.parameters())  # master weights untouched


def test_lpips_stays_frozen_in_train_mode(perceptual):
    loss_fn = make_loss(perceptual).train()
    assert loss_fn.discriminator.training and not loss_fn.perceptual.training
    assert not any(p.requires_grad for p in loss_fn.perceptual.parameters())


def test_bad_arguments(perceptual, batch):
    with pytest.raises(ValueError, match="rec_loss"):
        make_loss(perceptual, rec_loss="l3")
    with pytest.raises(ValueError, match="disc_loss"):
        make_loss(perceptual, disc_loss="wgan")
    with pytest.raises(ValueError, match="kl_weight"):
        make_loss(perceptual, kl_weight=-1.0)
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))
    with pytest.raises(ValueError, match="differ"):
        make_loss(perceptual).generator_loss(batch, batch[:, :, :16], posterior, 0)


# ---- discriminator model


def test_discriminator_shape_init_and_round_trip(tmp_path):
    disc = NLayerDiscriminator()
    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1] and len(bns) == 3
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and all(c.bias is None for c in convs[1:4])
    big = torch.cat([c.weight.flatten() for c in convs[1:4]])
    assert big.mean().abs() < 1e-3 and big.std().item() == pytest.approx(0.02, rel=0.02)
    bn_w = torch.cat([b.weight for b in bns])
    assert bn_w.mean().item() == pytest.approx(1.0, abs=5e-3) and 0.015 < bn_w.std() < 0.025

    small = NLayerDiscriminator(ndf=8, n_layers=2, use_actnorm=True)
    small(torch.randn(4, 3, 32, 32))  # ActNorm's data-dependent init
    small.save_pretrained(tmp_path)
    loaded = NLayerDiscriminator.from_pretrained(tmp_path).eval()
    assert loaded.config.use_actnorm and loaded.config.n_layers == 2
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), small.eval()(x))


def test_actnorm_initializes_from_first_batch():
    norm = ActNorm(5)
    x = torch.randn(8, 5, 6, 6) * 3 + 2
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(5), atol=1e-4, rtol=0)
    z = norm(x * 2)  # later batches use the learned affine map, not their own statistics
    torch.testing.assert_close(z, norm.scale * (x * 2 + norm.loc))
    assert norm.initialized.item() == 1
