"""rlcourse: LLM post-training (SFT, preference optimisation, online RL) built from scratch and
checked against TRL. See README.md; the lessons are in course/, the notebooks in notebooks/.

Importing the package checks that the installed libraries are the pinned versions
(``rlcourse.versions``) and warns, naming each difference and the fix, when they are not.
Set ``RLCOURSE_SKIP_VERSION_CHECK=1`` to skip that check. It also sets the OpenMP environment of a course
process (``rlcourse.threads``: a short OpenMP spin, threads capped to the usable cores) when ``torch`` is not
imported yet.
"""

import os as _os

from rlcourse import threads as _threads

_threads.apply()

__version__ = "0.1.0"

if _os.environ.get("RLCOURSE_SKIP_VERSION_CHECK") != "1":
    try:
        from rlcourse.versions import check_versions as _check_versions
    except ImportError:  # `packaging` missing: the install itself is broken, pip will say more
        pass
    else:
        _check_versions(warn=True)
