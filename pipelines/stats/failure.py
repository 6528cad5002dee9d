"""How a refusal inside the statistics pipeline reaches the driver as the same one-line error.

Beam's runners do not carry exception types across processes, so a step that refuses (no valid
episode in a dataset, an unreadable cached projection) first leaves a note (``FAILURE_FILE`` in the
output directory: the error's class name and message); the driver, seeing the pipeline fail, raises
the noted error instead of the runner's wrapper.
"""

from __future__ import annotations

import json

from vlaprep import paths
from vlaprep.errors import UserError
from vlaprep.pipelines.job import write_json_atomic
from vlaprep.pipelines.stats.cache import StatsCacheError

FAILURE_FILE = ".stats-failure.json"  # why the last run's pipeline refused (read by a waiting driver)


class NoValidEpisodesError(UserError):
    """Every episode of a dataset was quarantined: there is nothing to compute statistics from."""


# Errors a pipeline step reports through FAILURE_FILE, by name.
_PIPELINE_ERRORS = {cls.__name__: cls for cls in (NoValidEpisodesError, StatsCacheError)}


def note_failure(output_dir: str, error: type, message: str) -> None:
    """Leave the reason of a refusal inside the pipeline for the driver (see ``noted_failure``)."""
    write_json_atomic(paths.join(output_dir, FAILURE_FILE), {"error": error.__name__, "message": message})


def noted_failure(failure_path: str) -> UserError | None:
    """The error a pipeline step noted in ``failure_path``, if any."""
    if not paths.isfile(failure_path):
        return None
    try:
        note = json.loads(paths.read_text(failure_path))
        return _PIPELINE_ERRORS[note["error"]](str(note["message"]))
    except (ValueError, KeyError, TypeError):  # a note from another version: the pipeline's own error stands
        return None
