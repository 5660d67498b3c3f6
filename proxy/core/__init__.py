"""Pure helpers every layer shares: money units and record timestamps; no I/O."""
