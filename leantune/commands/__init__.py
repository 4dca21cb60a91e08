"""One thin module per CLI command: parse the flags (typed signature + docstring), call the library, print."""
