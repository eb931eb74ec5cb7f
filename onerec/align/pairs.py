"""The preference pairs of one IPA round: one row per sampled user, how the round's users are
split over ranks and the rows gathered back, and the round's pairs file.

Shape legend: R rows (users of the round, or of one rank's share), S history length,
M session items, L code levels.

Row r belongs to the round's r-th sampled user (`row_R`, the order of ipa.round_users), so a
gathered table is sorted by it and the same whatever the number of ranks:

    rank 0 samples rows 0, W, 2W, ...     rank 1 samples rows 1, W + 1, ...     (W ranks)
    all_gather (every share padded to ceil(R / W) rows, padding rows marked row -1)
    -> drop the padding, sort by row -> the table one process would have built

The file, <out>/dpo/round_<k>/pairs.safetensors, holds these tensors (safetensors: loaded
without unpickling) and is written through a temporary file and a rename, so a killed job
leaves either no file or a whole one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from onerec.errors import CorruptFileError

PAIRS_FILE = "pairs.safetensors"


@dataclass
class PairTable:
    """Everything DPO needs about each sampled user, on the host or one device."""

    row_R: torch.Tensor  # int64 the user's position in the round's sample; -1 marks padding
    user_R: torch.Tensor  # int64 user index
    history_RS: torch.Tensor  # int64 history items, -1 padding (the prompt)
    target_RM: torch.Tensor  # int64 the real next session (the NTP term), -1 padding
    chosen_RML: torch.Tensor  # int64 codes of the highest-reward generated session
    rejected_RML: torch.Tensor  # int64 codes of the lowest-reward one
    ref_chosen_R: torch.Tensor  # float32 log pi_ref(chosen | history), the frozen reference M_t
    ref_rejected_R: torch.Tensor  # float32 log pi_ref(rejected | history)
    chosen_reward_R: torch.Tensor  # float32
    rejected_reward_R: torch.Tensor  # float32
    usable_R: torch.Tensor  # bool: the rewards differ (a tie gives no preference)

    def __len__(self) -> int:
        return len(self.row_R)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def select(self, rows_R: torch.Tensor) -> "PairTable":
        return PairTable(**{name: t[rows_R.to(t.device)] for name, t in self.tensors().items()})

    def to(self, device: torch.device | str) -> "PairTable":
        return PairTable(**{name: t.to(device) for name, t in self.tensors().items()})

    def usable(self) -> "PairTable":
        """The rows that make a pair, in row order: what DPO trains on."""
        return self.select(self.usable_R.nonzero().squeeze(1))

    @staticmethod
    def concat(parts: list["PairTable"]) -> "PairTable":
        names = [f.name for f in fields(PairTable)]
        return PairTable(**{name: torch.cat([getattr(p, name) for p in parts]) for name in names})


def shard_rows(num_rows: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows (rank, rank + W, ...) padded with -1 to ceil(num_rows / W) entries:
    every rank then runs the same number of equal batches, which an expert-parallel model
    needs (its forward is a collective). A padding row computes on row 0's prompt and is
    dropped by gather_rows."""
    own_R = torch.arange(rank, num_rows, world_size)
    padded = math.ceil(num_rows / world_size)
    return torch.cat([own_R, torch.full((padded - len(own_R),), -1, dtype=torch.long)])


def gather_rows(local: PairTable, world_size: int, device: torch.device) -> PairTable:
    """Every rank's rows on every rank (a collective), padding dropped, sorted by row; on the host.

    Every rank's share has the same length (shard_rows), so one all_gather per tensor does it;
    nccl gathers device tensors only, so they travel on `device`.
    """
    if world_size > 1:
        gathered = {}
        for name, tensor in local.tensors().items():
            # bool is widened for the transfer: not every backend gathers it.
            sent = tensor.to(device, torch.uint8 if tensor.dtype == torch.bool else tensor.dtype).contiguous()
            parts = [torch.empty_like(sent) for _ in range(world_size)]
            dist.all_gather(parts, sent)
            gathered[name] = torch.cat(parts).cpu().to(tensor.dtype)
        local = PairTable(**gathered)
    local = local.to("cpu")
    real_R = (local.row_R >= 0).nonzero().squeeze(1)
    table = local.select(real_R)
    return table.select(torch.argsort(table.row_R))


def save_pairs(path: Path, table: PairTable, meta: dict) -> None:
    """Write the table atomically; `meta` (plain JSON) goes into the file's metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {name: t.contiguous().cpu() for name, t in table.tensors().items()}
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_pairs(path: Path) -> tuple[PairTable, dict]:
    """(table, meta) from a file save_pairs wrote; CorruptFileError when it cannot be read."""
    names = [f.name for f in fields(PairTable)]
    try:
        with safe_open(str(path), framework="pt") as handle:
            missing = [name for name in names if name not in handle.keys()]
            if missing:
                raise CorruptFileError(f"{path}: no {', '.join(missing)} (not a pairs file of this onerec)")
            table = PairTable(**{name: handle.get_tensor(name) for name in names})
            meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
    except (OSError, SafetensorError, json.JSONDecodeError) as err:  # damaged or truncated
        raise CorruptFileError(f"{path}: unreadable pairs file ({err})") from None
    return table, meta
