"""Protobuf schema of the gossip transport; gossip_pb2 is generated from gossip.proto and committed."""
