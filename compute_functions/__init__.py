"""Code that runs where the models run: model-server launch, inference, status.

Shipped to worker nodes that do not have the gateway installed, so it imports
only the standard library, httpx and ``backend_http`` (the HTTP/1.1 client it shares with the gateway).
"""
