"""The one settings object: environment variables (prefix DICOM_NODE_) and an optional YAML file.

Precedence, highest first: explicit arguments, environment, the YAML file named by
DICOM_NODE_CONFIG_FILE, the defaults below. Every field is documented in the README.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from .identity import DEFAULT_UID_ROOT
from .priors.settings import PriorSettings
from .references.settings import ReferenceSettings
from .uids import check_uid_root
from .validators import check_ae_title
from .report.settings import ReportSettings

CONFIG_FILE_ENV = "DICOM_NODE_CONFIG_FILE"
LOCAL_BACKENDS = ("torch", "onnxruntime", "tensorrt")  # vlm_backend values whose weights are on this machine


class StudyRule(BaseModel):
    """Per-modality completion rule for studies that pause mid-transfer."""

    required_series: int | None = None  # complete as soon as this many series have arrived and are idle
    idle_seconds: float | None = None  # overrides the global idle time for this modality
    force_complete_seconds: float | None = None  # complete this long after the first instance, idle or not


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DICOM_NODE_", env_nested_delimiter="__", extra="ignore")

    # Identity and listening socket
    ae_title: str = "DICOM_NODE"
    host: str = "0.0.0.0"
    port: int = 11112

    # HTTP operations UI and API (/, /jobs, /status; /metrics, /healthz, /readyz); port 0 disables it
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # File holding the bearer token (a mounted Secret); re-read when it changes. None: no token,
    # and the service binds loopback only whatever http_host says.
    http_token_file: Path | None = None
    readiness_timeout_seconds: float = Field(5.0, gt=0)  # longest a /readyz check may take
    readiness_echo_cache_seconds: float = Field(15.0, ge=0)  # an archive's C-ECHO result is reused this long
    # False: only index and storage decide /readyz; broker, archives and model server show as degraded
    # (ingest goes on without them). True: they count too (a router that fails over to another node).
    readiness_includes_downstream: bool = False

    # Pseudonyms of patient identifiers in logs and the PHI audit: HMAC-SHA256 under a site key.
    # The file: one KEY_ID:SECRET per line, current key first (README: key rotation).
    # None: a random key generated into <storage_dir>/.pseudonym-key on first use.
    pseudonym_key_file: Path | None = None

    # Root of the UIDs the node derives (SR, overlay SC, tracking UIDs): the site's registered
    # organisation root; at most 40 characters, so derived UIDs keep 24 digits of hash.
    uid_root: str = DEFAULT_UID_ROOT

    # Storage and index
    storage_dir: Path = Path("var/store")
    database_url: str = "sqlite:///var/index.db"
    min_free_disk_mb: int = 1024
    duplicate_policy: Literal["keep_first", "replace", "reject"] = "keep_first"
    # fast: the SCP's instance-row commits do not wait for the disk (rows a power loss takes
    # back are restored from the store at the next start, recovery.py); durable: they do.
    index_instance_commit: Literal["fast", "durable"] = "fast"

    # Security
    # "AE" or "AE@host"; empty: any caller. From the environment: comma-separated or a JSON list.
    allowed_callers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    check_called_ae: bool = True
    max_associations: int = 16
    max_connections_per_host: int = 8  # concurrent connections from one peer address, associated or not; 0: no limit
    # SCP processes behind the DICOM port (the first accepts and passes each connection to the one
    # holding the fewest; limits count for the whole node); "auto":
    # the container's CPU limit, rounded up, else the CPUs this process may run on (cpu_limit.py)
    scp_processes: int = Field(1, ge=1)
    refusal_audit_limit: int = 20  # audit rows (and log lines) per peer address per window for refused connections; the rest counted; 0: no limit
    refusal_audit_window_seconds: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0
    # DCMTK's largest (storescu's --max-send-pdu: 4096..131072): a 513 KB slice comes in 4 PDUs
    # rather than 8, each a read and a write less (4 associations: 5 of 7 runs faster, ~15 %)
    max_pdu_size: int = 131072

    # TLS (a second listener on tls_port when enabled)
    tls_enabled: bool = False
    tls_port: int = 2762
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False

    # Study assembly
    study_idle_seconds: float = 30.0
    assembly_poll_seconds: float = 1.0
    study_rules: dict[str, StudyRule] = Field(default_factory=dict)  # keyed by Modality, e.g. {"CT": {...}}

    # Pipeline: Celery over Redis, queues "io" and "gpu"
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    work_dir: Path = Path("var/jobs")  # per-job artefacts (chosen priors, findings, overlay)
    visibility_timeout_seconds: int = 7200  # Redis redelivers an unacknowledged message after this; correctness does not depend on it
    task_max_retries: int = 5  # attempts of a stage failing for an unknown reason (or whose worker died) before the job fails
    retry_horizon_seconds: float = 86400.0  # transient failures (peer down, timeouts...) are retried this long, then the job fails
    retry_backoff_seconds: float = 5.0  # first retry delay; doubles per attempt, with full jitter
    retry_backoff_max_seconds: float = 600.0
    job_lease_seconds: float = 60.0  # a running stage renews its lease every third of this; a dead worker's stage moves on after it
    republish_after_seconds: float = 120.0  # a stage published but not started this long is published again (lost message)
    dispatch_poll_seconds: float = 1.0  # how often the coordinator creates jobs and republishes stalled ones
    worker_max_memory_mb: int = 4096  # a worker process is replaced after a job leaves it above this
    # Worker liveness (`dicom-node worker-alive`): each worker rewrites <dir>/<worker name> while its
    # consumer consumes or reconnects to the broker; None: <work_dir>/heartbeats
    worker_heartbeat_dir: Path | None = None
    worker_heartbeat_seconds: float = 10.0  # how often the heartbeat file is rewritten
    worker_heartbeat_max_age_seconds: float = 60.0  # no progress this long: the worker is not alive (above the 30 s reconnect backoff)

    # Comparison
    # Radiographs: prior onto current by similarity + affine ("affine"), then a coarse B-spline for
    # breathing and positioning ("bspline"); volumes are always rigid. See inference/registration.py.
    analysis_registration: Literal["affine", "bspline"] = "affine"
    vlm_model: str = ""  # a folder under models_root; empty: the analysis engine alone
    models_root: Path = Path("models")
    vlm_backend: str = "torch"
    vlm_fallback_backend: str = ""  # used when vlm_backend cannot run here (e.g. no TensorRT); empty: fail clearly
    vlm_on_engine_mismatch: Literal["rebuild", "refuse"] = "rebuild"  # a missing/incompatible TensorRT engine
    vlm_vision_batch: int = Field(0, ge=0)  # images per vision-encoder run (onnxruntime); 0: automatic
    vlm_max_batch_size: int = 4  # comparisons run together by a threaded gpu worker
    vlm_max_wait_ms: float = 50.0  # how long the first request of a batch waits for others
    # vlm_backend "openai": a model server's OpenAI-compatible API (vLLM, SGLang, TensorRT-LLM / NIM)
    vlm_base_url: str = ""  # e.g. http://model-server:8000/v1
    vlm_served_model: str = ""  # the name the server serves; empty: vlm_model's name
    vlm_api_key: SecretStr = SecretStr("")  # never logged; or from a mounted Secret via vlm_api_key_file
    vlm_api_key_file: Path | None = None  # a file holding the key (wins over vlm_api_key)
    vlm_timeout_seconds: float = Field(120.0, gt=0)  # one request; past it the comparison is retried later
    vlm_max_concurrency: int = Field(8, ge=1)  # requests in flight per gpu worker (the server batches them)

    # Worklist notification: HL7 ORU^R01 over MLLP to the RIS after the SR is delivered
    worklist_hl7_host: str = ""  # empty: no worklist notification
    worklist_hl7_port: int = 2575
    worklist_receiving_application: str = "RIS"
    worklist_timeout_seconds: float = 30.0

    # Prior retrieval and reporting: their own sections (see their settings modules)
    priors: PriorSettings = Field(default_factory=PriorSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)
    references: ReferenceSettings = Field(default_factory=ReferenceSettings)  # normal reference library (no prior)

    # Logging
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @model_validator(mode="after")
    def _a_dicom_listener(self) -> "Settings":
        if self.port == 0 and not self.tls_enabled:
            raise ValueError("port 0 turns the plain DICOM listener off (TLS only): set tls_enabled with tls_port")
        return self

    @property
    def runs_local_model(self) -> bool:
        return bool(self.vlm_model) and self.vlm_backend in LOCAL_BACKENDS

    @model_validator(mode="after")
    def _an_encoder_to_describe_references(self) -> "Settings":
        if self.references.descriptor == "vision_encoder" and not self.runs_local_model:
            raise ValueError(
                "references.descriptor vision_encoder needs a local model: vlm_model with vlm_backend one of "
                f"{', '.join(LOCAL_BACKENDS)} (now vlm_model {self.vlm_model!r}, vlm_backend {self.vlm_backend!r}); "
                "or set references.descriptor to auto or thumbnail")
        return self

    @field_validator("scp_processes", mode="before")
    @classmethod
    def _auto_scp_processes(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            from .cpu_limit import usable_cpus

            return usable_cpus()
        return value

    @field_validator("uid_root")
    @classmethod
    def _valid_uid_root(cls, value: str) -> str:
        return check_uid_root(value)

    @field_validator("http_token_file", "pseudonym_key_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # A chart or compose file rendering an unset value as "" means "not configured", not the cwd.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _split_callers(cls, value: object) -> object:
        # Allow a comma-separated environment variable as well as a JSON/YAML list.
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={config_file}: no such configuration file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    def rule_for(self, modality: str) -> StudyRule:
        return self.study_rules.get(modality.upper(), StudyRule())


def load_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]


ENV_PREFIX = "DICOM_NODE_"
NESTED_DELIMITER = "__"


def _env_names(model: type[BaseModel], prefix: str) -> tuple[set[str], set[str]]:
    """Every variable name the model reads, and the prefixes under which any name is read (dict fields)."""
    names, open_prefixes = set(), set()
    for name, info in model.model_fields.items():
        env = prefix + name.upper()
        names.add(env)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            inner, inner_open = _env_names(annotation, env + NESTED_DELIMITER)
            names |= inner
            open_prefixes |= inner_open
        elif getattr(annotation, "__origin__", None) is dict:
            open_prefixes.add(env + NESTED_DELIMITER)
    return names, open_prefixes


def unknown_env_variables(environ: dict[str, str] | None = None) -> list[tuple[str, str | None]]:
    """DICOM_NODE_* variables no setting reads (settings ignore them), each with the closest real
    name (None when nothing is close), so a typo is reported instead of silently dropped."""
    import difflib

    environ = os.environ if environ is None else environ
    names, open_prefixes = _env_names(Settings, ENV_PREFIX)
    names.add(CONFIG_FILE_ENV)
    unknown = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in names or upper.startswith(tuple(open_prefixes)):
            continue
        # Compared without the prefix, which every name shares.
        suffixes = {name[len(ENV_PREFIX):]: name for name in names if name.startswith(ENV_PREFIX)}
        close = difflib.get_close_matches(upper[len(ENV_PREFIX):], sorted(suffixes), n=1, cutoff=0.6)
        unknown.append((variable, suffixes[close[0]] if close else None))
    return unknown
