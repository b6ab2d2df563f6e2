"""Names that command-line flags offer, kept free of torch so that ``gapaware --help`` starts fast.

The server owns what they mean: :data:`POLICY_NAMES` are the keys of
``gapaware.server.policies.POLICIES`` (a test keeps the two equal), :data:`NONFINITE_ACTIONS` what
``ParameterServerState`` does with a gradient holding NaN or Inf.
"""

POLICY_NAMES = ("asgd", "staleness-aware", "gap-aware", "dana", "dana-ga")

NONFINITE_ACTIONS = ("reject", "skip", "apply")
"""What a push with NaN or Inf gets: refused, acknowledged and dropped, or applied as it is (the
parameters then diverge, as plain arithmetic would: the simulator uses this to report divergence)."""
