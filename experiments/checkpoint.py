"""Atomic, resumable checkpoints: ``ckpt_epochNNNN.pt`` (+ ``ckpt_interrupt.pt``) in a folder."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from metapool.io import atomic_path

KEEP = 2  # the newest two: if the latest is corrupt, the one before it is used


class Checkpoints:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _epoch_files(self) -> list[Path]:
        files = [p for p in self.folder.glob("ckpt_epoch*.pt") if re.fullmatch(r"ckpt_epoch\d+\.pt", p.name)]
        return sorted(files, key=lambda p: int(p.stem.removeprefix("ckpt_epoch")))

    def save(self, state: dict, epoch: int) -> Path:
        """Write the end-of-``epoch`` checkpoint atomically and prune older ones."""
        path = self.folder / f"ckpt_epoch{epoch:04d}.pt"
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        self.interrupt_path.unlink(missing_ok=True)
        for old in self._epoch_files()[:-KEEP]:
            old.unlink(missing_ok=True)
        return path

    @property
    def interrupt_path(self) -> Path:
        return self.folder / "ckpt_interrupt.pt"

    def save_interrupt(self, state: dict) -> Path:
        """A mid-epoch checkpoint written when the run is asked to stop (SIGTERM/SIGINT)."""
        with atomic_path(self.interrupt_path) as tmp:
            torch.save(state, tmp)
        return self.interrupt_path

    def clear(self) -> None:
        """Delete every checkpoint of this folder."""
        for path in [*self._epoch_files(), self.interrupt_path]:
            path.unlink(missing_ok=True)

    def latest(self) -> Path | None:
        files = self._epoch_files()
        return files[-1] if files else None

    def load_latest(self) -> tuple[dict | None, Path | None]:
        """The newest readable checkpoint (interrupt first); corrupt ones are reported, skipped."""
        candidates = list(reversed(self._epoch_files()))
        if self.interrupt_path.is_file():
            candidates.insert(0, self.interrupt_path)
        for path in candidates:
            try:
                return torch.load(path, map_location="cpu", weights_only=False), path
            except Exception as exc:  # truncated or corrupt file: fall back to an older one
                print(f"warning: checkpoint {path} is unreadable ({type(exc).__name__}); "
                      "trying the previous one", file=sys.stderr)
        return None, None
