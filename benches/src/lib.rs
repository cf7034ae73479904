//! Benchmarks of healer; the end-to-end peer comparison is `peer_zscore.py`.
