"""The computing layer: the Flower ClientApp that runs at every site."""
