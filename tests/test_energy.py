"""The energy meter against the real CodeCarbon tracker (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from shiftcost.energy import EnergyMeasurement, EnergyMeasurementError, EnergyMeter, measure_energy, options_for_device
from shiftcost.errors import ConfigError
from shiftcost.retrain import probe_joules_per_sample_epoch

LOCKFILE = Path(tempfile.gettempdir()) / ".codecarbon.lock"


def busy_work(units: int) -> int:
    """A fixed amount of single-threaded CPU work (not a fixed time)."""
    total = 0
    for _ in range(units):
        total += sum(i * i for i in range(200_000))
    return total


@pytest.fixture(autouse=True)
def in_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # CodeCarbon reads ./.codecarbon.config and writes emissions.csv to the cwd by default.
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.lower().startswith("codecarbon_"):
            monkeypatch.delenv(key)
    return tmp_path


def test_measurement_is_positive_complete_and_writes_nothing(in_empty_dir: Path) -> None:
    lock_before = LOCKFILE.exists()
    with measure_energy(country_iso_code="usa", measure_power_secs=0.2) as meter:
        busy_work(2)
    m = meter.measurement
    assert isinstance(m, EnergyMeasurement)
    assert m.energy_kwh > 0 and m.emissions_kg > 0 and m.duration_s > 0
    assert m.energy_kwh == pytest.approx(m.cpu_energy_kwh + m.gpu_energy_kwh + m.ram_energy_kwh, rel=1e-9)
    assert m.cpu_power_w > 0 and m.ram_power_w > 0
    assert m.country_iso_code == "USA" and m.country_name == "United States"
    assert m.carbon_intensity_kg_per_kwh == pytest.approx(m.emissions_kg / m.energy_kwh)
    assert m.codecarbon_version.startswith("3.3")
    assert m.cpu_model
    # How each figure was obtained: CPU measured exactly when CodeCarbon finds RAPL.
    from codecarbon.core.cpu import is_rapl_available

    assert m.cpu_measured == is_rapl_available()
    assert m.cpu_method.startswith("measured" if m.cpu_measured else "estimated")
    assert not m.ram_measured and m.ram_method.startswith("estimated")
    assert (m.gpu_measured is None) == (m.gpu_count == 0)
    # Nothing written: no emissions.csv, no lock file.
    assert list(in_empty_dir.iterdir()) == []
    if not lock_before:
        assert not LOCKFILE.exists()


def test_energy_scales_with_work() -> None:
    measured = {}
    for units in (12, 72):  # about 0.1 s and 0.6 s of work on an idle core
        with measure_energy(measure_power_secs=0.2) as meter:
            busy_work(units)
        measured[units] = meter.measurement
    ratio = measured[72].energy_kwh / measured[12].energy_kwh
    cpu_ratio = measured[72].cpu_energy_kwh / measured[12].cpu_energy_kwh
    # Six times the work. The CPU part follows the process's CPU seconds (5.3-6.9 in five pairs
    # on an idle 2-core host; CodeCarbon's sampled figure gave 5.4-319), but a unit's CPU time is
    # not fixed on a shared host: on a 2-core AMD EPYC, 11.5-15.1 ms from run to run alone and
    # 11.7-15.8 ms beside a busy neighbour, and a CI run there measured 3.9. So the bound is a
    # factor of two either way: a figure that did not follow the work (a fixed charge per run,
    # say) still fails it.
    # The RAM part is CodeCarbon's sampled figure: 0.65-2.8 times its own power x wall time in
    # six pairs on a 2-core AMD EPYC, so the total's ratio ran 4.5-13.3 there, and 21 beside a
    # second test process. Only its growth is asserted.
    assert 3.0 < cpu_ratio < 12.0
    assert ratio > 2.0
    assert measured[72].emissions_kg > measured[12].emissions_kg


def _estimated_cpu_tdp_and_cores() -> tuple[float, int]:
    with measure_energy(measure_power_secs=0.2) as meter:
        busy_work(1)
    if meter.measurement.cpu_measured:
        pytest.skip("the CPU is measured through an energy counter here, not estimated from its load")
    from codecarbon.core.util import count_cpus

    return meter.measurement.cpu_tdp_w, count_cpus()


def test_cpu_energy_is_the_tdp_model_over_the_runs_cpu_seconds() -> None:
    tdp, cores = _estimated_cpu_tdp_and_cores()
    with measure_energy(measure_power_secs=0.2) as meter:
        before = time.process_time()
        busy_work(36)
        cpu_seconds = time.process_time() - before
    m = meter.measurement
    # The meter's window also holds CodeCarbon's sampling threads, a few milliseconds here.
    assert m.cpu_energy_kwh * 3.6e6 == pytest.approx(tdp * cpu_seconds / cores, rel=0.1)
    assert m.cpu_power_w == pytest.approx(m.cpu_energy_kwh * 3.6e6 / m.duration_s)
    assert m.energy_kwh == pytest.approx(m.cpu_energy_kwh + m.ram_energy_kwh + m.gpu_energy_kwh)
    assert m.carbon_intensity_kg_per_kwh == pytest.approx(m.emissions_kg / m.energy_kwh)
    assert m.cpu_method.startswith("estimated: process CPU time x TDP / cores")


def test_cpu_energy_counts_the_child_processes_work() -> None:
    import resource

    tdp, cores = _estimated_cpu_tdp_and_cores()
    child_work = "total = 0\nfor _ in range(36):\n    total += sum(i * i for i in range(200_000))"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with measure_energy(measure_power_secs=0.2) as meter:
        subprocess.run([sys.executable, "-c", child_work], check=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    # The parent only waits, so nearly all of the run's CPU seconds are the child's.
    assert meter.measurement.cpu_energy_kwh * 3.6e6 == pytest.approx(tdp * child_seconds / cores, rel=0.25)


def test_machine_mode_keeps_codecarbons_sampled_cpu_figure() -> None:
    with measure_energy(measure_power_secs=0.2, tracking_mode="machine") as meter:
        busy_work(1)
    m = meter.measurement
    assert m.tracking_mode == "machine"
    assert m.cpu_measured or m.cpu_method.startswith("estimated: CPU load x TDP")


def test_country_changes_carbon_intensity_not_energy_accounting() -> None:
    intensities = {}
    for country in ("USA", "FRA"):
        with measure_energy(country_iso_code=country, measure_power_secs=0.2) as meter:
            busy_work(1)
        intensities[country] = meter.measurement.carbon_intensity_kg_per_kwh
    # France's nuclear-heavy grid is far cleaner than the US average in CodeCarbon's data.
    assert intensities["FRA"] < 0.5 * intensities["USA"]


def test_unknown_country_is_refused_before_measuring() -> None:
    # CodeCarbon itself would silently fall back to a world average.
    with pytest.raises(ConfigError, match="'XYZ'.*3-letter ISO"):
        EnergyMeter(country_iso_code="XYZ")
    with pytest.raises(ConfigError, match="close: .*FRA"):
        EnergyMeter(country_iso_code="FRX")


def test_swallowed_codecarbon_failure_is_a_failed_measurement(in_empty_dir: Path) -> None:
    # A malformed value in ./.codecarbon.config: CodeCarbon logs it, sets the PUE to None,
    # and every measurement raises inside its suppress(); stop() returns None.
    (in_empty_dir / ".codecarbon.config").write_text("[codecarbon]\npue = not-a-number\n")
    meter = EnergyMeter(measure_power_secs=0.2)
    meter.start()
    busy_work(1)
    with pytest.raises(EnergyMeasurementError, match="energy measurement failed"):
        meter.stop()
    assert meter.measurement is None
    # Stopping again does not touch the tracker and still reports the failure.
    with pytest.raises(EnergyMeasurementError):
        meter.stop()


def test_failure_inside_body_keeps_the_body_exception(in_empty_dir: Path) -> None:
    (in_empty_dir / ".codecarbon.config").write_text("[codecarbon]\npue = not-a-number\n")
    with pytest.raises(ZeroDivisionError):
        with measure_energy(measure_power_secs=0.2) as meter:
            1 / 0
    assert meter.measurement is None and isinstance(meter.error, EnergyMeasurementError)


def test_body_exception_still_yields_the_measurement() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with measure_energy(measure_power_secs=0.2) as meter:
            busy_work(1)
            raise RuntimeError("boom")
    assert meter.measurement is not None and meter.measurement.energy_kwh > 0


def test_one_tracker_per_run() -> None:
    meter = EnergyMeter(measure_power_secs=0.2).start()
    busy_work(1)
    first = meter.stop()
    time.sleep(0.3)
    assert meter.stop() is first  # cached, not a second record
    with pytest.raises(RuntimeError, match="one run"):
        meter.start()


def test_save_to_file_writes_one_row(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with measure_energy(save_to_file=True, output_dir=str(out), measure_power_secs=0.2):
        busy_work(1)
    lines = (out / "emissions.csv").read_text().strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("timestamp")


def test_measurement_round_trips_through_json() -> None:
    with measure_energy(measure_power_secs=0.2) as meter:
        busy_work(1)
    data = json.loads(json.dumps(meter.measurement.to_dict(), allow_nan=False))
    assert EnergyMeasurement.from_dict(data) == meter.measurement


def test_probe_joules_per_sample_epoch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    spec = SimpleNamespace(architecture="tiny_mlp", num_classes=3, in_channels=1, image_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = probe_joules_per_sample_epoch(model, spec, samples=64, epochs=2, batch_size=16, min_seconds=0.3, device="cpu")
    assert result.epochs >= 2 and result.steps == result.epochs * 4
    assert result.joules_per_sample_epoch > 0
    sample_epochs = result.samples * result.epochs
    assert result.joules_per_sample_epoch == pytest.approx(result.energy.energy_joules / sample_epochs)
    assert result.hardware.startswith("cpu:")
    assert result.input_shape == (1, 4, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    json.dumps(result.to_dict(), allow_nan=False)


def test_a_run_that_used_no_gpu_is_not_charged_the_hosts_gpus() -> None:
    assert options_for_device({"experiment_name": "x"}, "cpu") == {"experiment_name": "x", "count_gpu": False}
    assert options_for_device({"experiment_name": "x"}, "cuda") == {"experiment_name": "x"}
    assert options_for_device({"count_gpu": True}, "cpu") == {"count_gpu": True}
    # What CodeCarbon reported on an H200 host for a retrain on the CPU (its components' sum).
    cpu, gpu, ram, intensity = 2.2162e-05, 3.3725e-05, 3.916e-06, 0.369473
    total = cpu + gpu + ram
    reported = SimpleNamespace(
        energy_consumed=total, emissions=total * intensity, cpu_energy=cpu, gpu_energy=gpu, ram_energy=ram, cpu_power=39.6,
        gpu_power=261.7, ram_power=10.0, duration=1.78, cpu_model="Xeon", gpu_model="1 x NVIDIA H200", gpu_count=1, cpu_count=16,
        country_iso_code="USA", country_name="United States", region=None, tracking_mode="process", pue=1.0,
        codecarbon_version="3.3.2", cpu_utilization_percent=50.0, gpu_utilization_percent=0.0,
    )
    counted = EnergyMeter()._to_measurement(reported)
    assert counted.energy_kwh == total and counted.gpu_energy_kwh == gpu and counted.gpu_count == 1
    left_out = EnergyMeter(count_gpu=False)._to_measurement(reported)
    assert left_out.energy_kwh == pytest.approx(cpu + ram) and left_out.emissions_kg == pytest.approx((cpu + ram) * intensity)
    assert left_out.gpu_energy_kwh == 0 and left_out.gpu_power_w == 0 and left_out.gpu_count == 0 and left_out.gpu_model == ""
    assert left_out.gpu_measured is None and left_out.gpu_method.startswith("not counted")
    assert left_out.cpu_energy_kwh == cpu and left_out.ram_energy_kwh == ram and left_out.carbon_intensity_kg_per_kwh == pytest.approx(intensity)


@pytest.mark.parametrize("run", ["retrain", "probe", "energy_probe"])
def test_retrains_and_probes_on_the_cpu_meter_no_gpu(monkeypatch, run: str) -> None:
    import shiftcost.energy
    import shiftcost.retrain.energy_probe
    import shiftcost.retrain.loop
    from shiftcost.forecast.probe import run_probe
    from shiftcost.retrain import retrain_to_cutoff

    built: list[dict] = []

    class Recording(EnergyMeter):
        def __init__(self, **options) -> None:
            built.append(options)
            super().__init__(**options)

    for module in (shiftcost.energy, shiftcost.retrain.loop, shiftcost.retrain.energy_probe):
        monkeypatch.setattr(module, "EnergyMeter", Recording)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(60, 1, 4, 4), torch.randint(0, 3, (60,))
    if run == "retrain":
        retrain_to_cutoff(model, x, y, target_accuracy=1.0, max_steps=2, device="cpu", energy_options={"measure_power_secs": 0.2})
    elif run == "probe":
        run_probe(model, x, y, target_accuracy=0.9, ceiling=0.95, steps=2, samples=20, batch_size=8, track_energy=True, device="cpu")
    else:
        spec = SimpleNamespace(architecture="tiny", num_classes=3, in_channels=1, image_size=4)
        probe_joules_per_sample_epoch(model, spec, samples=32, epochs=1, batch_size=16, min_seconds=0.1, device="cpu")
    assert len(built) == 1 and built[0]["count_gpu"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_host_only_the_run_on_the_gpu_is_charged_its_draw() -> None:
    from shiftcost.retrain import retrain_to_cutoff

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 3))
    x, y = torch.rand(2000, 1, 16, 16), torch.randint(0, 3, (2000,))
    runs = {
        device: retrain_to_cutoff(model, x, y, target_accuracy=1.0, max_steps=300, device=device, energy_options={"measure_power_secs": 0.2})
        for device in ("cpu", "cuda")
    }
    on_cpu, on_gpu = runs["cpu"].energy, runs["cuda"].energy
    assert on_cpu.gpu_energy_kwh == 0 and on_cpu.gpu_count == 0 and on_cpu.gpu_method.startswith("not counted")
    assert on_cpu.energy_kwh == pytest.approx(on_cpu.cpu_energy_kwh + on_cpu.ram_energy_kwh)
    # NVML reads the GPU's whole draw; an idle H200 alone draws tens of watts.
    assert on_gpu.gpu_count >= 1 and on_gpu.gpu_energy_kwh > 0
    assert on_gpu.energy_kwh == pytest.approx(on_gpu.cpu_energy_kwh + on_gpu.gpu_energy_kwh + on_gpu.ram_energy_kwh)


def test_importing_retrain_does_not_import_codecarbon() -> None:
    code = "import sys, shiftcost.retrain, shiftcost.energy; assert 'codecarbon' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(autouse=True)
def one_torch_thread() -> None:
    # Small models on a shared 2-core machine run far faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
