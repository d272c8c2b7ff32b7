"""Which certificate authorities rbee's clients trust.

The standard `SSL_CERT_FILE` (or `SSL_CERT_DIR`) names the CA of a cluster's own certificates.
httpx (0.28) reads it itself whenever a client is made with its defaults (`trust_env=True`),
falling back to certifi's public CAs; the aiohttp clients (the queen's to workers, a worker's
heartbeats to the queen) get the same rule from `client_context()`, so every hop trusts the
same CAs.
"""

from __future__ import annotations

import functools
import os
import ssl

import certifi


def client_context() -> ssl.SSLContext:
    """A verifying client context: the CAs named by SSL_CERT_FILE / SSL_CERT_DIR, else certifi's.
    One per process and CA setting (reading the CAs takes ~25 ms): a standby worker makes its
    own ahead, so a worker's start does not wait for it. Never changed once made."""
    return _context(os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None)


@functools.cache
def _context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    return ssl.create_default_context(cafile=certifi.where())
