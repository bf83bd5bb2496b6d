"""The weights digest: sha256 over the files that decide what a model generates.

Hashing 40 GB takes minutes, so the result is cached beside the model (or in the user
cache when the model directory is read-only), keyed by each file's name, size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

_PATTERNS = (
    "*.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer*.json",
    "special_tokens_map.json",
    "*.jinja",
    "*.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
)
# Read by mlx_lm.load besides the digest's files, but it decides nothing generated (an
# index of the weight shards, which are hashed): copied with a model, not hashed.
_EXTRA = ("model.safetensors.index.json",)
CACHE_NAME = ".studiofleet-digest.json"
DIGEST_FORMAT = re.compile(
    r"sha256:[0-9a-f]{64}"
)  # what weights_digest returns; check with fullmatch
_CHUNK = 8 << 20
# A node whose generations happen on a hosted API that returns text, not token ids (the
# upstream engine's openai kind, docs/upstream.md) reports "remote:" + provider + model:
# not weights anyone can hash, and no continuation on it or from it is exact.
REMOTE_PREFIX = "remote:"


def is_remote(digest: str) -> bool:
    """A remote: digest: no stream pinned to it can be continued exactly anywhere."""
    return digest.startswith(REMOTE_PREFIX)


def digest_files(model_dir: Path) -> list[Path]:
    found = {p for pattern in _PATTERNS for p in model_dir.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def model_files(model_dir: Path) -> list[Path]:
    """Every file a node needs to load the model: the digest's files, then the extras."""
    files = digest_files(model_dir)
    return files + sorted(
        p for p in (model_dir / n for n in _EXTRA) if p.is_file() and p not in files
    )


def remember(model_dir: Path, digest: str) -> None:
    """Record a digest already verified for these files (staging hashed them while copying),
    so loading them does not hash 40 GB again."""
    _write_cache(model_dir, digest, _fingerprint(digest_files(model_dir)))


def _fingerprint(files: list[Path]) -> list[list]:
    return [[p.name, (s := p.stat()).st_size, s.st_mtime_ns] for p in files]


def _fallback_cache(model_dir: Path) -> Path:
    base = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "studiofleet" / "digests"
    )
    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:24]
    return base / f"{key}.json"


def compute_digest(model_dir: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    total = sum(p.stat().st_size for p in files)
    done = 0
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                done += len(chunk)
                if total > (1 << 30) and done % (1 << 30) < _CHUNK:
                    log.info("hashing weights in %s: %d%%", model_dir, 100 * done // total)
    return f"sha256:{h.hexdigest()}"


def weights_digest(model_dir: Path) -> str:
    """The model's digest, from the cache when no file changed since it was computed."""
    files = digest_files(model_dir)
    if not files:
        raise FileNotFoundError(f"{model_dir} has no model files (config.json, *.safetensors)")
    fingerprint = _fingerprint(files)
    for cache in (model_dir / CACHE_NAME, _fallback_cache(model_dir)):
        try:
            cached = json.loads(cache.read_text())
            if cached.get("files") == fingerprint:
                return cached["digest"]
        except (OSError, ValueError, KeyError):
            continue
    digest = compute_digest(model_dir, files)
    _write_cache(model_dir, digest, fingerprint)
    return digest


def _write_cache(model_dir: Path, digest: str, fingerprint: list) -> None:
    record = json.dumps({"digest": digest, "files": fingerprint})
    for cache in (model_dir / CACHE_NAME, _fallback_cache(model_dir)):
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(record)
            tmp.replace(cache)
            break
        except OSError:
            continue


# -- node groups (docs/node-groups.md) ---------------------------------------------------
# A group's ModelInfo.weights_digest is the model's digest combined with how it is sharded
# (its tokens may differ from one process's); what is staged and activated is the model's own
# digest, which the group reports in NodeStatus.group.model_digest.


def layout_digest(model_digest: str, mode: str, size: int) -> str:
    """The weights digest a group of `size` ranks in `mode` reports for `model_digest`."""
    layout = f"{model_digest}|group:{mode}:{size}"
    return "sha256:" + hashlib.sha256(layout.encode()).hexdigest()


def model_digest(status) -> str:
    """The model's own digest a node (NodeStatus) serves: what StageModel and Activate name,
    and what a rollout's target is compared with. A group's is in group.model_digest."""
    if status.HasField("group") and status.group.size:
        return status.group.model_digest
    return status.model.weights_digest


def served_digest(model: str, group=None) -> str:
    """The weights digest a node's generations report (their final's ModelInfo) while it
    serves `model`: for a group (its NodeStatus.group) the digest with the layout."""
    if model and group is not None and group.size:
        return layout_digest(model, group.mode, group.size)
    return model
