"""Token budgets: bucket arithmetic, a route's policy, the backends, the admission."""

from sidecar.ratelimit.bucket import Bucket, Grant
from sidecar.ratelimit.policy import LimitPolicy, Limits

__all__ = ["Bucket", "Grant", "LimitPolicy", "Limits"]
