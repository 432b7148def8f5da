"""Configuration: defaults here, a TOML file over them, environment variables over both.

``configs/default.toml`` documents every key; a test keeps it equal to the defaults below.
Environment: prefix ``MTS_``, nesting with ``__`` (``MTS_QUEUE__GLOBAL_CAP=2000``).
``MTS_CONFIG`` names another TOML file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

TIER_NAMES = ("vip", "normal", "low")
Tier = Literal["vip", "normal", "low"]
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = ""
    allowed_origins: list[str] = Field(default_factory=list)
    ws_ping_interval_s: float = 20.0
    ws_ping_timeout_s: float = 20.0
    header_timeout_s: float = 10.0
    allocator: Literal["jemalloc", "glibc"] = "jemalloc"
    jemalloc_library: str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    jemalloc_conf: str = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
    malloc_arena_max: int = 2
    data_dir: Path = Path("var")


class AuthSettings(BaseModel):
    hs256_secret: str = ""
    public_key_file: str = ""
    algorithms: list[str] = Field(default_factory=lambda: ["HS256", "RS256", "ES256"])
    leeway_s: float = 5.0
    exp_grace_s: float = 30.0
    resume_secret: str = ""


class TierSettings(BaseModel):
    max_wait_s: float
    cap: int = 1000


def _default_tiers() -> dict[str, TierSettings]:
    return {
        "vip": TierSettings(max_wait_s=120.0, cap=1000),
        "normal": TierSettings(max_wait_s=600.0, cap=1000),
        "low": TierSettings(max_wait_s=1200.0, cap=1000),
    }


class QueueSettings(BaseModel):
    store: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "mts:"
    redis_max_connections: int = 64
    global_cap: int = 1000
    per_identity_cap: int = 1
    resume_grace_s: float = 30.0
    heartbeat_s: float = 5.0
    coalesce_s: float = 0.25
    retry_after_s: float = 10.0
    overtake_reserve: float = 0.5
    hot_boost_s: float = 30.0
    live_expected_s: float = 60.0
    tiers: dict[str, TierSettings] = Field(default_factory=_default_tiers)

    def tier(self, name: str) -> TierSettings:
        return self.tiers[name]


class ClusterSettings(BaseModel):
    node_id: str = ""
    pool: str = "default"
    lease_s: float = 6.0
    grant_ttl_s: float = 10.0
    drain_timeout_s: float = 600.0


class PoolSettings(BaseModel):
    tiers: dict[str, list[str]] = Field(default_factory=dict)
    overflow: dict[str, list[str]] = Field(default_factory=dict)

    def primary(self, tier: str) -> list[str] | None:
        """The pools whose slots ``tier`` is granted; ``None``: any pool."""
        return self.tiers.get(tier)


class LimitSettings(BaseModel):
    max_audio_seconds: float = 120.0
    max_audio_bytes: int = 20_000_000
    max_message_bytes: int = 1_048_576
    max_live_session_s: float = 1800.0
    start_rate_per_minute: float = 20
    start_burst: int = 5
    bad_message_limit: int = 20
    hello_timeout_s: float = 5.0
    live_idle_timeout_s: float = 300.0
    outbox_bytes: int = 8 << 20
    queued_audio_bytes: int = 1 << 30
    audio_spool_bytes: int = 16_384
    avatar_upload_bytes: int = 200_000_000
    avatar_upload_pixels: int = 16_777_216
    avatar_upload_frames: int = 3000
    avatar_upload_seconds: float = 120.0


class EngineSettings(BaseModel):
    kind: Literal["auto", "lite", "musetalk"] = "auto"
    models_dir: Path = Path("models")
    device: str = "cuda"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    workers: int = 1
    process_mode: Literal["thread", "process"] = "thread"
    slots: int = 4
    max_slots: int = 64
    capacity_headroom: float = 0.8
    max_batch: int = 8
    stream_buffer_frames: int = 50


class IceServer(BaseModel):
    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


class StreamSettings(BaseModel):
    segment_s: float = 0.5
    video_crf: int = Field(default=23, ge=1, le=51)  # 0 (lossless) needs a profile the encoder is not given
    x264_preset: str = "superfast"
    ice_servers: list[IceServer] = Field(default_factory=list)
    clip_cache_bytes: int = 10 << 30
    webrtc_offer_timeout_s: float = 20.0
    webrtc_video_bitrate: int = 1_000_000
    webrtc_keyframe_interval_s: float = 2.0
    stall_timeout_s: float = 30.0
    audio_bitrate: int = 64000
    clip_store: Literal["local", "s3"] = "local"
    s3_bucket: str = ""
    s3_prefix: str = "clips/"
    s3_endpoint_url: str = ""
    s3_region: str = ""
    cdn_base_url: str = ""


class AvatarSettings(BaseModel):
    device_cache: int = 4
    host_cache_bytes: int = 2 << 30
    disk_bytes: int = 0
    hot_after_uses: int = 10
    hot_window_s: float = 600.0
    prepare_queue: int = 8


class TemplateSettings(BaseModel):
    file: str = ""
    pregen_top_k: int = 0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MTS_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    pools: PoolSettings = Field(default_factory=PoolSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    avatars: AvatarSettings = Field(default_factory=AvatarSettings)
    templates: TemplateSettings = Field(default_factory=TemplateSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("MTS_CONFIG", DEFAULT_CONFIG))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    def check(self) -> None:
        """Fail early, with the key's name, on settings that cannot work together."""
        missing = [t for t in TIER_NAMES if t not in self.queue.tiers]
        if missing:
            raise ValueError(f"queue.tiers lacks {', '.join(missing)}")
        waits = [self.queue.tiers[t].max_wait_s for t in TIER_NAMES]
        if waits != sorted(waits):
            raise ValueError("queue.tiers max_wait_s must not decrease from vip to normal to low")
        if self.avatars.device_cache < 1:
            raise ValueError("avatars.device_cache must hold at least one avatar per worker")
        if self.queue.hot_boost_s < 0:
            raise ValueError("queue.hot_boost_s must not be negative")
        if self.queue.live_expected_s <= 0:
            raise ValueError("queue.live_expected_s must be positive: a live session holds its slot a while")
        if self.queue.store == "redis" and not self.server.public_url:
            raise ValueError(
                'queue.store = "redis" needs server.public_url: the URL other nodes redirect clients to'
            )
        unknown = [t for t in [*self.pools.tiers, *self.pools.overflow] if t not in self.queue.tiers]
        if unknown:
            raise ValueError(f"pools names unknown tiers: {', '.join(unknown)}")
        if self.cluster.grant_ttl_s <= 0 or self.cluster.lease_s <= 0:
            raise ValueError("cluster.lease_s and cluster.grant_ttl_s must be positive")
        if self.engine.slots < 0:
            raise ValueError("engine.slots must be 0 (measure) or more")
