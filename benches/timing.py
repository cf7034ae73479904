"""Timing helpers shared by the peer benchmark scripts."""
import time


def best_of(n, f):
    """The shortest of `n` wall-clock timings of `f()`, in seconds."""
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best
