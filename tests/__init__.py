"""cratevit's tests, in folders by the layer of src/cratevit/ they guard (see tests/README.md)."""
