"""Mutual-TLS gRPC gossip transport: codec, server, client, byte counters and backoff.

Wire: ``proto/gossip.proto`` (generated ``proto/gossip_pb2.py`` is committed); one
bidirectional stream per message exchange, body streamed in 1 MiB chunks (the header packed
with the first, the trailer with the last: wire version 2), never pickle.
"""

from privfl.pki import NodeIdentity
from privfl.transport.client import Delivery, GossipClient
from privfl.transport.codec import (
    CHUNK_BYTES,
    DIGEST_ALGORITHMS,
    LEDGER_DIGEST,
    STREAM_DIGEST,
    WIRE_VERSION,
    DecodedMessage,
    ExpectedSpec,
    Message,
    PeerRefused,
    PeerUnavailable,
    SparseTensor,
    SpecChoice,
    TensorExpectation,
    TransportError,
    decode_stream,
    decode_tensors,
    encode_message,
    encode_tensors,
    iter_chunks,
    model_digest,
    spec_of,
)
from privfl.transport.common import PeerBackoff, PeerTraffic, TrafficCounters, TrustState
from privfl.transport.server import ACCEPT_KIND, ACK_KIND, GossipServer, Handler
from privfl.transport.signing import AuthenticationFailed, PeerVerifier, Signer

__all__ = [
    "ACCEPT_KIND", "ACK_KIND", "AuthenticationFailed", "CHUNK_BYTES", "PeerVerifier", "Signer", "TrustState",
    "DIGEST_ALGORITHMS", "LEDGER_DIGEST", "STREAM_DIGEST",
    "DecodedMessage", "Delivery", "ExpectedSpec", "GossipClient",
    "GossipServer", "Handler", "Message", "NodeIdentity", "PeerBackoff", "PeerRefused",
    "PeerTraffic", "PeerUnavailable", "SparseTensor", "SpecChoice", "TensorExpectation", "TrafficCounters",
    "TransportError", "WIRE_VERSION", "decode_stream", "decode_tensors", "encode_message", "encode_tensors",
    "iter_chunks", "model_digest", "spec_of",
]
