"""Moved to :mod:`duo_plugin.objectives.curriculum` (the objectives own their schedules); re-exported here."""

from duo_plugin.objectives.curriculum import CurriculumPhase, PhaseInfo  # noqa: F401

__all__ = ["CurriculumPhase", "PhaseInfo"]
