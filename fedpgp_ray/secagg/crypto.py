"""The cryptographic primitives of SecAgg, all from the `cryptography` package.

* key agreement: X25519 (Diffie-Hellman on Curve25519), the shared secret stretched by HKDF-SHA256;
* authenticated encryption of the Shamir shares sent between clients: AES-256-GCM, with the sender
  and receiver ids and the round as associated data (a share cannot be replayed to another pair);
* the mask PRG: AES-256 in counter mode over zeros, keyed by a 32-byte seed, read as uint64 words.
"""
from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_RAW = serialization.Encoding.Raw


def new_private_key() -> bytes:
    """A fresh X25519 private key (32 raw bytes, from the OS's CSPRNG)."""
    return X25519PrivateKey.generate().private_bytes(_RAW, serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption())


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256(X25519(private, peer_public), info=purpose)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """Raises cryptography.exceptions.InvalidTag when the ciphertext or its associated data was altered."""
    return AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], associated)


def prg_words(seed: bytes, count: int) -> np.ndarray:
    """`count` pseudo-random uint64 words: AES-256-CTR keystream of `seed` (zero nonce: one stream per seed)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * count)), dtype=np.uint64).copy()
