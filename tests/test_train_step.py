"""train_step under mixed precision and accumulation: each optimizer unscaled once, the discriminator in fp32,
schedulers on the training step, EMA on VAE updates; and the adaptive weight under fp16 gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import AutocastKwargs

from diffusers_klvae import KLVAE, losses, train_outputs, training
from diffusers_klvae.discriminator import NLayerDiscriminator
from diffusers_klvae.losses import KLVAELoss


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny_models(seed: int = 0):
    torch.manual_seed(seed)
    vae = KLVAE(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    return vae, disc


def setup(accelerator, *, disc_start=0, lr_scheduler="constant", max_steps=6):
    vae, disc = tiny_models()
    loss_fn = KLVAELoss(discriminator=disc, perceptual=None, perceptual_weight=0.0, disc_start=disc_start)
    optimizers = training.build_optimizers(vae, disc, learning_rate=1e-3, disc_learning_rate=1e-3)
    schedulers = training.build_schedulers(optimizers, name=lr_scheduler, warmup_steps=0, max_train_steps=max_steps,
                                           num_processes=1)
    vae, disc, optimizers, schedulers = training.prepare(accelerator, vae, disc, optimizers, schedulers)
    loss_fn.discriminator = disc
    return vae, disc, loss_fn, optimizers, schedulers


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(n)]


def grads_at_step(accelerator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The gradients each optimizer applies in one update of two micro-batches (recorded by step pre-hooks)."""
    vae, disc, loss_fn, (opt_vae, opt_disc), schedulers = setup(accelerator)
    seen = {}

    def record(name):
        def hook(optimizer, args, kwargs):
            seen[name] = [p.grad.clone() for group in optimizer.param_groups for p in group["params"]]
        return hook

    opt_vae.optimizer.register_step_pre_hook(record("vae"))
    opt_disc.optimizer.register_step_pre_hook(record("disc"))
    generator = torch.Generator().manual_seed(0)
    for x in batches(2):
        training.train_step(accelerator, vae, disc, loss_fn, (opt_vae, opt_disc), x, 0, generator=generator,
                            schedulers=schedulers, max_grad_norm=1e9)  # clipping on (it unscales), never binding
    return seen["vae"], seen["disc"]


def test_grad_scaler_with_accumulation_gives_both_models_their_fp32_gradient():
    """A real GradScaler (scale 2^10), accumulation 2, clipping on: both optimizers see the fp32 gradients.

    Autocast is disabled through Accelerate's own AutocastKwargs, so the only difference between the runs is the
    loss scaling (by a power of two: exact in fp32) and its unscaling; tolerance 1e-6 relative.
    Before the fix, clipping the VAE unscaled the discriminator too and the VAE's step updated the scaler before the
    discriminator's step, so the first micro-batch's D gradient was divided by the scale twice.
    """
    ref_vae, ref_disc = grads_at_step(Accelerator(cpu=True, gradient_accumulation_steps=2))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2, mixed_precision="fp16",
                              kwargs_handlers=[AutocastKwargs(enabled=False)])
    # Accelerate makes its GradScaler on CUDA only; the CPU one runs the same code (torch.amp.GradScaler("cpu"))
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    accelerator.native_amp = True
    amp_vae, amp_disc = grads_at_step(accelerator)

    for ref, amp in zip(ref_disc, amp_disc):
        torch.testing.assert_close(amp, ref, rtol=1e-6, atol=1e-9)
    for ref, amp in zip(ref_vae, amp_vae):
        torch.testing.assert_close(amp, ref, rtol=1e-6, atol=1e-9)


def test_discriminator_runs_in_fp32_under_mixed_precision():
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    vae, disc, loss_fn, optimizers, schedulers = setup(accelerator)
    dtypes = []
    raw_disc = accelerator.unwrap_model(disc)
    raw_disc.main[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    vae_dtypes = []
    accelerator.unwrap_model(vae).decoder.conv_out.register_forward_hook(lambda m, i, o: vae_dtypes.append(o.dtype))
    x = batches(1)[0]
    with accelerator.autocast():  # the step calls the loss inside the VAE's autocast
        rec = vae(x).sample
        loss_fn.discriminator_loss(x, rec, 0)
        loss_fn.generator_loss(x, rec, vae.encode(x).latent_dist, 0, last_layer=accelerator.unwrap_model(vae).decoder.conv_out.weight)
    assert vae_dtypes == [torch.bfloat16]  # the VAE does run under autocast
    assert dtypes == [torch.float32] * 3  # real, fake, and the generator's logits


def test_schedulers_follow_the_step_and_ema_follows_vae_updates():
    """6 updates, GAN from step 2, alternating G (even) and D (odd) steps: G updates at 0, 1, 2, 4; D at 3, 5.
    Both schedulers tick 6 times (one schedule over the run), the EMA 4 times (once per VAE update)."""
    accelerator = Accelerator(cpu=True)
    vae, disc, loss_fn, (opt_vae, opt_disc), schedulers = setup(accelerator, disc_start=2, lr_scheduler="linear",
                                                                 max_steps=6)
    ema = training.build_ema(accelerator.unwrap_model(vae), decay=0.9)
    d_steps = []
    opt_disc.optimizer.register_step_post_hook(lambda *a: d_steps.append(step))
    generator = torch.Generator().manual_seed(0)
    for step, x in enumerate(batches(6)):
        training.train_step(accelerator, vae, disc, loss_fn, (opt_vae, opt_disc), x, step, generator=generator,
                            schedulers=schedulers, ema=ema, alternate_gan_steps=True)
    assert d_steps == [3, 5]
    assert [s.scheduler.last_epoch for s in schedulers] == [6, 6]
    assert opt_disc.param_groups[0]["lr"] == pytest.approx(0.0)  # linear decay ran over the whole run for D too
    assert ema.optimization_step == 4


class Fp16Grad(torch.autograd.Function):
    """Identity whose backward rounds the gradient to float16: what an fp16 autocast graph stores there."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.half().float()


class BlurredMSE(torch.nn.Module):
    """A perceptual stand-in with LPIPS' shape (B, 1, 1, 1) and gradient scale (a mean over the image)."""

    def forward(self, x, y):
        return F.avg_pool2d((x - y).pow(2), 8).mean(dim=(1, 2, 3), keepdim=True)


class ZeroPosterior:
    def __init__(self, mean):
        self.mean, self.logvar = mean, torch.zeros_like(mean)


def adaptive_weight_at(batch: int, res: int, *, fp16: bool) -> float:
    """The loss's adaptive weight for a decoder whose last conv (8 -> 3 channels) runs in fp32 or emulated fp16:
    activations and reconstructions stored in fp16, every gradient into and out of the conv rounded to fp16."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(batch, 8, res, res, generator=g).half().float()
    weight = (torch.randn(3, 8, 3, 3, generator=g) * 0.05).requires_grad_()
    target = (F.conv2d(feats, weight.detach(), padding=1) + 0.05 * torch.randn(batch, 3, res, res, generator=g)).clamp(-1, 1)
    torch.manual_seed(0)
    loss_fn = KLVAELoss(discriminator=NLayerDiscriminator(ndf=8, n_layers=2), perceptual=BlurredMSE(), disc_start=0)
    w = Fp16Grad.apply(weight) if fp16 else weight
    rec = F.conv2d(feats, w, padding=1)
    if fp16:
        rec = Fp16Grad.apply(rec.half().float())
    _, logs = loss_fn.generator_loss(target, rec, ZeroPosterior(torch.zeros(batch, 4, res // 8, res // 8)), 0,
                                     last_layer=weight)
    return logs["d_weight"]


def test_adaptive_weight_survives_fp16_gradients_at_batch_32_512(monkeypatch):
    """Batch 32 x 512²: the fp16-emulated adaptive weight is finite and within 1% of fp32 (clamp lifted so the
    ratio itself is compared). With the old mean-reduced NLL every per-pixel gradient (~1e-9) was 0 in fp16."""
    monkeypatch.setattr(losses, "ADAPTIVE_MAX", float("inf"))
    exact = adaptive_weight_at(32, 512, fp16=False)
    emulated = adaptive_weight_at(32, 512, fp16=True)
    assert exact > 0 and torch.isfinite(torch.tensor(emulated))
    assert emulated == pytest.approx(exact, rel=0.01)


def test_validation_of_a_diverged_model_records_nan_not_the_score_of_black_pixels(tmp_path, caplog):
    AcceleratorState._reset_state(True)
    vae = KLVAE.from_preset("tiny").eval()
    with torch.no_grad():
        vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    metrics = train_outputs.run_validation(Accelerator(cpu=True), vae, None, images, 3, tmp_path)
    assert metrics["psnr"] != metrics["psnr"] and metrics["ssim"] != metrics["ssim"]  # NaN
    assert "step 3 validation: the reconstructions hold" in caplog.text
    assert (tmp_path / "validation" / "step-0000003.png").is_file()  # the grid still shows what happened
