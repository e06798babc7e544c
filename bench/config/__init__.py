"""Settings of a run: the command-line options and their ``type=`` parsers, the typed nested :class:`BenchConfig`
and its presets, the command lines' shared conventions (one-line usage errors, Ctrl-C), byte sizes."""
