"""Checkpoints that do not depend on the transforms that wrote them.

    sharded.checkpoint.save(state, "ckpt/step_1000")           # every rank calls it
    state = sharded.checkpoint.load("ckpt/step_1000", like=state)

Every leaf is stored flattened, under its path in the state ("params['wte.weight']",
"opt_state[1][0].mu['wte.weight']", ...), through torch.distributed.checkpoint (DCP).
A leaf that is this rank's chunk (`state.placements`) is handed to DCP as the local
shard of a DTensor of the flattened leaf, so DCP writes each rank's part once and
reads back whatever part a loading rank needs: save with ZeRO-3 on 4 ranks, load
with ZeRO-1 on 2 ranks or into a plain single-process state. A buffer that is each
rank's own (`per_rank`: error feedback) is saved per rank and loads only into the same
rank of a job of the same layout.

Saves are atomic: ranks write into "<path>.partial", and rank 0 swaps it into place
after every rank has finished, so a crash leaves the previous checkpoint whole.
Loading never unpickles arbitrary objects: tensor data goes through
`torch.load(weights_only=True)` (DCP's own reader), and DCP's metadata file through an
unpickler that accepts only DCP's metadata classes, torch sizes and dtypes.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from sharded import comm
from sharded.placement import state_leaves
from sharded.sharding import flat_views

__all__ = ["save", "load", "export_safetensors", "UnsafeCheckpoint"]


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint's metadata asked to build something other than DCP metadata."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        comm.barrier()


def _flat_views(state: Any) -> tuple[dict[str, Any], Any]:
    """{path: flattened leaf}, with this rank's chunks as DTensor shards and its own
    (per-rank) buffers under "<path>@rank<r>"; and what writes loaded copies back
    (`sharding.flat_views`)."""
    placements = state.placements
    views, write_back = flat_views(state)
    out = {}
    for path, x in state_leaves(views):  # params first: a mismatch is named where users look
        if isinstance(x, torch.Tensor) and not hasattr(x, "placements"):
            x = x.view(-1)
        p = placements.get(path)
        out[f"{path}@rank{_rank()}" if p is not None and p.per_rank else path] = x
    return out, write_back


def save(state: Any, path: str | os.PathLike) -> None:
    """Write `state` (a TrainState, sharded or not) to the directory `path`, atomically.

    Every rank of the job calls it; rank 0 also removes a stale "<path>.partial"."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if _rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    _barrier()
    dcp.save(_flat_views(state)[0], storage_writer=dcp.FileSystemWriter(partial))
    _barrier()
    if _rank() == 0:
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        partial.rename(path)
        if old.exists():
            shutil.rmtree(old)
    _barrier()


_SAFE_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # any of DCP's metadata classes
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _SAFE_GLOBALS.get(module, set())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if allowed is None or name in allowed:
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"checkpoint metadata asks for {module}.{name}, which is not DCP metadata; refusing to load it")


class _SafeReader(dcp.FileSystemReader):
    """DCP's reader, with the metadata unpickled through an allowlist."""

    def read_metadata(self) -> Any:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_matches(path: Path, views: dict[str, Any], metadata: Any) -> None:
    stored = metadata.state_dict_metadata
    for key, x in views.items():
        if key not in stored:
            per_rank = "@rank" in key and " (a per-rank buffer: load it into a job whose ranks match the one that saved it)"
            raise ValueError(
                f"checkpoint {path} does not match this state: it has no {key!r}{per_rank or ''} "
                f"(it holds {len(stored)} entries, e.g. {sorted(stored)[:3]}); is it another model or optimizer?"
            )
        want, got = tuple(x.shape), tuple(getattr(stored[key], "size", ()))
        if want != got:
            raise ValueError(f"checkpoint {path} does not match this state: {key!r} has {got[0] if got else 1} elements there, {want[0]} here")
    mine = f"@rank{_rank()}"
    extra = sorted(k for k in set(stored) - set(views) if k.rpartition("@rank")[0] + mine not in views)  # other ranks' own buffers
    if extra:
        raise ValueError(f"checkpoint {path} does not match this state: it has {extra[0]!r}, which this state lacks")


def load(path: str | os.PathLike, like: Any) -> Any:
    """Read the checkpoint at `path` into `like` (a state of the same model and
    optimizer, laid out for this rank by any transforms) and return it.

    The tensors of `like` are overwritten in place."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (no .metadata); was the save interrupted? see {path}.partial")
    reader = _SafeReader(path)
    views, write_back = _flat_views(like)
    _check_matches(path, views, reader.read_metadata())
    dcp.load(views, storage_reader=reader)
    write_back()
    return like


def export_safetensors(params: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write whole params ({name: tensor}, e.g. `step.gather_params(state)`) as one
    safetensors file, from rank 0, atomically."""
    from safetensors.torch import save_file

    if _rank() == 0:
        tmp = Path(str(path) + ".partial")
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp))
        os.replace(tmp, path)
    _barrier()
