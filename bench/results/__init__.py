"""Results: the one record type (:class:`CaseRecord`, every key documented once), the files it is written to and
read from (crash-safe JSON lines, pytest-benchmark JSON), and the terminal summary of a session."""
