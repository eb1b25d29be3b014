"""Exceptions raised by the secure-aggregation protocol, each with one clear message line."""

from __future__ import annotations

from fedloom.privacy.secagg.config import Stage


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class RoundAbortedError(SecAggError):
    """Too few parties survived a stage: the round cannot finish and is abandoned.

    ``client`` is ``None`` when the whole round fell below ``required`` survivors, and
    otherwise names the client whose neighbourhood fell below the Shamir threshold (its
    secrets could no longer be reconstructed, or it would unmask with too few peers).
    """

    def __init__(
        self, stage: Stage, survived: int, required: int, *, client: int | None = None, of: int
    ) -> None:
        self.stage = stage
        self.survived = survived
        self.required = required
        self.client = client
        #: What the round put on the wire before it aborted (set by the stage loop).
        self.bytes_up = 0
        self.bytes_down = 0
        if client is None:
            scope = f"{survived} of {of} clients survived, minimum {required}"
        else:
            scope = (
                f"{survived} of client {client}'s {of} neighbours survived, threshold {required}"
            )
        super().__init__(f"secure aggregation round aborted at stage {stage.value}: {scope}")


class ProtocolViolationError(SecAggError):
    """A message arrived out of order, from the wrong party, or asked for too much."""


class ShareAuthenticationError(SecAggError):
    """An encrypted share failed AEAD authentication: tampered, replayed or misrouted."""


class QuantizationOverflowError(SecAggError, ValueError):
    """The sum of the quantized inputs could wrap around the modulus; the round is refused."""


class MessageFormatError(SecAggError, ValueError):
    """Bytes that are not a well-formed secure-aggregation message of the expected type."""
