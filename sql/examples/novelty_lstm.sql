-- The bundled novelty rule (sql/rules/novelty.sql) with a fifth deviation: the LSTM
-- forecaster's residual, |x − forecast| in units of its 60-sample window's scale, against its
-- own 99.9th percentile. Measured on NAB (`healer eval nab --rules sql/examples/novelty_lstm.sql`)
-- it scores below the bundled rule on all three profiles and takes about ten times as long,
-- so the bundled rule does without it. Run from the repository root (the model path is
-- relative).
CREATE VIEW novelty_lstm AS
WITH base AS (
    SELECT
        ts, resource, metric, value,
        MEDIAN(value) OVER history AS center,
        COUNT(value)  OVER history AS n,
        AVG(value)    OVER recent  AS recent_mean,
        lstm_residual('models/lstm', value) OVER f AS residual
    FROM samples
    WINDOW history AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 5999 PRECEDING AND CURRENT ROW),
           recent  AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 4 PRECEDING AND CURRENT ROW),
           f       AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 60 PRECEDING AND CURRENT ROW)
),
local_spreads AS (
    SELECT
        ts, resource, metric, value, center, n, d_value, d_recent, d_lstm,
        PERCENTILE_CONT(d_value, 0.999)  OVER history AS q_value,
        PERCENTILE_CONT(d_recent, 0.999) OVER history AS q_recent,
        PERCENTILE_CONT(d_lstm, 0.999)   OVER history AS q_lstm
    FROM (
        SELECT
            ts, resource, metric, value, center, n,
            abs(value - center)       AS d_value,
            abs(recent_mean - center) AS d_recent,
            abs(residual)             AS d_lstm
        FROM base
    )
    WINDOW history AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 5999 PRECEDING AND CURRENT ROW)
),
local_ratios AS (
    SELECT
        ts, resource, metric, value, center, n, q_value,
        greatest(d_value / NULLIF(q_value, 0), d_recent / NULLIF(q_recent, 0)) AS local_ratio,
        d_lstm / NULLIF(q_lstm, 0) AS lstm_ratio
    FROM local_spreads
),
lagged AS (
    SELECT
        ts, resource, metric, value, center, n, q_value, local_ratio, lstm_ratio,
        FIRST_VALUE(local_ratio) OVER day  AS day_ago_ratio,
        CASE WHEN COUNT(1) OVER day = 289 THEN abs(value - FIRST_VALUE(value) OVER day) END AS d_day,
        FIRST_VALUE(local_ratio) OVER week AS week_ago_ratio,
        CASE WHEN COUNT(1) OVER week = 2017 THEN abs(value - FIRST_VALUE(value) OVER week) END AS d_week
    FROM local_ratios
    WINDOW day  AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 288 PRECEDING AND CURRENT ROW),
           week AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 2016 PRECEDING AND CURRENT ROW)
),
lag_spreads AS (
    SELECT
        ts, resource, metric, value, center, n, q_value, local_ratio, lstm_ratio,
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
            lstm_ratio,
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
