//! `healer eval nab`: detection quality on the Numenta Anomaly Benchmark with NAB's own
//! scoring ([`healer_operators::nab`]).
//!
//! Every series of `data/<category>/<file>.csv` becomes one resource (`<category>/<file>.csv`)
//! with one metric, `nab_value` (`value` is the samples view's own column), and the whole corpus goes through the same replay a user runs:
//! parquet source, event-time gate, keyed workers running the configured rules (the bundled
//! ones by default), the incident log. A row's anomaly score is the largest `confidence` any
//! rule gave it, 0 where no rule flagged it; rules only see the past, so the scores are
//! those a live stream would have produced. The scores of the files with labels are then
//! scored by NAB's rules, with one threshold per profile for the whole corpus.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimestampMillisecondType};
use healer_operators::nab::{FileInput, FileScore, Profile, evaluate};
use healer_operators::schema::ts_type;

use crate::config::PipelineConfig;
use crate::job::Job;
use crate::store::{Location, S3Config};

/// Errors of the evaluation.
#[derive(Debug, thiserror::Error)]
pub enum NabError {
    /// Reading the data set failed.
    #[error("{path}: {reason}")]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The replay failed.
    #[error(transparent)]
    Job(#[from] crate::job::JobError),
    /// Querying the log failed.
    #[error(transparent)]
    Query(#[from] datafusion::error::DataFusionError),
    /// The log's location could not be resolved.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// One NAB series.
#[derive(Debug, Clone)]
pub struct Series {
    /// `<category>/<file>.csv`, as in the labels file.
    pub key: String,
    /// Row timestamps (ms since the epoch, UTC).
    pub timestamps: Vec<i64>,
    /// Row values.
    pub values: Vec<f64>,
    /// Label windows (inclusive ms bounds), `None` when the file has no labels here.
    pub windows: Option<Vec<(i64, i64)>>,
}

fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S%.f",
    ]
    .iter()
    .find_map(|f| chrono::NaiveDateTime::parse_from_str(s, f).ok())
    .map(|t| t.and_utc().timestamp_millis())
}

/// Every series under `<dir>/data`, with its windows from `labels`, by default
/// `<dir>/labels/combined_windows.json`. A labels file that names a series not under
/// `<dir>/data` is rejected: its windows would silently drop out of the normalisation, and
/// the scores would not be comparable with NAB's.
pub fn load(dir: &Path, labels_file: Option<&Path>) -> Result<Vec<Series>, NabError> {
    let labels_path = labels_file.map_or_else(
        || dir.join("labels/combined_windows.json"),
        Path::to_path_buf,
    );
    let err = |path: &Path, reason: String| NabError::Data {
        path: path.to_path_buf(),
        reason,
    };
    let labels: HashMap<String, Vec<(String, String)>> = serde_json::from_slice(
        &std::fs::read(&labels_path).map_err(|e| err(&labels_path, e.to_string()))?,
    )
    .map_err(|e| err(&labels_path, e.to_string()))?;
    let data = dir.join("data");
    let mut keys = Vec::new();
    for category in std::fs::read_dir(&data).map_err(|e| err(&data, e.to_string()))? {
        let category = category.map_err(|e| err(&data, e.to_string()))?.path();
        if !category.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&category).map_err(|e| err(&category, e.to_string()))? {
            let file = file.map_err(|e| err(&category, e.to_string()))?.path();
            if file.extension().is_some_and(|e| e == "csv") {
                keys.push(file);
            }
        }
    }
    keys.sort();
    let mut series = Vec::new();
    for path in keys {
        let key = path
            .strip_prefix(&data)
            .expect("listed under data/")
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(&path).map_err(|e| err(&path, e.to_string()))?;
        let (mut timestamps, mut values) = (Vec::new(), Vec::new());
        for (n, line) in text.lines().enumerate().skip(1) {
            if line.trim().is_empty() {
                continue;
            }
            let (t, v) = line
                .split_once(',')
                .ok_or_else(|| err(&path, format!("line {}: expected timestamp,value", n + 1)))?;
            timestamps.push(
                parse_time(t)
                    .ok_or_else(|| err(&path, format!("line {}: bad timestamp `{t}`", n + 1)))?,
            );
            values.push(
                v.trim()
                    .parse::<f64>()
                    .map_err(|e| err(&path, format!("line {}: `{v}`: {e}", n + 1)))?,
            );
        }
        let windows = match labels.get(&key) {
            Some(w) => Some(
                w.iter()
                    .map(|(a, b)| match (parse_time(a), parse_time(b)) {
                        (Some(a), Some(b)) => Ok((a, b)),
                        _ => Err(err(&labels_path, format!("{key}: bad window [{a}, {b}]"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        if let Some(w) = &windows {
            let reversed = w.iter().any(|(a, b)| a > b);
            if reversed || w.windows(2).any(|p| p[0].1 >= p[1].0) {
                return Err(err(
                    &labels_path,
                    format!("{key}: windows must be ascending, disjoint and not reversed"),
                ));
            }
        }
        series.push(Series {
            key,
            timestamps,
            values,
            windows,
        });
    }
    let mut unknown: Vec<&str> = labels
        .keys()
        .filter(|k| !series.iter().any(|s| &s.key == *k))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        unknown.sort_unstable();
        return Err(err(
            &labels_path,
            format!(
                "labels for {} series not under {}: {}",
                unknown.len(),
                data.display(),
                unknown.join(", ")
            ),
        ));
    }
    Ok(series)
}

/// The whole corpus as one stream: rows of every series, in event-time order.
fn corpus_batch(series: &[Series]) -> RecordBatch {
    let mut rows: Vec<(i64, usize, usize)> = series
        .iter()
        .enumerate()
        .flat_map(|(s, x)| {
            x.timestamps
                .iter()
                .enumerate()
                .map(move |(i, &t)| (t, s, i))
        })
        .collect();
    rows.sort_unstable();
    let ts = TimestampMillisecondArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())
        .with_timezone("UTC");
    let resource = StringArray::from(
        rows.iter()
            .map(|r| series[r.1].key.as_str())
            .collect::<Vec<_>>(),
    );
    let value = Float64Array::from(
        rows.iter()
            .map(|r| series[r.1].values[r.2])
            .collect::<Vec<_>>(),
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("ts", ts_type(), false),
        Field::new("resource", DataType::Utf8, false),
        Field::new("nab_value", DataType::Float64, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![Arc::new(ts), Arc::new(resource), Arc::new(value)],
    )
    .expect("columns match the schema")
}

/// Per-row anomaly scores of every series, from replaying the corpus through `rules`
/// (the bundled rules when empty). `work` holds the input file and the incident log.
pub async fn detect(
    series: &[Series],
    rules: &[PathBuf],
    work: &Path,
) -> Result<Vec<Vec<f64>>, NabError> {
    std::fs::create_dir_all(work).map_err(|e| NabError::Data {
        path: work.to_path_buf(),
        reason: e.to_string(),
    })?;
    let input = work.join("nab.parquet");
    let batch = corpus_batch(series);
    write_parquet(&input, &batch)?;
    let mut config = PipelineConfig::default();
    config.source.paths = vec![input.display().to_string()];
    config.rules.paths = rules.to_vec();
    config.sink.out = work.join("log").display().to_string();
    let summary = Job::prepare(&config).await?.run().await?;
    let index: HashMap<&str, usize> = series
        .iter()
        .enumerate()
        .map(|(i, s)| (s.key.as_str(), i))
        .collect();
    // The row of each (series, ts): the first one, where a file repeats a timestamp.
    let mut rows: HashMap<(usize, i64), usize> = HashMap::new();
    for (s, x) in series.iter().enumerate() {
        for (i, &t) in x.timestamps.iter().enumerate() {
            rows.entry((s, t)).or_insert(i);
        }
    }
    let mut scores: Vec<Vec<f64>> = series
        .iter()
        .map(|s| vec![0.0; s.timestamps.len()])
        .collect();
    if summary.files.is_empty() {
        return Ok(scores);
    }
    let location = Location::parse(&config.sink.out, &S3Config::default(), false)?;
    let batches = crate::query::query(
        &location,
        "SELECT resource, ts, max(confidence) AS score FROM anomalies GROUP BY resource, ts",
    )
    .await?;
    for b in &batches {
        // DataFusion may read strings as views: normalise.
        let resource = arrow::compute::cast(b.column(0), &DataType::Utf8)
            .map_err(|e| datafusion::error::DataFusionError::ArrowError(Box::new(e), None))?;
        let resource = resource.as_string::<i32>();
        let ts = b.column(1).as_primitive::<TimestampMillisecondType>();
        let score = b.column(2).as_primitive::<arrow::datatypes::Float64Type>();
        for i in 0..b.num_rows() {
            let Some(&s) = index.get(resource.value(i)) else {
                continue;
            };
            let row = series[s].timestamps.partition_point(|&t| t < ts.value(i));
            if row < scores[s].len()
                && series[s].timestamps[row] == ts.value(i)
                && score.is_valid(i)
            {
                scores[s][row] = scores[s][row].max(score.value(i).clamp(0.0, 1.0));
            }
        }
    }
    Ok(scores)
}

fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<(), NabError> {
    let err = |reason: String| NabError::Data {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::create(path).map_err(|e| err(e.to_string()))?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)
        .map_err(|e| err(e.to_string()))?;
    writer.write(batch).map_err(|e| err(e.to_string()))?;
    writer.close().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// NAB-format result files: `<out>/<category>/<file>.csv` with
/// `timestamp,value,anomaly_score,label` for every series, labelled or not.
pub fn write_results(out: &Path, series: &[Series], scores: &[Vec<f64>]) -> std::io::Result<()> {
    use std::io::Write;
    for (s, sc) in series.iter().zip(scores) {
        let path = out.join(&s.key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        writeln!(f, "timestamp,value,anomaly_score,label")?;
        for (i, (&t, &v)) in s.timestamps.iter().zip(&s.values).enumerate() {
            let label = s
                .windows
                .as_ref()
                .is_some_and(|w| w.iter().any(|&(a, b)| a <= t && t <= b));
            let time = chrono::DateTime::from_timestamp_millis(t)
                .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            writeln!(f, "{time},{v},{},{}", sc[i], u8::from(label))?;
        }
    }
    Ok(())
}

/// Scores from NAB-format result files, `<dir>/<category>/<file>.csv` with an
/// `anomaly_score` column, one row per data row (as NAB's own `results/<detector>/` files and
/// [`write_results`] hold them), so that any detector's output is scored by the same rules.
/// Every labelled series needs its file; an unlabelled one without a file scores 0.
pub fn read_results(dir: &Path, series: &[Series]) -> Result<Vec<Vec<f64>>, NabError> {
    series
        .iter()
        .map(|s| {
            let path = dir.join(&s.key);
            let err = |reason: String| NabError::Data {
                path: path.clone(),
                reason,
            };
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && s.windows.is_none() => {
                    return Ok(vec![0.0; s.timestamps.len()]);
                }
                Err(e) => return Err(err(e.to_string())),
            };
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            let header = lines.next().ok_or_else(|| err("empty file".into()))?;
            let column = header
                .split(',')
                .position(|c| c.trim() == "anomaly_score")
                .ok_or_else(|| err("no `anomaly_score` column in the header".into()))?;
            let scores = lines
                .enumerate()
                .map(|(n, line)| {
                    let cell = line.split(',').nth(column).unwrap_or_default().trim();
                    cell.parse::<f64>()
                        .ok()
                        .filter(|v| !v.is_nan())
                        .ok_or_else(|| err(format!("row {}: bad anomaly_score `{cell}`", n + 1)))
                })
                .collect::<Result<Vec<f64>, _>>()?;
            if scores.len() != s.timestamps.len() {
                return Err(err(format!(
                    "{} scores for the data file's {} rows",
                    scores.len(),
                    s.timestamps.len()
                )));
            }
            Ok(scores)
        })
        .collect()
}

/// NAB's three profiles scored over the labelled files.
#[derive(Debug, Clone)]
pub struct NabReport {
    /// Labelled files scored.
    pub files: usize,
    /// Label windows in them.
    pub windows: usize,
    /// Per profile name: (normalised score, threshold).
    pub scores: Vec<(String, f64, f64)>,
    /// Per labelled file, at the `standard` profile's threshold: its key and score.
    pub files_standard: Vec<(String, FileScore)>,
}

/// Scores the detector's per-row `scores` of the labelled series.
pub fn score(series: &[Series], scores: &[Vec<f64>]) -> Result<NabReport, NabError> {
    let (keys, files): (Vec<&str>, Vec<FileInput<'_>>) = series
        .iter()
        .zip(scores)
        .filter_map(|(s, sc)| {
            Some((
                s.key.as_str(),
                FileInput {
                    timestamps: &s.timestamps,
                    scores: sc,
                    windows: s.windows.as_deref()?,
                },
            ))
        })
        .unzip();
    let mut files_standard = Vec::new();
    let windows = files.iter().map(|f| f.windows.len()).sum();
    let mut out = Vec::new();
    for (name, profile) in [
        ("standard", Profile::standard()),
        ("reward_low_FP_rate", Profile::reward_low_fp_rate()),
        ("reward_low_FN_rate", Profile::reward_low_fn_rate()),
    ] {
        // The windows were checked when loaded: what is left to reject is in the scores.
        let r = evaluate(&files, &profile).map_err(|e| NabError::Data {
            path: PathBuf::from("anomaly scores"),
            reason: e.to_string(),
        })?;
        if name == "standard" {
            files_standard = keys.iter().map(|k| k.to_string()).zip(r.files).collect();
        }
        out.push((name.to_string(), r.normalized, r.threshold));
    }
    Ok(NabReport {
        files: files.len(),
        windows,
        scores: out,
        files_standard,
    })
}
