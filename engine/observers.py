"""Sacred's own observers beside the project's run folder: ``-F DIR``, ``-m MONGO_URL``, ``-s SQL_URL``.

``train.py`` and ``test.py`` pass Sacred's command line through, so its observer flags work as
documented by Sacred, next to :class:`config.RunFolderObserver` (which always writes the run folder)::

    python train.py -F runs/sacred with abd_mri                          # FileStorageObserver
    python train.py -m mongodb://localhost:27017/qamp with abd_mri      # MongoObserver (pip install pymongo)
    python test.py  -s sqlite:///runs.db with abd_mri reload_model_path=...  # SqlObserver (sqlalchemy)

Two details make them work with this project:

* the run folder observer has priority 10, below Sacred's (file 20, Mongo 30, SQL 40), so Sacred's
  observers start first and number runs their own way (``-F`` folders ``1``, ``2``, ...; the database
  ids) instead of reusing the run folder's name, which repeats across log dirs and would collide;
* Sacred's ``SqlObserver`` stores a run's result in a float column, and ``train`` / ``test`` return
  a dict: :func:`install_sql_result_fix` makes the observer store a non-numeric result as NULL in
  ``run.result`` and as JSON under ``"result"`` in ``run.info`` (numeric results are unchanged).
"""
from __future__ import annotations

import json
import numbers
from typing import Any

_INSTALLED = False


def _split_result(result: Any) -> tuple[float | None, Any]:
    """``(value for the float column, value for info['result'] or None)``."""
    if result is None or (isinstance(result, numbers.Real) and not isinstance(result, bool)):
        return result, None
    return None, result


def install_sql_result_fix() -> None:
    """Patch ``sacred.observers.SqlObserver`` once so that dict results are stored (see module doc)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from sacred.observers.sql import SqlObserver
    from sacred.serializer import flatten

    original_heartbeat, original_completed = SqlObserver.heartbeat_event, SqlObserver.completed_event

    def keep(self, result) -> float | None:
        value, other = _split_result(result)
        if other is not None:
            info = json.loads(self.run.info or "{}")
            info["result"] = flatten(other)
            self.run.info = json.dumps(info)
        return value

    def heartbeat_event(self, info, captured_out, beat_time, result):
        original_heartbeat(self, info, captured_out, beat_time, _split_result(result)[0])
        if _split_result(result)[1] is not None:
            keep(self, result)
            self.save()

    def completed_event(self, stop_time, result):
        original_completed(self, stop_time, keep(self, result))

    SqlObserver.heartbeat_event = heartbeat_event
    SqlObserver.completed_event = completed_event
    _INSTALLED = True
