"""Energy and carbon measurement of a piece of work, through CodeCarbon's offline tracker.

One :class:`EnergyMeter` measures one run: it wraps a fresh
``codecarbon.OfflineEmissionsTracker`` and turns what CodeCarbon reports into an
:class:`EnergyMeasurement` that says not only how much, but *how* each figure was
obtained (counter-measured or estimated from a power model), so an audit can tell the two
apart.

Behaviour of CodeCarbon 3.3 that this module guards against (read from its source):

- ``OfflineEmissionsTracker.__init__``, ``start()`` and ``stop()`` are wrapped in
  ``suppress(Exception)``: any error inside is logged and swallowed, and ``stop()`` then
  returns ``None``. A ``None`` result is a failed measurement here
  (:class:`EnergyMeasurementError`), never zero.
- ``stop()`` must run once per tracker; the meter calls it once and caches the result.
- An unknown ``country_iso_code`` does not fail: CodeCarbon silently falls back to a world
  average carbon intensity. The code is therefore checked against CodeCarbon's own energy
  mix table before the tracker is built (:class:`~shiftcost.errors.ConfigError`).
- The tracker reads ``~/.codecarbon.config``, ``./.codecarbon.config`` and ``CODECARBON_*``
  environment variables for every setting not passed explicitly. The meter passes every
  setting that could send data over the network or write files (output methods, HTTP
  endpoint, Electricity Maps token, lock file), so no configuration file can turn those on.
  Hardware facts (``force_cpu_power``, ``force_ram_power``, ``pue``) are still honoured from
  the configuration when not given, and recorded in the measurement.
- Files: with ``save_to_file=False`` (the default) the tracker writes nothing at all: no
  ``emissions.csv`` (no output handler is created), no ``/tmp/.codecarbon.lock`` (taken
  only when ``allow_multiple_runs`` is false; the meter sets it true so that concurrent
  measured runs on one machine are possible, and no SIGINT/SIGTERM handlers are installed
  either). ``.codecarbon.config`` is only read, never written, by the tracker.
- The default sampling interval is 15 s; the meter samples every ``measure_power_secs``
  (default 1 s). CodeCarbon additionally samples CPU load every second in a thread and once
  more on ``stop()``, so even sub-second runs get a figure.
- Without RAPL (e.g. in a VM or container) CPU power is *estimated* as the CPU's TDP times
  a function of its load; an unknown CPU model gets 4 W per thread. RAM power is always an
  estimate from a DIMM model (at least 10 W on x86). NVIDIA GPUs are measured through
  NVML's energy counter when it is available, else from sampled power.
- In ``process`` tracking mode that load is the process's CPU-time delta over the window
  since the previous sample, taken by three threads (the scheduler, the 1-second monitor,
  ``stop()``), and each window's power is multiplied by the time since the previous
  *measurement*. When the measured work holds Python's lock, the threads wake late and
  together, windows shrink to a few milliseconds, under the 10 ms tick of the CPU-time
  counters, and the figure swings: 1.4 s of pure-Python work read 1.5e-6 to 8.3e-5 kWh of
  CPU energy on one idle 2-core host. The model itself, TDP x CPU-seconds / cores,
  integrates exactly, so the meter reads the process's CPU seconds (its children's
  included) at start and stop and applies it once to the whole run; ``cpu_method`` says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from shiftcost.errors import ConfigError, ShiftcostError

__all__ = [
    "EnergyMeasurement",
    "EnergyMeasurementError",
    "EnergyMeter",
    "measure_energy",
    "device_kind",
    "options_for_device",
    "known_country_codes",
    "KWH_TO_JOULES",
]

KWH_TO_JOULES = 3.6e6
_MIN_RUN_S = 0.06

# How CodeCarbon's CPU modes (``codecarbon.external.hardware.CPU._mode``) obtain a figure.
_CPU_MODE_MEASURED = {
    "intel_rapl": True,
    "windows_emi": True,
    "intel_power_gadget": True,
    "apple_powermetrics": True,
    "cpu_load": False,
    "constant": False,
}


class EnergyMeasurementError(ShiftcostError):
    """CodeCarbon could not produce a measurement (it returned nothing or garbage).

    ``partial`` optionally carries the result of the work that was measured (e.g. a
    finished retraining whose energy figure is missing), so that nothing is lost.
    """

    exit_code = 1

    def __init__(self, message: str, *, partial: Any = None) -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class EnergyMeasurement:
    """What one measured run cost, and how each figure was obtained.

    Energies are in kWh, powers in W (CodeCarbon's mean over its samples), emissions in
    kg CO2e, carbon intensity in kg CO2e per kWh. The ``*_method`` fields name the
    mechanism behind each component and ``*_measured`` says whether it came from a
    hardware energy counter (True) or a power model/estimate (False); ``gpu_measured`` is
    None when no GPU was tracked.
    """

    energy_kwh: float
    emissions_kg: float
    cpu_energy_kwh: float
    gpu_energy_kwh: float
    ram_energy_kwh: float
    cpu_power_w: float
    gpu_power_w: float
    ram_power_w: float
    duration_s: float
    cpu_model: str
    gpu_model: str
    gpu_count: int
    cpu_count: int
    country_iso_code: str
    country_name: str
    region: str | None
    carbon_intensity_kg_per_kwh: float | None
    carbon_intensity_source: str
    cpu_method: str
    cpu_measured: bool
    cpu_tdp_w: float | None
    gpu_method: str
    gpu_measured: bool | None
    ram_method: str
    ram_measured: bool
    tracking_mode: str
    pue: float
    measure_power_secs: float
    codecarbon_version: str
    cpu_utilization_percent: float = 0.0
    gpu_utilization_percent: float = 0.0

    @property
    def energy_joules(self) -> float:
        """Total energy in joules."""
        return self.energy_kwh * KWH_TO_JOULES

    @property
    def fully_measured(self) -> bool:
        """True when no component's figure came from an estimate."""
        return self.cpu_measured and self.ram_measured and self.gpu_measured is not False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EnergyMeasurement":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def known_country_codes() -> dict[str, str]:
    """ISO 3166-1 alpha-3 codes CodeCarbon has grid data for, mapped to country names."""
    from codecarbon.input import DataSource

    return {code: row.get("country_name", code) for code, row in DataSource().get_global_energy_mix_data().items()}


def _check_country(country_iso_code: str) -> str:
    import difflib

    code = (country_iso_code or "").strip().upper()
    known = known_country_codes()
    if code in known:
        return code
    close = difflib.get_close_matches(code, list(known), n=3, cutoff=0.5)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise ConfigError(
        f"country code {country_iso_code!r} is not one CodeCarbon has grid data for{hint}; "
        "give a 3-letter ISO code such as USA, FRA or DEU."
    )


def _import_codecarbon() -> Any:
    try:
        import codecarbon
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "energy tracking needs the codecarbon package, which is not installed; "
            "install it (pip install 'codecarbon>=3.3,<3.4') or turn energy tracking off."
        ) from error
    return codecarbon


class EnergyMeter:
    """Measures one run with a fresh CodeCarbon ``OfflineEmissionsTracker``.

    Use ``start()`` then ``stop()`` exactly once each (or ``with EnergyMeter(...) as m``).
    ``stop()`` returns an :class:`EnergyMeasurement` or raises
    :class:`EnergyMeasurementError`; calling it again returns the same object without
    touching the tracker again. No network access; nothing written unless
    ``save_to_file`` is true (then CodeCarbon appends a row to ``output_dir/output_file``).

    ``tracking_mode="process"`` (default) attributes CPU load and RAM of this process and
    its children only, so other work on a shared machine does not inflate the figure;
    ``"machine"`` measures the whole machine. ``count_gpu=False`` leaves GPU energy out of the
    figure (for a run that uses none; see :func:`options_for_device`): CodeCarbon still reads
    the GPUs, since its hardware cache takes ``gpu_ids=[]`` for "every GPU".
    """

    def __init__(
        self,
        *,
        country_iso_code: str = "USA",
        region: str | None = None,
        measure_power_secs: float = 1.0,
        tracking_mode: str = "process",
        save_to_file: bool = False,
        output_dir: str | None = None,
        output_file: str = "emissions.csv",
        project_name: str = "shiftcost",
        experiment_name: str = "run",
        gpu_ids: list[int] | None = None,
        count_gpu: bool = True,
        force_cpu_power: float | None = None,
        force_ram_power: float | None = None,
        pue: float | None = None,
        force_carbon_intensity_g_co2e_kwh: float | None = None,
    ) -> None:
        if tracking_mode not in ("process", "machine"):
            raise ConfigError(f"tracking mode {tracking_mode!r} is unknown; use 'process' or 'machine'.")
        if not (measure_power_secs > 0 and math.isfinite(measure_power_secs)):
            raise ConfigError(f"measure_power_secs must be a positive number of seconds, got {measure_power_secs!r}.")
        self.country_iso_code = _check_country(country_iso_code)
        self.region = region
        self.measure_power_secs = float(measure_power_secs)
        self.tracking_mode = tracking_mode
        self.save_to_file = save_to_file
        self.output_dir = output_dir
        self.output_file = output_file
        self.project_name = project_name
        self.experiment_name = experiment_name
        self.gpu_ids = gpu_ids
        self.count_gpu = count_gpu
        self.force_cpu_power = force_cpu_power
        self.force_ram_power = force_ram_power
        self.pue = pue
        self.force_carbon_intensity = force_carbon_intensity_g_co2e_kwh
        self.measurement: EnergyMeasurement | None = None
        self.error: EnergyMeasurementError | None = None
        self._tracker: Any = None
        self._stopped = False
        self._started_at: float | None = None
        self._cpu_seconds_at_start: dict[int, float] = {}

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> "EnergyMeter":
        """Build the tracker and start measuring. Raises if CodeCarbon fails to start."""
        if self._tracker is not None:
            raise RuntimeError("an EnergyMeter measures one run only; create a new one")
        codecarbon = _import_codecarbon()
        # CodeCarbon logs a few lines before it applies its own log_level setting.
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        self._tracker = codecarbon.OfflineEmissionsTracker(**self._tracker_kwargs())
        if not hasattr(self._tracker, "_start_time"):
            # The constructor raised inside CodeCarbon's suppress(): half-built object.
            raise self._fail("CodeCarbon's tracker could not be constructed (see its log above)")
        self._tracker.start()
        if getattr(self._tracker, "_start_time", None) is None:
            raise self._fail("CodeCarbon's tracker did not start (see its log above)")
        self._started_at = time.perf_counter()
        self._cpu_seconds_at_start = _process_cpu_seconds()
        return self

    def stop(self) -> EnergyMeasurement:
        """Stop the tracker (once) and return the measurement, or raise if there is none."""
        if self._stopped:
            if self.measurement is not None:
                return self.measurement
            raise self.error or EnergyMeasurementError("energy measurement failed")
        if self._tracker is None:
            raise RuntimeError("EnergyMeter.stop() called before start()")
        self._stopped = True
        # CodeCarbon skips its final sample when the previous one is under 50 ms old, so a
        # run shorter than that would be reported as zero; pad it to its resolution.
        short = _MIN_RUN_S - (time.perf_counter() - (self._started_at or 0.0))
        if short > 0:
            time.sleep(short)
        cpu_seconds = _cpu_seconds_between(self._cpu_seconds_at_start, _process_cpu_seconds())
        emissions = self._tracker.stop()
        data = getattr(self._tracker, "final_emissions_data", None)
        if emissions is None or data is None:
            raise self._fail("CodeCarbon returned no measurement when stopped (its error is in the log above)")
        # A sampling error inside CodeCarbon can also leave a well-formed record of zero:
        # a healthy run has at least two completed samples (one at start, one later).
        samples = getattr(self._tracker, "_power_measurement_count", None)
        if isinstance(samples, int) and samples < 2:
            raise self._fail(f"CodeCarbon completed {samples} power samples, so its figure is not a measurement (its error is in the log above)")
        try:
            self.measurement = self._to_measurement(data, cpu_seconds=cpu_seconds)
        except (TypeError, ValueError, AttributeError) as error:
            raise self._fail(f"CodeCarbon returned an unusable measurement ({error})") from error
        return self.measurement

    def __enter__(self) -> "EnergyMeter":
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.stop()
        except EnergyMeasurementError:
            # Never hide the body's own exception behind a measurement failure;
            # the failure stays available in ``self.error``.
            if exc_type is None:
                raise

    # -- internals ---------------------------------------------------------------

    def _fail(self, reason: str) -> EnergyMeasurementError:
        self._stopped = True
        self.error = EnergyMeasurementError(
            f"energy measurement failed: {reason}; check the CodeCarbon settings "
            "(.codecarbon.config, CODECARBON_* variables) or run without energy tracking."
        )
        return self.error

    def _tracker_kwargs(self) -> dict[str, Any]:
        from codecarbon.output_methods.base_output import OutputMethod

        kwargs: dict[str, Any] = dict(
            country_iso_code=self.country_iso_code,
            measure_power_secs=self.measure_power_secs,
            tracking_mode=self.tracking_mode,
            log_level="error",
            project_name=self.project_name,
            experiment_name=self.experiment_name,
            output_methods=[OutputMethod.CSV] if self.save_to_file else [],
            # Explicit values, so that no config file can enable network output or the
            # global lock file (see module docstring).
            emissions_endpoint=False,
            electricitymaps_api_token="",
            allow_multiple_runs=True,
            api_call_interval=-1,
            output_handlers=[],
        )
        if self.save_to_file:
            kwargs["output_dir"] = self.output_dir or "."
            kwargs["output_file"] = self.output_file
        if self.region is not None:
            kwargs["region"] = self.region
        if self.gpu_ids is not None:
            kwargs["gpu_ids"] = list(self.gpu_ids)
        if self.force_cpu_power is not None:
            kwargs["force_cpu_power"] = self.force_cpu_power
        if self.force_ram_power is not None:
            kwargs["force_ram_power"] = self.force_ram_power
        if self.pue is not None:
            kwargs["pue"] = self.pue
        if self.force_carbon_intensity is not None:
            kwargs["force_carbon_intensity_g_co2e_kwh"] = self.force_carbon_intensity
        return kwargs

    def _methods(self) -> dict[str, Any]:
        """Read how each component was tracked from the tracker's hardware objects."""
        cpu_method, cpu_measured, cpu_tdp = "none", False, None
        gpu_method, gpu_measured = "none", None
        ram_method, ram_measured = "none", False
        for hw in getattr(self._tracker, "_hardware", []):
            kind = type(hw).__name__
            if kind == "CPU":
                mode = getattr(hw, "_mode", "unknown")
                cpu_measured = _CPU_MODE_MEASURED.get(mode, False)
                tdp = getattr(hw, "_tdp", None)
                cpu_tdp = float(tdp) if tdp is not None and not cpu_measured else None
                if mode == "cpu_load":
                    cpu_method = "estimated: CPU load x TDP"
                elif mode == "constant":
                    cpu_method = "estimated: 50% of TDP"
                else:
                    cpu_method = f"measured: {mode}"
                if not cpu_measured and getattr(self._tracker, "_force_cpu_power", None) is not None:
                    cpu_method += " (TDP given by user)"
                elif getattr(hw, "_is_generic_tdp", False):
                    cpu_method += " (generic TDP, CPU model unknown)"
            elif kind == "GPU":
                devices = getattr(getattr(hw, "devices", None), "devices", []) or []
                fallback = any(getattr(d, "_use_power_fallback", False) for d in devices)
                gpu_measured = not fallback
                gpu_method = "estimated: sampled NVML/SMI power x time" if fallback else "measured: GPU energy counter (NVML/AMD SMI)"
            elif kind == "RAM":
                forced = getattr(hw, "_force_ram_power", None) is not None
                ram_method = "estimated: RAM power given by user" if forced else "estimated: DIMM power model"
                ram_measured = False
            elif kind in ("AppleSiliconChip", "Raspberry"):
                part = getattr(hw, "chip_part", "CPU")
                if part == "CPU":
                    cpu_method, cpu_measured = f"measured: {kind}", True
                elif part == "GPU":
                    gpu_method, gpu_measured = f"measured: {kind}", True
                elif part == "RAM":
                    ram_method, ram_measured = f"measured: {kind}", True
        return dict(
            cpu_method=cpu_method,
            cpu_measured=cpu_measured,
            cpu_tdp_w=cpu_tdp,
            gpu_method=gpu_method,
            gpu_measured=gpu_measured,
            ram_method=ram_method,
            ram_measured=ram_measured,
        )

    def _process_load_cpu(self) -> Any:
        """CodeCarbon's CPU object when it estimates this process's CPU power from its load, else None."""
        if self.tracking_mode != "process":
            return None
        for hw in getattr(self._tracker, "_hardware", []):
            if type(hw).__name__ == "CPU" and getattr(hw, "_mode", None) == "cpu_load":
                return hw
        return None

    def _to_measurement(self, data: Any, *, cpu_seconds: float | None = None) -> EnergyMeasurement:
        """The measurement from CodeCarbon's record; ``cpu_seconds`` (the run's process CPU time)
        replaces its sampled CPU figure with the whole-run integral of the same model."""
        energy = float(data.energy_consumed)
        emissions = float(data.emissions)
        if not (math.isfinite(energy) and math.isfinite(emissions)) or energy < 0 or emissions < 0:
            raise ValueError(f"energy {energy!r} kWh, emissions {emissions!r} kg")
        intensity = emissions / energy if energy > 0 else None
        gpu = {
            "gpu_energy_kwh": float(data.gpu_energy), "gpu_power_w": float(data.gpu_power), "gpu_model": str(data.gpu_model or ""),
            "gpu_count": int(data.gpu_count or 0), "gpu_utilization_percent": float(data.gpu_utilization_percent or 0.0),
        }
        cpu = {"cpu_energy_kwh": float(data.cpu_energy), "cpu_power_w": float(data.cpu_power)}
        methods = self._methods()
        hw = self._process_load_cpu() if cpu_seconds is not None else None
        if hw is not None:
            # CodeCarbon's process-mode power is TDP x (CPU-seconds / wall-seconds) / cores,
            # so over the whole run its energy is TDP x CPU-seconds / cores (then the PUE).
            joules = float(hw._tdp) * cpu_seconds / max(int(hw._cpu_count), 1) * float(data.pue)
            cpu_kwh = joules / KWH_TO_JOULES
            energy += cpu_kwh - cpu["cpu_energy_kwh"]
            duration = float(data.duration)
            cpu = {"cpu_energy_kwh": cpu_kwh, "cpu_power_w": joules / duration if duration > 0 else 0.0}
            methods["cpu_method"] = methods["cpu_method"].replace("CPU load x TDP", "process CPU time x TDP / cores")
        if not self.count_gpu:
            # CodeCarbon's total is the components' sum, each already times the PUE.
            energy = max(energy - gpu["gpu_energy_kwh"], 0.0)
            gpu = dict.fromkeys(gpu, 0.0) | {"gpu_model": "", "gpu_count": 0}
            methods |= {"gpu_method": "not counted: the run used no GPU", "gpu_measured": None}
        if intensity is not None:
            emissions = energy * intensity
        if self.force_carbon_intensity is not None:
            source = "given by user"
        elif self.region:
            source = f"CodeCarbon offline data for {self.country_iso_code}/{self.region}"
        else:
            source = f"CodeCarbon offline data for {self.country_iso_code}"
        return EnergyMeasurement(
            energy_kwh=energy,
            emissions_kg=emissions,
            ram_energy_kwh=float(data.ram_energy),
            ram_power_w=float(data.ram_power),
            duration_s=float(data.duration),
            cpu_model=str(data.cpu_model or ""),
            cpu_count=int(data.cpu_count or 0),
            country_iso_code=str(data.country_iso_code or self.country_iso_code),
            country_name=str(data.country_name or ""),
            region=data.region or None,
            # The intensity CodeCarbon actually applied, whatever its data path.
            carbon_intensity_kg_per_kwh=(emissions / energy) if energy > 0 else None,
            carbon_intensity_source=source,
            tracking_mode=str(data.tracking_mode),
            pue=float(data.pue),
            measure_power_secs=self.measure_power_secs,
            codecarbon_version=str(data.codecarbon_version),
            cpu_utilization_percent=float(data.cpu_utilization_percent or 0.0),
            **cpu,
            **gpu,
            **methods,
        )


def _process_cpu_seconds() -> dict[int, float]:
    """CPU seconds so far of this process (with its reaped children) and of each live descendant."""
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    seconds = {me.pid: times.user + times.system + times.children_user + times.children_system}
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it exited meanwhile
            child_times = child.cpu_times()
            seconds[child.pid] = child_times.user + child_times.system
    return seconds


def _cpu_seconds_between(start: Mapping[int, float], stop: Mapping[int, float]) -> float:
    """CPU seconds spent between two :func:`_process_cpu_seconds` readings."""
    return sum(max(seconds - start.get(pid, 0.0), 0.0) for pid, seconds in stop.items())


def device_kind(device: str) -> str:
    """The kind of a torch device written as text (``cuda:1`` -> ``cuda``), as energy rates record it."""
    return str(device).split(":")[0]


def options_for_device(options: Mapping[str, Any], device_type: str) -> dict[str, Any]:
    """:class:`EnergyMeter` ``options`` for a run on ``device_type`` (``"cpu"``, ``"cuda"``).

    A run on the CPU does not count the host's GPUs: NVML counts a GPU's whole draw, idle or
    another process's, which such a run does not cause (on an H200 host a CPU retrain was charged
    3.4e-5 kWh of GPU energy, 56% of its figure). A given ``count_gpu`` stands; a CUDA run counts
    what CodeCarbon tracks (the GPUs in ``CUDA_VISIBLE_DEVICES``, else every GPU of the host).
    """
    chosen = dict(options)
    if device_type == "cpu":
        chosen.setdefault("count_gpu", False)
    return chosen


@contextmanager
def measure_energy(**options: Any) -> Iterator[EnergyMeter]:
    """Measure the body of a ``with`` block; options are :class:`EnergyMeter`'s.

    The meter is yielded; after the block, ``meter.measurement`` holds the result. If the
    body raises, the tracker is still stopped (its figure stays in ``meter.measurement``)
    and the body's exception propagates; if only the measurement fails,
    :class:`EnergyMeasurementError` is raised.
    """
    meter = EnergyMeter(**options)
    with meter:
        yield meter


# --------------------------------------------------------------------------- per-host rate


#: Cost of evaluating a sample relative to training on it (forward vs forward + backward).
EVAL_SAMPLE_WEIGHT = 1.0 / 3.0


@dataclass(frozen=True)
class HostEnergyRate:
    """Joules per training sample-gradient on one host, and per measured run, refitted from real retrains.

    A single probe on a shared CPU swings by an order of magnitude (0.64 vs 0.045 J per
    sample-epoch in four runs), so the rate is fitted robustly over measured runs: the
    line ``joules = overhead_joules + joules_per_sample * work`` by Siegel's repeated
    medians, where work is ``samples trained + EVAL_SAMPLE_WEIGHT * samples evaluated``.
    The overhead is what a run costs whatever its length (starting the meter, copying the
    model, splitting the data): a median of ``joules / work`` spreads it over the work of a
    typical calibration run, so short retrains are underpriced (a digits retrain that
    trained on nothing measured 0.67 J where that median priced 0.08 J) and, when the
    calibration runs were short, long ones overpriced.
    When the line is not identified (fewer than three runs, all of one length, or a
    non-positive intercept or slope), the rate is that median and the overhead 0.
    ``spread`` is the median absolute deviation of measured over fitted, divided by its
    median. Evaluations count, so a retrain that needed no training is priced at its one
    evaluation and its overhead, never at 0 kWh. ``threads`` is the torch CPU thread count
    the runs trained at: on a CPU, CodeCarbon's load model prices the same work differently
    at another count (30% more at two threads than at one on a 2-core machine). ``device`` is
    the kind of device they trained on (``cpu`` or ``cuda``): a rate does not carry from one
    to the other.
    """

    joules_per_sample: float
    spread: float
    runs: int
    hardware: str | None = None
    overhead_joules: float = 0.0
    threads: int | None = None
    device: str | None = None

    def kwh(self, samples_trained: float, samples_evaluated: float) -> float:
        """Estimated energy of one measured run training on and evaluating that many samples."""
        return self.overhead_joules / KWH_TO_JOULES + self.marginal_kwh(samples_trained, samples_evaluated)

    def marginal_kwh(self, samples_trained: float, samples_evaluated: float) -> float:
        """Estimated energy of that much more work in a run already under way (its overhead already paid)."""
        return self.joules_per_sample * (samples_trained + EVAL_SAMPLE_WEIGHT * samples_evaluated) / KWH_TO_JOULES

    def device_mismatch(self, device: str) -> str | None:
        """Why a run on ``device`` (``cpu``, ``cuda`` or ``cuda:N``) is not priced by this rate; None when the kinds match or the rate records none."""
        kind = device_kind(device)
        if self.device is None or self.device == kind:
            return None
        on = self.device if self.hardware is None else f"{self.device} ({self.hardware})"
        return f"the energy rate was measured on {on} and this retrain runs on {kind}; the kWh it is priced and guarded by do not hold there"

    def thread_mismatch(self, threads: int) -> str | None:
        """Why a CPU run at ``threads`` torch threads may cost another kWh than this rate says; None when the counts match or the rate records none."""
        if self.threads is None or self.threads == threads:
            return None
        return (
            f"the energy rate was fitted at {self.threads} torch thread(s) and this retrain trains at {threads}; "
            "on a CPU the kWh it is priced and guarded by may be tens of percent off"
        )

    def mismatch(self, device: str, threads: int) -> tuple[str, str] | None:
        """What differs between this rate and a run on ``device`` at ``threads`` torch threads
        (``"device"``, or on a CPU ``"threads"``) and why it matters; None when nothing does."""
        why = self.device_mismatch(device)
        if why is not None:
            return "device", why
        why = self.thread_mismatch(threads) if device_kind(device) == "cpu" else None
        return None if why is None else ("threads", why)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HostEnergyRate":
        return cls(**{k: data[k] for k in ("joules_per_sample", "spread", "runs", "hardware", "overhead_joules", "threads", "device") if k in data})

    @classmethod
    def fit(
        cls, runs: Any, hardware: str | None = None, method: str = "per_run_overhead", threads: int | None = None, device: str | None = None
    ) -> "HostEnergyRate":
        """From ``(energy_kwh, samples_trained, samples_evaluated)`` triples of measured runs.

        ``method="median_ratio"`` skips the overhead (the median of ``joules / work``); it
        is kept for ``benchmarks/energy_rate.py``, which compares the two.
        """
        if method not in ("per_run_overhead", "median_ratio"):
            raise ValueError(f"method must be 'per_run_overhead' or 'median_ratio', got {method!r}")
        points = []
        for energy_kwh, trained, evaluated in runs:
            work = float(trained) + EVAL_SAMPLE_WEIGHT * float(evaluated)
            if energy_kwh is not None and energy_kwh > 0 and work > 0:
                points.append((energy_kwh * KWH_TO_JOULES, work))
        if not points:
            raise EnergyMeasurementError("no measured run with positive energy and work to fit the host's energy rate from.")
        joules, work = np.array(points).T
        overhead, rate = 0.0, float(np.median(joules / work))
        if method == "per_run_overhead" and len(points) >= 3 and np.ptp(work) > 0:
            from scipy.stats import siegelslopes

            slope, intercept = siegelslopes(joules, work)
            if slope > 0 and intercept > 0:
                overhead, rate = float(intercept), float(slope)
        ratios = joules / (overhead + rate * work)
        spread = float(np.median(np.abs(ratios - np.median(ratios))) / np.median(ratios))
        return cls(
            joules_per_sample=rate, spread=spread, runs=len(points), hardware=hardware, overhead_joules=overhead, threads=threads,
            device=device,
        )

    def refit(self, runs: Any) -> "HostEnergyRate":
        """A new rate from these runs; this one is kept when none of them was measured."""
        try:
            return HostEnergyRate.fit(runs, hardware=self.hardware, threads=self.threads, device=self.device)
        except EnergyMeasurementError:
            return self


def run_work(run: dict[str, Any]) -> tuple[float | None, float, float]:
    """``(energy_kwh, samples_trained, samples_evaluated)`` of a ``RetrainResult.to_dict()``."""
    energy = run.get("energy") or {}
    evaluated = len(run.get("curve") or []) * int(run.get("holdout_samples") or 0)
    return energy.get("energy_kwh"), float(run.get("samples_seen") or 0), float(evaluated)
