"""What every job's entry point shares: logging, and one-line errors for bad conf or arguments."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from advertisex.config import ConfigError


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("ADVX_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # py4j logs every gateway call at INFO.
    logging.getLogger("py4j").setLevel(logging.WARNING)


def run_job(main: Callable[[list[str]], None], argv: list[str]) -> None:
    setup_logging()
    prog = os.path.basename(sys.argv[0]) or "job"
    try:
        main(argv)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
