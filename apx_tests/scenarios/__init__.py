"""Backend-neutral scenarios over a register bank: load -> export -> compare -> modify ->
import -> the guest verifies."""

from .catalog import SCENARIOS, Scenario
from .engine import Run, ScenarioFailure, ScenarioNotApplicable

__all__ = ["SCENARIOS", "Scenario", "Run", "ScenarioFailure", "ScenarioNotApplicable"]
