"""``SafetensorsLoader``: a checkpoint on disk (one file, a directory, or a sharded index).

The manifest comes from the files' JSON headers alone (no tensor bytes read); tensors are then streamed one at a
time through ``safe_open`` (memory-mapped), so peak extra memory is one tensor.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from weight_sync.base import Manifest

# safetensors header dtype codes -> torch dtypes
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_code] = getattr(torch, _attr)

_MAX_HEADER_BYTES = 100 << 20  # the format's own limit


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files at ``path``: the file itself; a directory's sharded index (every shard it names must
    exist); else ``model.safetensors``; else every ``*.safetensors`` in it."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _index_files(path)
        return [path]
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            return _index_files(index)
        if (path / "model.safetensors").is_file():
            return [path / "model.safetensors"]
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
    raise ValueError(f"no safetensors weights at {path}")


def _index_files(index: Path) -> list[Path]:
    weight_map = json.loads(index.read_text())["weight_map"]
    files = [index.parent / f for f in sorted(set(weight_map.values()))]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise ValueError(f"{index} names missing shard files: {absent}")
    return files


def read_header(file: Path) -> Manifest:
    """{name: (shape, dtype)} from a safetensors file's header; reads only the header bytes."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{file}: header of {length} bytes is not a safetensors header")
        header = json.loads(f.read(length))
    out: Manifest = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        out[name] = (tuple(info["shape"]), _ST_DTYPES[info["dtype"]])
    return out


class SafetensorsLoader:
    """Loader over a safetensors checkpoint. ``names``: yield only these tensors (read nothing else)."""

    def __init__(self, path: str | Path, *, version: Optional[int] = None,
                 names: Optional[Iterable[str]] = None) -> None:
        self.path = Path(path)
        self.version = version
        self._files = safetensors_files(self.path)
        self._names = None if names is None else set(names)
        self._plan_cache: Optional[list[tuple[Path, Manifest]]] = None  # per file: the tensors to read
        self._stream: Optional[Iterator[tuple[str, torch.Tensor]]] = None

    def _plan(self) -> list[tuple[Path, Manifest]]:
        if self._plan_cache is None:
            plan, seen = [], {}
            for file in self._files:
                header = read_header(file)
                wanted = {n: spec for n, spec in header.items() if self._names is None or n in self._names}
                for n in wanted:
                    if n in seen:
                        raise ValueError(f"tensor {n!r} is in both {seen[n]} and {file}")
                    seen[n] = file
                plan.append((file, wanted))
            if self._names is not None and self._names - set(seen):
                raise ValueError(f"{self.path} lacks requested tensors: {sorted(self._names - set(seen))}")
            self._plan_cache = plan
        return self._plan_cache

    def names_and_shapes(self) -> Manifest:
        return {n: spec for _, wanted in self._plan() for n, spec in wanted.items()}

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._stream = self._read()
        return self._stream

    def _read(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for file, wanted in self._plan():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in wanted:
                    yield name, f.get_tensor(name)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()  # exits the open ``safe_open`` of a stream abandoned half-way
            self._stream = None

    def __repr__(self) -> str:
        return f"SafetensorsLoader({str(self.path)!r}, version={self.version})"
