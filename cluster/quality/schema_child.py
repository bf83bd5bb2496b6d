"""The schema worker's child process (cluster/quality/schema_worker.py starts it): one
JSON string (a schema's text) per line in, {"error": ""|message} out. A module of its own,
so the parent side imports nothing of the checks it runs here."""

from __future__ import annotations

import json
import sys

from cluster.invalid_request import InvalidRequest
from cluster.quality.notes import check_text


def main() -> None:
    for line in sys.stdin:
        try:
            check_text(json.loads(line))
            error = ""
        except InvalidRequest as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - never the text: it may quote the schema
            error = f"the request could not be checked ({type(exc).__name__}); simplify the schema"
        sys.stdout.write(json.dumps({"error": error}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
