"""How models meet: gossip topologies, compression, decentralized and Flower strategies."""
