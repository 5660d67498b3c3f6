"""The command line, run as a user runs it: reports, reprice and pricing, serving."""
