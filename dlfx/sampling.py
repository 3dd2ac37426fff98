"""Text generation from a trained character LM run (`dlfx sample`)."""

from __future__ import annotations

import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlfx import remote
from dlfx.errors import ConfigError, DataError
from dlfx.models import GPT, RNN
from dlfx.models import rnn, transformer
from dlfx.restore import restore_run
from dlfx.workdir import DATA_FILE, read_json


def encode(text: str, vocab: list[str]) -> np.ndarray:
    """Character ids of `text`; a character outside the vocabulary is an error naming it."""
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted({c for c in text if c not in index})
    if unknown:
        raise DataError(f"prompt has characters not in the run's vocabulary: {''.join(unknown)!r}")
    return np.array([index[c] for c in text], np.int32)


def _generate_windowed(model: GPT, params, prompt: jnp.ndarray, length: int, rng: jnp.ndarray,
                       temperature: float, window: int) -> jnp.ndarray:
    """KV-cache generation that never runs past `window` positions: when the context fills up,
    decoding restarts from its last half (positions beyond the trained length were never learned)."""
    keep = max(window // 2, 1)
    context = prompt[:, -keep:] if prompt.shape[1] >= window else prompt
    pieces, remaining, chunk = [], length, 0
    while remaining > 0:
        count = min(remaining, window - context.shape[1])
        tokens, _ = transformer.generate(model, params, context, count, jax.random.fold_in(rng, chunk), temperature)
        pieces.append(tokens)
        remaining, chunk = remaining - count, chunk + 1
        context = jnp.concatenate([context, tokens], axis=1)[:, -keep:]
    return jnp.concatenate(pieces, axis=1)


def _codec(workdir: str) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) between text and the run's token ids: its vocabulary (`data.json`, or `vocab.json` of
    runs from before data.json) or, for `bytes` token folders, UTF-8 bytes."""
    described, legacy = os.path.join(workdir, DATA_FILE), os.path.join(workdir, "vocab.json")
    size = None
    if os.path.lexists(described):
        recorded = read_json(described)
        metadata = recorded.get("metadata") if isinstance(recorded.get("metadata"), dict) else {}
        path, vocab, size = described, metadata.get("vocab"), recorded.get("num_classes")
        if vocab is None and metadata.get("encoding") == "bytes":
            return (lambda text: list(text.encode("utf-8", "surrogateescape")),
                    lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", errors="replace"))
        if vocab is None:
            shown = remote.shown(workdir)
            raise ConfigError(f"{shown} cannot be sampled as text: {remote.join(shown, DATA_FILE)} records no vocabulary "
                              f"(a language-model run on characters, bytes or a token folder with a vocab has one)")
    elif os.path.isfile(legacy):
        path, vocab = legacy, read_json(legacy, "any")
    else:
        raise ConfigError(f"{remote.shown(workdir)} is not a language-model run: it has no {DATA_FILE}")
    if not (isinstance(vocab, list) and vocab and all(isinstance(t, str) and t for t in vocab)):
        raise ConfigError(f"{path}: the vocabulary must be a JSON list of non-empty strings")
    if size is not None and len(vocab) != size:
        raise ConfigError(f"{path}: the vocabulary has {len(vocab)} entries but the run has {size} token ids")
    if all(len(t) == 1 for t in vocab):
        return (lambda text: list(encode(text, vocab))), (lambda ids: "".join(vocab[i] for i in ids))
    return _longest_match(vocab), (lambda ids: "".join(vocab[i] for i in ids))


def _longest_match(vocab: list[str]) -> Callable[[str], list[int]]:
    """Greedy longest-match encoding for a vocabulary of multi-character tokens."""
    index = {t: i for i, t in enumerate(vocab)}
    longest = max(len(t) for t in vocab)

    def to_ids(text: str) -> list[int]:
        ids, at = [], 0
        while at < len(text):
            for width in range(min(longest, len(text) - at), 0, -1):
                if text[at:at + width] in index:
                    ids.append(index[text[at:at + width]])
                    at += width
                    break
            else:
                raise DataError(f"prompt: {text[at:at + 10]!r} starts with no token of the run's vocabulary")
        return ids

    return to_ids


def sample_workdir(workdir: str, prompt: str, length: int, temperature: float = 1.0, seed: int = 0,
                   num_samples: int = 1) -> list[str]:
    """Restore a run's newest valid checkpoint and continue `prompt` by `length` characters."""
    with remote.readable(workdir) as local:  # a gs:// run: its data.json pulled, its checkpoints read in place
        return _sample(local, prompt, length, temperature, seed, num_samples)


def _sample(workdir: str, prompt: str, length: int, temperature: float, seed: int, num_samples: int) -> list[str]:
    to_ids, to_text = _codec(workdir)
    if not prompt:
        raise DataError("the prompt is empty; give at least one character")
    if length < 1:
        raise ConfigError(f"--length must be >= 1, got {length}")
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), got {seed}")
    exp, state, _ = restore_run(workdir, load_data=False)  # the model and vocabulary come from data.json
    params = jax.device_get(state.params)
    prompt_ids = jnp.asarray(np.tile(np.asarray(to_ids(prompt), np.int32), (num_samples, 1)))
    rng = jax.random.PRNGKey(seed)
    if isinstance(exp.model, GPT):
        window = min(exp.model.max_len, int(exp.dataset.example_shape[0]))  # the context it was trained on
        tokens = _generate_windowed(exp.model, params, prompt_ids, length, rng, temperature, window)
    elif isinstance(exp.model, RNN) and exp.model.vocab_size:
        tokens, _ = rnn.generate(exp.model, params, prompt_ids, length, rng, temperature)
    else:
        raise ConfigError(f"model {exp.config.model.name!r} cannot generate text")
    return [prompt + to_text([int(t) for t in row]) for row in np.asarray(tokens)]
