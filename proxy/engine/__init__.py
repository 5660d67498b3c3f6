"""The pure aggregation engine: totals, queries, the scan cube and report insights; no file I/O."""
