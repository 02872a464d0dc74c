"""Rewards by name: ``build_reward("pickscore", path=...)``; ``"module:attr"`` imports a user callable."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import torch

from leapalign.rewards.base import RewardFn
from leapalign.rewards.composite import CompositeReward, RewardTerm

__all__ = ["UnknownRewardError", "REWARD_NAMES", "build_reward", "build_rewards", "check_reward_name"]


class UnknownRewardError(ValueError):
    """A reward name is neither registered nor an importable ``module:attribute``."""


def _clip(path=None, **kw):
    from leapalign.rewards.clip import clip_score

    return clip_score(_need_path("clip", path), **kw)


def _pick(path=None, **kw):
    from leapalign.rewards.clip import pick_score

    return pick_score(_need_path("pickscore", path), **kw)


def _hps(path=None, **kw):
    from leapalign.rewards.hps import HPSv2Reward

    return HPSv2Reward(_need_path("hps", path), **kw)


def _simple(attr: str) -> Callable[..., RewardFn]:
    def factory(path=None, **kw):
        from leapalign.rewards import simple

        if path is not None or kw:
            raise ValueError(f"reward {attr!r} takes no path or kwargs, got path={path!r}, kwargs={kw}")
        return getattr(simple, attr)

    return factory


_REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "clip": _clip,
    "pickscore": _pick,
    "hps": _hps,
    "hpsv2.1": _hps,
    "brightness": _simple("brightness_reward"),
    "saturation": _simple("saturation_reward"),
}
REWARD_NAMES: tuple[str, ...] = tuple(_REGISTRY)
_MODEL_REWARDS = {"clip", "pickscore", "hps", "hpsv2.1"}


def _need_path(name: str, path: str | None) -> str:
    if not path:
        raise ValueError(f"reward {name!r} needs path= a local checkpoint (no weights are downloaded)")
    return path


def check_reward_name(name: str) -> None:
    """Fail fast (before loading any model) on a name that can never resolve."""
    if name in _REGISTRY:
        return
    if ":" in name:
        module, _, attr = name.partition(":")
        if module and attr:
            return
    raise UnknownRewardError(
        f"unknown reward name={name!r}; expected one of {list(REWARD_NAMES)} or 'package.module:callable'"
    )


def build_reward(name: str, path: str | None = None, **kwargs: Any) -> RewardFn:
    """A reward callable ``(images [B,3,H,W] in [0,1], prompts) -> [B]``.

    Registered: ``clip`` / ``pickscore`` (transformers CLIPModel directory), ``hps`` / ``hpsv2.1``
    (open_clip checkpoint file), ``brightness``, ``saturation``. Anything else must be
    ``"module:attr"``: the attribute is the reward itself, or a factory called with ``path``/
    ``kwargs`` when either is given.
    """
    check_reward_name(name)
    if name in _REGISTRY:
        return _REGISTRY[name](path=path, **kwargs)
    module_name, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownRewardError(f"reward name={name!r}: cannot import {attr!r} from {module_name!r} ({exc})") from exc
    if path is not None or kwargs:
        obj = obj(**({"path": path} if path is not None else {}), **kwargs)
    if not callable(obj):
        raise UnknownRewardError(f"reward name={name!r} resolved to a non-callable {type(obj).__name__}")
    return obj


def build_rewards(
    specs: Sequence[Any], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    gradient_checkpointing: bool = False,
) -> CompositeReward:
    """A :class:`CompositeReward` from ``RewardSpec``-like objects (name, path, weight, hinge, kwargs)."""
    if not specs:
        raise ValueError("reward_specs is empty: name at least one reward (e.g. {name: pickscore, path: ...})")
    for spec in specs:
        check_reward_name(spec.name)
    terms = []
    for spec in specs:
        kw = dict(spec.kwargs)
        if spec.name in _MODEL_REWARDS:
            kw.setdefault("dtype", dtype)
            kw.setdefault("device", device)
            kw.setdefault("gradient_checkpointing", gradient_checkpointing)
        terms.append(RewardTerm(spec.name, build_reward(spec.name, spec.path, **kw), spec.weight, spec.hinge))
    return CompositeReward(terms)
