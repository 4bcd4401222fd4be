"""Distributed differential privacy for secure aggregation (sans-I/O).

The distributed discrete Gaussian of Kairouz, Liu, Steinke (ICML 2021) with exact integer
sampling (Canonne, Kamath, Steinke 2020), made dropout-robust with removable excess noise
components (after Dordis, EuroSys 2024), accounted with Google's ``dp-accounting``.
See ``docs/dp.md``.

Modules
-------
randomness
    Exact uniform integers from one keyed ChaCha20 stream.
sampling
    Bernoulli(exp(-gamma)), discrete Laplace and discrete Gaussian samplers.
rotation
    Randomized Hadamard rotation with keyed signs.
encoding
    Clipping, scaling, conditional randomized rounding, modular clipping, decoding.
lanes
    Ring width with a stated wrap-around probability.
xnoise
    Noise components and which of them the server removes for a survivor set.
accountant
    Per-round ``rho``, RDP and PLD composition, the per-job ledger.
calibration
    ``(epsilon, delta, rounds, clients) -> (gamma, noise plan, bits)``.
policy
    Client-side check of the server's DP offer against the client's own budget.
participants
    ``DPClient`` / ``DPServer``: the calls the masked round's client and server make.
streams
    Chunked noise streams (one ChaCha20 stream per 256 coordinates) and their exact
    scalar reference (kernel: kernels/dp_noise).
simulation
    One round's DP arithmetic in memory (what ``secagg simulate --dp-epsilon`` reports).
"""
