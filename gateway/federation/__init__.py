"""Which endpoint serves a request: the registry and the choice among its entries."""
