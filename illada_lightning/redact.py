"""Credentials never leave the command line: a URL is stored, logged and printed with its password masked.

    mask_password("postgresql+psycopg://illada:s3cret@db:5432/optuna")  ->  "postgresql+psycopg://illada:***@db:5432/optuna"

The same rendering as SQLAlchemy's `URL.render_as_string(hide_password=True)`, for any `scheme://user:pass@`
inside a text (an error message, a config value), so MLflow params and tags, printed summaries and saved
configs never hold a password. Keep secrets out of URLs altogether where the client allows it: libpq (psycopg)
reads PGPASSWORD or ~/.pgpass, MLflow reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")


def mask_password(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def mask_values(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of `values` with passwords masked in its string values (params, tags, a flattened config)."""
    return {k: mask_password(v) if isinstance(v, str) else v for k, v in values.items()}
