"""The one settings object: flags > environment (`IMAGE_GEN_*`) > config file (TOML or JSON) > defaults."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from image_gen.errors import ImageGenError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: JSON config files only
    tomllib = None  # type: ignore[assignment]

ENV_PREFIX = "IMAGE_GEN_"


class ArenaContender(BaseModel):
    """An arena contender: a registered model and the settings it generates with (unset: the model's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$", description="shown after the vote")
    model: str
    steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    scheduler: str | None = None
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    negative_prompt: str = ""


class Settings(BaseSettings):
    """Every knob of the product. Build it with `load_settings`, which turns invalid values into one line."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    config: Path | None = Field(default=None, description="TOML or JSON file with any of these settings")
    models_dir: Path = Field(default=Path("models"), description="folder of diffusers model folders")
    store: str = Field(
        default="./data", description="object store: a path, file://PATH or s3://BUCKET/PREFIX"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    attention: Literal["sdpa", "xformers", "sliced", "math"] = "sdpa"
    vae_tiling: Literal["auto", "on", "off"] = "auto"
    cpu_offload: bool = False
    # --- speed settings of the pipelines (docs/performance.md); off unless a benchmark showed a win with parity ---
    channels_last: bool = Field(default=False, description="NHWC weights and activations for the convolutions")
    autocast: Literal["off", "bfloat16", "float16"] = Field(
        default="off", description="matmuls and convolutions in lower precision (bfloat16 on CPUs with AVX-512 BF16)"
    )
    fuse_qkv: bool = Field(default=False, description="one projection matmul for query, key and value")
    compile: bool = Field(default=False, description="torch.compile the UNet, warmed up when a model loads")
    max_loaded_models: int = Field(default=2, ge=1)
    bundled_models: bool = Field(
        default=True,
        description="list the models shipped in the package (pipelines/models) before models_dir; off: only your own",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=7860, ge=1, le=65535)
    workers_in_process: int = Field(default=1, ge=0, description="workers `image-gen serve` runs beside its API")
    worker_isolation: Literal["process", "thread"] = Field(
        default="process",
        description="serve's workers as supervised child processes (the API stays responsive while they generate) "
        "or as threads of the API process (fast start-up, for tests)",
    )
    worker_nice: int = Field(
        default=5,
        ge=0,
        le=19,
        description="niceness serve's worker processes add to the API's: the API is scheduled first, they use the rest",
    )
    lease_s: float = Field(
        default=30.0,
        ge=3.0,
        description="a job's lease: a worker that stops heartbeating (every second) loses its job after this long",
    )
    max_batch: int = Field(default=4, ge=1)
    default_model: str | None = None
    request_timeout_s: float = Field(default=300.0, gt=0, description="how long a synchronous request waits")
    # --- REST API: exposure, auth, limits, webhooks (docs/api.md) ---
    insecure: bool = Field(
        default=False, description="serve a non-loopback address without API keys (anyone who reaches it is the user)"
    )
    public_url: str | None = Field(
        default=None, description="base URL of image links in responses (default: the URL the request came to)"
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="signs image links and derives webhook secrets (default: one generated once, kept in the store)",
    )
    auth_cache_s: float = Field(
        default=5.0, ge=0, description="how long a process trusts its cached copy of a key (revocation delay)"
    )
    requests_per_minute: float | None = Field(
        default=6000.0, gt=0, description="requests of any kind per key per minute (None: unlimited)"
    )
    rate_per_minute: float | None = Field(
        default=None, gt=0, description="generation requests per key per minute for keys without their own rate"
    )
    max_concurrent: int | None = Field(
        default=None, ge=1, description="unfinished jobs per key for keys without their own quota"
    )
    max_body_bytes: int = Field(default=65536, ge=1024, description="largest request body the API accepts")
    max_steps: int = Field(default=150, ge=1, le=150, description="most denoising steps a request may ask for")
    max_images: int = Field(default=10, ge=1, le=10, description="most images one request may ask for")
    image_url_expires_s: int = Field(
        default=3600, ge=1, le=604800, description="lifetime of image links (response_format=url), a week at most as on S3"
    )
    webhook_allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs webhooks may target although private, loopback or link-local (e.g. 127.0.0.0/8)",
    )
    webhook_max_attempts: int = Field(default=8, ge=1, description="deliveries tried before a webhook is given up")
    webhook_backoff_s: float = Field(default=2.0, gt=0, description="wait before the 2nd delivery; doubles each time")
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="how long one delivery may take")
    webhook_poll_s: float = Field(default=1.0, gt=0, description="how often the dispatcher looks for finished jobs")
    # --- arena: blind pairwise votes (docs/arena.md) ---
    arena_contenders: list[ArenaContender] = Field(
        default_factory=list, description="models and settings that battle (default: every model at each preset)"
    )
    arena_anchor: str | None = Field(default=None, description="contender pinned at 1000 (default: the mean is)")
    arena_min_view_s: float = Field(default=3.0, ge=0, description="seconds both images are shown before a vote counts")
    arena_votes_per_day: int = Field(default=300, ge=1, description="votes one voter may cast per UTC day")
    arena_votes_per_ip_per_day: int = Field(default=3000, ge=1, description="votes from one IP address per UTC day")
    arena_battles_per_minute: float | None = Field(
        default=20.0, gt=0, description="battles a voter may start per minute (an IP address: ten times as many)"
    )
    arena_battle_ttl_s: float = Field(default=1800.0, gt=0, description="how long a battle's vote token is valid")
    arena_seeds_per_prompt: int = Field(
        default=4, ge=1, description="seeds a prompt is drawn with: images repeat, so they are generated once"
    )

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network: use CIDR notation, e.g. 127.0.0.0/8") from None
        return value

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep:
            return value
        if scheme == "file" and rest:
            return value
        if scheme == "s3" and rest.split("/", 1)[0]:
            return value
        raise ValueError("expected a path, file://PATH or s3://BUCKET/PREFIX")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, ConfigFileSource(settings_cls)


class ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the file named by the `config` setting, which the flags or the environment have set by now."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        return read_config_file(Path(path)) if path else {}


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML (`.toml`) or JSON file, as a flat table of setting names."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ImageGenError(f"cannot read config file {path}: {exc.strerror}", param="config") from exc
    try:
        if path.suffix.lower() == ".toml":
            if tomllib is None:
                raise ImageGenError(f"config file {path}: TOML needs Python 3.11+; use JSON", param="config")
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, TypeError) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ImageGenError(f"config file {path} is not valid {kind}: {exc}", param="config") from exc
    if not isinstance(data, dict):
        raise ImageGenError(f"config file {path} must hold a table of settings", param="config")
    return data


def _describe(error: Any) -> str:
    name = ".".join(str(part) for part in error["loc"]) or "settings"
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(field for field in Settings.model_fields if field != "config")
        return f"unknown setting {name!r} (allowed: {allowed})"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "bool_parsing":
        message += " (true/false, 1/0, yes/no or on/off)"
    return (
        f"invalid setting {name}={error['input']!r} "
        f"(set by a flag, {ENV_PREFIX}{name.upper()} or the config file): {message}"
    )


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Settings from flags (`overrides`; None means not given) > env > config file > defaults.

    `config` is the config file path from `--config`; otherwise `IMAGE_GEN_CONFIG` names it.
    Raises ImageGenError with a one-line message naming the setting and what is allowed.
    """
    flags = {name: value for name, value in overrides.items() if value is not None}
    if config is not None:
        flags["config"] = Path(config)
    try:
        return Settings(**flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise ImageGenError("; ".join(_describe(error) for error in exc.errors()), param=param) from exc
