"""Mask-aware decoding demo (issue 9): a short fine-tune with latent masks raises masked PSNR.

A decoder that has only seen whole latents turns a latent hole (zeros) into whatever zero latents happen to
decode to, and the error bleeds into the kept border. Mask-aware training (``train_autoencoder.py
--latent_mask_prob p``) shows the decoder latents with holes and asks for the pixel-masked image (holes
mid-gray), so it reconstructs the kept region and leaves the hole cleanly empty: what latent inpainting needs.

The demo, on the bundled photos, CPU-sized (about a minute):

1. starts from the bundled ``pretrained/klvae-small-photos`` (or ``--model``; ``--from-scratch`` first trains the
   ``small`` preset briefly with plain MSE instead);
2. fine-tunes two copies of it for the same steps and data: one plainly, one with ``latent_mask_prob``;
3. measures masked PSNR (kept / hole pixels, the ``klvae-eval`` protocol) and plain PSNR on fixed crops and
   box masks, prints a table and writes a grid: original | pixel-masked target | decoded from masked latents
   (plain fine-tune) | the same (mask-aware fine-tune).

    python examples/masked_demo.py --out outputs/masked_demo

Both fine-tunes train the decoder only (the encoder is frozen, like Stable Diffusion's ``sd-vae-ft-mse``):
masking happens after the encoder, and it halves the CPU cost.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_klvae.cli_support import OneLineParser, int_at_least, positive_float

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
ASSET_PHOTOS = ROOT / "assets" / "photos"
PRETRAINED = ROOT / "pretrained" / "klvae-small-photos"


def photo_crops(paths, *, resolution: int, per_image: int, scale: float = 1.5, generator: torch.Generator) -> torch.Tensor:
    """Random ``resolution``² crops of photos resized (shorter side) to ``scale * resolution`` -> (N, 3, r, r) in [-1, 1]."""
    from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor

    crops = []
    for path in paths:
        img = load_image(path)
        short = round(resolution * scale)
        img = img.resize((max(short, round(img.width * short / min(img.size))), max(short, round(img.height * short / min(img.size)))))
        crops += [to_tensor(resize_and_crop(img, resolution, center_crop=False, generator=generator)) for _ in range(per_image)]
    return torch.stack(crops)


def train_mse(vae, images: torch.Tensor, *, steps: int, batch_size: int = 8, lr: float = 2e-4, latent_mask_prob: float = 0.0,
              mask_kind: str = "boxes", decoder_only: bool = False, generator: torch.Generator | None = None) -> list[float]:
    """A minimal plain-MSE training loop (no KL, no LPIPS, no GAN): enough to compare masking on vs off.

    ``vae`` is trained in place, with Adam at ``lr``, on ``batch_size`` images drawn from ``images`` (N, 3, H, W) in [-1, 1]
    each step; ``latent_mask_prob``: the probability per image of a random ``mask_kind`` hole mask (``training.mask_batch``:
    aligned to the latent grid, target = the pixel-masked image); ``decoder_only`` freezes the encoder and ``quant_conv``
    for good; ``generator`` (CPU) draws the batches and masks. Returns the loss of every step.
    """
    from diffusers_klvae.latent_masks import downsampling_factor
    from diffusers_klvae.training import freeze_encoder, mask_batch

    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if decoder_only:
        freeze_encoder(vae)  # no encoder gradients at all: the backward pass stops at the latents
    optimizer = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=lr)
    factor, device = downsampling_factor(vae), vae.device
    vae.train()
    losses = []
    for _ in range(steps):
        x = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        latent_mask, target = mask_batch(x, factor=factor, prob=latent_mask_prob, kind=mask_kind, generator=generator)
        x = x.to(device)
        target = x if target is None else target.to(device)
        latent_mask = None if latent_mask is None else latent_mask.to(device)
        loss = F.mse_loss(vae(x, latent_mask=latent_mask).sample.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval()
    return losses


@torch.no_grad()
def masked_scores(vae, images: torch.Tensor, pixel_masks: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB, uint8, peak 255) of: the plain reconstruction (``psnr``), and the decode of masked latents
    vs the pixel-masked image over kept pixels (``masked_psnr_kept``) and hole pixels (``masked_psnr_hole``)."""
    from diffusers_klvae.evaluation import psnr, reconstruct, region_psnr
    from diffusers_klvae.imaging import to_uint8
    from diffusers_klvae.latent_masks import masked_reconstruct

    decoded, target, region = masked_reconstruct(vae, images, pixel_masks)
    dec8, target8 = to_uint8(decoded).cpu(), to_uint8(target).cpu()
    region = region.cpu()
    return {
        "psnr": psnr(to_uint8(images), to_uint8(reconstruct(vae, images)).cpu()).mean().item(),
        "masked_psnr_kept": region_psnr(dec8, target8, region).mean().item(),
        "masked_psnr_hole": region_psnr(dec8, target8, 1.0 - region).mean().item(),
    }


def demo_grid(originals: torch.Tensor, pixel_masks: torch.Tensor, models, rows: int = 4):
    """Rows: original | pixel-masked target | decoded from masked latents, one column per model."""
    from diffusers_klvae.imaging import image_grid, to_pil
    from diffusers_klvae.latent_masks import masked_reconstruct

    columns = [originals[:rows].float()]
    for vae in models:
        decoded, target, _ = masked_reconstruct(vae, originals[:rows], pixel_masks[:rows])
        if len(columns) == 1:
            columns.append(target.cpu())
        columns.append(decoded.clamp(-1, 1).cpu())
    return image_grid([[to_pil(col[i]) for col in columns] for i in range(min(rows, len(originals)))])


def _photo_paths(folder: str) -> list[Path]:
    paths = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise FileNotFoundError(f"no photos (.jpg, .jpeg, .png) found in {folder}")
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="python examples/masked_demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/masked_demo", help="output folder (default: outputs/masked_demo)")
    parser.add_argument("--photos", default=str(ASSET_PHOTOS), help="photo folder (default: assets/photos)")
    parser.add_argument("--model", default=str(PRETRAINED), help="the model both fine-tunes start from (folder, file or Hub id; default: pretrained/klvae-small-photos)")
    parser.add_argument("--from-scratch", action="store_true", help="start from --preset trained briefly with plain MSE instead of --model")
    parser.add_argument("--preset", default="small", help="preset of --from-scratch (default: small, KL-f8)")
    parser.add_argument("--base-steps", type=int_at_least(1), default=60, help="plain MSE steps of --from-scratch (default: 60)")
    parser.add_argument("--base-lr", type=positive_float, default=1e-3, help="Adam learning rate of --from-scratch (default: 1e-3)")
    parser.add_argument("--resolution", type=int_at_least(8), default=64, help="crop size (default: 64)")
    parser.add_argument("--finetune-steps", type=int_at_least(1), default=100, help="steps of each fine-tune (default: 100)")
    parser.add_argument("--finetune-lr", type=positive_float, default=1e-4, help="Adam learning rate of the fine-tunes (default: 1e-4)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="default: 8")
    parser.add_argument("--latent-mask-prob", type=float, default=0.5, help="mask probability of the mask-aware fine-tune (default: 0.5)")
    parser.add_argument("--mask-generator", choices=("boxes", "strokes"), default="boxes", help="training masks (default: boxes)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from diffusers_klvae import KLVAE
    from diffusers_klvae.eval_data import resolve_device
    from diffusers_klvae.loading import load_vae
    from diffusers_klvae.latent_masks import downsampling_factor, random_pixel_mask

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    # 1) data: random training crops; fixed evaluation crops (other crops of the same photos) and box masks
    paths = _photo_paths(args.photos)
    train = photo_crops(paths, resolution=args.resolution, per_image=16, generator=gen)
    test = photo_crops(paths, resolution=args.resolution, per_image=2, scale=1.0, generator=torch.Generator().manual_seed(1234))
    base = (KLVAE.from_preset(args.preset) if args.from_scratch else load_vae(args.model)).to(device)
    factor = downsampling_factor(base)
    masks = random_pixel_mask(len(test), args.resolution, args.resolution, "boxes", torch.Generator().manual_seed(4321), grid=factor)

    # 2) --from-scratch: a base model trained with plain MSE, whole model
    if args.from_scratch:
        losses = train_mse(base, train, steps=args.base_steps, batch_size=args.batch_size, lr=args.base_lr, generator=gen)
        logger.info("base: %d steps, loss %.4f -> %.4f (%.0f s)", args.base_steps, losses[0], losses[-1], time.perf_counter() - start)

    # 3) two fine-tunes from the same weights, same batches: masking off / on
    results, models = {}, {}
    for name, prob in (("plain fine-tune", 0.0), (f"mask-aware fine-tune (p={args.latent_mask_prob})", args.latent_mask_prob)):
        vae = copy.deepcopy(base)
        train_mse(vae, train, steps=args.finetune_steps, batch_size=args.batch_size, lr=args.finetune_lr, latent_mask_prob=prob,
                  mask_kind=args.mask_generator, decoder_only=True, generator=torch.Generator().manual_seed(args.seed + 1))
        results[name], models[name] = masked_scores(vae, test, masks), vae
        logger.info("%s done (%.0f s)", name, time.perf_counter() - start)

    # 4) report
    table = format_table(results)
    sys.stdout.write(table + "\n")
    (out / "results.md").write_text(table + "\n")
    demo_grid(test, masks, list(models.values())).save(out / "masked_grid.png")
    plain, masked = results.values()
    gain = {key: masked[key] - plain[key] for key in ("masked_psnr_hole", "masked_psnr_kept", "psnr")}
    sys.stdout.write("mask-aware minus plain fine-tune: masked PSNR hole {masked_psnr_hole:+.2f} dB, kept {masked_psnr_kept:+.2f} dB; "
                     "unmasked PSNR {psnr:+.2f} dB".format(**gain) + f"; total {time.perf_counter() - start:.0f} s\n")
    sys.stdout.write(f"wrote {out / 'results.md'} and {out / 'masked_grid.png'} "
                     "(original | pixel-masked target | plain fine-tune | mask-aware fine-tune)\n")
    return 0


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| model | PSNR (dB) | masked PSNR kept (dB) | masked PSNR hole (dB) |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['masked_psnr_kept']:.2f} | {r['masked_psnr_hole']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
