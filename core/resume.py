"""The one resume mechanism: a training state file that is written atomically and read back only when
asked, and only by a run with the same settings.

Each save keeps the state it replaces as `<name>.prev` (a rename, so no copy). A resumed run whose state
file is truncated, empty or unreadable (a job killed while its network filesystem was still writing)
falls back to that previous state, or starts over when there is none that reads, and says which in one
line. Temporary files left by a writer that was killed are removed."""
from pathlib import Path

import torch

from core.cli import UserError
from core.files import atomic_save


def _unreadable_reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class StateFile:
    """`save(state)` after each unit of work; `load()` returns the saved state when `resume` is set and a
    state that reads exists (None otherwise), refusing one written under other settings.

    `fingerprint` identifies the settings (a protocol's repr, a config's values); `describe_change` may turn
    the saved and current fingerprints into a sentence naming what differs. `found` tells, after `load()`,
    whether any state file was there (readable or not), so that a caller can tell "nothing to resume"
    from "started over". `log` takes the one line saying which state a damaged file was replaced with."""

    def __init__(self, path, resume: bool, fingerprint, describe_change=None, device="cpu", log=print):
        self.path, self.resume, self.fingerprint = Path(path), resume, fingerprint
        self.describe_change, self.device, self.log = describe_change, device, log
        self.previous = self.path.with_name(self.path.name + ".prev")
        self.found = False
        self.loaded_from = None  # the file load() returned the state of
        self._resumed_from_previous = False
        # A run that does not resume starts a new history: the first save does not keep the old run's state.
        self._keep_previous = resume

    def _read(self, path):
        """The state in `path`, or the reason it cannot be read."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # truncated zip, empty file, bad pickle, I/O error: all mean "unusable"
            return None, _unreadable_reason(e)
        if not isinstance(state, dict) or "fingerprint" not in state:
            return None, "not a training state"
        return state, None

    def _check(self, path, state):
        if state.get("fingerprint") != self.fingerprint:
            what = (self.describe_change(state.get("fingerprint"), self.fingerprint) if self.describe_change
                    else "was written with other settings; remove it or drop --resume")
            raise UserError(f"--resume: {path} {what}")
        return state

    def _remove_leftovers(self):
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)

    def load(self):
        if not self.resume:
            return None
        self._remove_leftovers()
        exists = self.path.is_file()
        self.found = exists or self.previous.is_file()
        if exists:
            state, why = self._read(self.path)
            if state is not None:
                self.loaded_from = self.path
                return self._check(self.path, state)
        elif not self.previous.is_file():
            return None
        else:  # killed between the two renames of a save: the previous state is all there is
            why = "missing"
        previous, why_previous = self._read(self.previous) if self.previous.is_file() else (None, "missing")
        # The unreadable file is not kept as a "previous" state by the next save. (It is not removed here: under
        # torchrun every process reads the state, and all of them must see the same files.)
        self._keep_previous = not exists
        if previous is not None and previous.get("fingerprint") == self.fingerprint:
            self.log(f"--resume: {self.path} is unreadable ({why}); resuming from the previous state {self.previous}")
            self._resumed_from_previous = True
            self.loaded_from = self.previous
            return previous
        self.log(f"--resume: {self.path} is unreadable ({why}) and there is no usable previous state "
                 f"({why_previous if previous is None else 'other settings'}); starting over")
        return None

    def save(self, state: dict) -> None:
        path, previous = self.path, self.previous

        def write_keeping_previous(tmp):
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)
            if self._keep_previous and path.is_file():
                path.replace(previous)
            elif not self._keep_previous and not self._resumed_from_previous:
                previous.unlink(missing_ok=True)

        atomic_save(path, write_keeping_previous)
        self._keep_previous = True
