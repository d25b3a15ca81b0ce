"""Optional API key (bearer token) for the embedding service.

The key comes from a secret file (first line) or an environment variable, read once in the ingress replica. It is
compared in constant time and never logged or echoed: error messages say only that the key is missing or wrong.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from reasonembed.config.serve import AuthConfig


class AuthConfigError(ValueError):
    """The configured key source is unusable (missing or empty file)."""


def load_api_key(cfg: AuthConfig) -> str | None:
    """The API key, or None when the service is open. A configured but missing/empty key file is an error."""
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file():
            raise AuthConfigError(f"auth.api_key_file: {path} does not exist")
        lines = path.read_text().splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise AuthConfigError(f"auth.api_key_file: {path} is empty")
        return key
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        return key or None
    return None


def bearer_ok(authorization: str | None, key: str) -> bool:
    """True iff the header is ``Bearer <key>`` (scheme case-insensitive, constant-time comparison)."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())
