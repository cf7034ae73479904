-- Rolling z-score of every metric of every resource.
--
-- The window is the last 300 samples of the (resource, metric) series, the current sample
-- included; the standard deviation is the sample one (n - 1), as pandas'
-- `rolling(300).mean()` / `.std()`. Only full windows are scored: a NULL or NaN sample counts
-- as missing, so a window that holds one is not full. A constant window has no z-score
-- (std = 0 gives NULL, never an infinity) and so never flags.
--
-- |z| > 3 flags an anomaly; severity CRITICAL > 5, HIGH > 4, MEDIUM > 3;
-- confidence = min(|z| / 10, 1); expected range = mean ± 3σ.
CREATE VIEW zscore_300 AS
WITH windowed AS (
    SELECT
        ts, resource, metric, value,
        AVG(value)         OVER w AS mean,
        STDDEV_SAMP(value) OVER w AS std,
        COUNT(value)       OVER w AS n
    FROM samples
    WINDOW w AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 299 PRECEDING AND CURRENT ROW)
),
scored AS (
    SELECT ts, resource, metric, value, mean, std, (value - mean) / NULLIF(std, 0) AS z
    FROM windowed
    WHERE n = 300
)
SELECT
    ts, resource, metric, value,
    z                    AS score,
    zscore_severity(z)   AS severity,
    zscore_confidence(z) AS confidence,
    mean - 3 * std       AS expected_low,
    mean + 3 * std       AS expected_high
FROM scored
WHERE abs(z) > 3;
