"""The planner: a type per tensor, the fewest bytes under a quality target or the least error under a size.

Every tensor's candidates (quantize/sensitivity.py) are points (bytes, relative output error). Only the
lower convex hull of each tensor's points is worth taking: a point above the hull is beaten by mixing its
neighbours. Starting from every tensor's cheapest candidate, the hull steps of all tensors, taken in order
of error removed per byte added (steepest first), trace the optimal size-vs-error front (the Lagrangian
relaxation of the knapsack: at every point reached, no other choice of the same bytes has less summed error).
Walking that front until the goal is met gives the plan:

- max_mean_kld: take steps until the predicted mean KLD (kld_floor + kld_per_error × summed error) is at most
  the target, then step back the tensors that can while it stays met (the front's last step may overshoot).
- size_mb / bits_per_weight: take steps while the bytes fit; a step too big is skipped and smaller later
  ones still taken, so the budget is filled.

Deterministic: ties are broken by tensor name and type name, so the same costs give the same plan.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from siliconvert.quantize.sensitivity import KLD_PER_ERROR, Option, TensorCosts, predicted_kld
from siliconvert.recipe import QuantPlan


@dataclass(frozen=True)
class Plan:
    """The chosen option per tensor, the bytes outside the plan (metadata, norms: `fixed_bytes`) and the
    prediction's scale."""

    choices: dict[str, Option]
    params: int  # weights in the planned tensors
    fixed_bytes: int
    kld_per_error: float
    kld_floor: float
    goal: dict[str, float]  # the recipe's plan: {"max_mean_kld": x}, {"size_mb": n} or {"bits_per_weight": b}
    # every tensor at its cheapest option (no plan has fewer bytes) / its most exact one (none has less error):
    # where the re-plan loop has nowhere left to go
    cheapest: bool = False
    most_exact: bool = False

    @property
    def planned_bytes(self) -> int:
        return sum(o.nbytes for o in self.choices.values())

    @property
    def nbytes(self) -> int:
        return self.planned_bytes + self.fixed_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.planned_bytes / self.params if self.params else 0.0

    @property
    def summed_error(self) -> float:
        return sum(o.error for o in self.choices.values())

    @property
    def predicted_kld(self) -> float:
        return self.kld_floor + predicted_kld(self.summed_error, self.kld_per_error)

    def summary(self) -> dict:
        """What the report and the model card show: the totals, the types' shares, and tensor → type."""
        counts: dict[str, int] = {}
        for option in self.choices.values():
            counts[option.kind] = counts.get(option.kind, 0) + 1
        return {"goal": self.goal, "predicted_mean_kld": round(self.predicted_kld, 6),
                "bits_per_weight": round(self.bits_per_weight, 3),
                "planned_bytes": self.planned_bytes, "bytes": self.nbytes, "summed_error": self.summed_error,
                "kld_per_error": self.kld_per_error, "kld_floor": self.kld_floor,
                "types": dict(sorted(counts.items())), "cheapest": self.cheapest, "most_exact": self.most_exact,
                "tensors": {name: option.kind for name, option in sorted(self.choices.items())}}


def make_plan(costs: Sequence[TensorCosts], goal: QuantPlan, *, fixed_bytes: int = 0) -> Plan:
    """The plan for `goal` over `costs` (see the module docstring); `fixed_bytes` are the artifact's bytes
    outside the planned tensors (a size goal counts them)."""
    kld_per_error, kld_floor = goal.kld_per_error or KLD_PER_ERROR, goal.kld_floor or 0.0
    params = sum(c.params for c in costs)
    chosen = {c.name: _cheapest(c) for c in costs}
    steps = sorted((step for c in costs for step in _hull_steps(c)), key=lambda s: (-s[0], s[1], s[2].kind))
    if goal.max_mean_kld is not None:
        allowed_error = max(goal.max_mean_kld - kld_floor, 0.0) / kld_per_error
        error = sum(o.error for o in chosen.values())
        for _, name, option in steps:
            if error <= allowed_error:
                break
            error += option.error - chosen[name].error
            chosen[name] = option
        _trim(costs, chosen, allowed_error)
    else:
        budget = goal.size_mb * 1e6 - fixed_bytes if goal.size_mb is not None else goal.bits_per_weight * params / 8
        used = sum(o.nbytes for o in chosen.values())
        skipped: set[str] = set()  # a tensor whose step did not fit takes none of its later (steeper-cost) steps
        for _, name, option in steps:
            if name in skipped:
                continue
            extra = option.nbytes - chosen[name].nbytes
            if used + extra > budget:
                skipped.add(name)
                continue
            used += extra
            chosen[name] = option
    goals = goal.model_dump(exclude_none=True, exclude={"kld_per_error", "kld_floor"})
    cheapest = all(chosen[c.name] == _cheapest(c) for c in costs)
    most_exact = all(chosen[c.name].error <= min(o.error for o in c.options) for c in costs)
    return Plan(chosen, params, fixed_bytes, kld_per_error, kld_floor, goals, cheapest, most_exact)


def _trim(costs: Sequence[TensorCosts], chosen: dict[str, Option], allowed_error: float) -> None:
    """Undo what the last front step overshot: while some tensor can move to a cheaper option and the
    summed error stays allowed, make the move that saves the most bytes (the front's last step may add far
    more than the goal needed, and then a few other tensors can step back)."""
    error = sum(o.error for o in chosen.values())
    while True:
        moves = [(chosen[c.name].nbytes - o.nbytes, -o.error, c.name, o) for c in costs for o in c.options
                 if o.nbytes < chosen[c.name].nbytes and error - chosen[c.name].error + o.error <= allowed_error]
        if not moves:
            return
        _, _, name, option = max(moves, key=lambda m: (m[0], m[1], m[2], m[3].kind))
        error += option.error - chosen[name].error
        chosen[name] = option


def _cheapest(costs: TensorCosts) -> Option:
    """The option of fewest bytes (of those, the least error): where a plan starts, and its hull too."""
    return min(costs.options, key=lambda o: (o.nbytes, o.error))


def _hull_steps(costs: TensorCosts) -> list[tuple[float, str, Option]]:
    """(error removed per byte, tensor, step, option it moves to) along the tensor's lower convex hull."""
    hull: list[Option] = []
    # cheapest first, the more exact of two at one size first: errors rescaled after costing (GPTQ's share of an
    # MLX affine option's) can put an option below another of its size, and no step may be a step of zero bytes
    for option in sorted(costs.options, key=lambda o: (o.nbytes, o.error)):
        if hull and option.error >= hull[-1].error:
            continue  # no fewer bytes, no less error
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], option):
            hull.pop()  # the middle point lies above the line from its neighbours
        hull.append(option)
    return [(_slope(a, b), costs.name, b) for a, b in itertools.pairwise(hull)]


def _slope(cheaper: Option, dearer: Option) -> float:
    return (cheaper.error - dearer.error) / (dearer.nbytes - cheaper.nbytes)
