//! Numenta Anomaly Benchmark (NAB) v1.1 scoring, following NAB's own `sweeper.py`,
//! `scorer.py`, `optimizer.py` and `runner.py`.
//!
//! # Rules
//! * **Probation.** The first [`probation_length`]`(n)` = min(⌊0.15·n⌋, 750) rows of a file are
//!   not scored: detections there count for nothing and those rows are in no count.
//! * **Windows.** A window covers the rows from the first row at or after its start to the last
//!   row at or before its end. NAB looks both bounds up as exact row timestamps; on NAB's
//!   labels the two agree, and off-grid bounds are handled here instead of failing. A window
//!   without any row counts towards the perfect score but is never scored.
//! * **True positive.** In a window of `w` rows ending at row `e`, row `i` is at position
//!   `-(e - i + 1) / w`, and a detection there is worth
//!   `scaled_sigmoid(position) · tp_weight / scaled_sigmoid(-1)`: exactly `tp_weight` on the
//!   window's first row, less later. Only the earliest detection of a window counts; a window
//!   whose scored rows hold no detection costs `-fn_weight`. Windows reaching into probation
//!   keep their full width, so only their scored rows can be detected.
//! * **False positive.** A detection outside every window costs `-fp_weight` when no window
//!   has ended before it, else `scaled_sigmoid((i - e) / (w - 1)) · fp_weight`, where `e` and
//!   `w` are the last row and width of the most recent window that ended: a detection right
//!   after a window costs little, one three window-widths later the full `fp_weight`.
//!   (NAB divides by zero after a one-row window; here the distance is infinite, so the cost
//!   is the full weight.)
//! * **Threshold.** A row is a detection when its score is `>= threshold`. One threshold per
//!   profile is chosen for the whole corpus, maximising the summed raw score over every
//!   distinct score and "no detection" ([`f64::INFINITY`]); ties keep the higher threshold.
//! * **Normalisation.** `100 · (raw - null) / (perfect - null)`. `perfect` is `tp_weight` times
//!   the number of windows, as NAB's `runner.normalize` counts it. `null` is the optimised raw
//!   score of NAB's null detector, which outputs one constant for every row: the better of
//!   "never detect" (every scored window missed) and "always detect".
//!
//! Raw scores equal NAB's up to floating-point rounding of the sums.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{OperatorError, Result};

/// Share of each file's rows, at the start, that is not scored.
pub const PROBATION_PERCENT: f64 = 0.15;

/// A NAB cost matrix (one entry of `config/profiles.json`). `tn_weight` is carried for
/// completeness; NAB's scoring never uses it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    /// Weight of a detected window.
    pub tp_weight: f64,
    /// Weight of a detection outside every window.
    pub fp_weight: f64,
    /// Cost of a missed window.
    pub fn_weight: f64,
    /// Unused by NAB's scoring.
    pub tn_weight: f64,
}

impl Profile {
    const fn with_fp_fn(fp_weight: f64, fn_weight: f64) -> Self {
        let (tp_weight, tn_weight) = (1.0, 1.0);
        Self {
            tp_weight,
            fp_weight,
            fn_weight,
            tn_weight,
        }
    }

    /// NAB's `standard` profile: tp 1, fp 0.11, fn 1.
    pub const fn standard() -> Self {
        Self::with_fp_fn(0.11, 1.0)
    }

    /// NAB's `reward_low_FP_rate` profile: tp 1, fp 0.22, fn 1.
    pub const fn reward_low_fp_rate() -> Self {
        Self::with_fp_fn(0.22, 1.0)
    }

    /// NAB's `reward_low_FN_rate` profile: tp 1, fp 0.11, fn 2.
    pub const fn reward_low_fn_rate() -> Self {
        Self::with_fp_fn(0.11, 2.0)
    }

    /// Parses NAB's `config/profiles.json` (`{"name": {"CostMatrix": {"tpWeight": ..}}}`)
    /// into profiles by name.
    pub fn parse_profiles(json: &str) -> Result<BTreeMap<String, Profile>> {
        #[derive(Debug, Deserialize)]
        struct Entry {
            #[serde(rename = "CostMatrix")]
            cost_matrix: Profile,
        }
        let entries: BTreeMap<String, Entry> = serde_json::from_str(json)
            .map_err(|e| invalid(format!("not a NAB profiles file: {e}")))?;
        Ok(entries
            .into_iter()
            .map(|(name, entry)| (name, entry.cost_matrix))
            .collect())
    }
}

/// One data file: its row timestamps, the detector's score per row and the label windows.
#[derive(Debug, Clone, Copy)]
pub struct FileInput<'a> {
    /// Milliseconds since the epoch, one per row. Rows are scored in file order, as NAB
    /// does: real NAB files repeat timestamps and even go back in time where a clock did
    /// (a daylight-saving change), so order is not checked.
    pub timestamps: &'a [i64],
    /// Anomaly score per row (finite; NAB's are in [0, 1]).
    pub scores: &'a [f64],
    /// Label windows as inclusive `(start, end)` milliseconds, ascending and disjoint.
    pub windows: &'a [(i64, i64)],
}

/// Row counts of the scored (post-probation) rows, as NAB reports them: a window row is a
/// true positive when detected, else a false negative; any other row is a false positive when
/// detected, else a true negative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Detected rows inside windows.
    pub true_positives: usize,
    /// Detected rows outside windows.
    pub false_positives: usize,
    /// Undetected rows inside windows.
    pub false_negatives: usize,
    /// Undetected rows outside windows.
    pub true_negatives: usize,
}

/// The score of one file at one threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FileScore {
    /// Raw NAB score of the file.
    pub raw: f64,
    /// Row counts.
    pub counts: Counts,
    /// Windows with scored rows that hold at least one detection.
    pub windows_detected: usize,
    /// Windows with scored rows that hold no detection.
    pub windows_missed: usize,
}

/// The result of [`evaluate`]: the corpus-optimal threshold and the scores at it.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusScore {
    /// The optimal threshold; [`f64::INFINITY`] when detecting nothing scores best.
    pub threshold: f64,
    /// Sum of the files' raw scores at `threshold`.
    pub raw: f64,
    /// Raw score of NAB's null detector (the 0 of the normalised scale).
    pub null: f64,
    /// Raw score of a perfect detector (the 100 of the normalised scale).
    pub perfect: f64,
    /// `100 · (raw - null) / (perfect - null)`; NaN when the corpus has no window.
    pub normalized: f64,
    /// Per-file scores at `threshold`, in input order.
    pub files: Vec<FileScore>,
}

/// NAB's scaled sigmoid `2 / (1 + e^(5x)) - 1` of a relative position, and `-1` beyond 3:
/// 0.9866 at -1 (a window's first row), 0 at 0, -0.9866 at 1.
pub fn scaled_sigmoid(position: f64) -> f64 {
    if position > 3.0 {
        -1.0
    } else {
        2.0 * sigmoid(-5.0 * position) - 1.0
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Number of leading rows of an `rows`-row file that are not scored:
/// min(⌊0.15 · rows⌋, 0.15 · 5000), evaluated in `f64` exactly as NAB does.
pub fn probation_length(rows: usize) -> usize {
    let bound = (PROBATION_PERCENT * rows as f64)
        .floor()
        .min(PROBATION_PERCENT * 5000.0);
    // NAB scores row i when i >= bound.
    bound.ceil() as usize
}

/// `100 · (raw - null) / (perfect - null)`, NAB's normalised score.
pub fn normalize(raw: f64, null: f64, perfect: f64) -> f64 {
    100.0 * (raw - null) / (perfect - null)
}

/// Scores one file at a fixed threshold (NAB's `Sweeper.scoreDataSet`): a row is a
/// detection when its score is `>= threshold`. Unlike NAB, a threshold below every score
/// detects every row instead of failing.
pub fn score_file(file: &FileInput<'_>, profile: &Profile, threshold: f64) -> Result<FileScore> {
    let prepared = prepare(file, profile)?;
    Ok(prepared.score(profile, &file.scores[prepared.probation..], threshold))
}

/// Finds the threshold that maximises the corpus raw score (NAB's `optimizeThreshold`), by
/// one pass over all scored rows sorted by score: O(N log N) for N rows in total. Returns the
/// per-file scores at that threshold and the normalised score.
pub fn evaluate(files: &[FileInput<'_>], profile: &Profile) -> Result<CorpusScore> {
    let prepared = files
        .iter()
        .map(|file| prepare(file, profile))
        .collect::<Result<Vec<_>>>()?;

    // Current value of every window: -fn_weight until detected, then its best detection.
    // Windows without scored rows stay at 0, as NAB leaves them out.
    let mut offsets = Vec::with_capacity(prepared.len());
    let mut parts = Vec::new();
    let mut points = Vec::with_capacity(files.iter().map(|f| f.scores.len()).sum());
    for (f, (p, file)) in prepared.iter().zip(files).enumerate() {
        offsets.push(parts.len());
        parts.extend(p.initial_parts(profile));
        let scored = file.scores[p.probation..].iter().enumerate();
        points.extend(scored.map(|(r, &score)| (score, f, r)));
    }
    // Stable: equal scores keep file and row order, as NAB's sort does.
    points.sort_by(|a, b| b.0.total_cmp(&a.0));

    let mut window_sum: f64 = parts.iter().sum();
    let mut fp_sum = 0.0;
    let mut threshold = f64::INFINITY;
    let mut best = window_sum;
    // All rows with the same score switch on together.
    for group in points.chunk_by(|a, b| a.0 == b.0) {
        for &(_, f, r) in group {
            let row = prepared[f].rows[r];
            match row.window {
                Some(k) => {
                    let part = &mut parts[offsets[f] + k];
                    let value = part.max(row.weight);
                    window_sum += value - *part;
                    *part = value;
                }
                None => fp_sum += row.weight,
            }
        }
        let total = fp_sum + window_sum;
        if total > best {
            best = total;
            threshold = group[0].0;
        }
    }

    let at = |t: f64| -> Vec<FileScore> {
        prepared
            .iter()
            .zip(files)
            .map(|(p, file)| p.score(profile, &file.scores[p.probation..], t))
            .collect()
    };
    let file_scores = at(threshold);
    let raw = total_raw(&file_scores);
    // NAB's null detector outputs a constant, so its sweep sees only "nothing" and "all".
    let never = total_raw(&at(f64::INFINITY));
    let always = total_raw(&at(f64::NEG_INFINITY));
    let null = never.max(always);
    let windows: usize = files.iter().map(|f| f.windows.len()).sum();
    let perfect = profile.tp_weight * windows as f64;
    Ok(CorpusScore {
        threshold,
        raw,
        null,
        perfect,
        normalized: normalize(raw, null, perfect),
        files: file_scores,
    })
}

fn total_raw(scores: &[FileScore]) -> f64 {
    scores.iter().map(|s| s.raw).sum()
}

/// A scored row: what a detection there is worth and the window (index into the file's
/// windows) it lies in.
#[derive(Debug, Clone, Copy)]
struct Row {
    weight: f64,
    window: Option<usize>,
}

/// A validated file with the NAB weight of every scored row.
#[derive(Debug)]
struct Prepared {
    probation: usize,
    /// Rows `probation..n`.
    rows: Vec<Row>,
    /// Per window: does it hold a scored row?
    scored_windows: Vec<bool>,
}

impl Prepared {
    fn initial_parts(&self, profile: &Profile) -> impl Iterator<Item = f64> {
        let missed = -profile.fn_weight;
        self.scored_windows
            .iter()
            .map(move |&scored| if scored { missed } else { 0.0 })
    }

    /// The file's score when the scored rows with `scores[r] >= threshold` are detections.
    fn score(&self, profile: &Profile, scores: &[f64], threshold: f64) -> FileScore {
        let mut parts: Vec<f64> = self.initial_parts(profile).collect();
        let mut detected = vec![false; parts.len()];
        let mut counts = Counts::default();
        let mut fp_sum = 0.0;
        for (row, &score) in self.rows.iter().zip(scores) {
            let hit = score >= threshold;
            match (row.window, hit) {
                (Some(k), true) => {
                    counts.true_positives += 1;
                    parts[k] = parts[k].max(row.weight);
                    detected[k] = true;
                }
                (Some(_), false) => counts.false_negatives += 1,
                (None, true) => {
                    counts.false_positives += 1;
                    fp_sum += row.weight;
                }
                (None, false) => counts.true_negatives += 1,
            }
        }
        let windows_detected = detected.iter().filter(|&&d| d).count();
        let windows_scored = self.scored_windows.iter().filter(|&&s| s).count();
        FileScore {
            // NAB adds the false positives first, then the windows in order.
            raw: parts.iter().fold(fp_sum, |total, part| total + part),
            counts,
            windows_detected,
            windows_missed: windows_scored - windows_detected,
        }
    }
}

fn invalid(message: String) -> OperatorError {
    OperatorError::InvalidInput(message)
}

/// Validates a file and computes NAB's per-row weights (`Sweeper.calcSweepScore`).
fn prepare(file: &FileInput<'_>, profile: &Profile) -> Result<Prepared> {
    let n = file.timestamps.len();
    if file.scores.len() != n {
        return Err(invalid(format!(
            "{} scores for {n} timestamps",
            file.scores.len()
        )));
    }
    if let Some(score) = file.scores.iter().find(|s| !s.is_finite()) {
        return Err(invalid(format!("anomaly score {score} is not finite")));
    }
    if let Some(&(start, end)) = file.windows.iter().find(|(start, end)| start > end) {
        return Err(invalid(format!("window ({start}, {end}) is reversed")));
    }
    if file.windows.windows(2).any(|p| p[0].1 >= p[1].0) {
        return Err(invalid("windows are not ascending and disjoint".into()));
    }

    // Row range of each window. NAB looks both bounds up with `timestamps.index(t)`, the
    // first row at that exact time; a bound between rows is taken as the first row after the
    // start and the last row before the end.
    let ts = file.timestamps;
    let ranges: Vec<Option<(usize, usize)>> = file
        .windows
        .iter()
        .map(|&(start, end)| {
            let first = ts
                .iter()
                .position(|&t| t == start)
                .or_else(|| ts.iter().position(|&t| t >= start))?;
            let last = ts
                .iter()
                .position(|&t| t == end)
                .or_else(|| ts.iter().rposition(|&t| t <= end))?;
            (first <= last).then_some((first, last))
        })
        .collect();
    let mut pending = ranges
        .iter()
        .enumerate()
        .filter_map(|(k, &range)| range.map(|(first, last)| (k, first, last)))
        .peekable();

    let max_tp = scaled_sigmoid(-1.0);
    let probation = probation_length(n);
    let mut rows = Vec::with_capacity(n.saturating_sub(probation));
    let mut scored_windows = vec![false; file.windows.len()];
    // (window index, first row, last row) of the window row i is in.
    let mut current: Option<(usize, usize, usize)> = None;
    // (last row, width) of the most recent window that ended.
    let mut previous: Option<(usize, f64)> = None;
    for i in 0..n {
        if current.is_none() {
            current = pending.next_if(|&(_, first, _)| first == i);
        }
        let row = match current {
            Some((k, first, last)) => {
                let width = (last - first + 1) as f64;
                let position = -((last - i + 1) as f64) / width;
                Row {
                    weight: scaled_sigmoid(position) * profile.tp_weight / max_tp,
                    window: Some(k),
                }
            }
            None => {
                let unweighted = match previous {
                    None => -1.0,
                    Some((last, width)) => scaled_sigmoid((i - last) as f64 / (width - 1.0)),
                };
                Row {
                    weight: unweighted * profile.fp_weight,
                    window: None,
                }
            }
        };
        if i >= probation {
            if let Some(k) = row.window {
                scored_windows[k] = true;
            }
            rows.push(row);
        }
        if current.is_some_and(|(_, _, last)| last == i) {
            previous = current.map(|(_, first, last)| (last, (last - first + 1) as f64));
            current = None;
        }
    }
    Ok(Prepared {
        probation,
        rows,
        scored_windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: i64 = 300_000;
    const PROFILES: [Profile; 3] = [
        Profile::standard(),
        Profile::reward_low_fp_rate(),
        Profile::reward_low_fn_rate(),
    ];

    fn stamps(n: usize) -> Vec<i64> {
        (0..n as i64).map(|i| i * STEP).collect()
    }

    fn input<'a>(ts: &'a [i64], scores: &'a [f64], windows: &'a [(i64, i64)]) -> FileInput<'a> {
        FileInput {
            timestamps: ts,
            scores,
            windows,
        }
    }

    /// Scores `n` rows with 1.0 on `hits` and 0.0 elsewhere; windows given as row bounds.
    fn one(n: usize, windows: &[(i64, i64)], hits: &[usize], profile: &Profile) -> FileScore {
        let ts = stamps(n);
        let windows: Vec<_> = windows.iter().map(|&(a, b)| (a * STEP, b * STEP)).collect();
        let mut scores = vec![0.0; n];
        hits.iter().for_each(|&h| scores[h] = 1.0);
        score_file(&input(&ts, &scores, &windows), profile, 0.5).unwrap()
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-12, "{actual} != {expected}");
    }

    /// Weight of a detection at a relative window position, by the closed form
    /// 2σ(-5x) - 1 = -tanh(2.5x).
    fn tp_at(position: f64) -> f64 {
        (-2.5 * position).tanh() / 2.5f64.tanh()
    }

    #[test]
    fn scaled_sigmoid_and_probation() {
        assert_close(scaled_sigmoid(-1.0), 0.9866142981514303);
        assert_close(scaled_sigmoid(-0.5), 0.8482836399575129);
        assert_close(scaled_sigmoid(0.0), 0.0);
        assert_close(scaled_sigmoid(1.0), -0.9866142981514303);
        // NAB cuts off strictly beyond 3.
        assert_close(scaled_sigmoid(3.0), -f64::tanh(7.5));
        assert!(scaled_sigmoid(3.0) > -1.0);
        assert_eq!(scaled_sigmoid(3.000001), -1.0);
        // Probation: 15% of the rows, at most 750.
        let cases = [(0, 0), (6, 0), (7, 1), (20, 3), (100, 15), (4999, 749)];
        for (rows, expected) in cases {
            assert_eq!(probation_length(rows), expected, "{rows} rows");
        }
        assert_eq!(probation_length(5000), 750);
        assert_eq!(probation_length(1_000_000), 750);
    }

    #[test]
    fn parses_nab_profiles_json() {
        let json = r#"{
            "standard": {"CostMatrix":
                {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0}},
            "reward_low_FP_rate": {"CostMatrix":
                {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.22, "tnWeight": 1.0}},
            "reward_low_FN_rate": {"CostMatrix":
                {"tpWeight": 1.0, "fnWeight": 2.0, "fpWeight": 0.11, "tnWeight": 1.0}}
        }"#;
        let profiles = Profile::parse_profiles(json).unwrap();
        let names = ["standard", "reward_low_FP_rate", "reward_low_FN_rate"];
        assert_eq!(profiles.len(), 3);
        for (name, expected) in names.into_iter().zip(PROFILES) {
            assert_eq!(profiles[name], expected, "{name}");
        }
        assert!(Profile::parse_profiles(r#"{"standard": {"tpWeight": 1.0}}"#).is_err());
    }

    #[test]
    fn earlier_detection_in_a_window_scores_higher() {
        let p = Profile::standard();
        let first = one(20, &[(10, 14)], &[10], &p);
        assert_close(first.raw, 1.0);
        // Position -(14 - 12 + 1) / 5; NAB's sweeper gives 0.9174286804284079.
        let middle = one(20, &[(10, 14)], &[12], &p);
        assert_close(middle.raw, tp_at(-0.6));
        assert_close(middle.raw, 0.9174286804284079);
        let last = one(20, &[(10, 14)], &[14], &p);
        assert_close(last.raw, tp_at(-0.2));
        assert!(first.raw > middle.raw && middle.raw > last.raw && last.raw > 0.0);
        let c = first.counts;
        assert_eq!((c.true_positives, c.false_positives), (1, 0));
        assert_eq!((c.false_negatives, c.true_negatives), (4, 12));
    }

    #[test]
    fn false_positive_before_any_window_costs_fp_weight() {
        let s = one(20, &[(10, 14)], &[5], &Profile::standard());
        assert_close(s.raw, -0.11 - 1.0);
        assert_eq!((s.counts.false_positives, s.windows_missed), (1, 1));
        assert_close(
            one(20, &[], &[5, 6], &Profile::reward_low_fp_rate()).raw,
            -0.44,
        );
    }

    #[test]
    fn false_positive_close_after_a_window_costs_less_than_far_after() {
        let p = Profile::standard();
        // Distance (15 - 14) / (5 - 1); NAB's sweeper gives 0.9389940305415679.
        let near = one(40, &[(10, 14)], &[10, 15], &p);
        assert_close(near.raw, 1.0 - 0.11 * 0.625f64.tanh());
        assert_close(near.raw, 0.9389940305415679);
        // Distance 16 / 4 > 3: the full weight.
        let far = one(40, &[(10, 14)], &[10, 30], &p);
        assert_close(far.raw, 1.0 - 0.11);
        assert!(near.raw > far.raw);
    }

    #[test]
    fn probation_is_ignored_and_a_missed_window_costs_fn_weight() {
        let s = one(20, &[(10, 14)], &[0, 1, 2], &Profile::standard());
        assert_close(s.raw, -1.0);
        let c = s.counts;
        assert_eq!(c.false_positives + c.true_positives, 0);
        assert_eq!(c.true_negatives + c.false_negatives, 17);
        // A window reaching into probation keeps its width; its first scored row is row 3.
        let partial = one(20, &[(1, 5)], &[3, 4], &Profile::standard());
        assert_close(partial.raw, tp_at(-0.6));
        // A missed window costs fn_weight.
        let s = one(20, &[(10, 14)], &[], &Profile::reward_low_fn_rate());
        assert_close(s.raw, -2.0);
        assert_eq!((s.windows_detected, s.windows_missed), (0, 1));
    }

    #[test]
    fn only_the_first_detection_in_a_window_counts() {
        let p = Profile::standard();
        let s = one(20, &[(10, 14)], &[10, 11, 12], &p);
        assert_close(s.raw, 1.0);
        assert_eq!((s.counts.true_positives, s.windows_detected), (3, 1));
        assert_close(one(20, &[(10, 14)], &[12, 13], &p).raw, tp_at(-0.6));
    }

    #[test]
    fn off_grid_window_bounds_snap_inwards() {
        let ts = stamps(20);
        let windows = [(10 * STEP - 1, 14 * STEP + 1)];
        let p = Profile::standard();
        let score_of = |s: &[f64]| score_file(&input(&ts, s, &windows), &p, 0.5).unwrap();
        let mut scores = vec![0.0; 20];
        scores[10] = 1.0;
        assert_close(score_of(&scores).raw, 1.0);
        scores.swap(9, 10);
        assert_close(score_of(&scores).raw, -1.11);
    }

    #[test]
    fn rejects_malformed_input() {
        let ts = stamps(5);
        let scores = [0.0; 5];
        let rejected = |f: FileInput<'_>| score_file(&f, &Profile::standard(), 0.5).is_err();
        assert!(!rejected(input(&ts, &scores, &[])));
        assert!(rejected(input(&ts, &scores[..4], &[])));
        assert!(rejected(input(&ts, &[0.0, f64::NAN, 0.0, 0.0, 0.0], &[])));
        let overlapping = [(0, 2 * STEP), (2 * STEP, 3 * STEP)];
        assert!(rejected(input(&ts, &scores, &overlapping)));
        assert!(rejected(input(&ts, &scores, &[(STEP, 0)])));
        // Real files repeat timestamps and go back in time (clock changes): rows are scored
        // in file order, as NAB does.
        assert!(!rejected(input(&[0, 2, 1, 1, 4], &scores, &[])));
    }

    #[test]
    fn perfect_detector_normalises_to_100_and_null_to_0() {
        let (ta, tb) = (stamps(100), stamps(60));
        let wa = [(40 * STEP, 49 * STEP), (70 * STEP, 79 * STEP)];
        let wb = [(30 * STEP, 39 * STEP)];
        let (mut perfect_a, mut perfect_b) = (vec![0.0; 100], vec![0.0; 60]);
        perfect_a[40] = 1.0;
        perfect_a[70] = 1.0;
        perfect_b[30] = 1.0;
        let corpus = |a: &[f64], b: &[f64], p: &Profile| {
            evaluate(&[input(&ta, a, &wa), input(&tb, b, &wb)], p).unwrap()
        };
        for p in PROFILES {
            let best = corpus(&perfect_a, &perfect_b, &p);
            assert_eq!(best.threshold, 1.0);
            assert_close(best.raw, 3.0);
            assert_close(best.perfect, 3.0);
            assert_close(best.null, -3.0 * p.fn_weight);
            assert!((best.normalized - 100.0).abs() < 1e-9);
            assert_eq!(best.files[0].windows_detected, 2);
            // NAB's null detector: one constant score everywhere.
            let null = corpus(&[0.5; 100], &[0.5; 60], &p);
            assert_eq!(null.threshold, f64::INFINITY);
            assert_eq!(null.normalized, 0.0);
            assert_eq!(corpus(&[0.0; 100], &[0.0; 60], &p).normalized, 0.0);
        }
    }

    #[test]
    fn equal_scores_switch_on_together() {
        // Row 10 opens the window and row 16 is a false positive just after it, both 0.9:
        // no threshold takes the first without the second.
        let ts = stamps(20);
        let windows = [(10 * STEP, 14 * STEP)];
        let mut scores = vec![0.0; 20];
        scores[10] = 0.9;
        scores[16] = 0.9;
        let best = evaluate(&[input(&ts, &scores, &windows)], &Profile::standard()).unwrap();
        assert_eq!(best.threshold, 0.9);
        // NAB's optimiser gives 0.9066887996046735.
        assert_close(best.raw, 1.0 - 0.11 * 1.25f64.tanh());
        assert_close(best.raw, 0.9066887996046735);
        let c = best.files[0].counts;
        assert_eq!((c.true_positives, c.false_positives), (1, 1));
    }

    /// NAB's scoring written the direct way (like NAB's older `Scorer.getScore`): windows by
    /// exact timestamp lookup, the earliest scored detection per window, each false positive
    /// against the closest window that ended before it.
    fn brute_file(file: &FileInput<'_>, p: &Profile, threshold: f64) -> f64 {
        let (ts, scores) = (file.timestamps, file.scores);
        let n = ts.len();
        let probation = (0.15 * n as f64).floor().min(750.0) as usize;
        let sig = |x: f64| if x > 3.0 { -1.0 } else { -(2.5 * x).tanh() };
        let row = |t: i64| ts.iter().position(|&x| x == t).unwrap();
        let bounds: Vec<_> = file
            .windows
            .iter()
            .map(|&(a, b)| (row(a), row(b)))
            .collect();
        let mut total = 0.0;
        for &(first, last) in bounds.iter().filter(|&&(_, last)| last >= probation) {
            let width = (last - first + 1) as f64;
            total += match (first.max(probation)..=last).find(|&i| scores[i] >= threshold) {
                Some(i) => sig(-((last - i + 1) as f64) / width) * p.tp_weight / sig(-1.0),
                None => -p.fn_weight,
            };
        }
        for i in probation..n {
            if scores[i] < threshold || bounds.iter().any(|&(a, b)| (a..=b).contains(&i)) {
                continue;
            }
            let unweighted = match bounds.iter().rev().find(|&&(_, b)| b < i) {
                None => -1.0,
                Some(&(a, b)) => sig((i - b) as f64 / (b - a) as f64),
            };
            total += unweighted * p.fp_weight;
        }
        total
    }

    /// Tiny deterministic generator (Knuth's MMIX LCG).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005);
            self.0 = self.0.wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn sweep_matches_brute_force_over_all_thresholds() {
        let mut rng = Lcg(42);
        for case in 0..20 {
            let mut data = Vec::new();
            for f in 0..3 {
                let n = 30 + rng.below(100) as usize;
                let ts = stamps(n);
                // Coarse scores make many ties; one file gets fine-grained ones.
                let levels: u64 = if f == 0 { 1000 } else { 16 };
                let scores: Vec<f64> = (0..n)
                    .map(|_| rng.below(levels + 1) as f64 / levels as f64)
                    .collect();
                let mut windows = Vec::new();
                let mut start = rng.below(20) as usize;
                while start + 2 < n {
                    let end = (start + 1 + rng.below(12) as usize).min(n - 1);
                    windows.push((ts[start], ts[end]));
                    start = end + 1 + rng.below(30) as usize;
                }
                data.push((ts, scores, windows));
            }
            let files: Vec<_> = data.iter().map(|(t, s, w)| input(t, s, w)).collect();
            let probation = |f: &FileInput<'_>| probation_length(f.scores.len());
            let mut candidates: Vec<f64> = files
                .iter()
                .flat_map(|f| f.scores[probation(f)..].iter().copied())
                .collect();
            candidates.push(f64::INFINITY);
            for p in PROFILES {
                let total = |t: f64| files.iter().map(|f| brute_file(f, &p, t)).sum::<f64>();
                let best = candidates
                    .iter()
                    .map(|&t| total(t))
                    .fold(f64::NEG_INFINITY, f64::max);
                let result = evaluate(&files, &p).unwrap();
                assert!((result.raw - best).abs() < 1e-9, "case {case}");
                assert!((total(result.threshold) - best).abs() < 1e-9, "case {case}");
                for (file, score) in files.iter().zip(&result.files) {
                    let brute = brute_file(file, &p, result.threshold);
                    assert!((score.raw - brute).abs() < 1e-9, "case {case}");
                    let c = score.counts;
                    let rows = c.true_positives + c.false_positives;
                    let rows = rows + c.true_negatives + c.false_negatives;
                    assert_eq!(rows, file.scores.len() - probation(file));
                }
            }
        }
    }
}
