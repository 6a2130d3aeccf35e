"""A GGUF file's tokenizer, kept on disk once built.

transformers rebuilds a GGUF file's tokenizer from its vocabulary and merges
on every load: ~3 s for the default model on a quiet core, more on a busy box,
paid by every client process (`swarm generate`, `swarm serve`, each test's
`SwarmModel`). Saved once in the tokenizers' own format it loads in ~0.3 s,
with the same ids, special tokens and chat template. An entry is keyed by the
file's path, size and modification time, so a changed file is built anew; it
is written to a temporary directory and renamed into place, so a reader never
sees half an entry. A cache that cannot be written is skipped, not an error.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "layerswarm" / "tokenizers"


def entry_key(gguf: Path) -> str:
    """Names one version of one file: its resolved path, size and modification time."""
    stat = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]


def cached_tokenizer(gguf: Path, build: Callable[[], Any], cache_dir: Path | None) -> Any:
    """The tokenizer of `gguf`: from `cache_dir` when an entry is there, else `build()` and keep it.
    `cache_dir` None: always build."""
    if cache_dir is None:
        return build()
    from transformers import AutoTokenizer

    entry = cache_dir / entry_key(gguf)
    if (entry / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(entry), local_files_only=True)
        except (OSError, ValueError) as exc:  # a damaged entry: build it again
            log.info("tokenizer cache entry %s unusable (%s); rebuilding", entry, exc)
    tokenizer = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".partial-"))
    except OSError as exc:
        log.info("tokenizer not cached in %s: %s", cache_dir, exc)
        return tokenizer
    try:
        tokenizer.save_pretrained(str(staging))
        shutil.rmtree(entry, ignore_errors=True)
        staging.rename(entry)  # atomic: another process may have put the same entry there meanwhile
    except OSError as exc:
        log.info("tokenizer not cached in %s: %s", cache_dir, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
