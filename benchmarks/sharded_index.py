"""A batch's indices in shards on a local Dask cluster against one pass in this process.

Usage: python benchmarks/sharded_index.py [--n 4096] [--shard-size 1024] [--workers 2]
                                          [--image-size 32] [--prefect]

Both sides compute every index of the same batch against the same reference stats (built
beforehand, not timed) on CPU:

- ``one_pass``: :func:`shiftcost.index.engine.assess` in this process;
- ``dask_shards``: :func:`shiftcost.index.shards.assess_in_shards` with the shards mapped
  onto a ``distributed.LocalCluster`` of ``--workers`` processes with one thread each
  (cluster start-up not timed; shipping the model, the reference stats and each shard's
  rows to the workers is);
- ``prefect_dask_shards`` (with ``--prefect``): the assess flow's sharded path
  (``flows.shards.forward_pass``: one Prefect task per shard on ``DaskTaskRunner``) against
  the same cluster, inside a flow on Prefect's temporary local server.

Printed JSON: wall seconds of each, the shard count, and the largest absolute difference
of any index between the sharded and the single pass (the target is 1e-12). On a shared
machine wall times move with the load; the differences do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from shiftcost.features import COST_FEATURES  # noqa: E402

INDEX_KEYS = COST_FEATURES  # the figures compared between the sharded and the single pass


def max_difference(a, b) -> float:
    first, second = a.to_dict(), b.to_dict()
    values = [abs(first[key] - second[key]) for key in INDEX_KEYS if first[key] is not None]
    for key in ("resque_dist_by_layer", "layer_shift_by_layer"):
        values += [abs(first[key][layer] - second[key][layer]) for layer in second[key]]
    return max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--prefect", action="store_true", help="also time the Prefect flow path (starts a temporary server)")
    args = parser.parse_args()

    import distributed

    from shiftcost.data.models import build_model
    from shiftcost.index.engine import assess, compute_reference_stats
    from shiftcost.index.shards import assess_in_shards

    torch.manual_seed(0)
    model, spec = build_model("digits_cnn", 10, in_channels=3, image_size=args.image_size)
    model.eval()
    shape = (3, args.image_size, args.image_size)
    x_ref, y_ref = torch.rand(1024, *shape), torch.arange(1024) % 10
    reference = compute_reference_stats(model, spec, x_ref, y_ref, device="cpu", max_samples=2000)
    x = (torch.rand(args.n, *shape) * 0.8 + 0.1).clamp(0, 1)
    y = torch.arange(args.n) % 10

    started = time.perf_counter()
    single = assess(model, spec, reference, x, y, device="cpu", check_model=False)
    one_pass_s = time.perf_counter() - started

    result: dict = {"n": args.n, "shard_size": args.shard_size, "shards": -(-args.n // args.shard_size), "workers": args.workers}
    with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            client.run(torch.set_num_threads, 1)
            started = time.perf_counter()
            sharded = assess_in_shards(
                model, spec, reference, x, y, shard_size=args.shard_size, device="cpu", check_model=False,
                map_shards=lambda one, shards: client.gather(client.map(one, shards, pure=False)),
            )  # fmt: skip
            dask_s = time.perf_counter() - started
        result.update(one_pass_s=round(one_pass_s, 3), dask_shards_s=round(dask_s, 3), dask_max_abs_difference=max_difference(sharded, single))
        if args.prefect:
            result.update(prefect_flow(model, spec, reference, x, y, args.shard_size, cluster.scheduler_address, single))
    result["threads_in_this_process"] = torch.get_num_threads()
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result, indent=2))


def prefect_flow(model, spec, reference, x, y, shard_size: int, address: str, single) -> dict:
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")  # the temporary server stops before the last log lines
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.shards import forward_pass
    from shiftcost.config import Settings

    @flow(name="sharded-index-benchmark", persist_result=False, validate_parameters=False)
    def run(settings: Settings, loaded: SimpleNamespace):
        started = time.perf_counter()
        report = forward_pass(settings, loaded)
        return report, time.perf_counter() - started

    loaded = SimpleNamespace(model=model, spec=spec, reference=reference, new_task=False, data=SimpleNamespace(x=x, y=y), batch_id=0)
    settings = Settings(device="cpu", index_shard_size=shard_size, dask_address=address)
    with prefect_test_harness(server_startup_timeout=180):
        report, seconds = run(settings, loaded)
    return {"prefect_dask_shards_s": round(seconds, 3), "prefect_max_abs_difference": max_difference(report, single)}


if __name__ == "__main__":
    main()
