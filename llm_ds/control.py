"""Control of a running job: SIGTERM/SIGINT (where handled) and errors mean save and stop; a trigger file
means save.

Ranks must act at the same step (a save is a collective), yet a signal reaches them at slightly
different times and only rank 0 watches the trigger file. A rank that sees a request writes the
step to act at (the current step plus a margin) into the process group's key-value store, which
lives outside the accelerator's streams; every rank reads it at each step boundary. No device
synchronisation per step, and one small request to the store.
"""

from __future__ import annotations

import itertools
import logging
import signal
from pathlib import Path

logger = logging.getLogger("llm_ds")
MARGIN_STEPS = 2  # ranks run in lock-step through the gradient collectives; two steps cover the skew
_runs = itertools.count()  # each run in this process has keys of its own in the store


class Control:
    def __init__(self, rank: int, save_trigger: str | None, handle_signals: bool = True):
        """``handle_signals``: SIGTERM and SIGINT mean "save and stop" until ``close()`` (the driver); without
        it they keep their meaning (a notebook's interrupt stays an interrupt)."""
        import torch.distributed.distributed_c10d as c10d

        self.rank, self.trigger = rank, Path(save_trigger) if save_trigger else None
        self.store = c10d._get_default_store()
        run = next(_runs)
        self.stop_key, self.save_key = f"llm_ds/{run}/stop_at", f"llm_ds/{run}/save_at"
        self.reason_key = f"llm_ds/{run}/stop_reason"
        self.reason: str | None = None  # why this rank asked to stop
        self._proposed_stop = False
        self._previous = {}
        if handle_signals:
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is None:
            logger.warning("received %s: saving at a step boundary, then stopping", name)
        self.request_stop(name)

    def request_stop(self, reason: str) -> None:
        """Save and stop at a step boundary all ranks agree on (the first reason is kept)."""
        if self.reason is None:
            self.reason = reason

    def _read(self, key: str) -> int | None:
        return int(self.store.get(key)) if self.store.check([key]) else None

    def poll(self, step: int) -> tuple[bool, bool]:
        """At the boundary after ``step``: ``(save_now, stop_now)``, the same on every rank."""
        if self.reason is not None and not self._proposed_stop:
            self._proposed_stop = True
            proposal = str(step + MARGIN_STEPS)
            if self.store.compare_set(self.stop_key, "", proposal).decode() == proposal:  # the first one wins
                self.store.set(self.reason_key, self.reason)
        if self.rank == 0 and self.trigger is not None and self.trigger.exists():
            self.trigger.unlink(missing_ok=True)
            self.store.set(self.save_key, str(step + MARGIN_STEPS))
            logger.info("save requested through %s: saving after step %d", self.trigger, step + MARGIN_STEPS)
        stop_at, save_at = self._read(self.stop_key), self._read(self.save_key)
        stop = stop_at is not None and step >= stop_at
        return stop or save_at == step, stop

    def stop_reason(self) -> str | None:
        """Why the run stopped: this rank's reason, else the one the stop's proposer gave."""
        if self.reason is not None:
            return self.reason
        return self.store.get(self.reason_key).decode() if self.store.check([self.reason_key]) else None

    def close(self) -> None:
        """Signals keep their meaning again. The store keys stay: another rank may still read them."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def forget(self) -> None:
        """Rank 0, once every rank is past the run's last step (after a barrier): the keys leave the store."""
        if self.rank == 0:
            for key in (self.stop_key, self.save_key, self.reason_key):
                if self.store.check([key]):
                    self.store.delete_key(key)
