"""Counter-based random numbers inside kernels.

Exploration noise must be regenerable from a key alone (seed, module, a hash of x) so that a
later quality rating can be turned into a REINFORCE step without storing the noise; dropout masks
use the same generator so training is deterministic given a seed. SplitMix64 is a good,
stateless mixer for that; Python's and Numba's own hashes are salted per process, so they are
not used.
"""

from __future__ import annotations

import numpy as np
from sona.kernels.jit import inline, kernel

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / 9007199254740992.0


@inline
def splitmix64(z: np.uint64) -> np.uint64:
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@inline
def uniform01(key: np.uint64, counter: np.uint64) -> float:
    """A float in (0, 1) determined by (key, counter)."""
    z = splitmix64(key ^ splitmix64(counter))
    return (float(z >> np.uint64(11)) + 0.5) * _INV_2_53


@inline
def normal(key: np.uint64, counter: np.uint64) -> float:
    """A standard normal determined by (key, counter), by Box-Muller on two uniforms."""
    u1 = uniform01(key, counter * np.uint64(2))
    u2 = uniform01(key, counter * np.uint64(2) + np.uint64(1))
    return float(np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2))


@kernel
def fill_normal(key: np.uint64, scale: float, out: np.ndarray) -> None:
    """out[i] = scale * N(0, 1) keyed on (key, i)."""
    for i in range(out.shape[0]):
        out[i] = scale * normal(key, np.uint64(i))


@kernel
def add_normal(key: np.uint64, scale: float, out: np.ndarray) -> None:
    """out[i] += scale * N(0, 1) keyed on (key, i); the same noise ``fill_normal`` makes."""
    for i in range(out.shape[0]):
        out[i] += scale * normal(key, np.uint64(i))


@kernel
def hash_vector(x: np.ndarray, seed: np.uint64) -> np.uint64:
    """A stable 64-bit hash of a float32 vector's bit pattern."""
    bits = x.view(np.uint32)
    h = splitmix64(seed ^ np.uint64(x.shape[0]))
    for i in range(bits.shape[0]):
        h = (h ^ np.uint64(bits[i])) * np.uint64(0x100000001B3)
    return splitmix64(h)
