"""`klvae`: one command for what people do with a VAE by hand.

    klvae reconstruct --model M photo.jpg --out rec/           # images -> decode(encode(x)) PNGs (+ grid)
    klvae encode      --model M a.jpg b.jpg -o latents.safetensors
    klvae decode      --model M latents.safetensors --out dec/
    klvae interpolate --model M a.jpg b.jpg --steps 8 -o interp.png
    klvae sample      --model M -n 8 --height 256 --width 256 -o samples.png
    klvae preview     --model M photo.jpg --fit photos/*.jpg --store -o preview.png
    klvae eval | stats | push ...                               # the evaluation / latent-statistics / Hub tools

``--model`` is a diffusers folder (``save_pretrained``, or a pipeline folder with a ``vae/`` subfolder), a
single checkpoint file (``.safetensors``/``.ckpt``, original LDM layout), a preset name (random weights) or a
Hub id. Image arguments may be files or folders (listed recursively); images are read by ``imaging``'s one
reader, and one that it refuses (undecodable, decompression bomb, dangling symlink, FIFO...) is skipped with a
warning naming it and the reason (``interpolate`` needs both of its images). Bad arguments, paths and shapes,
non-finite latents or pixels (NaN/Inf), an output that would replace an input and a full disk end with a one-line
error and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from contextlib import nullcontext

from .cli_io import (SCALING_KEYS, check_new_files, check_not_inputs, check_output_file, find_images,
                     load_images, output_dir, output_names, output_stems, raw_latents, read_latents, save_image,
                     seeded_generator, stack_same_size)
from .cli_support import (OneLineParser, check_finite, check_output_folder, int_at_least, positive_float, run_main,
                          writing)
from .loading import load_vae, model_config_path, update_config

logger = logging.getLogger(__name__)

FORWARDED = {  # subcommand -> (module, help); their own parsers handle the arguments
    "eval": ("diffusers_klvae.evaluation", "evaluate a model (PSNR, SSIM, LPIPS, rFID, masked PSNR): klvae eval --help"),
    "stats": ("diffusers_klvae.latent_stats", "latent statistics and scaling_factor fitting: klvae stats --help"),
    "push": ("diffusers_klvae.hub", "write a model card and upload to the Hub: klvae push --help"),
}
LATENTS_KEY = "latents"
DTYPES = ("float32", "float16", "bfloat16")


def load_model(spec: str, *, device: str | None = None, dtype: str = "float32"):
    """``--model`` -> an eval-mode VAE on ``device`` (default: cuda if available, else cpu), loaded by
    ``loading.load_vae`` (the package's one loader: folder, pipeline folder, single file, preset, Hub id), whose
    decoder refuses to output NaN/Inf."""
    from .eval_data import resolve_device

    vae = load_vae(spec, dtype=dtype).to(resolve_device(device)).eval()
    # NaN weights, a NaN scaling_factor or a float16 overflow decode to NaN, which PIL writes as black pixels; sample
    # and interpolate turn pixels into PIL images inside `latents`, so check them where every command's pixels are made
    vae.decoder.register_forward_hook(lambda module, inputs, pixels: check_finite(pixels, "the decoded images"))
    return vae


def cmd_reconstruct(args) -> None:
    import torch

    from .imaging import reconstruction_grid
    from .latents import decode_latents, encode_images

    grid = check_output_file(args.grid, ".png") if args.grid else None  # before any work
    inputs = find_images(args.images)
    stems = dict(zip(inputs, output_stems(inputs)))  # numbered when two inputs share a name, even one skipped later
    out = check_output_folder(args.out, "--out")
    check_not_inputs([out / f"{stem}.png" for stem in stems.values()] + ([grid] if grid else []), inputs)
    check_new_files([out / f"{stem}.png" for stem in stems.values()], args.out)
    vae = load_model(args.model, device=args.device, dtype=args.dtype)
    paths, images = load_images(args.images, args.resolution, vae)  # lists them as find_images did: paths are keys of stems
    x_all = stack_same_size(images) if grid else None  # before writing anything: a grid needs one size
    generator = seeded_generator(args.seed)
    recs = []
    with output_dir(out, "--out"):
        for path, x in zip(paths, images):  # one at a time: photos may differ in size
            latents = encode_images(vae, x, sample=args.sample, generator=generator)
            rec = decode_latents(vae, latents)[0].cpu()  # NaN/Inf pixels: refused by load_model's decoder hook
            save_image(rec, out / f"{stems[path]}.png")
            recs.append(rec)
    logger.info("wrote %d reconstructions to %s", len(recs), out)
    if grid:
        with writing(grid):
            reconstruction_grid(x_all, [torch.stack(recs)]).save(grid)
        logger.info("wrote %s", args.grid)


def cmd_encode(args) -> None:
    from safetensors.torch import save_file

    from .latents import encode_images, scale_latents

    vae = load_model(args.model, device=args.device, dtype=args.dtype)
    out = check_output_file(args.output, ".safetensors")
    paths, images = load_images(args.images, args.resolution, vae)
    latents = encode_images(vae, stack_same_size(images), sample=args.sample, generator=seeded_generator(args.seed))
    check_finite(latents, "the encoded latents")  # a model overflowing (e.g. float16) must not leave a file of NaNs
    if args.scaled:
        latents = scale_latents(vae, latents)
        check_finite(latents, f"the latents scaled with the model's scaling_factor {vae.config.scaling_factor}")
    metadata = {
        "format": "klvae-latents",
        "space": "diffusion" if args.scaled else "raw",
        # the model's latent scaling (JSON): decode unscales with these, even after the model's config is refitted
        **{key: json.dumps(getattr(vae.config, key, None)) for key in SCALING_KEYS},
        "files": json.dumps([os.path.basename(p) for p in paths]),
    }
    with writing(out):
        save_file({LATENTS_KEY: latents.cpu().contiguous()}, str(out), metadata=metadata)
    logger.info("wrote latents %s (%s space) to %s", tuple(latents.shape), metadata["space"], out)


def cmd_decode(args) -> None:
    from .latents import decode_latents

    vae = load_model(args.model, device=args.device, dtype=args.dtype)
    latents, metadata = read_latents(args.latents, args.key)
    latents = raw_latents(vae, latents, metadata, args.space, args.latents)
    out = check_output_folder(args.out, "--out")
    paths = [out / f"{stem}.png" for stem in output_stems(output_names(metadata, len(latents), args.latents))]
    check_new_files(paths, args.out)  # the names are those of the encoded images: --out may be their folder
    images = decode_latents(vae, latents).cpu()  # finite latents, overflowing model: refused by load_model's decoder hook
    with output_dir(out, "--out"):
        for path, image in zip(paths, images):
            save_image(image, path)
    logger.info("wrote %d images to %s", len(images), out)


def cmd_interpolate(args) -> None:
    from .latents import interpolate

    out = check_output_file(args.output, ".png")
    frames_dir = check_output_folder(args.frames_dir, "--frames-dir") if args.frames_dir else None
    frames = [frames_dir / f"frame_{i:03d}.png" for i in range(args.steps)] if frames_dir else []
    check_not_inputs([out] + frames, [args.image_a, args.image_b])
    vae = load_model(args.model, device=args.device, dtype=args.dtype)
    _, (a, b) = load_images([args.image_a, args.image_b], args.resolution, vae, skip_unreadable=False)
    stack_same_size([a, b])
    with writing(out):
        images = interpolate(vae, a, b, steps=args.steps, method=args.method, grid_path=out)
    with output_dir(frames_dir, "--frames-dir") if frames_dir else nullcontext():
        for path, image in zip(frames, images):
            with writing(path):
                image.save(path)
    logger.info("wrote %d frames to %s", len(images), out)


def cmd_sample(args) -> None:
    from .latents import sample_prior

    vae = load_model(args.model, device=args.device, dtype=args.dtype)
    out = check_output_file(args.output, ".png")
    with writing(out):
        sample_prior(vae, args.num, args.height, args.width, generator=seeded_generator(args.seed), temperature=args.temperature, grid_path=out)
    logger.info("wrote %d prior samples to %s", args.num, out)


def cmd_preview(args) -> None:
    import torch.nn.functional as F

    from .imaging import to_pil
    from .latent_preview import fit_preview_map, latents_to_rgb
    from .latent_masks import downsampling_factor
    from .latents import encode_images, save_grid

    if not args.images and not args.latents:
        raise ValueError("give images to preview or --latents FILE")
    config_path = model_config_path(args.model, "--store") if args.store else None  # before any work
    out = check_output_file(args.output, ".png")
    check_not_inputs([out], (find_images(args.images) if args.images else []) + (find_images(args.fit) if args.fit else [])
                     + ([args.latents] if args.latents else []))
    vae = load_model(args.model, device=args.device, dtype=args.dtype)
    factor = downsampling_factor(vae)
    factors = fit_preview_map(vae, load_images(args.fit, args.resolution, vae)[1]) if args.fit else vae  # else the model's map
    if args.fit:
        check_finite(factors, "the fitted preview map")  # NaN latents fit a NaN map: neither shown nor stored
    if config_path and args.fit:
        update_config(config_path, {"latent_rgb_factors": factors.tolist()})
        logger.info("stored latent_rgb_factors in %s", config_path)
    show = lambda z: to_pil(F.interpolate(latents_to_rgb(z, factors), scale_factor=factor, mode="nearest")[0])  # noqa: E731 - (1, C, h, w) -> PIL at image size
    rows = []
    if args.latents:
        latents, metadata = read_latents(args.latents, args.key)
        rows += [[show(z[None])] for z in raw_latents(vae, latents, metadata, args.space, args.latents).cpu()]
    for path, x in zip(*load_images(args.images, args.resolution, vae)) if args.images else []:
        z = encode_images(vae, x).cpu()
        check_finite(z, f"the latents of {path!r}")  # NaN latents would preview as black
        rows.append([to_pil(x), show(z)])
    with writing(out):
        save_grid(rows, out)
    logger.info("wrote %d previews to %s", len(rows), out)


def run_forwarded(name: str, argv: list[str]) -> int:
    """``klvae eval|stats|push ARGS`` -> that module's ``main(ARGS)`` (imported only now)."""
    module_name = FORWARDED[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"'klvae {name}' is unavailable: cannot import {module_name} ({err})") from err
    return int(module.main(argv) or 0)


def _subcommand(sub, name: str, func, help_text: str, description: str) -> argparse.ArgumentParser:
    """A subcommand that loads ``--model`` and runs ``func(args)``."""
    p = sub.add_parser(name, help=help_text, description=description)
    p.add_argument("--model", required=True, help="model folder, single checkpoint file, preset name or Hub id")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default: float32)")
    p.set_defaults(func=func)
    return p


def _add_resolution(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolution", type=int_at_least(1), default=None, help="resize the shorter side and center-crop to this square size (default: keep the size, which must be a multiple of the downsampling factor)")


def _add_posterior_sample(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--sample", action="store_true", help=f"{what} a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=None, help="seed for --sample")


def _add_latents_key(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--key", default=LATENTS_KEY, help=f"tensor name in {what} (default: {LATENTS_KEY})")
    p.add_argument("--space", choices=("raw", "diffusion"), default=None, help=f"latent space of {what} (default: from its metadata, else raw)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="klvae", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subcommand(sub, "reconstruct", cmd_reconstruct, "encode and decode images; write PNGs and an optional comparison grid", "decode(encode(x)) for each image (posterior mean unless --sample); writes new files OUT/<name>.png (an existing file is never replaced).")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--grid", default=None, help="also write original | reconstruction | amplified error rows to this .png (images of one size)")
    _add_posterior_sample(p, "decode")
    _add_resolution(p)

    p = _subcommand(sub, "encode", cmd_encode, "encode images to a .safetensors file of latents", "Writes tensor 'latents' (B, C, H/f, W/f): raw latents (VAE space) unless --scaled; metadata records the space, the scaling_factor and the file names.")
    p.add_argument("images", nargs="+", help="image files or folders (one size, or pass --resolution)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--scaled", action="store_true", help="store diffusion-space latents ((z - shift) * scaling_factor), what a diffusion model sees")
    _add_posterior_sample(p, "store")
    _add_resolution(p)

    p = _subcommand(sub, "decode", cmd_decode, "decode a .safetensors file of latents to PNGs", "Decodes tensor --key (B, C, h, w) to new files OUT/<name>.png (an existing file is never replaced). The latent space comes from the file's metadata (written by 'klvae encode'), else raw; --space overrides it. Diffusion-space latents are unscaled with the scaling_factor/shift_factor the file records, else the model's.")
    p.add_argument("latents", help=".safetensors file")
    p.add_argument("--out", required=True, help="output folder")
    _add_latents_key(p, "the file")

    p = _subcommand(sub, "interpolate", cmd_interpolate, "frames between two images' latents, as one PNG row", "Interpolates the posterior means in diffusion space (slerp or lerp) and decodes each frame.")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("-o", "--output", required=True, help="output .png (one row of frames)")
    p.add_argument("--steps", type=int_at_least(2), default=8, help="frames, both ends included (default: 8)")
    p.add_argument("--method", choices=("slerp", "lerp"), default="slerp", help="default: slerp")
    p.add_argument("--frames-dir", default=None, help="also write each frame to this folder")
    _add_resolution(p)

    p = _subcommand(sub, "sample", cmd_sample, "decode samples of the N(0, I) prior", "Draws z ~ N(0, temperature^2 I) in diffusion space and decodes z / scaling_factor + shift_factor. Meaningful once the model's scaling_factor is fitted (klvae stats).")
    p.add_argument("-o", "--output", required=True, help="output .png grid")
    p.add_argument("-n", "--num", type=int_at_least(1), default=8, help="number of samples (default: 8)")
    p.add_argument("--height", type=int_at_least(1), default=256, help="pixel height, a multiple of the downsampling factor (default: 256)")
    p.add_argument("--width", type=int_at_least(1), default=256, help="pixel width (default: 256)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="std multiplier of z (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")

    p = _subcommand(sub, "preview", cmd_preview, "latents as RGB through the model's linear preview map (fit it with --fit)", "Shows latents as the per-pixel linear RGB map UIs use during sampling. The map comes from the model config key latent_rgb_factors, or is fitted by least squares on --fit images (--store writes it into the model folder's config.json).")
    p.add_argument("images", nargs="*", help="images to encode and preview (rows: original | preview)")
    p.add_argument("-o", "--output", required=True, help="output .png grid")
    p.add_argument("--latents", default=None, help="a .safetensors latents file to preview instead of / besides images")
    _add_latents_key(p, "--latents")
    p.add_argument("--fit", nargs="+", default=None, metavar="IMAGE", help="fit the preview map on these images")
    p.add_argument("--store", action="store_true", help="write the fitted map into --model's config.json")
    _add_resolution(p)

    for name, (_, help_text) in FORWARDED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``klvae`` console script: 0, or a user error as one line and ``SystemExit(2)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in FORWARDED:  # their own parsers handle the arguments
        status = run_main(f"klvae {command}", lambda: run_forwarded(command, argv[argv.index(command) + 1 :]))
    else:
        args = build_parser().parse_args(argv)
        status = run_main(f"klvae {command}", lambda: args.func(args))
    if status:
        sys.exit(status)  # as argparse's own errors exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
