-- The bundled novelty rule (sql/rules/novelty.sql) with its day and week lags in time
-- instead of rows: the sample compared with is the one exactly one day (one week) earlier,
-- whatever the sampling rate, and the lag is left out when there is no sample at exactly
-- that time (a gap, or a rate that does not divide a day). The bundled rule's lags are 288
-- and 2,016 rows, a day and a week only at 5-minute sampling; on 5-minute series without
-- gaps both rules give the same rows (a test checks it).
--
-- Use it for a fleet sampled every few minutes at another rate. Its cost: a `RANGE` frame
-- keeps every sample of its day and week (2,016 samples a series for the week at 5-minute
-- sampling, 10,080 at 1-minute, 604,800 at 1-second), where the row lags keep 2,017 at any
-- rate. On NAB (`healer eval nab --rules sql/examples/novelty_time_lags.sql`) it scores
-- within 1.3 points of the bundled rule (README, Detection quality on NAB).
--
-- Everything else, and the reasons behind it, as in sql/rules/novelty.sql.
CREATE VIEW novelty_time_lags AS
WITH base AS (
    SELECT
        ts, resource, metric, value,
        MEDIAN(value) OVER history AS center,
        COUNT(value)  OVER history AS n,
        AVG(value)    OVER recent  AS recent_mean
    FROM samples
    WINDOW history AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 5999 PRECEDING AND CURRENT ROW),
           recent  AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 4 PRECEDING AND CURRENT ROW)
),
local_spreads AS (
    SELECT
        ts, resource, metric, value, center, n, d_value, d_recent,
        PERCENTILE_CONT(d_value, 0.999)  OVER history AS q_value,
        PERCENTILE_CONT(d_recent, 0.999) OVER history AS q_recent
    FROM (
        SELECT
            ts, resource, metric, value, center, n,
            abs(value - center)       AS d_value,
            abs(recent_mean - center) AS d_recent
        FROM base
    )
    WINDOW history AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 5999 PRECEDING AND CURRENT ROW)
),
local_ratios AS (
    SELECT
        ts, resource, metric, value, center, n, q_value,
        greatest(d_value / NULLIF(q_value, 0), d_recent / NULLIF(q_recent, 0)) AS local_ratio
    FROM local_spreads
),
lagged AS (
    SELECT
        ts, resource, metric, value, center, n, q_value, local_ratio,
        FIRST_VALUE(local_ratio) OVER day  AS day_ago_ratio,
        CASE WHEN CAST(ts AS BIGINT) - FIRST_VALUE(CAST(ts AS BIGINT)) OVER day = 86400000
             THEN abs(value - FIRST_VALUE(value) OVER day) END AS d_day,
        FIRST_VALUE(local_ratio) OVER week AS week_ago_ratio,
        CASE WHEN CAST(ts AS BIGINT) - FIRST_VALUE(CAST(ts AS BIGINT)) OVER week = 604800000
             THEN abs(value - FIRST_VALUE(value) OVER week) END AS d_week
    FROM local_ratios
    WINDOW day  AS (PARTITION BY resource, metric ORDER BY ts RANGE BETWEEN INTERVAL '1 day' PRECEDING AND CURRENT ROW),
           week AS (PARTITION BY resource, metric ORDER BY ts RANGE BETWEEN INTERVAL '7 days' PRECEDING AND CURRENT ROW)
),
lag_spreads AS (
    SELECT
        ts, resource, metric, value, center, n, q_value, local_ratio,
        d_day, day_ago_ratio, d_week, week_ago_ratio,
        PERCENTILE_CONT(d_day, 0.999)  OVER history AS q_day,
        PERCENTILE_CONT(d_week, 0.999) OVER history AS q_week
    FROM lagged
    WINDOW history AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 5999 PRECEDING AND CURRENT ROW)
),
ratios AS (
    SELECT
        ts, resource, metric, value, center, n,
        q_value AS spread,
        -- A lagged sample without a ratio (no spread yet, or a constant history) counts as
        -- ordinary. No ratio during the warm-up.
        CASE WHEN n >= 300 THEN greatest(
            local_ratio,
            CASE WHEN coalesce(day_ago_ratio, 0) <= 1 THEN d_day / NULLIF(q_day, 0) END,
            CASE WHEN coalesce(week_ago_ratio, 0) <= 1 THEN d_week / NULLIF(q_week, 0) END
        ) END AS ratio
    FROM lag_spreads
),
held AS (
    SELECT
        ts, resource, metric, value, center, n, spread, ratio,
        MAX(ratio) OVER last_100   AS peak,
        MAX(ratio) OVER last_300   AS peak_300,
        MAX(ratio) OVER last_1000  AS peak_1000,
        MAX(ratio) OVER last_3000  AS peak_3000,
        MAX(ratio) OVER history    AS peak_6000
    FROM ratios
    WINDOW last_100  AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 99 PRECEDING AND CURRENT ROW),
           last_300  AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 299 PRECEDING AND CURRENT ROW),
           last_1000 AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 999 PRECEDING AND CURRENT ROW),
           last_3000 AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 2999 PRECEDING AND CURRENT ROW),
           history   AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 5999 PRECEDING AND CURRENT ROW)
),
surprise AS (
    SELECT
        ts, resource, metric, value, center, spread, ratio, peak,
        ratio * (1 + 0.02 * ln(CASE
            WHEN ratio >= peak_6000 THEN 60
            WHEN ratio >= peak_3000 THEN 30
            WHEN ratio >= peak_1000 THEN 10
            WHEN ratio >= peak_300  THEN 3
            ELSE 1
        END)) AS surprise
    FROM held
)
SELECT
    ts, resource, metric, value,
    ratio AS score,
    CASE WHEN ratio >= 4 THEN 'CRITICAL' WHEN ratio >= 2 THEN 'HIGH' ELSE 'MEDIUM' END AS severity,
    surprise / (surprise + 0.25) AS confidence,
    center - spread AS expected_low,
    center + spread AS expected_high
FROM surprise
WHERE ratio > 1 AND ratio >= peak;
