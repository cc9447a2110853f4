"""Run the demo job the way `make demo` does.

With no frontier configured (``SLMBATCH_FRONTIER_URL`` unset), start the demo's
STAND-IN frontier - the demo's MiniLM with a head on its mean-pooled sentence
embedding (stronger than the small model's CLS head) behind a real
OpenAI-compatible server on 127.0.0.1 (``devkit.classifier_server``) - run the
job against it, and stop it. Exits with ``slmbatch run``'s status.
"""

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from devkit.classifier_server import local_classifier_server
from slmbatch.cli import main as slmbatch_main

HERE = Path(__file__).resolve().parent
JOB = str(HERE / "banking77_demo.py")
STAND_IN = HERE.parent / "build" / "models" / "banking77-minilm-meanpool"
STAND_IN_NAME = "stand-in-frontier"


@contextlib.contextmanager
def stand_in_frontier() -> Iterator[str]:
    """Start the stand-in frontier and point the demo job at it (environment); stop it on exit.

    Not waited for: it loads while Ray and the small model's replica start,
    and is up before the first escalation (the client retries till then). It
    loads on a thread at niceness 19, below Ray's workers (15), and answers
    at the default priority, so that escalated rows do not wait behind the
    replica's batches.
    """
    # 600 s only means "it hangs": on a 2-core box busy with other work its load took over 120 s.
    server = local_classifier_server(STAND_IN, served_name=STAND_IN_NAME, wait=False, timeout_s=600, load_nice=19)
    with server as url:
        os.environ.update(
            SLMBATCH_FRONTIER_URL=url, SLMBATCH_FRONTIER_MODEL=STAND_IN_NAME, SLMBATCH_FRONTIER_KEY_ENV=""
        )
        try:
            yield url
        finally:
            for name in ("SLMBATCH_FRONTIER_URL", "SLMBATCH_FRONTIER_MODEL", "SLMBATCH_FRONTIER_KEY_ENV"):
                os.environ.pop(name, None)


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
    with stand_in_frontier():
        return slmbatch_main(args)


if __name__ == "__main__":
    sys.exit(main())
