"""Control plane: filter backend instances for a request, then select one with a policy."""

from spear_rt.router.core import Decision, Router
from spear_rt.router.policies import POLICIES, Policy, make_policy

__all__ = ["POLICIES", "Decision", "Policy", "Router", "make_policy"]
