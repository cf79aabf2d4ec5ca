"""Wire formats: link, IP, TCP and MPTCP option parsing and building (sans-I/O)."""
