"""API keys: hashed in a SQLite file written by `sidecar keys`, indexed in memory for
the request path (see sidecar.auth.keys)."""

from sidecar.auth.keys import (
    DEFAULT_KEYS_DB,
    KEYS_DB_ENV,
    ApiKey,
    KeyIndex,
    KeyNotFound,
    KeyRevoked,
    KeyStore,
    KeyStoreError,
    KeyWatcher,
    credential,
)

__all__ = [
    "DEFAULT_KEYS_DB",
    "KEYS_DB_ENV",
    "ApiKey",
    "KeyIndex",
    "KeyNotFound",
    "KeyRevoked",
    "KeyStore",
    "KeyStoreError",
    "KeyWatcher",
    "credential",
]
