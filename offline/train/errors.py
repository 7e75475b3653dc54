"""The one error a training command reports as a line: input it cannot use, found before any
weights load. Each stage raises its own subclass (config, data, output folder, DPO setup);
the commands catch this base, print its message on one line and exit with status 2."""

from __future__ import annotations


class TrainInputError(ValueError):
    """Input a training run cannot use; the message is one line naming the problem."""
