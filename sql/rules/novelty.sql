-- Novelty of every metric of every resource: a sample is anomalous when it deviates from
-- the series' recent median further than the series has in the last 6,000 samples, except
-- one time in a thousand.
--
-- Four deviations, two from the median of the last 6,000 samples (the current one
-- included) and two from a lagged sample:
--   * d_value  |x − median|, a spike or a level beyond what the series does;
--   * d_recent |mean of the last 5 − median|, a smaller shift that persists (noise averages
--              out over 5 samples, a shift does not);
--   * d_day    |x − the sample 288 rows back|, one day at 5-minute sampling, and
--   * d_week   |x − the sample 2,016 rows back|, one week: a break of the daily or weekly
--              pattern that stays within the series' usual range.
-- Each is divided by its own 99.9th percentile over the same 6,000 samples, so the four
-- are on one scale whatever the metric's units or noise: ratio > 1 means "beyond what this
-- series has shown 999 times in 1,000". No Gaussian assumption: infrastructure metrics are
-- heavy-tailed, and a z-score's 3σ flags them far too often.
--
-- A lagged sample is a baseline only if it was itself ordinary: when its value or recent
-- mean was beyond its 99.9th percentile at the time, that lag's ratio is left out of the
-- score. Otherwise a spike comes back one day and one week later, when the series is normal
-- again and the sample that deviates is the one a day or a week back. The lag's percentile
-- still counts every sample, so the one-in-a-thousand calibration is unchanged.
--
-- A candidate is reported only when it is the largest ratio of the last 100 samples, so one
-- event gives one anomaly (its first and strongest samples), not one per sample; and not in
-- a series' first 299 samples, before there is a history to compare with (their ratios, from
-- a percentile of a few hundred samples, take no part in the surprise below). On stationary
-- data about one sample in a thousand passes.
--
-- How long since the series last went this far: a ratio the series has not reached in the
-- last 6,000 samples is more surprising than the same ratio 150 samples after a larger one,
-- in the middle of a burst. The surprise is the ratio times 1 + 0.02 ln(L / 100), where L is
-- the longest of 100, 300, 1,000, 3,000 and 6,000 samples over which the ratio is the
-- largest: ×1 within a burst, ×1.082 for a six-thousand-sample record (on a younger series,
-- the largest since the warm-up). It moves the confidence of a candidate, not whether it is
-- one.
--
-- confidence = surprise / (surprise + 0.25): 0.80–0.81 at the 99.9th percentile, 0.89–0.90
-- at twice it, 0.94–0.95 at four times (the higher figure for a record). Severity, from the
-- ratio: MEDIUM above the percentile, HIGH at twice, CRITICAL at four times. Expected range:
-- median ± the 99.9th percentile deviation.
CREATE VIEW novelty AS
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
        CASE WHEN COUNT(1) OVER day = 289 THEN abs(value - FIRST_VALUE(value) OVER day) END AS d_day,
        FIRST_VALUE(local_ratio) OVER week AS week_ago_ratio,
        CASE WHEN COUNT(1) OVER week = 2017 THEN abs(value - FIRST_VALUE(value) OVER week) END AS d_week
    FROM local_ratios
    WINDOW day  AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 288 PRECEDING AND CURRENT ROW),
           week AS (PARTITION BY resource, metric ORDER BY ts ROWS BETWEEN 2016 PRECEDING AND CURRENT ROW)
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
