"""The fleet dashboard (issue 17): server-rendered pages under /ui (see docs/dashboard.md)."""
