"""Settings: environment variables ``SHIFTCOST_*``, optionally a TOML file.

Precedence, highest first: values passed to ``Settings(...)``, environment variables
(``SHIFTCOST_DATABASE_URL`` ...), a ``.env`` file if present, then the TOML file named by
``SHIFTCOST_CONFIG`` (flat ``key = value`` pairs using the field names), then defaults.

To add a setting, add a typed field with a default to ``Settings``; its environment
variable is ``SHIFTCOST_`` followed by the upper-cased field name.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from shiftcost.errors import ConfigError
from shiftcost.forecast.protocol import MAX_EPOCHS

CONFIG_FILE_VARIABLE = "SHIFTCOST_CONFIG"
#: The share of the budget left a probe may cost before the decision, unless the user allows more
#: (``probe_max_share``, ``retrain --probe-max-share``; :func:`shiftcost.forecast.decide.probe_pays`).
MAX_PROBE_SHARE = 0.05


class Settings(BaseSettings):
    """Every shiftcost setting, each overridable by ``SHIFTCOST_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="SHIFTCOST_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    database_url: str = Field(
        default="sqlite:///shiftcost.db",
        description="SQLAlchemy URL of the database; the default is the SQLite file "
        "shiftcost.db in the working directory. Put passwords here only through the "
        "environment, never in a committed file.",
    )

    # --- pipeline: where batches arrive and where artifacts go -----------------------
    landing: str = Field(
        default="landing",
        description="Where new batches arrive: a local folder (default ./landing) or any fsspec "
        "URL such as s3://bucket/prefix or memory://landing. Each .npz/.pt file or ImageFolder "
        "sub-folder is one batch.",
    )
    landing_archive: str = Field(
        default="_archive",
        description="Where processed landing entries move once their batch is final (done, failed, or a "
        "duplicate): a folder or fsspec URL, or a name inside the landing location (the default _archive, "
        "which polls ignore). Empty: leave them in place (polls still skip them without reading them).",
    )
    landing_retention_days: float | None = Field(
        default=None,
        gt=0,
        description="Days an archived landing entry is kept before it is deleted (none: kept for ever).",
    )
    artifacts_dir: str = Field(
        default="shiftcost-artifacts",
        description="Where model weights, reference stats, replay samples and Evidently drift reports go: a "
        "local folder or any fsspec URL such as s3://bucket/artifacts or memory://artifacts.",
    )
    reference_replay_samples: int = Field(
        default=2000,
        ge=10,
        description="The most labelled images a model version keeps as its replay sample and reference: a "
        "retrained version draws them from its parent's sample and the batch, so stored data stays bounded.",
    )
    model_name: str = Field(default="model", description="Name of the deployed model that batches are assessed against.")
    poll_interval_s: float = Field(default=60.0, gt=0, description="Seconds between two polls of the landing location.")
    flow_mode: Literal["inline", "deployment"] = Field(
        default="inline",
        description="inline (embedded): the watch flow runs assess, and assess runs retrain, as subflows in "
        "its own process; deployment (production): they start the assess and retrain deployments on the "
        "gpu work pool with run_deployment, keyed by the batch fingerprint.",
    )
    assess_deployment: str = Field(
        default="assess/shiftcost-assess", description="flow-name/deployment-name of assess in deployment mode."
    )
    retrain_deployment: str = Field(
        default="retrain/shiftcost-retrain", description="flow-name/deployment-name of retrain in deployment mode."
    )
    handoff_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="Deployment mode: seconds an assess run may wait for a worker of its work pool to start it; "
        "after that the watcher cancels it with the reason and hands the batch off afresh on a later poll.",
    )
    claim_lease_s: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds after which a batch claimed by a crashed assessment may be claimed again.",
    )
    retrain_stale_after_s: float = Field(
        default=900.0,
        gt=0,
        description=(
            "Lease of a running retrain: a run whose heartbeat is older than this is proven dead (its process was "
            "killed); the watcher marks it and its batch failed and settles its reservation at the work its last heartbeat "
            "carried, priced at the host's energy rate (released when there is no rate)."
        ),
    )
    retrain_heartbeat_s: float = Field(
        default=60.0, gt=0, description="Seconds between two heartbeats of a running retrain (keep well under the lease)."
    )
    device: str = Field(default="auto", description="Torch device for forward passes and retraining: auto, cpu, cuda[:N].")
    index_shard_size: int = Field(
        default=0, ge=0,
        description="Images per shard when a batch is larger: its forward pass is split and run on Dask; 0: always one pass.",
    )  # fmt: skip
    dask_address: str | None = Field(
        default=None, description="Scheduler address of the Dask cluster for shards (tcp://host:8786); none: a temporary local one."
    )
    dask_local_workers: int = Field(default=2, ge=1, description="Worker processes of the temporary local Dask cluster.")

    # --- drift detection --------------------------------------------------------------
    drift_embedding_method: Literal["model", "distance", "ratio", "mmd"] = Field(
        default="model", description="Evidently embedding drift method."
    )
    drift_embeddings_threshold: float | None = Field(
        default=None, description="Embedding drift score threshold (default: the method's own)."
    )
    drift_image_stats_threshold: float | None = Field(
        default=None, description="Per-column threshold of the image-statistics tests (default: Evidently's)."
    )
    drift_image_stats_share: float = Field(
        default=0.5, gt=0, le=1, description="Share of drifted image statistics that makes that group drift."
    )
    drift_predictions_threshold: float | None = Field(
        default=None, description="Threshold of the prediction-distribution test (default: Evidently's)."
    )
    drift_min_groups: int = Field(default=1, ge=1, description="Drift groups that must drift for the batch to drift.")
    drift_max_rows: int = Field(default=1000, ge=10, description="Rows per side the embedding drift test subsamples to.")

    # --- decision -----------------------------------------------------------------------
    always_assess: bool = Field(default=False, description="Predict costs and check budgets even without drift.")
    use_upper_bound: bool = Field(
        default=True, description="Check the upper bound of the predicted interval against budgets (else the point)."
    )
    min_accuracy_drop: float | None = Field(
        default=None, description="Retrain only when the accuracy drop on a labelled batch exceeds this."
    )
    on_not_converging: Literal["skip", "defer"] = Field(
        default="skip", description="What to do when retraining is predicted not to reach the cutoff."
    )
    probe_max_share: float = Field(
        default=MAX_PROBE_SHARE, ge=0, le=1,
        description="A probe runs before the decision only when the index forecast's interval straddles what the budgets "
        "have left and the probe costs at most this share of it (a model whose retrains are tens of steps needs more than "
        "the default for a probe ever to run; 0: never probe).",
    )
    budget_name: str = Field(default="default", description="Name of the budget created from budget_kwh / budget_co2.")
    budget_kwh: float | None = Field(default=None, ge=0, description="kWh cap of the default budget (none: no cap).")
    budget_co2: float | None = Field(default=None, ge=0, description="kg CO2e cap of the default budget (none: no cap).")
    budget_period: Literal["per_run", "daily", "monthly", "rolling_days"] = Field(
        default="monthly", description="Period of the default budget."
    )
    budget_rolling_days: int | None = Field(default=None, ge=1, description="Days of a rolling_days default budget.")

    # --- cost prediction and retraining ----------------------------------------------------
    interval_level: float = Field(default=0.9, gt=0, lt=1, description="Coverage of the cost prediction intervals.")
    country_iso_code: str = Field(default="USA", description="3-letter ISO code of the grid (carbon intensity).")
    carbon_intensity_kg_per_kwh: float | None = Field(
        default=None, ge=0, description="Carbon intensity for predictions (default: CodeCarbon's figure for the country)."
    )
    cutoff_tolerance: float = Field(
        default=0.03, ge=0, lt=1, description="Retraining stops at the reference accuracy minus this."
    )
    retrain_max_epochs: float | None = Field(
        default=MAX_EPOCHS, gt=0, description="Epoch cap of one retraining (calibration's, so forecasts know the runs they price)."
    )
    retrain_max_steps: int | None = Field(default=None, ge=1, description="Optimizer step cap of one retraining.")
    retrain_batch_size: int = Field(default=64, ge=1, description="Mini-batch size of retraining.")
    retrain_lr: float | None = Field(
        default=None, gt=0, description="Learning rate of retraining (default: the recipe's, 1e-4; a model file's own recipe wins)."
    )
    retrain_holdout_fraction: float = Field(
        default=0.3, gt=0, lt=1,
        description="Share of a batch held out to check the cutoff (the measurement protocol's, as calibration uses).",
    )
    retrain_seed: int = Field(default=0, description="Seed of retraining and of the drift tests.")
    promotion_tolerance: float = Field(
        default=0.01, ge=0, lt=1,
        description="A retrained version is promoted only if its accuracy on the reference holdout is at least its parent's minus this.",
    )
    promotion_approval: Literal["auto", "manual"] = Field(
        default="auto",
        description="auto: a retrained version that passes the promotion gate becomes current; manual: it waits as pending "
        "for `shiftcost model approve VERSION`.",
    )
    energy_sample_s: float = Field(default=1.0, gt=0, description="CodeCarbon power sampling interval in seconds.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings, env_settings, dotenv_settings, file_secret_settings,
        ]
        config_file = os.environ.get(CONFIG_FILE_VARIABLE)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_checked_toml(config_file)))
        return tuple(sources)


def _checked_toml(path_text: str) -> Path:
    """Fail with one clear sentence when the configuration file is missing or not TOML."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"The configuration file {path} named by {CONFIG_FILE_VARIABLE} does not exist; "
            "fix the path or unset the variable."
        )
    try:
        tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"The configuration file {path} is not valid TOML ({error}); fix it or unset "
            f"{CONFIG_FILE_VARIABLE}."
        ) from error
    return path


def load_settings(**overrides: object) -> Settings:
    """Read the settings now (environment and files are read on every call).

    An invalid value becomes a ``ConfigError`` naming the setting and its variable.
    """
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        name = ".".join(str(part) for part in first["loc"]) or "?"
        raise ConfigError(
            f"The setting {name} (environment variable SHIFTCOST_{name.upper()}) is invalid: "
            f"{first['msg']}; fix its value."
        ) from error


def _memory_bytes() -> int:
    """This machine's physical memory (8 GiB when the system cannot say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


class InputLimits(BaseSettings):
    """How large an input may declare itself before anything is allocated for it.

    Checked against the sizes a file declares in its headers (``.npz`` members' ``.npy``
    headers, ``.pt`` storages, safetensors headers), the number of images of a folder and
    the fields of a model spec, so a small file declaring a huge array is refused with one
    sentence instead of exhausting memory. Each is ``SHIFTCOST_<NAME>``.
    """

    model_config = SettingsConfigDict(env_prefix="SHIFTCOST_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    max_batch_bytes: int = Field(
        default_factory=lambda: _memory_bytes() // 4, ge=1,
        description="Most bytes the arrays of one batch file may declare (default: a quarter of this machine's memory).",
    )
    max_batch_images: int = Field(default=1_000_000, ge=1, description="Most images one batch may hold.")
    max_model_bytes: int = Field(
        default_factory=lambda: _memory_bytes() // 4, ge=1,
        description="Most bytes a model's weights (declared, or estimated from its spec) and one image's "
        "activations may take (default: a quarter of this machine's memory).",
    )
    max_image_size: int = Field(default=4096, ge=1, description="Largest image side, in pixels, a model spec may ask for.")
    max_in_channels: int = Field(default=64, ge=1, description="Most input channels a model spec may ask for.")


def load_limits() -> InputLimits:
    """The input size limits now (environment read on every call); ``ConfigError`` if invalid."""
    from pydantic import ValidationError

    try:
        return InputLimits()
    except ValidationError as error:
        first = error.errors()[0]
        name = ".".join(str(part) for part in first["loc"]) or "?"
        raise ConfigError(
            f"The setting {name} (environment variable SHIFTCOST_{name.upper()}) is invalid: {first['msg']}; fix its value."
        ) from error
