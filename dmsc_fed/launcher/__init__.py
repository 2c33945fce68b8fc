"""Start, watch and stop Flower SuperLink and SuperNode processes."""
