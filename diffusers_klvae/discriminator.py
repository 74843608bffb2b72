"""PatchGAN discriminator for VAE training (pix2pix, Isola et al. 2017; as used by taming-transformers and LDM).

A stack of 4x4 convolutions that maps an image to a grid of real/fake logits, one per overlapping patch
(70x70 pixels receptive field with the defaults): at 256x256 input the output is (N, 1, 30, 30). It is a
training-only model: it is saved beside the VAE in training checkpoints, never pushed with it to the Hub.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

KERNEL, PADDING = 4, 1  # pix2pix: 4x4 kernels with padding 1, so a stride-2 conv halves the size exactly
LEAKY_SLOPE = 0.2
MAX_WIDTH_MULT = 8  # channels stop growing at 8 * ndf (512 with ndf=64)


def conv4(c_in: int, c_out: int, *, stride: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, KERNEL, stride=stride, padding=PADDING, bias=bias)


class ActNorm(nn.Module):
    """Per-channel affine normalisation with data-dependent init (Glow, Kingma & Dhariwal 2018).

    On the first forward in training mode, ``loc``/``scale`` are set so that the batch leaves with zero
    mean and unit variance per channel; afterwards they are ordinary learned parameters. Unlike BatchNorm it
    keeps no batch statistics, so a batch of only fakes or only reals is normalised like any other.
    Under DDP each rank initialises from its own first batch; the values are then kept in sync as parameters.

    Args:
        num_features (`int`): channels.
        eps (`float`, *optional*, defaults to 1e-6): added to the std before inverting it.
    """

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._seen_initialized = False  # caches `initialized == 1`: reading the buffer is a GPU sync

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self._seen_initialized:
            if self.initialized.item() == 0:  # a loaded checkpoint arrives already initialized
                with torch.no_grad():
                    self.loc.copy_(-x.mean(dim=(0, 2, 3), keepdim=True))
                    self.scale.copy_(1.0 / (x.std(dim=(0, 2, 3), keepdim=True) + self.eps))
                    self.initialized.fill_(1)
            self._seen_initialized = True
        return self.scale * (x + self.loc)


def weights_init(module: nn.Module) -> None:
    """DCGAN / pix2pix init: conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0.

    Use as ``model.apply(weights_init)``. Conv biases keep PyTorch's default init, as in the reference.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN discriminator: image (N, C, H, W) -> patch logits (N, 1, H', W').

    Layers with the defaults: conv 3->64 s2, LeakyReLU(0.2); then 64->128 s2, 128->256 s2 and 256->512 s1,
    each followed by a norm and LeakyReLU(0.2); then 512->1 s1 (the logits, no activation).

    Args:
        in_channels (`int`, *optional*, defaults to 3): image channels.
        ndf (`int`, *optional*, defaults to 64): channels of the first conv; later convs use up to 8 * ndf.
        n_layers (`int`, *optional*, defaults to 3): number of stride-2 convs (the receptive field grows with
            it: 70 px for 3).
        use_actnorm (`bool`, *optional*, defaults to `False`): ActNorm instead of BatchNorm between convs.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm's own shift makes a conv bias redundant
        layers: list[nn.Module] = [conv4(in_channels, ndf, stride=2), nn.LeakyReLU(LEAKY_SLOPE, True)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, MAX_WIDTH_MULT)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the size (-1 px): 32 -> 31
            layers += [conv4(width, out, stride=stride, bias=use_bias), norm(out), nn.LeakyReLU(LEAKY_SLOPE, True)]
            width = out
        layers.append(conv4(width, 1, stride=1))  # (N, 1, 30, 30) at 256x256 input
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, 1, H', W') logits (H' = 30 for H = 256 with the defaults)."""
        return self.main(sample)
