"""KLVAE inside real diffusers Stable Diffusion pipelines, built offline from tiny configs.

Every pipeline runs twice with the same seed: once with diffusers' AutoencoderKL, once with KLVAE holding the same
weights. The images must match; so must what a saved pipeline loads back.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)

from diffusers_klvae import KLVAE

SIZE = 32
VAE_CONFIG = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  sample_size=SIZE)


def byte_level_alphabet() -> list[str]:
    """The 256 characters GPT-2/CLIP byte-level BPE maps the bytes onto: printable bytes as themselves, the others
    onto chr(256), chr(257), ..."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = [chr(256 + i) for i in range(256 - len(printable))]
    return sorted(chr(b) for b in printable) + others


def write_tokenizer(folder):
    """A byte-level CLIP BPE tokenizer with one token per character and no merges: enough for any prompt."""
    from transformers import CLIPTokenizer

    chars = byte_level_alphabet()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12), len(vocab)


def randomize_vae(vae: AutoencoderKL) -> AutoencoderKL:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return vae.eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer, vocab_size = write_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet_kw = dict(sample_size=SIZE // 4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                   norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=4)
    unet = UNet2DConditionModel(in_channels=4, **unet_kw).eval()
    inpaint_unet = UNet2DConditionModel(in_channels=9, **unet_kw).eval()
    reference = randomize_vae(AutoencoderKL(**VAE_CONFIG))
    ours = KLVAE(**VAE_CONFIG).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, inpaint_unet=inpaint_unet,
                reference=reference, ours=ours, scheduler=scheduler)


def make(cls, parts, vae, unet_key="unet"):
    pipe = cls(vae=vae, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts[unet_key],
               scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    return pipe(prompt="a red cube", num_inference_steps=2, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def photo(seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, SIZE, SIZE, generator=g)  # in [0, 1], as the pipelines' image processor expects


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4, np.abs(a - b).max()


def test_txt2img_identical(parts):
    reference = run(make(StableDiffusionPipeline, parts, parts["reference"]), height=SIZE, width=SIZE)
    ours = run(make(StableDiffusionPipeline, parts, parts["ours"]), height=SIZE, width=SIZE)
    assert reference.shape == (1, SIZE, SIZE, 3) and reference.std() > 0
    assert_same_images(ours, reference)


def test_img2img_identical(parts):
    kw = dict(image=photo(), strength=1.0)  # strength 1: both steps run, the image is encoded with a posterior sample
    reference = run(make(StableDiffusionImg2ImgPipeline, parts, parts["reference"]), **kw)
    ours = run(make(StableDiffusionImg2ImgPipeline, parts, parts["ours"]), **kw)
    assert_same_images(ours, reference)


def test_inpaint_identical(parts):
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 8:24, 8:24] = 1
    kw = dict(image=photo(), mask_image=mask, height=SIZE, width=SIZE, strength=1.0)
    reference = run(make(StableDiffusionInpaintPipeline, parts, parts["reference"], "inpaint_unet"), **kw)
    ours = run(make(StableDiffusionInpaintPipeline, parts, parts["ours"], "inpaint_unet"), **kw)
    assert_same_images(ours, reference)


def test_pipeline_vae_switches(parts):
    """``pipe.enable_vae_slicing()``/``enable_vae_tiling()`` where the installed diffusers still has them (removed in
    0.36+ in favour of ``pipe.vae.enable_slicing()``/``enable_tiling()``, which is what they called)."""
    pipe = make(StableDiffusionPipeline, parts, parts["ours"])

    def call(name, kind):
        return getattr(pipe, f"{name}_vae_{kind}", None) or getattr(pipe.vae, f"{name}_{kind}")

    for kind in ("slicing", "tiling"):
        call("enable", kind)()
    assert parts["ours"].use_slicing and parts["ours"].use_tiling
    images = run(pipe, height=SIZE, width=SIZE, num_images_per_prompt=2)
    assert images.shape == (2, SIZE, SIZE, 3) and np.isfinite(images).all()
    for kind in ("slicing", "tiling"):
        call("disable", kind)()
    assert not parts["ours"].use_slicing and not parts["ours"].use_tiling


def test_saved_pipeline_loads_back(parts, tmp_path):
    pipe = make(StableDiffusionPipeline, parts, parts["ours"])
    expected = run(pipe, height=SIZE, width=SIZE)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, requires_safety_checker=False)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is KLVAE  # model_index.json names diffusers_klvae.KLVAE
    library, name = json.loads((tmp_path / "model_index.json").read_text())["vae"]
    assert library.startswith("diffusers_klvae") and name == "KLVAE"
    assert_same_images(run(loaded, height=SIZE, width=SIZE), expected)

    vae = KLVAE.from_pretrained(tmp_path, subfolder="vae")
    with_vae = StableDiffusionPipeline.from_pretrained(tmp_path, vae=vae, safety_checker=None,
                                                       requires_safety_checker=False)
    with_vae.set_progress_bar_config(disable=True)
    assert with_vae.vae is vae
    assert_same_images(run(with_vae, height=SIZE, width=SIZE), expected)


def test_readme_lines_with_local_folders(parts, tmp_path):
    """README: ``vae = KLVAE.from_pretrained(<SD VAE>)``; ``StableDiffusionPipeline.from_pretrained(<SD>, vae=vae)``,
    with local folders standing in for the Hub ids."""
    parts["reference"].save_pretrained(tmp_path / "sd-vae-ft-mse")  # what the Hub's VAE repo holds
    make(StableDiffusionPipeline, parts, parts["reference"]).save_pretrained(tmp_path / "stable-diffusion")

    vae = KLVAE.from_pretrained(tmp_path / "sd-vae-ft-mse")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "stable-diffusion", vae=vae, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is vae and isinstance(pipe.vae, KLVAE)
    expected = run(make(StableDiffusionPipeline, parts, parts["reference"]), height=SIZE, width=SIZE)
    assert_same_images(run(pipe, height=SIZE, width=SIZE), expected)
