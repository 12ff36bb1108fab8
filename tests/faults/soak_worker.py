"""One watcher of the soak test: polls the landing folder (library pipeline, no Prefect) until
nothing has been left to do for a few polls, or its time is up. Settings come from the
environment (SHIFTCOST_*), as for any deployed watcher."""

from __future__ import annotations

import sys
import time

STARTED = time.monotonic()


def main(seconds: float, idle_polls: int) -> None:
    from shiftcost import pipeline
    from shiftcost.config import load_settings

    settings = load_settings()
    # Import what a poll needs before saying so (on a busy machine, a minute of imports).
    import shiftcost.drift
    import shiftcost.energy
    import shiftcost.index.engine
    import shiftcost.retrain  # noqa: F401

    print(f"ready after {time.monotonic() - STARTED:.1f} s", flush=True)
    deadline = time.monotonic() + seconds
    idle = 0
    with pipeline.connect(settings) as db:
        while time.monotonic() < deadline and idle < idle_polls:
            try:
                results = pipeline.watch_once(settings, db=db)
            except Exception as error:  # a poll that fails is logged; the watcher goes on, as the flow does
                print(f"poll failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                results = [None]
            idle = 0 if results else idle + 1
            print(f"{time.monotonic() - STARTED:.1f} s: poll handled {len(results)}", flush=True)
            if not results:
                time.sleep(0.5)


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=False)  # where a stuck watcher is, in its log
    main(float(sys.argv[1]), int(sys.argv[2]))
