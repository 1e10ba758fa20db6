"""Keep torch.compile's on-disk caches from serving code compiled against older smile-fast ops.

Inductor and AOTAutograd cache compiled graphs on disk (/tmp/torchinductor_<user> by default), keyed
by the traced graph, but the key does not cover a custom op's registered autograd formula: after the
feature-loss backward op changed its arguments, a cached compiled backward kept calling it with the
old ones and failed (found while changing it; an upgrade of smile-fast across such a change would hit
the same). torch.compiler.config.cache_key_tag is part of both caches' keys, so the trainer adds a
digest of the ops' and kernels' sources to it: any change to them gives fresh cache entries, and
entries of other versions stay on disk for their own version.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
SOURCE_FOLDERS = (_PACKAGE / "ops", _PACKAGE / "kernels")
_TAG_PREFIX = "smile-fast-ops-"


def ops_source_digest(folders=SOURCE_FOLDERS) -> str:
    """12 hex digits of SHA-256 over the .py files under `folders` (names and contents, in a fixed order)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.py")):
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:12]


def tag_compile_cache(folders=SOURCE_FOLDERS) -> str:
    """Add this smile-fast's ops digest to torch.compile's cache key tag; returns the tag now in force
    ("" on a torch that has no such tag).

    A tag the user set (TORCH_COMPILE_CACHE_KEY_TAG) is kept, with the digest appended; an earlier
    smile-fast digest in it is replaced, so calling this again changes nothing.
    """
    try:
        config = importlib.import_module("torch.compiler.config")
    except ImportError:
        config = None
    if config is None or not hasattr(config, "cache_key_tag"):
        return ""  # a torch without the setting (the package allows torch >= 2.6): nothing to tag
    own = _TAG_PREFIX + ops_source_digest(folders)
    parts = [part for part in config.cache_key_tag.split(";") if part]
    parts = [part for part in parts if not part.startswith(_TAG_PREFIX)] + [own]
    config.cache_key_tag = ";".join(parts)
    return config.cache_key_tag
