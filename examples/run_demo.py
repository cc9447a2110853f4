"""Run the demo job the way `make demo` does.

If no frontier is configured (``SLMBATCH_FRONTIER_URL`` unset), start a local
OpenAI-compatible vLLM server with the demo's tiny random model as the
frontier, run the job against it, and stop it. Then print what was written.
"""

import os
import sys
from pathlib import Path

from devkit.localserver import local_openai_server
from slmbatch.cli import main as slmbatch_main

HERE = Path(__file__).resolve().parent
JOB = str(HERE / "banking77_demo.py")


def main() -> int:
    args = ["run", JOB, "--fresh"]
    if os.environ.get("SLMBATCH_FRONTIER_URL"):
        print(f"demo: escalating low-confidence rows to {os.environ['SLMBATCH_FRONTIER_URL']}", flush=True)
        return slmbatch_main(args)
    print(
        "demo: no SLMBATCH_FRONTIER_URL set - starting a local vLLM OpenAI-compatible server as the frontier, "
        "serving the tiny random model (real HTTP, real cost accounting, answers NOT meaningful)",
        flush=True,
    )
    model = str(HERE.parent / "build" / "models" / "tiny-qwen2-chat")
    with local_openai_server(model, served_name="local-tiny-frontier", max_model_len=2048) as url:
        os.environ.update(
            SLMBATCH_FRONTIER_URL=url,
            SLMBATCH_FRONTIER_MODEL="local-tiny-frontier",
            SLMBATCH_FRONTIER_KEY_ENV="SLMBATCH_NO_KEY",
        )
        return slmbatch_main(args)


if __name__ == "__main__":
    sys.exit(main())
