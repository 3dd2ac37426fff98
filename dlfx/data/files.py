"""File-backed sources, memory-mapped so that no split is ever read whole: `tokens` and `arrays`.

`tokens`: a folder with `train.bin` and `val.bin` (flat token ids, uint16 or uint32) and `meta.json`
(`vocab_size`; `vocab`, a list of strings, for decoding; `encoding`: `chars` or `bytes`), written by
`dlfx data tokens` (`write_tokens`). `arrays`: a `.npz` file (stored uncompressed, as `np.savez` writes
it) or a folder of `.npy` files.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import sys
import threading
import zipfile
from typing import Any, Iterator

import numpy as np

from dlfx.data.access import ArraySource
from dlfx.data.sources import Dataset
from dlfx.errors import DataError

TOKEN_DTYPES = ("uint16", "uint32")
READ_CHUNK = 1 << 24  # characters (or bytes) read at a time when writing token files


class TokenWindows:
    """Windows of `seq_len + 1` tokens of a memory-mapped token file, starting every `stride` tokens:
    example i is x = tokens[s : s + seq_len], y = tokens[s + 1 : s + seq_len + 1] with s = i * stride."""

    def __init__(self, tokens: np.ndarray, seq_len: int, stride: int, name: str = "tokens"):
        self.tokens, self.seq_len, self.stride, self.name = tokens, seq_len, stride, name
        self._len = max((len(tokens) - seq_len - 1) // stride + 1, 0)
        self._offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} of {self._len}")
        start = index * self.stride
        window = np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)
        return {"x": window[:-1], "y": window[1:]}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The windows at `indices` in one read of exactly their tokens."""
        windows = np.asarray(self.tokens[np.asarray(indices)[:, None] * self.stride + self._offsets], np.int32)
        return {"x": windows[:, :-1], "y": windows[:, 1:]}

    def __repr__(self) -> str:
        return f"TokenWindows({self.name}, seq_len={self.seq_len}, stride={self.stride}, windows={self._len})"


def _read_meta(folder: str) -> dict:
    path = os.path.join(folder, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"config.data.path: {path} does not exist (write the folder with `dlfx data tokens`)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not readable JSON: {e}") from None
    size = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DataError(f"{path} must hold an object with a positive int 'vocab_size'")
    vocab = meta.get("vocab")
    if vocab is not None and not (isinstance(vocab, list) and len(vocab) == size and all(isinstance(t, str) for t in vocab)):
        raise DataError(f"{path}: 'vocab' must be a list of {size} strings (one per token id)")
    return meta


def _token_file(folder: str, name: str, dtype: str, seq_len: int) -> np.ndarray:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise DataError(f"config.data.path: {path} does not exist")
    size, itemsize = os.path.getsize(path), np.dtype(dtype).itemsize
    if size % itemsize:
        raise DataError(f"{path} holds {size} bytes, not a whole number of {dtype} tokens (config.data.dtype)")
    if size // itemsize < seq_len + 1:
        raise DataError(f"{path} holds {size // itemsize} tokens, fewer than one window of "
                        f"config.data.seq_len={seq_len} + 1")
    return np.memmap(path, dtype=dtype, mode="r")


def _max_id(tokens: np.ndarray, stop: int | None = None) -> int:
    """The largest id among the first `stop` tokens (all by default), read in chunks."""
    stop = len(tokens) if stop is None else min(stop, len(tokens))
    return max(int(np.max(tokens[i:min(i + READ_CHUNK, stop)])) for i in range(0, stop, READ_CHUNK))


def tokens(path: str = "", seq_len: int = 1024, dtype: str = "") -> Dataset:
    """A token folder (`train.bin`, `val.bin`, `meta.json`): training on windows at every offset, validation
    on consecutive windows; both memory-mapped. `dtype` ("" = meta.json's, else uint16) must match meta.json."""
    if not path:
        raise DataError("config.data.path must name a token folder (write one with `dlfx data tokens`)")
    if os.path.isfile(path):
        raise DataError(f"config.data.path: {path} is a file, not a token folder (train.bin, val.bin, meta.json)")
    if seq_len < 1:
        raise DataError(f"config.data.seq_len must be >= 1, got {seq_len}")
    meta = _read_meta(path)
    written = meta.get("dtype")
    if written is not None and written not in TOKEN_DTYPES:
        raise DataError(f"{path}/meta.json: 'dtype' {written!r} is not one of {', '.join(TOKEN_DTYPES)}")
    defaulted = not (dtype or written)
    dtype = dtype or written or "uint16"
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"config.data.dtype={dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
    if written and dtype != written:
        raise DataError(f"config.data.dtype={dtype!r} but {path}/meta.json says the files hold {written!r}")
    train = _token_file(path, "train.bin", dtype, seq_len)
    val = _token_file(path, "val.bin", dtype, seq_len)
    # ids past the vocabulary would be silent garbage in the embedding lookups: all of val.bin, and the
    # start of train.bin (a wrong dtype shows at once; a full scan of a huge train file is left out)
    for name, ids, stop in (("val.bin", val, None), ("train.bin", train, 1 << 20)):
        largest = _max_id(ids, stop)
        if largest >= meta["vocab_size"]:
            raise DataError(f"{path}/{name} holds token id {largest} >= vocab_size {meta['vocab_size']} "
                            f"(is config.data.dtype={dtype!r} the dtype it was written with?)")
    if defaulted:  # no one named the dtype: uint32 ids read as uint16 leave every other one 0
        start = train[:min(len(train), 1 << 16) // 2 * 2]
        if len(start) >= 64 and not start[1::2].any() and start[::2].any():
            raise DataError(f"{path}: train.bin reads as uint16 ids of which every second one is 0: it looks "
                            "like uint32 ids; name its dtype in meta.json (\"dtype\": \"uint32\", or \"uint16\" if "
                            "those zeros are real) or in config.data.dtype")
    encoding = meta.get("encoding", "chars" if meta.get("vocab") else "ids")
    metadata: dict[str, Any] = {"kind": "tokens", "encoding": encoding, "char_level": encoding == "chars"}
    if meta.get("vocab") is not None:
        metadata["vocab"] = meta["vocab"]
    return Dataset(train=TokenWindows(train, seq_len, 1, "train.bin"),
                   test=TokenWindows(val, seq_len, seq_len, "val.bin"),
                   name="tokens", num_classes=meta["vocab_size"], metadata=metadata)


@contextlib.contextmanager
def staged_output(out: str) -> Iterator[str]:
    """A fresh hidden folder beside `out` to write into; renamed to `out` on success, removed on any error or
    signal. Refuses an `out` that exists and is not an empty folder, or whose parent folder is missing; never
    touches anything it did not create. OS errors become one DataError line naming the path."""
    out = out.rstrip("/") or out
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"--out {out} exists and is not an empty folder")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise DataError(f"--out {out}: its folder {parent} does not exist")
    _remove_dead_stages(parent, os.path.basename(out))
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds like Ctrl-C: the stage is removed
        signal.signal(signal.SIGTERM, _raise_terminated)
    stage = None
    try:
        stage = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.partial-{socket.gethostname()}-"
                                                    f"{os.getpid()}-")
        yield stage
        if os.path.isdir(out):
            os.rmdir(out)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would keep the data set from other users
        os.replace(stage, out)
        stage = None
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _remove_dead_stages(parent: str, name: str) -> None:
    """Remove the stages of `name` that a killed (SIGKILL) writer of this machine left in `parent`."""
    from dlfx.workdir import _alive

    pattern = re.compile(re.escape(f".{name}.partial-{socket.gethostname()}-") + r"(\d+)-[^-]+$")
    for entry in os.listdir(parent):
        found = pattern.match(entry)
        if found and not _alive(int(found.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            print(f"dlfx: removed {os.path.join(parent, entry)}, left by a writer that was killed", file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM while writing a data folder: handled like Ctrl-C (cleaned up, `dlfx: interrupted`)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("terminated (SIGTERM)")


def _text_files(source: str) -> list[str]:
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        files, seen = [], set()
        for root, folders, names in os.walk(source, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:  # a symlink loop
                folders[:] = []
                continue
            seen.add(real)
            folders[:] = sorted(f for f in folders if not f.startswith("."))  # no .git and the like
            for name in sorted(names):
                path = os.path.join(root, name)
                if name.startswith("."):
                    continue
                if not os.path.exists(path):
                    raise DataError(f"--input {path} is a broken symbolic link")
                if os.path.isfile(path):  # regular files only: never block on a FIFO or a device
                    files.append(path)
        if files:
            return files
        raise DataError(f"--input {source} holds no files")
    raise DataError(f"--input {source} does not exist")


def _read_chunks(files: list[str], binary: bool) -> Iterator[Any]:
    """Chunks of bytes, or of text decoded incrementally (line endings kept as they are)."""
    for path in files:
        try:
            with open(path, "rb") as f:
                decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
                while chunk := f.read(READ_CHUNK):
                    if binary:
                        yield chunk
                        continue
                    try:
                        text = decoder.decode(chunk)
                    except UnicodeDecodeError as e:
                        raise DataError(f"--input {path} is not UTF-8 text ({e.reason} at byte {offset + e.start}); "
                                        "use --vocab bytes for any file") from None
                    offset += len(chunk)
                    if text:
                        yield text
                if not binary:
                    try:
                        decoder.decode(b"", final=True)
                    except UnicodeDecodeError as e:
                        raise DataError(f"--input {path} is not UTF-8 text ({e.reason} at its end); "
                                        "use --vocab bytes for any file") from None
        except OSError as e:
            raise DataError(f"--input {path}: {e.strerror or e}") from None


def write_tokens(source: str, out: str, vocab: str = "chars", val_fraction: float = 0.1) -> dict:
    """Write a token folder from a text file or a folder of them, streaming (never the whole corpus in
    memory): `bytes` = UTF-8 bytes as ids 0-255; `chars` = the corpus's characters, sorted. The last
    `val_fraction` of the tokens is `val.bin`. Written to a hidden stage beside OUT and renamed; returns meta.json."""
    if vocab not in ("bytes", "chars"):
        raise DataError(f"--vocab {vocab!r} is not one of bytes, chars")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"--out {out} exists and is not an empty folder")
    files = _text_files(source)
    binary = vocab == "bytes"
    if binary:
        table, total = None, sum(os.path.getsize(f) for f in files)
        meta: dict[str, Any] = {"vocab_size": 256, "encoding": "bytes"}
    else:  # first pass: the character set and the length
        chars, total = set(), 0
        for chunk in _read_chunks(files, binary=False):
            chars.update(chunk)
            total += len(chunk)
        ordered = sorted(chars)
        table = {c: i for i, c in enumerate(ordered)}
        meta = {"vocab_size": len(ordered), "vocab": ordered, "encoding": "chars"}
    dtype = np.uint16 if meta["vocab_size"] <= 1 << 16 else np.uint32
    num_val = int(total * val_fraction)
    if total - num_val < 2 or num_val < 2:
        raise DataError(f"--input {source} has {total} tokens: too few to split into train and validation")
    with staged_output(out) as stage:
        written = 0
        with open(os.path.join(stage, "train.bin"), "wb") as train, open(os.path.join(stage, "val.bin"), "wb") as val:
            for chunk in _read_chunks(files, binary):
                ids = np.frombuffer(chunk, np.uint8) if binary else \
                    np.fromiter((table[c] for c in chunk), np.int64, len(chunk))
                ids = ids.astype(dtype)
                cut = max(0, min(len(ids), total - num_val - written))
                train.write(ids[:cut].tobytes())
                val.write(ids[cut:].tobytes())
                written += len(ids)
        meta["dtype"] = np.dtype(dtype).name
        meta["num_train"], meta["num_val"] = total - num_val, num_val
        with open(os.path.join(stage, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return meta


def _npz_member(path: str, archive: zipfile.ZipFile, key: str) -> np.ndarray:
    """Memory-map one array of an uncompressed .npz (np.savez stores members verbatim)."""
    info = archive.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise DataError(f"{path}: array {key!r} is compressed (np.savez_compressed) and cannot be memory-mapped; "
                        "write it with np.savez, or as a folder of .npy files")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in reader:
            raise DataError(f"{path}: array {key!r} has .npy format version {version}; write it with numpy's np.savez")
        shape, fortran, dtype = reader[version](f)
        if dtype.hasobject:
            raise DataError(f"{path}: array {key!r} holds Python objects; dlfx never unpickles data files")
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _load_arrays(path: str, keys: dict[str, str], key: str = "config.data.path") -> dict[str, np.ndarray]:
    """{dlfx key: memory-mapped array} from a .npz file or a folder of .npy files (`key` names the config key),
    checked: each at least 1-D, all equally long."""
    loaded = _open_arrays(path, keys, key)
    for name, array in loaded.items():
        if array.ndim == 0:
            raise DataError(f"{key}: {path}: array {keys[name]!r} is a scalar, not one entry per example")
    lengths = {k: len(v) for k, v in loaded.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{key}: {path}: the arrays have unequal lengths {lengths}")
    return loaded


def _open_arrays(path: str, keys: dict[str, str], key: str) -> dict[str, np.ndarray]:
    if os.path.isdir(path):
        out = {}
        for name, stored in keys.items():
            file = os.path.join(path, stored + ".npy")
            if not os.path.isfile(file):
                raise DataError(f"{key}: {file} does not exist (config.data.keys maps {name!r} to it)")
            try:
                out[name] = np.load(file, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise DataError(f"{file}: {e}") from None
        return out
    if not os.path.isfile(path):
        raise DataError(f"{key}: {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            missing = [stored for stored in keys.values() if stored not in names]
            if missing:
                raise DataError(f"{path} has no array {missing[0]!r} (it holds {', '.join(names) or 'no arrays'}; "
                                "map keys with config.data.keys, or `dlfx data convert --keys`)")
            return {name: _npz_member(path, archive, stored) for name, stored in keys.items()}
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a .npz file (nor a folder of .npy files)") from None


def _parse_keys(keys: tuple) -> dict[str, str]:
    mapping = {"x": "x", "y": "y"}
    for item in keys:
        name, sep, stored = str(item).partition("=")
        if not sep or not name or not stored:
            raise DataError(f"config.data.keys: {item!r} is not 'name=stored_key' (e.g. 'x=images')")
        mapping[name] = stored
    return mapping


def arrays(path: str = "", test_path: str = "", test_fraction: float = 0.0, keys: tuple = (),
           num_classes: int = 0, split_seed: int = 0) -> Dataset:
    """Memory-mapped arrays from a `.npz` file or a folder of `.npy` files; the test split from `test_path`
    or a seeded `test_fraction` of the examples. `keys` maps dlfx keys to stored names ('x=images');
    `num_classes` (0: max label + 1 for integer labels, read in chunks)."""
    if not path:
        raise DataError("config.data.path must name a .npz file or a folder of .npy files")
    mapping = _parse_keys(keys)
    train = _load_arrays(path, mapping)
    lengths = {k: len(v) for k, v in train.items()}
    if test_path and test_fraction:
        raise DataError("set config.data.test_path or config.data.test_fraction, not both")
    if test_path:
        test = _load_arrays(test_path, mapping, "config.data.test_path")
        for name in train:
            if train[name].shape[1:] != test[name].shape[1:]:
                raise DataError(f"config.data.test_path: {test_path}: {name!r} examples are {test[name].shape[1:]}, "
                                f"but {train[name].shape[1:]} in config.data.path {path}")
        train_split, test_split = ArraySource(train), ArraySource(test)
    elif 0 < test_fraction < 1:
        order = np.random.default_rng(split_seed).permutation(next(iter(lengths.values())))
        cut = int(round(len(order) * test_fraction))
        if cut < 1 or cut == len(order):
            raise DataError(f"config.data.test_fraction={test_fraction} leaves an empty split")
        train_split, test_split = _Subset(train, np.sort(order[cut:])), _Subset(train, np.sort(order[:cut]))
    else:
        raise DataError("config.data.test_path or a config.data.test_fraction in (0, 1) is needed for the eval split")
    labels = [train["y"]] + ([test["y"]] if test_path else [])
    if "y" in train and train["y"].ndim == 1 and np.issubdtype(train["y"].dtype, np.integer):
        low = min(int(np.min(y[i:i + READ_CHUNK])) for y in labels for i in range(0, len(y), READ_CHUNK))
        high = max(int(np.max(y[i:i + READ_CHUNK])) for y in labels for i in range(0, len(y), READ_CHUNK))
        if low < 0:
            raise DataError(f"{path}: labels 'y' go down to {low}; class labels are 0 .. num_classes - 1")
        if num_classes and high >= num_classes:
            raise DataError(f"{path}: label {high} in 'y' but config.data.num_classes={num_classes}")
        num_classes = num_classes or high + 1
    return Dataset(train=train_split, test=test_split, name=os.path.basename(path.rstrip("/")) or "arrays",
                   num_classes=num_classes or None)


class _Subset:
    """The rows `indices` of memory-mapped arrays, as a random-access source."""

    def __init__(self, arrays: dict[str, np.ndarray], indices: np.ndarray):
        self.arrays, self.indices = arrays, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row = self.indices[index]
        return {k: np.asarray(v[row]) for k, v in self.arrays.items()}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices` (positions in this subset), stacked."""
        rows = self.indices[np.asarray(indices)]
        order = np.argsort(rows)  # sorted reads from the mapped file, then back to the asked order
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {k: np.asarray(v[rows[order]])[inverse] for k, v in self.arrays.items()}

    def rows(self) -> dict[str, np.ndarray]:
        """The whole subset, read into memory (for a device-resident split)."""
        return self.gather(np.arange(len(self.indices)))

    def __repr__(self) -> str:
        return f"_Subset({len(self.indices)} of {len(next(iter(self.arrays.values())))})"
