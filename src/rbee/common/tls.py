"""Which certificate authorities rbee's clients trust.

The standard `SSL_CERT_FILE` (or `SSL_CERT_DIR`) names the CA of a cluster's own certificates.
httpx (0.28) reads it itself whenever a client is made with its defaults (`trust_env=True`),
falling back to certifi's public CAs; the aiohttp clients (the queen's to workers, a worker's
heartbeats to the queen) get the same rule from `client_context()`, so every hop trusts the
same CAs.
"""

from __future__ import annotations

import os
import ssl

import certifi


def client_context() -> ssl.SSLContext:
    """A verifying client context: the CAs named by SSL_CERT_FILE / SSL_CERT_DIR, else certifi's."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    return ssl.create_default_context(cafile=certifi.where())
