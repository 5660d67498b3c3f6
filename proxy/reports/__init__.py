"""Reports over the log, rendered as text, CSV or JSON: one ``ReportRequest`` in, the
same output whether the command line or the coming analytics HTTP API asks. Every number comes from
``engine`` (over ``storage``'s scan); this package only chooses and formats."""
