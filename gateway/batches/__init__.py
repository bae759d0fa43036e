"""Batch jobs: a file of requests in, a file of answers out, run through the endpoint's transport and resumable."""
