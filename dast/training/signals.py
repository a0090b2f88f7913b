"""SIGTERM and SIGINT during training: recorded, so that the stage saves and stops."""

from __future__ import annotations

import signal
from typing import Any


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved."""

    def __init__(self, signum: int, stage: str, step: int) -> None:
        self.signum, self.stage, self.step = signum, stage, step
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received at {stage} step {step}: checkpoint saved; continue with `dast train --resume`"
        )


class SignalFlag:
    """Records SIGTERM/SIGINT instead of dying, so the loop can save and stop (a second
    SIGINT raises KeyboardInterrupt at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
