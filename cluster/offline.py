"""Nothing in StudioFleet reaches the internet at run time: models load from local paths."""

import os

_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def force_offline() -> None:
    """Set before mlx_lm / transformers / huggingface_hub are imported."""
    os.environ.update(_OFFLINE)
