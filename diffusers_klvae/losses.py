"""Training loss of a KL autoencoder: L2/L1 + LPIPS + KL + PatchGAN with an adaptive weight.

The recipe of CompVis latent-diffusion (``ldm/modules/losses/contperceptual.py``, ``LPIPSWithDiscriminator``)
at its scale: the per-pixel loss ``rec + perceptual_weight * LPIPS`` (LPIPS broadcast to every pixel) is summed
over C, H, W and averaged over the batch, and so is the KL; ``kl_weight=1e-6`` therefore means what it means in
LDM's KL-f8 config at every resolution. The bugs of diffusers' ``train_autoencoderkl.py`` are fixed: LPIPS has a
gradient, the discriminator step never reaches the VAE, nothing GAN-related runs before ``disc_start``.

API (stable; ``training.py`` relies on it)::

    loss_fn = KLVAELoss(discriminator=disc, perceptual=load_lpips("vgg"))      # keyword-only weights
    out = vae(x, sample_posterior=True, return_posterior=True)                 # one call to the wrapped VAE
    loss, logs = loss_fn.generator_loss(x, out.sample, out.latent_dist, step, last_layer=W)
    accelerator.backward(loss)                                                 # VAE update
    if loss_fn.discriminator_active(step):                                     # skip the D step before start
        d_loss, d_logs = loss_fn.discriminator_loss(x, out.sample, step)       # detaches out.sample itself
        accelerator.backward(d_loss)                                           # discriminator update

- ``W = unwrap_model(vae).decoder.conv_out.weight`` (the decoder's last layer, for the adaptive weight).
- ``generator_loss`` logs ``loss, nll, rec, kl, g, d_weight, disc_factor`` and ``lpips`` (when
  ``perceptual_weight > 0``); ``discriminator_loss`` logs ``d_loss, logits_real, logits_fake``. ``loss``,
  ``nll`` and ``kl`` are per image (sums over pixels / latents); ``rec`` and ``lpips`` are means, readable
  as MSE (or L1) and LPIPS. All logs are Python floats (one device sync per call). Before ``disc_start``,
  ``g`` and ``d_weight`` log 0.
- ``discriminator_loss`` raises before ``disc_start``: the loop must check ``discriminator_active(step)``.
- Mixed precision: call under autocast with fp32 master weights. LPIPS, the discriminator, the
  reconstruction error and the KL run in fp32 (autocast off, inputs cast up): VGG features squared in
  LPIPS' channel normalisation and the KL summed over a latent overflow fp16's 65504. The discriminator
  must not be wrapped in autocast by ``accelerator.prepare`` (``training.prepare`` removes
  that wrapper). The adaptive weight takes the GAN gradient of a per-image sum, so no per-pixel
  gradient is subnormal in fp16 (it equals the fp32 value within 1% at batch 32 x 512²; tests).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .discriminator import NLayerDiscriminator

ADAPTIVE_EPS = 1e-4  # keeps the ratio finite when the GAN gradient vanishes (LDM's value)
ADAPTIVE_MAX = 1e4  # clamp of the adaptive weight (LDM's value)
REC_LOSSES = ("l2", "l1")
DISC_LOSSES = ("hinge", "vanilla")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_rec))): the non-saturating BCE GAN loss on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


_D_LOSS_FNS = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, g_scale: float = 1.0) -> torch.Tensor:
    """‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), clamped to [0, 1e4] and detached (Esser et al. 2021, eq. 7).

    Balances the GAN gradient against the reconstruction gradient at the decoder's last layer ``W``. Both
    graphs are kept (``retain_graph``) because the caller back-propagates the total loss afterwards.

    Args:
        nll_loss (`torch.Tensor`): scalar reconstruction (+ perceptual) loss.
        g_loss (`torch.Tensor`): scalar generator (GAN) loss.
        last_layer (`torch.Tensor`): the parameter both losses depend on, e.g. ``decoder.conv_out.weight``.
        g_scale (`float`, *optional*, defaults to 1.0): the gradient of ``g_scale * g_loss`` is taken and divided
            by ``g_scale`` in float32: the same value, but under fp16 autocast the per-pixel gradients of a mean
            over many logits would otherwise be subnormal (the patch count per image is a good scale).
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss * g_scale, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() / g_scale + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()


def kl_to_standard_normal(posterior) -> torch.Tensor:
    """0.5 * sum(mean² + var - 1 - logvar) over C, H, W, in fp32 -> (B,). Same as ``posterior.kl()``."""
    if getattr(posterior, "deterministic", False):
        return torch.zeros(posterior.mean.shape[0], device=posterior.mean.device)
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])


def _fp32(device: torch.device):
    """Autocast off: the wrapped computation runs in the dtype of its (fp32) inputs and weights."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support: nothing to turn off
        return contextlib.nullcontext()


class KLVAELoss(nn.Module):
    """Loss of a KL-regularized autoencoder: reconstruction + perceptual + KL + adaptive PatchGAN.

    ``loss = nll + kl_weight · KL + d_weight · disc_factor · g`` where, as in LDM's ``contperceptual.py``,
    ``nll = sum over C,H,W of (rec + perceptual_weight · LPIPS) / B`` (LPIPS, one value per image, counts at
    every pixel), ``KL`` is summed over the latent and averaged over the batch, ``g = -mean D(x_rec)`` and
    ``d_weight = disc_weight · adaptive_weight(...)``; the GAN term starts at ``disc_start``.

    Args:
        discriminator (`nn.Module`, *optional*): the PatchGAN (may be the DDP-wrapped one from
            ``accelerator.prepare``); a default ``NLayerDiscriminator()`` when `None`.
        perceptual (`nn.Module`, *optional*): LPIPS module called as ``perceptual(x, y) -> (B, 1, 1, 1)``;
            loaded with ``load_lpips(lpips_net)`` when `None` and ``perceptual_weight > 0``.
        rec_loss (`str`, *optional*, defaults to `"l2"`): per-pixel error, `"l2"` (squared, diffusers' example) or
            `"l1"` (absolute, LDM's `contperceptual.py`).
        perceptual_weight (`float`, *optional*, defaults to 0.5): LPIPS weight (0 disables and skips LPIPS).
        kl_weight (`float`, *optional*, defaults to 1e-6): KL weight, LDM's KL-f8 value (both the NLL and the
            KL are per-image sums, so the balance does not change with resolution).
        disc_weight (`float`, *optional*, defaults to 0.5): multiplier of the adaptive GAN weight.
        disc_start (`int`, *optional*, defaults to 50001): first step with GAN terms (generator and D).
        disc_loss (`str`, *optional*, defaults to `"hinge"`): discriminator loss, `"hinge"` or `"vanilla"`.
        disc_factor (`float`, *optional*, defaults to 1.0): scales both GAN losses after start; 0 disables GAN.
        lpips_net (`str`, *optional*, defaults to `"vgg"`): LPIPS backbone when ``perceptual`` is `None`.
        learn_logvar (`bool`, *optional*, defaults to `False`): learn the output log-variance ``logvar`` (a scalar,
            starting at 0): the per-pixel NLL becomes ``(rec + perceptual_weight·LPIPS) / exp(logvar) + logvar``.
            LDM's ``contperceptual.py`` has this parameter but leaves it out of its optimizer (so it stays 0); sgm
            trains it. Put :meth:`trainable_parameters` in the VAE's optimizer.
    """

    def __init__(
        self,
        *,
        discriminator: nn.Module | None = None,
        perceptual: nn.Module | None = None,
        rec_loss: str = "l2",
        perceptual_weight: float = 0.5,
        kl_weight: float = 1e-6,
        disc_weight: float = 0.5,
        disc_start: int = 50001,
        disc_loss: str = "hinge",
        disc_factor: float = 1.0,
        lpips_net: str = "vgg",
        learn_logvar: bool = False,
    ):
        super().__init__()
        if rec_loss not in REC_LOSSES:
            raise ValueError(f"rec_loss must be one of {REC_LOSSES}, got {rec_loss!r}")
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {DISC_LOSSES}, got {disc_loss!r}")
        for name, value in [("perceptual_weight", perceptual_weight), ("kl_weight", kl_weight),
                            ("disc_weight", disc_weight), ("disc_factor", disc_factor)]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.rec_loss, self.disc_loss = rec_loss, disc_loss
        self.perceptual_weight, self.kl_weight = perceptual_weight, kl_weight
        self.disc_weight, self.disc_start, self.disc_factor = disc_weight, int(disc_start), disc_factor
        if perceptual is None and perceptual_weight > 0:
            from .perceptual import load_lpips  # heavy (torchvision) and only needed here

            perceptual = load_lpips(lpips_net)
        self.perceptual = perceptual
        if self.perceptual is not None:
            self.perceptual.requires_grad_(False).eval()
        self.discriminator = discriminator if discriminator is not None else NLayerDiscriminator()
        self.logvar = nn.Parameter(torch.zeros(())) if learn_logvar else None  # None: fixed at 0, nll = rec

    def extra_repr(self) -> str:
        return (f"rec_loss={self.rec_loss!r}, perceptual_weight={self.perceptual_weight}, kl_weight={self.kl_weight}, "
                f"disc_weight={self.disc_weight}, disc_start={self.disc_start}, disc_loss={self.disc_loss!r}, "
                f"disc_factor={self.disc_factor}")

    def train(self, mode: bool = True) -> "KLVAELoss":
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()  # LPIPS stays frozen: train mode would switch on its heads' dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The loss's own parameters that the VAE's optimizer must update (``logvar`` with ``learn_logvar``)."""
        return [] if self.logvar is None else [self.logvar]

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms (and so the discriminator step) run at ``global_step``."""
        return self.disc_factor > 0 and int(global_step) >= self.disc_start

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior,
        global_step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the autoencoder (the "generator") for one batch.

        Args:
            inputs (`torch.Tensor`): images (B, 3, H, W) in [-1, 1].
            reconstructions (`torch.Tensor`): the VAE's output for ``inputs``, same shape, with its graph.
            posterior: the VAE's ``DiagonalGaussianDistribution`` (``mean``, ``logvar``).
            global_step (`int`): optimisation step, compared with ``disc_start``.
            last_layer (`torch.Tensor`, *optional*): decoder's last weight for the adaptive GAN weight; when
                `None`, ``disc_weight`` is used as a fixed weight. Under ``torch.no_grad()`` (validation) the
                GAN term is logged but weighted 0, as in LDM: there is no gradient to balance.

        Returns:
            `(loss, logs)`: the scalar loss to back-propagate and a dict of floats (see module docstring).
        """
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} differ")
        x, x_rec = inputs.float(), reconstructions.float()
        batch = x.shape[0]
        with _fp32(x.device):
            diff = x - x_rec
            rec = diff.pow(2) if self.rec_loss == "l2" else diff.abs()  # (B, 3, H, W)
            pixel_nll = rec
            logs = {"rec": rec.mean()}
            if self.perceptual_weight > 0:
                p_loss = self.perceptual(x, x_rec)  # (B, 1, 1, 1); no torch.no_grad(): the gradient reaches x_rec
                pixel_nll = pixel_nll + self.perceptual_weight * p_loss  # broadcast to every pixel, as LDM does
                logs["lpips"] = p_loss.mean()
            if self.logvar is not None:  # sgm's learned output variance; the adaptive weight then balances this nll
                pixel_nll = pixel_nll / torch.exp(self.logvar) + self.logvar
                logs["logvar"] = self.logvar
            # LDM's scale: summed over C, H, W, averaged over the batch. kl_weight=1e-6 means LDM's 1e-6 only so.
            nll = pixel_nll.sum() / batch
            kl = kl_to_standard_normal(posterior).sum() / batch
            loss = nll + self.kl_weight * kl

            g_loss = d_weight = torch.zeros((), device=x.device)
            if self.discriminator_active(global_step):
                logits_fake = self._logits_without_disc_grad(x_rec)
                g_loss = -logits_fake.mean()
                if torch.is_grad_enabled():  # validation (no_grad): d_weight stays 0
                    if last_layer is None:
                        d_weight = torch.tensor(self.disc_weight, device=x.device)
                    else:
                        patches = logits_fake[0].numel()
                        d_weight = self.disc_weight * adaptive_weight(nll, g_loss, last_layer, g_scale=patches)
                loss = loss + d_weight * self.disc_factor * g_loss
        logs.update(loss=loss, nll=nll, kl=kl, g=g_loss, d_weight=d_weight)
        logs = _to_floats(logs)
        logs["disc_factor"] = self.disc_factor if self.discriminator_active(global_step) else 0.0
        return loss, logs

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the discriminator on real ``inputs`` vs detached ``reconstructions`` (no VAE gradient).

        Args:
            inputs (`torch.Tensor`): images (B, 3, H, W) in [-1, 1].
            reconstructions (`torch.Tensor`): the VAE's output; detached here, so the VAE's ``.grad`` stays.
            global_step (`int`): optimisation step; must satisfy ``discriminator_active(global_step)``.

        Returns:
            `(d_loss, logs)` with logs ``d_loss``, ``logits_real``, ``logits_fake`` (means of the logits).
        """
        if not self.discriminator_active(global_step):
            raise RuntimeError(
                f"the discriminator is inactive at step {global_step} (disc_start={self.disc_start}, "
                f"disc_factor={self.disc_factor}): check loss_fn.discriminator_active(step) and skip the D step"
            )
        x, x_rec = inputs.detach().float(), reconstructions.detach().float()
        with _fp32(x.device):
            # two calls, as in the reference: with BatchNorm, one concatenated batch would mix the statistics
            logits_real = self.discriminator(x)
            logits_fake = self.discriminator(x_rec)
            d_loss = self.disc_factor * _D_LOSS_FNS[self.disc_loss](logits_real.float(), logits_fake.float())
        logs = _to_floats({"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()})
        return d_loss, logs

    def _logits_without_disc_grad(self, x_rec: torch.Tensor) -> torch.Tensor:
        """D(x_rec) with the gradient flowing into x_rec only: the plain module (no DDP gradient sync) called with
        detached views of its parameters, so no ``requires_grad`` flag is toggled and D's ``.grad`` stays clean."""
        disc = getattr(self.discriminator, "module", self.discriminator)  # DDP keeps the model in .module
        params = {name: p.detach() for name, p in disc.named_parameters()}
        return functional_call(disc, params, (x_rec,)).float()


def _to_floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Detach and move to the CPU in one transfer (a single device sync instead of one per value)."""
    names = list(values)
    numbers = torch.stack([values[n].detach().float().reshape(()) for n in names]).cpu().tolist()
    return dict(zip(names, numbers))
