"""The test suite, laid out like the package: unit/ (in process), e2e/ (real servers),
cli/ (the commands as a user runs them), support/ (helpers shared with bench/)."""
