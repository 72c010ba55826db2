"""Secure aggregation (SecAgg+) of the global prompt, with distributed DP (Skellam). Pure code.

shamir: secret sharing; ring: quantisation to Z_{2^k}; crypto: X25519, AES-GCM, AES-CTR PRG (the
`cryptography` package); graph: the sparse SecAgg+ graph; protocol: the four client stages and the
server; ddp: the Skellam noise accounting. See docs/PRIVACY.md.
"""
