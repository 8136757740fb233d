"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class DalbtError(Exception):
    """An error caused by the user's input or environment, with a message naming the fix."""


class TrainingDiverged(DalbtError):
    """Training produced a non-finite loss or weights: the round is abandoned unrecorded."""


class RankZeroFailed(DalbtError):
    """Raised on the other ranks of a distributed run when rank 0 failed (rank 0 reports the
    error itself)."""
