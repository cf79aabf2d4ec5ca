"""Network-namespace MPTCP lab: topology, traffic apps and end-to-end scenarios.

Needs root, ``ip netns``, kernel MPTCP, tcpdump and tshark; ``lab_available()``
says why not when it cannot run.
"""

from __future__ import annotations

from mproxy.lab.topology import Lab, LabAddresses, LabError, cleanup_stale, lab_available

__all__ = ["Lab", "LabAddresses", "LabError", "cleanup_stale", "lab_available"]
