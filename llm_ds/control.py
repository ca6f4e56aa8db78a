"""Operator control of a running job: SIGTERM/SIGINT mean save and stop; a trigger file means save.

Ranks must act at the same step (a save is a collective), yet a signal reaches them at slightly
different times and only rank 0 watches the trigger file. A rank that sees a request writes the
step to act at (the current step plus a margin) into the process group's key-value store, which
lives outside the accelerator's streams; every rank reads it at each step boundary. No device
synchronisation per step, and one small request to the store.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

logger = logging.getLogger("llm_ds")
STOP_KEY, SAVE_KEY = "llm_ds/stop_at", "llm_ds/save_at"
MARGIN_STEPS = 2  # ranks run in lock-step through the gradient collectives; two steps cover the skew


class Control:
    def __init__(self, rank: int, save_trigger: str | None):
        import torch.distributed.distributed_c10d as c10d

        self.rank, self.trigger = rank, Path(save_trigger) if save_trigger else None
        self.store = c10d._get_default_store()
        self.signal: int | None = None
        self._proposed_stop = False
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame) -> None:
        if self.signal is None:
            logger.warning("received %s: saving at a step boundary, then stopping", signal.Signals(signum).name)
        self.signal = signum

    def _read(self, key: str) -> int | None:
        return int(self.store.get(key)) if self.store.check([key]) else None

    def poll(self, step: int) -> tuple[bool, bool]:
        """At the boundary after ``step``: ``(save_now, stop_now)``, the same on every rank."""
        if self.signal is not None and not self._proposed_stop:
            self._proposed_stop = True
            self.store.compare_set(STOP_KEY, "", str(step + MARGIN_STEPS))  # the first proposal wins
        if self.rank == 0 and self.trigger is not None and self.trigger.exists():
            self.trigger.unlink(missing_ok=True)
            self.store.set(SAVE_KEY, str(step + MARGIN_STEPS))
            logger.info("save requested through %s: saving after step %d", self.trigger, step + MARGIN_STEPS)
        stop_at, save_at = self._read(STOP_KEY), self._read(SAVE_KEY)
        stop = stop_at is not None and step >= stop_at
        return stop or save_at == step, stop

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.rank == 0:
            for key in (STOP_KEY, SAVE_KEY):
                if self.store.check([key]):
                    self.store.delete_key(key)


def stop_reason(control: Control) -> str | None:
    return signal.Signals(control.signal).name if control.signal is not None else None
