"""A Flower App running privfl's DPClient unchanged under Flower's own runtime."""
