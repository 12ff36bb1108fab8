"""What ``shiftcost calibrate`` costs a user on their own torchvision model, walked with commands only.

Usage: python benchmarks/calibrate_user_model.py [--workdir DIR] [--reuse] [-- CALIBRATE-OPTIONS...]

1. Trains a torchvision ``resnet18(num_classes=10)`` at 32x32 with plain PyTorch (on the GPU
   where there is one) on scikit-learn's bundled digits (8x8 upscaled to 32x32, 3 channels,
   ``Normalize`` with the training set's mean and std; nothing is downloaded) and saves its
   ``state_dict``.
   The images are split 60/20/20 into training, reference and new data, written as ``.npz``.
2. ``shiftcost model import`` turns the state dict into a model file.
3. ``shiftcost calibrate --model --reference --data`` with the default settings (or the
   options after ``--``), stdout to a file (not a terminal), its CPU time from ``getrusage``.
4. ``shiftcost forecast --json`` with the fitted forecaster on two shifted copies of the new
   data (stronger noise than the sweep's, and a translation the sweep never saw).

Prints the wall and CPU seconds of the calibration, the load average before and after (the
machine may be shared: CPU seconds are the load-independent figure), the points and
retraining runs it made and their statuses, the leave-one-kind-out summary (of the index stage,
and of both stages and the naive forecast on the points that needed training), and whether the forecast's interval is
finite. ``--reuse`` keeps the model trained and imported by an earlier
run in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHIFTCOST = [sys.executable, "-c", "import sys; from shiftcost.cli import main; sys.argv[0] = 'shiftcost'; sys.exit(main())"]


def digits_32() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 N x 3 x 32 x 32 in [0, 1], and their labels."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    return x.numpy(), digits.target.astype(np.int64)


def train_resnet18(x: np.ndarray, y: np.ndarray, mean: list[float], std: list[float], epochs: int, seed: int) -> Any:
    """Plain PyTorch training of torchvision's resnet18 with a ``Normalize`` in front, on the
    GPU where there is one (as its user would), returned on the CPU."""
    import torch
    import torchvision
    from torchvision import transforms

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    normalize = transforms.Normalize(mean, std)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xs)).to(device)
        for start in range(0, len(xs), 64):
            idx = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(normalize(xs[idx])), ys[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"  epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}", flush=True)
    return model.cpu()


def prepare(work: Path, epochs: int, seed: int) -> None:
    import torch

    torch.set_num_threads(2)
    x, y = digits_32()
    order = np.random.default_rng(seed).permutation(len(x))
    n_train, n_ref = int(0.6 * len(x)), int(0.2 * len(x))
    parts = {"train": order[:n_train], "reference": order[n_train : n_train + n_ref], "new": order[n_train + n_ref :]}
    for name, idx in parts.items():
        np.savez(work / f"{name}.npz", x=x[idx], y=y[idx])
    train_x = x[parts["train"]]
    mean = [float(v) for v in train_x.mean(axis=(0, 2, 3))]
    std = [float(v) for v in train_x.std(axis=(0, 2, 3))]
    print(f"training resnet18 on {len(train_x)} images (mean {mean[0]:.3f}, std {std[0]:.3f})", flush=True)
    model = train_resnet18(train_x, y[parts["train"]], mean, std, epochs, seed)
    torch.save(model.state_dict(), work / "resnet18_digits.pt")
    run(
        ["model", "import", str(work / "resnet18_digits.pt"), "--arch", "resnet18", "--image-size", "32", "--classes", "10",
         "--mean", ",".join(f"{v:.4f}" for v in mean), "--std", ",".join(f"{v:.4f}" for v in std),
         "--data", str(work / "reference.npz"), "-o", str(work / "model.safetensors")],
    )


def make_shifted(work: Path, seed: int) -> dict[str, Path]:
    """Shifted copies of the new data the forecast is asked about: stronger Gaussian noise than
    the sweep's strongest (0.2), and a 4-pixel translation, a kind the sweep never saw. Both
    take the model's accuracy below the target, so retraining has a cost to forecast."""
    new = np.load(work / "new.npz")
    shifted = {
        "noise_0.35": np.clip(new["x"] + np.random.default_rng(seed + 1).normal(0, 0.35, new["x"].shape), 0, 1),
        "translate_4px": np.roll(new["x"], 4, axis=3),
    }
    paths = {}
    for name, x in shifted.items():
        paths[name] = work / f"shifted_{name}.npz"
        np.savez(paths[name], x=x.astype(np.float32), y=new["y"])
    return paths


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    print("$ shiftcost " + " ".join(args), flush=True)
    done = subprocess.run(SHIFTCOST + args, text=True, capture_output=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"shiftcost {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    print(done.stdout[-1500:], flush=True)
    return done


def timed_calibrate(work: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    args = ["calibrate", "-m", str(work / "model.safetensors"), "-r", str(work / "reference.npz"), "-d", str(work / "new.npz"),
            "--out", str(out), *extra]
    print("$ shiftcost " + " ".join(args) + f" > {out}.stdout 2> {out}.stderr", flush=True)
    load_before = Path("/proc/loadavg").read_text().strip()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:
        code = subprocess.run(SHIFTCOST + args, stdout=stdout, stderr=stderr).returncode
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = Path("/proc/loadavg").read_text().strip()
    err = Path(f"{out}.stderr").read_text()
    if code != 0:
        sys.exit(f"calibrate failed ({code}):\n{err[-3000:]}")
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    progress = [line for line in err.splitlines() if line.startswith("calibrating [")]
    return {
        # ru_maxrss of children is the largest of any waited for: calibrate's, as it outgrows the import.
        "wall_s": wall, "cpu_s": user + system, "user_s": user, "system_s": system,
        "max_rss_mb": after.ru_maxrss / 1024, "load_before": load_before, "load_after": load_after,
        "progress_lines": len(progress), "last_progress": progress[-1] if progress else None,
    }


def summarise(out: Path) -> dict[str, Any]:
    sweep = json.loads((out / "sweep.json").read_text())
    rows = sweep["rows"]
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    loco = sweep.get("loco") or {}
    summary = loco.get("summary") or {}
    return {
        "points": len(rows),
        "points_measured": sum(1 for row in rows if not row.get("copy_of")),
        "retrain_runs": sum(len(row.get("runs") or []) for row in rows if not row.get("copy_of")),
        "statuses": statuses,
        "kinds": sorted({row["corruption"] for row in rows}),
        "stopped_early": sweep.get("settings", {}).get("stopped_early"),
        "timing": sweep.get("timing"),
        "loco": {k: summary.get(k) for k in ("n", "n_censored", "mdape_epochs", "coverage_epochs", "mdape_energy", "coverage_energy")},
        "cost_model_error": sweep.get("cost_model_error"),
        # Both forecast stages on the points that needed training (what decides whether forecasts probe),
        # beside the naive forecast (the other kinds' median epochs) they must beat.
        "stages": {stage: (sweep.get("loco_stages") or {}).get(stage) for stage in ("index", "probe", "constant")},
    }


def forecast(work: Path, out: Path, batch: Path) -> dict[str, Any]:
    started = time.perf_counter()
    done = run(["forecast", "-m", str(work / "model.safetensors"), "-r", str(out / "reference.safetensors"),
                "-b", str(batch), "-c", str(out / "forecaster.json"), "--json"])
    result = json.loads(done.stdout)
    epochs = result.get("epochs") or {}
    finite = all(isinstance(epochs.get(k), (int, float)) and math.isfinite(epochs[k]) for k in ("median", "low", "high"))
    return {
        "stage": result.get("stage"), "epochs": epochs, "energy_kwh": result.get("energy_kwh"), "accuracy": result.get("features", {}).get("accuracy"),
        "probe": result.get("probe"), "finite_epochs_interval": finite, "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shiftcost-calibrate-user"))
    parser.add_argument("--out-name", default="calibration")
    parser.add_argument("--forecast-only", action="store_true", help="Forecast with an existing --out-name calibration.")
    parser.add_argument("--reuse", action="store_true", help="Keep the model and data of an earlier run in --workdir.")
    parser.add_argument("--epochs", type=int, default=8, help="Epochs of the user's own training.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("calibrate_options", nargs="*", help="Options for shiftcost calibrate (after --).")
    options = parser.parse_args()
    work = options.workdir
    work.mkdir(parents=True, exist_ok=True)
    if not (options.reuse and (work / "model.safetensors").exists()):
        started = time.perf_counter()
        prepare(work, options.epochs, options.seed)
        print(f"prepared in {time.perf_counter() - started:.0f} s", flush=True)
    out = work / options.out_name
    if options.forecast_only:
        saved = json.loads((work / f"{options.out_name}.figures.json").read_text())
        timing = saved["calibrate"]
    else:
        timing = timed_calibrate(work, out, options.calibrate_options)
    figures = {"calibrate": timing, "sweep": summarise(out)}
    figures["forecast"] = {name: forecast(work, out, path) for name, path in make_shifted(work, options.seed).items()}
    print(json.dumps(figures, indent=1, default=str))
    (work / f"{options.out_name}.figures.json").write_text(json.dumps(figures, indent=1, default=str))
    t, s = figures["calibrate"], figures["sweep"]
    print(
        f"calibrate: {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU (user {t['user_s']:.0f}, sys {t['system_s']:.0f}), "
        f"max RSS {t['max_rss_mb']:.0f} MB; load {t['load_before']} -> {t['load_after']}; "
        f"{s['points']} points ({s['points_measured']} measured), {s['retrain_runs']} retrains, statuses {s['statuses']}; loco {s['loco']}; stages {s['stages']}; "
        + "; ".join(f"forecast {name}: epochs {f['epochs']} (stage {f['stage']})" for name, f in figures["forecast"].items())
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
