"""How long a refused collective may take before a test calls it a hang.

The tests that check a mismatch is refused promptly (not left waiting) time the
refusal; the bound is loose because shared, oversubscribed machines stall ranks
for seconds, and a rank failing such a check alone breaks the session's pairing
of collectives for every later test.
"""
LIVENESS_S = 60.0
