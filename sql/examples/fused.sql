-- Fusion of the rolling z-score and the LSTM forecaster for every metric of every resource
-- (the isolation forest joins with `iforest_pvalue('model.json', iforest_score(…))` once a
-- model is trained for the fleet's metrics: see `healer train iforest`).
--
-- Each detector's statistic becomes a p-value, the probability that normal data scores at
-- least as high:
--   * z-score over the last 300 samples (the seed's window; full windows only): Gaussian tail;
--   * LSTM residual, the current value against the forecast from the 60 samples before it,
--     in units of that window's scale: its measured tail on held-out data (the model's
--     manifest, `calibration`).
-- `fuse_confidence` combines them (Šidák on the smallest) into decades of surprise
-- d = -log10(p), confidence = d / (d + 1). The seed's line 0.8 is p <= 1e-4, about one false
-- candidate a week per normal series sampled once a minute.
--
-- The model path is relative to the working directory (run from the repository root).
CREATE VIEW fused AS
WITH windowed AS (
    SELECT
        ts, resource, metric, value,
        AVG(value)         OVER z AS mean,
        STDDEV_SAMP(value) OVER z AS std,
        COUNT(value)       OVER z AS n,
        lstm_forecast('models/lstm', value) OVER f AS forecast,
        lstm_residual('models/lstm', value) OVER f AS residual
    FROM samples
    WINDOW z AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 299 PRECEDING AND CURRENT ROW),
           f AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 60 PRECEDING AND CURRENT ROW)
),
scored AS (
    SELECT
        ts, resource, metric, value, mean, std, forecast,
        fuse_confidence(
            zscore_pvalue(CASE WHEN n = 300 THEN (value - mean) / NULLIF(std, 0) END),
            lstm_pvalue('models/lstm', residual)
        ) AS confidence
    FROM windowed
)
SELECT
    ts, resource, metric, value,
    confidence AS score,
    CASE WHEN confidence >= 0.95 THEN 'CRITICAL'   -- p <= 1e-19
         WHEN confidence >= 0.9 THEN 'HIGH'        -- p <= 1e-9
         ELSE 'MEDIUM' END AS severity,
    confidence,
    mean - 3 * std AS expected_low,
    mean + 3 * std AS expected_high
FROM scored
WHERE confidence >= 0.8;
