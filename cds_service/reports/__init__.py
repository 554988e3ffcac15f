"""Reports people read: the feedback report and the audit report as HTML pages with charts."""
