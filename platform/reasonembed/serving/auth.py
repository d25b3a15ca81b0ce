"""Optional API key (bearer token) for the embedding service.

The key comes from a secret file (first line) or an environment variable. It is resolved once where the application
is built (``reasonembed serve``'s own process, or Serve's build task for ``serve deploy``) and handed to the ingress
replicas as a constructor argument wrapped in ``SecretStr``: a replica on an existing cluster does not inherit the
launching shell's environment, so a replica reading the variable itself would find nothing and serve without auth.
A constructor argument rather than a ``runtime_env`` variable, because runtime environments are shown by
``serve status``/the dashboard and written to Ray's runtime-env logs, while init args are not.

The key is compared in constant time and never logged or echoed: error messages name only where it should come from.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from pydantic import SecretStr

from reasonembed.config.serve import AuthConfig


class AuthConfigError(ValueError):
    """The configured key source is unusable (missing or empty file, variable set but empty)."""


def load_api_key(cfg: AuthConfig) -> str | None:
    """The API key, or None when the service is open (no file configured and the variable unset).

    A configured key source that yields no key is an error, never a silently open service: a missing or empty key
    file, or the variable set to an empty or whitespace-only value (e.g. ``REASONEMBED_API_KEY=$UNSET_VAR``)."""
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file():
            raise AuthConfigError(f"auth.api_key_file: {path} does not exist")
        lines = path.read_text().splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise AuthConfigError(f"auth.api_key_file: {path} is empty")
        return key
    if cfg.api_key_env and cfg.api_key_env in os.environ:
        key = os.environ[cfg.api_key_env].strip()
        if not key:
            raise AuthConfigError(
                f"environment variable {cfg.api_key_env} (auth.api_key_env) is set but empty: set it to the API "
                f"key, or unset it to run without auth")
        return key
    return None


def resolve_api_key(cfg: AuthConfig) -> SecretStr | None:
    """``load_api_key`` wrapped for passing to replicas: its repr is masked, so printing init args shows no key."""
    key = load_api_key(cfg)
    return SecretStr(key) if key is not None else None


def describe_auth(cfg: AuthConfig, key: SecretStr | None) -> str:
    """One line for the start-up log saying where the key came from, or plainly that there is none."""
    if key is not None:
        source = f"file {cfg.api_key_file}" if cfg.api_key_file else f"environment variable {cfg.api_key_env}"
        return f"auth: API key required (Authorization: Bearer), from {source}"
    hint = f"set {cfg.api_key_env} or auth.api_key_file" if cfg.api_key_env else "set auth.api_key_file"
    return f"auth: NONE, the service has no API key and anyone who can reach it can use it ({hint} to require one)"


def bearer_ok(authorization: str | None, key: str) -> bool:
    """True iff the header is ``Bearer <key>`` (scheme case-insensitive, constant-time comparison)."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())
