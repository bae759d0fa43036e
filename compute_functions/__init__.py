"""Code that runs where the models run: model-server launch, inference, status.

Shipped to worker nodes that do not have the gateway installed, so it imports
only the standard library (and httpx, or httptools for parsing HTTP, where an HTTP client is needed).
"""
