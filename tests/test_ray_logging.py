"""The local Ray's worker setup hook keeps Ray Train's PlacementGroupCleaner to errors: without a
dashboard its State API query fails every second and would log a warning each time."""
from __future__ import annotations

import logging


def test_placement_group_cleaner_warnings_are_quieted_errors_kept():
    from orchestrator.ray_runner import PG_CLEANER_LOGGER, quiet_placement_group_cleaner

    logger = logging.getLogger(PG_CLEANER_LOGGER)
    before = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        assert logger.isEnabledFor(logging.WARNING)
        quiet_placement_group_cleaner()
        assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)
        # the name is the module Ray logs from (a renamed module would silently undo the filter)
        from ray.train.v2._internal.execution.controller import placement_group_cleaner
        assert placement_group_cleaner.logger.name == PG_CLEANER_LOGGER
    finally:
        logger.setLevel(before)
