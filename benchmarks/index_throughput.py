"""Throughput of the index engine against a plain forward pass and the papers' protocol.

Usage: python benchmarks/index_throughput.py [--n 512] [--n-demo 4096] [--device auto]
                                             [--quick] [--models cifar_resnet18,digits_cnn]

For each model (a CIFAR-style ResNet-18 and the demo CNN, both on synthetic 3x32x32
images, 10 classes), in one run on one machine:

(a) ``forward``: a plain forward pass over the N new images (same batch size, same
    host->device path, ``torch.inference_mode``), nothing else;
(b) ``index``: :func:`shiftcost.index.engine.assess` over the same N images against
    reference stats computed beforehand (not timed, as in production where they are
    built once per model version): hooks on several layers, RESQUE_dist on every layer,
    layer shift, embedding sample, k-means for inv_ARI, prediction statistics, image
    statistics. The model fingerprint is checked once when the stats are loaded, as the
    CLI does, not in the timed call;
(c) ``paper_protocol``: a re-creation of the published RESQUE/PreIndex code path
    (JEKimLab/AAAI2025RESQUE ``ReSQuE/Noise/driver.py`` + ``extractactivations.py``,
    ``ReSQuE/Task/RTask.py``, and the PreIndex per-sample histograms): for every class a
    fresh copy of the model for the clean and one for the shifted data (``copy.deepcopy``;
    the original saves and reloads the whole model), the class's indices found by
    iterating the data set, a ``DataLoader`` with batch size 1, a forward hook that moves
    each sample's activation to numpy and averages it there; per-class sums and arccos
    angles; per-sample ``numpy.histogram`` (32 bins) of clean and shifted vectors and
    ``scipy.stats.wasserstein_distance`` between them for every hooked layer wider than
    the number of classes; scikit-learn k-means started at the clean class centroids
    and ``adjusted_rand_score`` at the end. Like the original it needs the clean
    reference images on every run; unlike the original (three separate scripts) it
    runs each image through the model once and reuses those activations for all three
    indices, and its DataLoader uses no worker processes (the data are in memory) —
    both choices make (c) faster, not slower. Same layers as (b).

The new batch is a Gaussian-noise copy of the reference images, so (c) can pair them.
Printed JSON per model: seconds and images/s of (a), (b), (c); ``index_over_forward`` =
b/a; ``speedup_over_paper_protocol`` = c/b; ``speedup_new_data_only`` = the part of (c)
spent on the shifted images and the indices, over b (credits (c) with cached reference
activations). On CPU the headline figures use this process's CPU time (all threads),
which other processes on a shared machine disturb far less than wall time; wall-time
figures are printed beside them (``wall``). On CUDA the headline is wall time. Peak memory of (b) is measured at N and 10·N images, each in a fresh
subprocess fed by a streaming source (images generated chunk by chunk, so the input
itself does not grow): peak RSS on CPU (``VmHWM``, because ``getrusage`` max RSS carries
the parent's peak into a child on Linux), ``torch.cuda.max_memory_allocated`` on CUDA;
both for the whole child and for the pass alone (peak reset after setup). The demo CNN
runs on ``--n-demo`` images (default 8·N) so that its much cheaper pass lasts long
enough to time. Timings are medians over ``--repeats`` interleaved runs of (a) and (b);
compare figures within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
LAYERS = {
    "cifar_resnet18": ["fc:input", "layer1", "layer2", "layer3", "layer4"],
    "digits_cnn": ["fc:input", "features.2", "features.5", "features.8"],
}


# --------------------------------------------------------------------------- data and models


def synthetic_images(n: int, seed: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 3x32x32 images in [0, 1]: a per-class colour pattern plus noise; labels cycle 0..9."""
    generator = torch.Generator().manual_seed(seed)
    y = (torch.arange(offset, offset + n) % NUM_CLASSES).long()
    patterns = torch.Generator().manual_seed(12345)
    base = torch.rand(NUM_CLASSES, *IMAGE_SHAPE, generator=patterns)
    x = 0.6 * base[y] + 0.4 * torch.rand(n, *IMAGE_SHAPE, generator=generator)
    return x.clamp(0, 1), y


def shifted_copy(x: torch.Tensor) -> torch.Tensor:
    from shiftcost.shifts import corrupt

    return corrupt(x, "gaussian_noise", 0.1, seed=7, clamp=True)


def make_model(architecture: str) -> tuple[nn.Module, Any]:
    from shiftcost.data.models import build_model

    torch.manual_seed(0)
    return build_model(architecture, NUM_CLASSES, in_channels=3, image_size=32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time and this process's CPU time (all threads) since start, in seconds."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def lap(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


# --------------------------------------------------------------------------- (a) and (b)


def plain_forward(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> tuple[float, float]:
    from shiftcost.index.capture import iter_chunks, prepare_model, to_device

    model, channels_last = prepare_model(model, device)
    sync(device)
    clock = Clock()
    with torch.inference_mode():
        for chunk, _ in iter_chunks(x, None, batch_size):
            model(to_device(chunk, device, channels_last))
    sync(device)
    return clock.lap()


def index_pass(
    model: nn.Module, spec: Any, reference: Any, x: Any, y: Any, batch_size: int, device: torch.device
) -> tuple[tuple[float, float], Any]:
    from shiftcost.index.engine import assess

    sync(device)
    clock = Clock()
    report = assess(model, spec, reference, x, y, batch_size=batch_size, device=device, check_model=False)
    sync(device)
    return clock.lap(), report


# --------------------------------------------------------------------------- (c) the papers' protocol


class PaperActivations:
    """The published ``ExtractLayerActivations``: hooks that move each output to numpy."""

    def __init__(self, model: nn.Module, device: torch.device, layers: list[str], loader: Any) -> None:
        self.model, self.device, self.loader = model, device, loader
        self.output: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
        modules = dict(model.named_modules())
        for layer in layers:
            name, _, where = layer.partition(":")
            if where == "input":  # the penultimate features: the classifier's input
                modules[name].register_forward_pre_hook(self._hook(layer, from_input=True))
            else:
                modules[name].register_forward_hook(self._hook(layer))

    def _hook(self, layer: str, from_input: bool = False):  # noqa: ANN202
        def hook(module: nn.Module, inputs: Any, output: Any = None) -> None:
            value = inputs[0] if from_input else output
            data = value.cpu().detach().numpy()
            data = data.reshape(*data.shape[:2], -1).mean(axis=-1)  # spatial mean in numpy, per sample
            self.output[layer].append(data)

        return hook

    def forward_pass(self) -> dict[str, np.ndarray]:
        with torch.no_grad():
            self.model.eval()
            for x, _ in self.loader:
                self.model(x.to(self.device))
        return {layer: np.concatenate(chunks).T for layer, chunks in self.output.items()}  # (D, n) as published


def paper_protocol(
    model: nn.Module, clean_x: torch.Tensor, noisy_x: torch.Tensor, y: torch.Tensor, layers: list[str], device: torch.device
) -> dict[str, float]:
    from scipy.stats import wasserstein_distance
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from torch.utils.data import DataLoader, Subset, TensorDataset

    clean_set, noisy_set = TensorDataset(clean_x, y), TensorDataset(noisy_x, y)
    # The published code runs the model as built (NCHW); undo the engine's channels_last.
    model = model.to(device, memory_format=torch.contiguous_format).eval()
    timings = {phase: [0.0, 0.0] for phase in ("clean", "shifted", "indices")}  # [wall, cpu]

    def charge(phase: str, clock: Clock) -> None:
        wall, cpu = clock.lap()
        timings[phase][0] += wall
        timings[phase][1] += cpu

    angles: list[float] = []
    clean_by_layer: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    noisy_by_layer: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    labels: list[np.ndarray] = []
    for cls in range(NUM_CLASSES):
        clock = Clock()
        model_1 = copy.deepcopy(model).to(device)
        clean_indices = [i for i, (_, label) in enumerate(clean_set) if label == cls]
        clean_loader = DataLoader(Subset(clean_set, clean_indices), batch_size=1, shuffle=False, num_workers=0)
        clean = PaperActivations(model_1, device, layers, clean_loader).forward_pass()
        charge("clean", clock)

        clock = Clock()
        model_2 = copy.deepcopy(model).to(device)
        noise_indices = [i for i, (_, label) in enumerate(noisy_set) if label == cls]
        noise_loader = DataLoader(Subset(noisy_set, noise_indices), batch_size=1, shuffle=False, num_workers=0)
        noisy = PaperActivations(model_2, device, layers, noise_loader).forward_pass()
        charge("shifted", clock)

        clock = Clock()
        primary = layers[0]
        clean_sum = np.sum(clean[primary], axis=1)
        noise_sum = np.sum(noisy[primary], axis=1)
        clean_norm = clean_sum / np.linalg.norm(clean_sum)
        noise_norm = noise_sum / np.linalg.norm(noise_sum)
        angles.append(float(np.arccos(np.clip(np.dot(clean_norm, noise_norm), -1.0, 1.0)) / np.pi))
        for layer in layers:
            clean_by_layer[layer].append(clean[layer].T)
            noisy_by_layer[layer].append(noisy[layer].T)
        labels.append(np.full(len(noise_indices), cls))
        charge("indices", clock)

    clock = Clock()
    # PreIndex p: per-sample histograms over each sample's own range, scipy W1 between pairs.
    per_layer = []
    for layer in layers:
        clean_rows = np.concatenate(clean_by_layer[layer])
        noisy_rows = np.concatenate(noisy_by_layer[layer])
        if clean_rows.shape[1] <= NUM_CLASSES:
            continue
        total = 0.0
        for clean_row, noisy_row in zip(clean_rows, noisy_rows):
            p = np.histogram(clean_row, bins=32)[0] / clean_row.shape[0]
            q = np.histogram(noisy_row, bins=32)[0] / noisy_row.shape[0]
            total += wasserstein_distance(p, q)
        per_layer.append(total)
    n = sum(len(part) for part in labels)
    preindex_p = float(np.mean(per_layer) / n)
    # inv_ARI: k-means on the shifted embeddings started at the clean class centroids.
    clean_primary = np.concatenate(clean_by_layer[layers[0]])
    noisy_primary = np.concatenate(noisy_by_layer[layers[0]])
    truth = np.concatenate(labels)
    centroids = np.stack([clean_primary[truth == k].mean(axis=0) for k in range(NUM_CLASSES)])
    clusters = KMeans(n_clusters=NUM_CLASSES, init=centroids, n_init=1, random_state=0).fit_predict(noisy_primary)
    inv_ari = 1.0 - adjusted_rand_score(truth, clusters)
    charge("indices", clock)
    return {
        "wall": sum(t[0] for t in timings.values()),
        "cpu": sum(t[1] for t in timings.values()),
        "wall_clean_pass": timings["clean"][0],
        "cpu_clean_pass": timings["clean"][1],
        "resque_dist": float(np.mean(angles)),
        "preindex_p": preindex_p,
        "inv_ari": float(inv_ari),
    }


# --------------------------------------------------------------------------- peak memory


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def host_peak_bytes() -> int:
    """This process's peak resident memory.

    Linux ``VmHWM`` where available: ``getrusage`` max RSS survives ``exec`` and so reports
    the parent benchmark's peak in a fresh child; elsewhere ``ru_maxrss``.
    """
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_host_peak() -> bool:
    """Restart the peak at the current resident size (Linux ``clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def stream(n: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic shifted images generated chunk by chunk, so the input never exists whole."""
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        x, y = synthetic_images(count, seed + start, offset=start)
        yield shifted_copy(x), y


def memory_child(architecture: str, n: int, batch_size: int, device_name: str, reference_n: int) -> None:
    """Runs in a fresh process: one ``assess`` over a stream of n images; prints peak memory."""
    from shiftcost.index.capture import resolve_device
    from shiftcost.index.engine import assess, compute_reference_stats

    device = resolve_device(device_name)
    model, spec = make_model(architecture)
    x_ref, y_ref = synthetic_images(reference_n, seed=0)
    # The embedding sample is full after reference_n images, so state stops growing there.
    reference = compute_reference_stats(
        model, spec, x_ref, y_ref, layers=LAYERS[architecture], batch_size=batch_size, device=device, max_samples=reference_n
    )
    del x_ref, y_ref
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        setup_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        reset = True
    else:
        setup_peak = host_peak_bytes()
        before = (_proc_status_kb("VmRSS") or 0) * 1024
        reset = reset_host_peak()
    report = assess(model, spec, reference, stream(n, batch_size, seed=99), batch_size=batch_size, device=device, check_model=False)
    pass_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else host_peak_bytes()
    print(json.dumps({
        "peak_bytes": max(setup_peak, pass_peak),
        "pass_peak_bytes": pass_peak if reset else None,
        "before_bytes": before,
        "samples": report.samples,
    }))


def measure_memory(architecture: str, n: int, batch_size: int, device: torch.device) -> dict[str, Any]:
    reference_n = min(n, 512)
    results = {}
    for label, count in (("n", n), ("10n", 10 * n)):
        done = subprocess.run(
            [sys.executable, __file__, "--memory-child", architecture, "--n", str(count), "--batch-size", str(batch_size),
             "--device", str(device), "--reference-n", str(reference_n), "--threads", str(torch.get_num_threads())],
            capture_output=True, text=True, check=True,
        )
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    mb = lambda value: None if value is None else round(value / 2**20, 1)  # noqa: E731
    peak_n, peak_10n = results["n"]["peak_bytes"], results["10n"]["peak_bytes"]
    pass_n, pass_10n = results["n"]["pass_peak_bytes"], results["10n"]["pass_peak_bytes"]
    out: dict[str, Any] = {
        "measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM (peak RSS) of the child",
        "images": [n, 10 * n],
        "peak_mb_at_n": mb(peak_n),
        "peak_mb_at_10n": mb(peak_10n),
        "peak_ratio_10n_over_n": round(peak_10n / peak_n, 4),
    }
    if pass_n is not None and pass_10n is not None:
        # The pass alone: peak while assess ran, and what it added above the memory held before it.
        out.update(
            pass_peak_mb_at_n=mb(pass_n),
            pass_peak_mb_at_10n=mb(pass_10n),
            pass_peak_ratio_10n_over_n=round(pass_10n / pass_n, 4),
            pass_growth_mb_at_n=mb(pass_n - results["n"]["before_bytes"]),
            pass_growth_mb_at_10n=mb(pass_10n - results["10n"]["before_bytes"]),
        )
    return out


# --------------------------------------------------------------------------- driver


def bench_model(architecture: str, n: int, batch_size: int, device: torch.device, repeats: int, memory: bool) -> dict[str, Any]:
    import statistics

    from shiftcost.index.engine import compute_reference_stats

    model, spec = make_model(architecture)
    layers = LAYERS[architecture]
    clean_x, y = synthetic_images(n, seed=0)
    noisy_x = shifted_copy(clean_x)
    reference = compute_reference_stats(model, spec, clean_x, y, layers=layers, batch_size=batch_size, device=device)
    reference.check_compatible(model)  # once, as when the stats file is loaded

    # Warm-up: first calls pay for lazy imports, allocator growth and kernel selection.
    plain_forward(model, noisy_x[: 2 * batch_size], batch_size, device)
    index_pass(model, spec, reference, noisy_x[: 2 * batch_size], y[: 2 * batch_size], batch_size, device)
    forward_runs, index_runs = [], []  # (wall, cpu) per repeat, (a) and (b) interleaved
    report = None
    for _ in range(repeats):
        forward_runs.append(plain_forward(model, noisy_x, batch_size, device))
        seconds, report = index_pass(model, spec, reference, noisy_x, y, batch_size, device)
        index_runs.append(seconds)
    paper = paper_protocol(model, clean_x, noisy_x, y, layers, device)

    # CPU time of this process is what the work costs, whatever else the machine runs;
    # on CUDA the work is on the GPU, so wall time is the measure there.
    clock = 1 if device.type == "cpu" else 0
    median = lambda runs, k: statistics.median(run[k] for run in runs)  # noqa: E731
    a, b = median(forward_runs, clock), median(index_runs, clock)
    c, c_clean = paper[("wall", "cpu")[clock]], paper[("wall_clean_pass", "cpu_clean_pass")[clock]]
    a_wall, b_wall = median(forward_runs, 0), median(index_runs, 0)
    assert report is not None
    return {
        "model": architecture,
        "layers": layers,
        "n": n,
        "batch_size": batch_size,
        "timing": ("wall time", "process CPU time")[clock] + f", median of {repeats} interleaved runs for (a) and (b)",
        "forward_seconds": round(a, 4),
        "index_seconds": round(b, 4),
        "paper_protocol_seconds": round(c, 4),
        "forward_images_per_s": round(n / a, 1),
        "index_images_per_s": round(n / b, 1),
        "paper_protocol_images_per_s": round(n / c, 2),
        "index_over_forward": round(b / a, 4),
        "speedup_over_paper_protocol": round(c / b, 2),
        "speedup_new_data_only": round((c - c_clean) / b, 2),
        "index_over_forward_per_repeat": [round(ib[clock] / fa[clock], 4) for fa, ib in zip(forward_runs, index_runs)],
        "wall": {
            "forward_seconds": round(a_wall, 4),
            "index_seconds": round(b_wall, 4),
            "paper_protocol_seconds": round(paper["wall"], 4),
            "index_over_forward": round(b_wall / a_wall, 4),
            "speedup_over_paper_protocol": round(paper["wall"] / b_wall, 2),
        },
        "indices": {
            "engine": {"resque_dist": report.resque_dist, "inv_ari": report.inv_ari, "layer_shift": report.layer_shift},
            "paper_protocol": {k: paper[k] for k in ("resque_dist", "inv_ari", "preindex_p")},
        },
        **({"memory": measure_memory(architecture, n, batch_size, device)} if memory else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="images per measurement for ResNet-18 (default 512, 128 with --quick)")
    parser.add_argument(
        "--n-demo", type=int, default=None, help="images per measurement for the demo CNN (default 8x --n: its pass is ~50x cheaper)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None, help="runs of (a) and (b) (default 5, 1 with --quick)")
    parser.add_argument("--models", default="cifar_resnet18,digits_cnn")
    parser.add_argument("--quick", action="store_true", help="small N, one repeat: a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference-n", type=int, default=512, help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.n or (128 if args.quick else 512)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_child:
        memory_child(args.memory_child, n, args.batch_size, args.device, args.reference_n)
        return

    from shiftcost.index.capture import resolve_device

    device = resolve_device(args.device)
    repeats = args.repeats or (1 if args.quick else 5)
    sizes = {"digits_cnn": args.n_demo or 8 * n}
    results = [
        bench_model(name.strip(), sizes.get(name.strip(), n), args.batch_size, device, repeats, not args.no_memory)
        for name in args.models.split(",")
        if name.strip()
    ]
    machine = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
