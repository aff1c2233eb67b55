"""The one resume mechanism: a training state file that is written atomically and read back only when
asked, and only by a run with the same settings."""
from pathlib import Path

import torch

from core.cli import UserError
from core.files import atomic_torch_save


class StateFile:
    """`save(state)` after each unit of work; `load()` returns the saved state when `resume` is set and the
    file exists (None otherwise), refusing one written under other settings.

    `fingerprint` identifies the settings (a protocol's repr, a config's values); `describe_change` may turn
    the saved and current fingerprints into a sentence naming what differs."""

    def __init__(self, path, resume: bool, fingerprint, describe_change=None, device="cpu"):
        self.path, self.resume, self.fingerprint = Path(path), resume, fingerprint
        self.describe_change, self.device = describe_change, device

    def load(self):
        if not (self.resume and self.path.is_file()):
            return None
        state = torch.load(self.path, map_location=self.device, weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            what = (self.describe_change(state.get("fingerprint"), self.fingerprint) if self.describe_change
                    else "was written with other settings; remove it or drop --resume")
            raise UserError(f"--resume: {self.path} {what}")
        return state

    def save(self, state: dict) -> None:
        atomic_torch_save({**state, "fingerprint": self.fingerprint}, self.path)
