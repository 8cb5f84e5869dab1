"""MX Guard: an anti-spam milter for secondary (backup) MX hosts.

A compliant sender reaches a secondary MX only when every MX host with a lower
preference number failed for it. MX Guard knows whether the primary was reachable
when a connection arrived, and flags or tempfails mail that bypassed a healthy primary.
"""

__version__ = "0.1.0"
