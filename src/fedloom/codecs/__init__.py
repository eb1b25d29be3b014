"""Update codecs: the client-to-server encoding chain (clipping, compression), and
broadcast codecs for the server-to-client direction.

Built-in codecs register in :data:`fedloom.registry.CODECS` (and
:data:`fedloom.registry.BROADCAST_CODECS`) from the modules that define them (central
DP's clipping codec lives with the mechanism in ``fedloom.privacy.stages``; compression
in :mod:`fedloom.codecs.compression` and :mod:`fedloom.codecs.downlink`).
"""

from fedloom.codecs import compression, downlink
from fedloom.codecs.base import BroadcastCodec, Layout, RejectedUpdateError, UpdateCodec

__all__ = [
    "BroadcastCodec",
    "Layout",
    "RejectedUpdateError",
    "UpdateCodec",
    "compression",
    "downlink",
]
