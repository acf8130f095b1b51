"""The ``adapterlab`` command line: one file per verb, no logic (they call the library)."""
