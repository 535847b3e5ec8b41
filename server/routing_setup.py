"""Turn `routing.*` config into a policy checked against the served model's shape."""
from __future__ import annotations

from .config import ConfigError, RoutingConfig, thaw
from .moe.routing import PolicyConfigError, RoutingPolicy, UnknownPolicyError, build_policy


def build_routing_policy(cfg: RoutingConfig, *, num_experts: int, top_k: int, ep_size: int,
                         num_layers: int | None = None) -> RoutingPolicy:
    """Build the configured policy; any problem becomes a ConfigError naming the key."""
    if num_experts % ep_size:
        raise ConfigError(
            f"parallel.ep_size={ep_size} does not divide the model's {num_experts} experts "
            f"(choose one of {[d for d in range(1, num_experts + 1) if num_experts % d == 0]})"
        )
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"the model's top-k ({top_k}) must be in [1, num_experts={num_experts}]")
    try:
        policy = build_policy(cfg.name, **thaw(cfg.params))
        policy.validate(num_experts, top_k, ep_size, num_layers)
    except UnknownPolicyError as exc:
        raise ConfigError(f"routing.name: {exc}") from None
    except (PolicyConfigError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    return policy
