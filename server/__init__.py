"""The control and aggregation layer: the Flower ServerApp and its round loop."""
