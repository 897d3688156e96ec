"""MLflow's webhook signature: how a delivery is signed, and checked against the secrets the bridge accepts.

How MLflow signs (verified in `mlflow/webhooks/delivery.py`, `_send_webhook_request` and
`_generate_hmac_signature`, MLflow 3.17): the body is `json.dumps({"entity", "action", "timestamp", "data"})`,
`X-MLflow-Delivery-Id` is a fresh uuid4, `X-MLflow-Timestamp` is `str(int(time.time()))` (Unix **seconds**) and
`X-MLflow-Signature` is `"v1," + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}"))`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_HEADER = "X-MLflow-Signature"
SIGNATURE_VERSION = "v1"


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of a delivery (for tests and tools): `v1,<base64 HMAC-SHA256>`."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signature_valid(header: str, delivery_id: str, timestamp: str, body: bytes, keys: Iterable[bytes]) -> bool:
    """Whether any `v1` signature in `header` is the delivery's signature under any of `keys`, in constant work."""
    # Header values reach us latin-1-decoded; encoding back gives the bytes MLflow hashed (its ids are ASCII).
    signed = delivery_id.encode("latin-1") + b"." + timestamp.encode("latin-1") + b"." + body
    offered = []
    for part in header.split():  # Standard Webhooks allows several space-separated signatures
        version, _, value = part.partition(",")
        if version == SIGNATURE_VERSION and value:
            offered.append(value.encode("latin-1"))
    valid = False
    for key in keys:
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
        for value in offered:
            valid |= hmac.compare_digest(expected, value)  # no early exit: constant work per request
    return valid


def secret_fingerprint(secret: str) -> str:
    """A short, non-reversible tag of the secret (MLflow never returns a webhook's secret, so we compare these)."""
    return hmac.new(secret.encode(), b"flywheel-webhook-secret-fingerprint", hashlib.sha256).hexdigest()[:16]
