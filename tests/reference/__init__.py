"""Small ports of the published reference searches, used as oracles by the tests.

Each module names the upstream file it follows. They work like the originals: on nn.Modules,
mutating the weights in place and restoring the state dict between grid points, so they share
no code path with tlq's tensor-level searches.
"""
