"""Update codecs: the client-to-server encoding chain (clipping today, compression next).

Built-in codecs register in :data:`fedloom.registry.CODECS` from the modules that define
them (central DP's clipping codec lives with the mechanism in ``fedloom.privacy.stages``).
"""

from fedloom.codecs.base import RejectedUpdateError, UpdateCodec

__all__ = ["RejectedUpdateError", "UpdateCodec"]
