"""One log format for every daemon: key=value lines on stderr, never payloads."""

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # Third-party libraries can log request payloads at DEBUG; keep them quiet.
    for name in ("grpc", "httpx", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)


def without_text(exc: BaseException) -> str:
    """An exception for the log without its message, which may quote request content
    (a tokenizer or template error): the type and where it was raised, nothing else."""
    import traceback

    return f"{type(exc).__name__}\n{''.join(traceback.format_tb(exc.__traceback__))}"
