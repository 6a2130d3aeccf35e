"""A GGUF file's tokenizer kept on disk (swarm/model/tokenizer_cache.py): the same tokenizer, faster."""

from __future__ import annotations

import os

from swarm.model import DEFAULT_MODEL, open_checkpoint, resolve_model
from swarm.model.tokenizer_cache import cached_tokenizer, entry_key

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcode, 日本語 and <tags>? 42"}]


def test_a_cached_tokenizer_is_the_built_one(tmp_path):
    with open_checkpoint(DEFAULT_MODEL) as uncached:
        built = uncached.tokenizer()
    with open_checkpoint(DEFAULT_MODEL, tmp_path) as checkpoint:
        first = checkpoint.tokenizer()  # built, then kept
        (entry,) = [p for p in tmp_path.iterdir()]
        assert entry.name == entry_key(checkpoint.path) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        loaded = checkpoint.tokenizer()  # from the entry
    for tokenizer in (first, loaded):
        assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True) == built.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True
        )
        assert tokenizer.encode("hello world ü 日本") == built.encode("hello world ü 日本")
        assert tokenizer.eos_token_id == built.eos_token_id and len(tokenizer) == len(built)
        assert tokenizer.decode(built.encode("a b\nc")) == built.decode(built.encode("a b\nc"))


def test_a_changed_file_is_a_new_entry_and_a_damaged_entry_is_rebuilt(tmp_path):
    path = resolve_model(DEFAULT_MODEL)
    key = entry_key(path)
    copy = tmp_path / "model.gguf"
    os.link(path, copy) if path.stat().st_dev == tmp_path.stat().st_dev else copy.write_bytes(path.read_bytes())
    os.utime(copy, ns=(1, 1))
    assert entry_key(copy) != key
    cache = tmp_path / "cache"
    (cache / key).mkdir(parents=True)
    (cache / key / "tokenizer_config.json").write_text("{not json")
    calls = []

    def build():
        calls.append(1)
        with open_checkpoint(path) as checkpoint:
            return checkpoint.tokenizer()

    assert cached_tokenizer(path, build, cache) is not None and calls == [1]  # the damaged entry was rebuilt
    cached_tokenizer(path, build, cache)
    assert calls == [1]


def test_an_unwritable_cache_is_skipped(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    with open_checkpoint(DEFAULT_MODEL, blocker / "cache") as checkpoint:
        assert checkpoint.tokenizer().encode("hi")
