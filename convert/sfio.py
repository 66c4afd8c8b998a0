"""Stream tensors into a safetensors file one at a time (the library's writer wants the whole shard in RAM).

The header is fixed first from names, dtypes and shapes, then tensor bytes follow in header order, so
memory stays at one tensor.  The file is written under a temporary name, fsynced, hashed while written
and renamed into place: a shard either exists whole or not at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading

from clusterctl.errors import UserError

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                      "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def header_bytes(entries: list[tuple[str, str, tuple, int]]) -> bytes:
    """The length prefix + JSON header for (name, torch dtype name, shape, nbytes) in file order."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file (no tensor data read); a UserError naming the file when it is
    missing, truncated or not safetensors."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"its header claims {n} bytes, the file holds {size}")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise UserError(f"cannot read it: {exc.strerror}", where=path) from None
    except (struct.error, ValueError, RecursionError) as exc:
        raise UserError(f"not a safetensors file ({str(exc)[:120] or type(exc).__name__})", where=path,
                        fix="the file is truncated or damaged: write or download it again") from None
    if not isinstance(header, dict) or not all(_is_entry(e) for k, e in header.items() if k != "__metadata__"):
        raise UserError("not a safetensors header (each tensor needs dtype, shape and data_offsets)", where=path,
                        fix="the file is damaged: write or download it again")
    header.pop("__metadata__", None)
    return header


def _is_entry(entry: object) -> bool:
    def ints(value: object, n: int | None = None) -> bool:
        return isinstance(value, list) and (n is None or len(value) == n) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    return isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and ints(entry.get("shape")) and \
        ints(entry.get("data_offsets"), 2)


class _Drain:
    """A thread feeding queued buffers to one consumer (a file's write, a hash's update: both release the
    GIL); its first error is kept for the caller's thread and later buffers are dropped."""

    def __init__(self, consume, depth: int):
        self.consume = consume
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.consume(data)
                except BaseException as exc:  # re-raised in the caller's thread
                    self.error = exc

    def put(self, data) -> None:
        self.queue.put(data)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


class ShardWriter:
    """Write one shard: `add(tensor)` in the order given to the constructor, then `close()`.

    Writing and hashing each run on a thread of their own while the caller reads and casts the next tensor;
    at most `depth` tensors wait in each queue, which bounds memory."""

    def __init__(self, path: str, entries: list[tuple[str, str, tuple, int]], depth: int = 2):
        self.path, self.entries, self.next = path, entries, 0
        self.tmp = path + ".tmp"
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.drains = [_Drain(self.file.write, depth), _Drain(self.hash.update, depth)]
        self._put(header_bytes(entries))

    def _put(self, data) -> None:
        for drain in self.drains:
            drain.put(data)

    def _raise_first_error(self) -> None:
        for drain in self.drains:
            if drain.error is not None:
                raise drain.error

    def add(self, tensor) -> None:
        import torch

        self._raise_first_error()
        name, dtype, shape, nbytes = self.entries[self.next]
        if str(tensor.dtype).removeprefix("torch.") != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, header says {dtype} {shape}")
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise ValueError(f"{name}: {data.nbytes} bytes, header says {nbytes}")
        self._put(memoryview(data))
        self.next += 1

    def _stop(self) -> None:
        for drain in self.drains:
            drain.stop()

    def close(self) -> dict:
        """Finish the file (fsync + rename) and return its record: size and sha256."""
        self._stop()
        self._raise_first_error()
        if self.next != len(self.entries):
            raise ValueError(f"{self.path}: {len(self.entries) - self.next} tensors were never written")
        self.file.flush()
        os.fsync(self.file.fileno())
        size = self.file.tell()
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"size": size, "sha256": self.hash.hexdigest()}

    def abort(self) -> None:
        for drain in self.drains:
            drain.error = drain.error or RuntimeError("aborted")
        self._stop()
        self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def file_record(path: str) -> dict:
    """Size and sha256 of a finished file, as `ShardWriter.close` reports them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
        return {"size": f.tell(), "sha256": h.hexdigest()}
