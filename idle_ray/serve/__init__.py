"""Recommendations out of the system: batch top-K for every user on Ray Data (:mod:`.batch`)."""
