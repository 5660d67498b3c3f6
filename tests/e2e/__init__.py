"""End to end: the real proxy (in process or as a process) in front of real servers."""
