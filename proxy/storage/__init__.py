"""Log storage: reading log files, the parallel scan and the roll-up index beside each log."""
