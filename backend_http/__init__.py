"""The HTTP/1.1 client that the gateway and the worker nodes both use to reach OpenAI-compatible model servers.

A package of its own, beside ``gateway`` and ``compute_functions`` in the same distribution, so that neither has to
import the other for it: worker environments install the distribution with ``--no-deps`` and get it with
``compute_functions``. It imports only the standard library and ``httptools``.
"""
