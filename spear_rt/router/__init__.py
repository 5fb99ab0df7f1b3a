"""Control plane: filter backend instances for a request, then select one with a policy.

Names are imported lazily (PEP 562) so that `spear_rt.registry` can use
`spear_rt.router.health` and `spear_rt.router.limits` without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spear_rt.router.core import Decision, Router
    from spear_rt.router.policies import POLICIES, Policy, make_policy

__all__ = ["POLICIES", "Decision", "Policy", "Router", "make_policy"]


def __getattr__(name: str) -> Any:
    if name in ("Decision", "Router"):
        from spear_rt.router import core

        return getattr(core, name)
    if name in ("POLICIES", "Policy", "make_policy"):
        from spear_rt.router import policies

        return getattr(policies, name)
    raise AttributeError(name)
