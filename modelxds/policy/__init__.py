"""Routing policy: DestinationRule / VirtualService documents in Alibaba ASM's
dynamic-subset form, read into immutable values."""

from modelxds.policy.loader import (
    ObjectKey,
    PolicyError,
    default_policy,
    load_policy,
    parse_policy,
    read_objects,
)
from modelxds.policy.model import (
    DestinationRule,
    FallbackPolicy,
    HeaderToKey,
    HttpRoute,
    Policy,
    SubsetSelector,
    VirtualService,
)

__all__ = [
    "DestinationRule",
    "FallbackPolicy",
    "HeaderToKey",
    "HttpRoute",
    "ObjectKey",
    "Policy",
    "PolicyError",
    "SubsetSelector",
    "VirtualService",
    "default_policy",
    "load_policy",
    "parse_policy",
    "read_objects",
]
