"""The model families: one table (``registry.FAMILIES``) that ``train``, ``predict --run``,
``export`` and the leaderboard enumerate. See ``registry`` for what a family declares."""

from .registry import BASELINES, FAMILIES, Family, family_named, family_of_card, family_of_run

__all__ = ["BASELINES", "FAMILIES", "Family", "family_named", "family_of_card", "family_of_run"]
