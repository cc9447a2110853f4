"""Run the demo job the way `make demo` does.

With no frontier configured (``SLMBATCH_FRONTIER_URL`` unset), start the demo's
STAND-IN frontier - the demo's MiniLM with a head on its mean-pooled sentence
embedding (stronger than the small model's CLS head) behind a real
OpenAI-compatible server on 127.0.0.1 (``devkit.classifier_server``) - run the
job against it, and stop it. Exits with ``slmbatch run``'s status.
"""

import os
import sys
from pathlib import Path

from devkit.classifier_server import local_classifier_server
from slmbatch.cli import main as slmbatch_main

HERE = Path(__file__).resolve().parent
JOB = str(HERE / "banking77_demo.py")
STAND_IN = HERE.parent / "build" / "models" / "banking77-minilm-meanpool"


def main() -> int:
    args = ["run", JOB, "--fresh"]
    if os.environ.get("SLMBATCH_FRONTIER_URL"):
        print(f"demo: escalating low-confidence rows to {os.environ['SLMBATCH_FRONTIER_URL']}", flush=True)
        return slmbatch_main(args)
    print(
        "demo: no SLMBATCH_FRONTIER_URL set, so the frontier is a local STAND-IN: MiniLM with a stronger head\n"
        "demo: (on its mean-pooled sentence embedding) behind an OpenAI-compatible server on 127.0.0.1 -\n"
        "demo: better than the small model, billed at a hosted mini model's prices, but not an LLM.\n"
        "demo: Set SLMBATCH_FRONTIER_URL (and _MODEL, _KEY_ENV) for a real frontier.",
        flush=True,
    )
    # Not waiting for it: it loads while Ray and the small model start, and is up before the first
    # escalation (the client retries till then). Niced below Ray's workers (15), so that loading
    # it never takes the cores the small model's replica is starting on.
    with local_classifier_server(STAND_IN, served_name="stand-in-frontier", wait=False, timeout_s=120, nice=19) as url:
        os.environ.update(
            SLMBATCH_FRONTIER_URL=url, SLMBATCH_FRONTIER_MODEL="stand-in-frontier", SLMBATCH_FRONTIER_KEY_ENV=""
        )
        return slmbatch_main(args)


if __name__ == "__main__":
    sys.exit(main())
