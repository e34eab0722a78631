"""The progress bars people read during long work."""

from __future__ import annotations

import pytest

from ifsteer.errors import InvalidSteering
from ifsteer.progress import progress_bar


def test_a_bar_shows_its_work_and_a_failed_one_leaves_no_trace(capsys):
    with progress_bar("answers", 3) as advance:
        advance(3)
    assert "answers" in capsys.readouterr().err
    with pytest.raises(InvalidSteering), progress_bar("training lowercase", 100):
        raise InvalidSteering("3 training examples: need at least 4")
    assert "training lowercase" not in capsys.readouterr().err
