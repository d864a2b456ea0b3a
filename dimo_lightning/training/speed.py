"""Speed levers of a Di[M]O run that change no result: the output-head mode and ``torch.compile`` of the networks.

Both act on the networks in place and leave their parameters and state-dict keys as they are, so checkpoints,
exports and the EMA copy (a deep copy drops the compiled wrapper) are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

COMPILABLE_NETWORKS = ("student", "aux", "teacher")


def set_full_head(networks: Iterable[nn.Module], full: bool) -> int:
    """Switch the output head of every network that has one (``full_head`` attribute) -> how many were switched.

    ``full=True`` computes the head over all positions and vocabulary ids before slicing (the reference
    computation); False computes only the returned logits. Networks without the switch are left alone.
    """
    switched = 0
    for network in networks:
        if hasattr(network, "full_head"):
            network.full_head = bool(full)
            switched += 1
    return switched


def compile_networks(networks: Mapping[str, nn.Module], names: Iterable[str] | None, **compile_kwargs) -> list[str]:
    """``nn.Module.compile()`` the networks named in ``names`` (of ``student``, ``aux``, ``teacher``) in place.

    In-place compilation keeps the parameter names (no ``_orig_mod.`` prefix), so the checkpoint layout does not
    change. Compilation itself happens lazily at the first forward.

    Args:
        networks: name -> network.
        names: which to compile (None or empty: none).
        compile_kwargs: passed to ``torch.compile`` (e.g. ``mode``, ``dynamic``).

    Returns:
        The names compiled, in the order given.
    """
    chosen = list(names or [])
    unknown = [n for n in chosen if n not in COMPILABLE_NETWORKS]
    if unknown:
        choices = ", ".join(COMPILABLE_NETWORKS)
        raise ValueError(f"compile_networks: unknown network(s) {unknown}; choose from {choices}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"compile_networks lists a network twice: {chosen}")
    for name in chosen:
        networks[name].compile(**compile_kwargs)
    return chosen
