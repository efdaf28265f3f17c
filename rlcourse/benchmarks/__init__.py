"""One module per benchmarked method, each defining ``BENCH = {"ours": fn, "TRL": fn}`` (see ``rlcourse.bench``)."""
