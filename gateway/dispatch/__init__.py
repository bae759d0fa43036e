"""How work reaches a backend: one ``Dispatcher`` contract, one module per transport."""
