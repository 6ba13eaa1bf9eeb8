"""Old spellings of renamed library keywords, kept working for one release with a note."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def renamed_keyword(function: str, old: str, old_value, new: str, new_value):
    """The value of keyword ``new`` of ``function``, or of its old spelling ``old`` when a
    caller still passes that (not None): then with a deprecation note on the log."""
    if old_value is None:
        return new_value
    log.warning("note: %s(%s=...) is deprecated and will be removed in the next release; "
                "use %s=", function, old, new)
    return old_value
