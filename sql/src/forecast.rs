//! The LSTM forecaster as SQL window functions, the seed's deviation mapping, and detector
//! fusion.
//!
//! | function | returns |
//! |---|---|
//! | `lstm_forecast('models/lstm', x) OVER w` | the forecast of `x` at this row from the rows of `w` before it |
//! | `lstm_residual('models/lstm', x) OVER w` | `(x − forecast) / s`, `s` the window's scale as the model normalises it |
//! | `lstm_deviation(x, forecast)` | `\|x − forecast\| / max(\|forecast\|, 1e-9)` (the seed's relative deviation) |
//! | `lstm_confidence(deviation)` | `min(deviation / 0.2, 1)` |
//! | `lstm_severity(deviation)` | `HIGH` above 0.15, `MEDIUM` above 0.05 (the seed's anomaly line), else `LOW` |
//! | `zscore_pvalue(z)` | two-sided Gaussian tail `P(\|Z\| ≥ \|z\|)` |
//! | `iforest_pvalue('model.json', score)` | share of the model's training rows that score at least `score`; an exponential tail beyond their 99.9th percentile |
//! | `lstm_pvalue('models/lstm', residual)` | `P(\|R\| ≥ \|residual\|)` on the model's held-out windows |
//! | `fuse_confidence(p1, p2, …)` | one anomaly confidence in [0, 1] from detector p-values |
//!
//! `w` must be `PARTITION BY … ORDER BY ts ROWS BETWEEN N PRECEDING AND CURRENT ROW` with `N`
//! the model's window (60 for `models/lstm`): the model reads the `N` rows before the current
//! one and forecasts the current one. The result is NULL until a series has `N` earlier rows,
//! and while one of them is missing (NULL or NaN). Each series keeps its last `N` values as
//! keyed window state (checkpointed like every window), and the forecasts of a batch are
//! computed together across series, so a stream and its replay give the same rows whatever
//! the batching.
//!
//! The model path is a directory holding `manifest.json` and the ONNX file it names, relative
//! to the working directory, as a string literal. It is loaded when the rule is compiled, on
//! the process's ONNX Runtime backend ([`crate::lstm::Backend::detect`]), and reloaded when
//! `manifest.json` or `forecaster.onnx` changes (at most once a second; see [`LstmModel`]):
//! write the new files next to the old ones and rename them over.
//!
//! # Fusion
//! Each detector's statistic becomes a p-value: the probability that normal data scores at
//! least as high. The z-score's comes from the Gaussian (exact for Gaussian noise, too small
//! for heavy-tailed metrics, which is why it is one voice of several); the isolation forest's
//! from its training scores; the LSTM's from its residuals on held-out windows (the manifest's
//! `calibration`). `fuse_confidence` combines the p-values present (NULLs are skipped) with
//! Šidák's correction for the smallest, `p = 1 − (1 − min pᵢ)^k`, exact for independent
//! detectors and conservative when they agree because they see the same event, and reports
//! the surprise in decades, `d = −log₁₀(p)`, as `confidence = d / (d + 1)`. Confidence ≥ 0.8
//! then means `p ≤ 10⁻⁴`: at one sample a minute a normal series crosses the seed's 0.8 line
//! about once a week; 0.5 is `p = 0.1`, 0.9 is `10⁻⁹`. The mapping never saturates, so the
//! confidence still ranks the rarest events (a cap at some p would tie them all at 1, and a
//! threshold could no longer tell a gross outlier from a merely unusual value). With no
//! p-value present the confidence is 0.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, StringArray};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{
    ColumnarValue, PartitionEvaluator, ScalarUDF, Signature, Volatility, WindowUDF, WindowUDFImpl,
    create_udf,
};
use datafusion::physical_expr::expressions::Literal;
use healer_operators::severity::Severity;
use healer_operators::window::{ForecastOutput, SeriesForecaster};

use crate::lstm::{Backend, Forecaster, runtime};

/// How often a model directory is checked for changes.
const RECHECK: Duration = Duration::from_secs(1);

/// Loaded forecasters by directory.
#[derive(Debug, Default)]
pub struct ForecasterRegistry {
    models: Mutex<HashMap<PathBuf, Arc<LstmModel>>>,
}

impl ForecasterRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The forecaster in `dir`, loaded on first use on the process's backend.
    pub fn get(&self, dir: &str) -> std::result::Result<Arc<LstmModel>, String> {
        let key = PathBuf::from(dir);
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = models.get(&key) {
            return Ok(Arc::clone(m));
        }
        let model = Arc::new(LstmModel::load(key.clone())?);
        eprintln!(
            "lstm: model `{dir}` on the {} ONNX Runtime backend",
            model.current().backend()
        );
        models.insert(key, Arc::clone(&model));
        Ok(model)
    }
}

/// A forecaster directory, reloaded when its files change (checked at most once a second,
/// when the model is next used), so a retrained model takes effect without a restart. A
/// replacement with another window length, or one that fails to load, is refused with a
/// warning and the previous model stays.
#[derive(Debug)]
pub struct LstmModel {
    dir: PathBuf,
    window: usize,
    current: RwLock<Arc<Forecaster>>,
    /// When the files were last checked, and their (modified, length) then.
    checked: Mutex<(Instant, Stamp)>,
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(dir: &Path) -> Stamp {
    ["manifest.json", "forecaster.onnx"]
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(dir.join(f)).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

impl LstmModel {
    fn load(dir: PathBuf) -> std::result::Result<Self, String> {
        let before = stamp(&dir);
        let runtime = runtime(Backend::detect()).map_err(|e| e.to_string())?;
        let model = Forecaster::load(&dir, runtime).map_err(|e| e.to_string())?;
        Ok(Self {
            window: model.window(),
            dir,
            current: RwLock::new(Arc::new(model)),
            checked: Mutex::new((Instant::now(), before)),
        })
    }

    /// The model in use, after reloading it if its files changed.
    pub fn current(&self) -> Arc<Forecaster> {
        self.reload_if_changed();
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn reload_if_changed(&self) {
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if checked.0.elapsed() < RECHECK {
            return;
        }
        checked.0 = Instant::now();
        let now = stamp(&self.dir);
        if now == checked.1 {
            return;
        }
        checked.1 = now;
        let dir = self.dir.display();
        let loaded = runtime(Backend::detect())
            .map_err(|e| e.to_string())
            .and_then(|rt| Forecaster::load(&self.dir, rt).map_err(|e| e.to_string()));
        match loaded {
            Ok(m) if m.window() == self.window => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(m);
                eprintln!("lstm: model `{dir}` reloaded");
            }
            Ok(m) => eprintln!(
                "warning: model `{dir}` changed its window to {} values; rules were checked \
                 against {}, so they keep the previous model",
                m.window(),
                self.window
            ),
            Err(e) => eprintln!("warning: model `{dir}`: {e}; keeping the previous model"),
        }
    }
}

impl SeriesForecaster for LstmModel {
    fn window(&self) -> usize {
        self.window
    }

    fn forecast(
        &self,
        windows: &[f64],
        out: &mut [healer_operators::window::Forecast],
    ) -> std::result::Result<(), String> {
        self.current().forecast(windows, out)
    }
}

/// `lstm_forecast` or `lstm_residual`.
#[derive(Debug)]
pub struct LstmWindowUdf {
    output: ForecastOutput,
    registry: Arc<ForecasterRegistry>,
    signature: Signature,
}

impl PartialEq for LstmWindowUdf {
    fn eq(&self, other: &Self) -> bool {
        self.output == other.output && Arc::ptr_eq(&self.registry, &other.registry)
    }
}

impl Eq for LstmWindowUdf {}

impl Hash for LstmWindowUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.output.hash(state);
    }
}

impl LstmWindowUdf {
    /// What the function returns.
    pub fn output(&self) -> ForecastOutput {
        self.output
    }

    /// The forecaster a call names with its first argument.
    pub fn model(&self, path: &str) -> std::result::Result<Arc<LstmModel>, String> {
        self.registry.get(path)
    }

    fn usage(&self) -> String {
        format!(
            "{}('models/lstm', x) OVER (PARTITION BY resource ORDER BY ts ROWS BETWEEN 60 \
             PRECEDING AND CURRENT ROW)",
            self.name()
        )
    }
}

/// The string literal naming a model, if `value` is one.
pub(crate) fn literal_path(value: &ScalarValue) -> Option<&str> {
    match value {
        ScalarValue::Utf8(Some(p))
        | ScalarValue::LargeUtf8(Some(p))
        | ScalarValue::Utf8View(Some(p)) => Some(p),
        _ => None,
    }
}

/// The argument types of a function called as `f('model', value)`.
fn model_and_value(name: &str, arg_types: &[DataType], usage: &str) -> Result<Vec<DataType>> {
    if arg_types.len() != 2 {
        return plan_err!(
            "{name}: {} arguments given; usage: {usage}",
            arg_types.len()
        );
    }
    Ok(vec![DataType::Utf8, DataType::Float64])
}

impl WindowUDFImpl for LstmWindowUdf {
    fn name(&self) -> &str {
        match self.output {
            ForecastOutput::Value => "lstm_forecast",
            ForecastOutput::Residual => "lstm_residual",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        model_and_value(self.name(), arg_types, &self.usage())
    }

    fn field(&self, field_args: WindowUDFFieldArgs) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(
            field_args.name(),
            DataType::Float64,
            true,
        )))
    }

    fn partition_evaluator(
        &self,
        args: PartitionEvaluatorArgs,
    ) -> Result<Box<dyn PartitionEvaluator>> {
        let path = args
            .input_exprs()
            .first()
            .and_then(|e| e.downcast_ref::<Literal>())
            .and_then(|l| literal_path(l.value()));
        let Some(path) = path else {
            return plan_err!(
                "{}: the first argument must be the model's directory, as a string literal",
                self.name()
            );
        };
        match self.registry.get(path) {
            Ok(model) => Ok(Box::new(FrameEvaluator {
                model,
                output: self.output,
            })),
            Err(e) => plan_err!("{}: {e}", self.name()),
        }
    }
}

/// DataFusion's own evaluation of the functions, one frame at a time: what a query run by
/// DataFusion (rather than healer's pipeline) computes, and a reference for healer's operator.
#[derive(Debug)]
struct FrameEvaluator {
    model: Arc<LstmModel>,
    output: ForecastOutput,
}

impl PartitionEvaluator for FrameEvaluator {
    fn uses_window_frame(&self) -> bool {
        true
    }

    fn evaluate(&mut self, values: &[ArrayRef], range: &Range<usize>) -> Result<ScalarValue> {
        let window = self.model.window();
        let x = values[1].as_primitive::<Float64Type>();
        if range.len() != window + 1 {
            return Ok(ScalarValue::Float64(None));
        }
        let current = range.end - 1;
        let history: Vec<f64> = (range.start..current)
            .map(|i| if x.is_valid(i) { x.value(i) } else { f64::NAN })
            .collect();
        if history.iter().any(|v| v.is_nan()) {
            return Ok(ScalarValue::Float64(None));
        }
        let mut out = [healer_operators::window::Forecast::default()];
        if let Err(e) = self.model.forecast(&history, &mut out) {
            return exec_err!("lstm: {e}");
        }
        let [f] = out;
        Ok(ScalarValue::Float64(match self.output {
            ForecastOutput::Value => Some(f.value),
            ForecastOutput::Residual => x
                .is_valid(current)
                .then(|| (x.value(current) - f.value) / f.scale)
                .filter(|r| !r.is_nan()),
        }))
    }
}

/// `lstm_forecast` and `lstm_residual`, sharing `registry`.
pub fn lstm_window_udfs(registry: &Arc<ForecasterRegistry>) -> Vec<WindowUDF> {
    [ForecastOutput::Value, ForecastOutput::Residual]
        .into_iter()
        .map(|output| {
            WindowUDF::new_from_impl(LstmWindowUdf {
                output,
                registry: Arc::clone(registry),
                signature: Signature::user_defined(Volatility::Stable),
            })
        })
        .collect()
}

/// The seed's relative deviation of `actual` from `forecast`.
pub fn deviation(actual: f64, forecast: f64) -> f64 {
    (actual - forecast).abs() / forecast.abs().max(1e-9)
}

/// The seed's LSTM confidence.
pub fn deviation_confidence(deviation: f64) -> f64 {
    if deviation.is_nan() {
        0.0
    } else {
        (deviation / 0.2).min(1.0)
    }
}

/// The seed's LSTM severity.
pub fn deviation_severity(deviation: f64) -> Severity {
    if deviation > 0.15 {
        Severity::High
    } else if deviation > 0.05 {
        Severity::Medium
    } else {
        Severity::Low
    }
}

/// `erfc(x)` for x ≥ 0, to about 1e-7 relative (Numerical Recipes' Chebyshev fit), so that
/// tails far below double-precision `1 − erf` stay accurate.
fn erfc(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * x);
    let poly = -x * x - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * poly.exp()
}

/// The two-sided Gaussian tail of a z-score; NaN for NaN.
pub fn zscore_pvalue(z: f64) -> f64 {
    if z.is_nan() {
        f64::NAN
    } else {
        erfc(z.abs() / std::f64::consts::SQRT_2).clamp(0.0, 1.0)
    }
}

/// Šidák-combined p-value of the present (non-NaN) `pvalues` as a confidence in [0, 1]: see
/// the [module docs](self). 0 when none is present.
pub fn fuse_confidence(pvalues: impl IntoIterator<Item = f64>) -> f64 {
    let (mut k, mut min) = (0i32, 1.0f64);
    for p in pvalues.into_iter().filter(|p| !p.is_nan()) {
        k += 1;
        min = min.min(p.clamp(0.0, 1.0));
    }
    if k == 0 {
        return 0.0;
    }
    // 1 − (1 − min)^k without cancellation for tiny `min`.
    let p = -(f64::from(k) * (-min).ln_1p()).exp_m1();
    let decades = (-p.max(1e-300).log10()).max(0.0);
    decades / (decades + 1.0)
}

/// Rows of a call: the length of its array arguments, 1 when all are scalars.
fn batch_rows(args: &[ColumnarValue]) -> usize {
    args.iter()
        .find_map(|a| match a {
            ColumnarValue::Array(a) => Some(a.len()),
            ColumnarValue::Scalar(_) => None,
        })
        .unwrap_or(1)
}

fn values(args: &[ColumnarValue], rows: usize) -> Result<Vec<Float64Array>> {
    args.iter()
        .map(|a| {
            let a = a.to_array(rows)?;
            let a = if a.data_type() == &DataType::Float64 {
                a
            } else {
                arrow::compute::cast(&a, &DataType::Float64)?
            };
            Ok(a.as_primitive::<Float64Type>().clone())
        })
        .collect()
}

fn get(a: &Float64Array, i: usize) -> f64 {
    if a.is_valid(i) { a.value(i) } else { f64::NAN }
}

/// A row-wise function of `DOUBLE` arguments; NULL reads as NaN and NaN results are NULL.
fn rowwise_udf(name: &str, arity: usize, f: fn(&[f64]) -> f64) -> ScalarUDF {
    create_udf(
        name,
        vec![DataType::Float64; arity],
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let rows = batch_rows(args);
            let cols = values(args, rows)?;
            let mut row = vec![0.0; cols.len()];
            let out: Float64Array = (0..rows)
                .map(|i| {
                    for (v, c) in row.iter_mut().zip(&cols) {
                        *v = get(c, i);
                    }
                    Some(f(&row)).filter(|v| !v.is_nan())
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// `fuse_confidence(p1, …)` for 1 to 8 p-values.
fn fuse_udfs() -> Vec<ScalarUDF> {
    // One signature per arity: a variadic `DOUBLE…` signature would accept zero arguments.
    let signature = Signature::one_of(
        (1..=8)
            .map(|n| datafusion::logical_expr::TypeSignature::Exact(vec![DataType::Float64; n]))
            .collect(),
        Volatility::Immutable,
    );
    vec![ScalarUDF::new_from_impl(FuseUdf { signature })]
}

fn fuse_columns(args: &[ColumnarValue]) -> Result<ColumnarValue> {
    let rows = batch_rows(args);
    let cols = values(args, rows)?;
    let out: Float64Array = (0..rows)
        .map(|i| Some(fuse_confidence(cols.iter().map(|c| get(c, i)))))
        .collect();
    Ok(ColumnarValue::Array(Arc::new(out)))
}

/// `fuse_confidence` with a signature of 1 to 8 `DOUBLE`s.
#[derive(Debug)]
struct FuseUdf {
    signature: Signature,
}

impl PartialEq for FuseUdf {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for FuseUdf {}

impl Hash for FuseUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        "fuse_confidence".hash(state);
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for FuseUdf {
    fn name(&self) -> &str {
        "fuse_confidence"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> Result<ColumnarValue> {
        fuse_columns(&args.args)
    }
}

/// `lstm_pvalue('models/lstm', residual)`.
#[derive(Debug)]
struct LstmPvalueUdf {
    registry: Arc<ForecasterRegistry>,
    signature: Signature,
}

impl PartialEq for LstmPvalueUdf {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.registry, &other.registry)
    }
}

impl Eq for LstmPvalueUdf {}

impl Hash for LstmPvalueUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        "lstm_pvalue".hash(state);
    }
}

impl LstmPvalueUdf {
    fn model(&self, value: Option<&ScalarValue>) -> Result<Arc<Forecaster>> {
        // The model in use now (a reload may bring a new calibration).
        let Some(path) = value.and_then(literal_path) else {
            return plan_err!(
                "lstm_pvalue: the first argument must be the model's directory, as a string \
                 literal"
            );
        };
        let model = match self.registry.get(path) {
            Ok(m) => m.current(),
            Err(e) => return plan_err!("lstm_pvalue: {e}"),
        };
        if model.calibration().is_none() {
            return plan_err!(
                "lstm_pvalue: model `{path}` has no residual calibration in its manifest"
            );
        }
        Ok(model)
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for LstmPvalueUdf {
    fn name(&self) -> &str {
        "lstm_pvalue"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        model_and_value(
            self.name(),
            arg_types,
            "lstm_pvalue('models/lstm', residual)",
        )
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<FieldRef> {
        self.model(args.scalar_arguments.first().copied().flatten())?;
        Ok(Arc::new(Field::new(self.name(), DataType::Float64, true)))
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let path = match &args.args[0] {
            ColumnarValue::Scalar(s) => Some(s),
            ColumnarValue::Array(_) => None,
        };
        let model = self.model(path)?;
        let calibration = model.calibration().expect("checked by model()");
        let residual = &values(&args.args[1..], rows)?[0];
        let out: Float64Array = (0..rows)
            .map(|i| Some(calibration.tail(get(residual, i))).filter(|p| !p.is_nan()))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// Registers the functions of this module on `ctx`.
pub fn register(ctx: &datafusion::prelude::SessionContext, registry: &Arc<ForecasterRegistry>) {
    for udwf in lstm_window_udfs(registry) {
        ctx.register_udwf(udwf);
    }
    ctx.register_udf(rowwise_udf("lstm_deviation", 2, |v| deviation(v[0], v[1])));
    ctx.register_udf(rowwise_udf("lstm_confidence", 1, |v| {
        deviation_confidence(v[0])
    }));
    ctx.register_udf(create_udf(
        "lstm_severity",
        vec![DataType::Float64],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let rows = batch_rows(args);
            let d = &values(args, rows)?[0];
            let out: StringArray = (0..rows)
                .map(|i| Some(deviation_severity(get(d, i)).as_str()))
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
        }),
    ));
    ctx.register_udf(rowwise_udf("zscore_pvalue", 1, |v| zscore_pvalue(v[0])));
    for udf in fuse_udfs() {
        ctx.register_udf(udf);
    }
    ctx.register_udf(ScalarUDF::new_from_impl(LstmPvalueUdf {
        registry: Arc::clone(registry),
        signature: Signature::user_defined(Volatility::Stable),
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_tail() {
        // P(|Z| ≥ 1.96) = 0.05, P(|Z| ≥ 3) = 0.0027, P(|Z| ≥ 6) = 1.97e-9.
        assert!((zscore_pvalue(1.959_964) - 0.05).abs() < 1e-7);
        assert!((zscore_pvalue(-3.0) - 0.002_699_796).abs() < 1e-8);
        assert!((zscore_pvalue(6.0) / 1.973_175e-9 - 1.0).abs() < 1e-5);
        assert_eq!(zscore_pvalue(0.0), 1.0);
        assert!(zscore_pvalue(f64::NAN).is_nan());
    }

    #[test]
    fn fusion_is_sidak_in_decades() {
        assert_eq!(fuse_confidence([]), 0.0);
        assert_eq!(fuse_confidence([f64::NAN, f64::NAN]), 0.0);
        assert_eq!(fuse_confidence([1.0]), 0.0);
        // One detector at p = 1e-4: 0.8, the seed's line.
        assert!((fuse_confidence([1e-4]) - 0.8).abs() < 1e-12);
        // The same smallest p among three detectors is three times as likely by chance.
        let three = fuse_confidence([1e-4, 0.5, 0.9]);
        let d = -(3e-4f64 - 3e-8 + 1e-12).log10();
        assert!((three - d / (d + 1.0)).abs() < 1e-9);
        // Missing detectors do not count.
        assert_eq!(fuse_confidence([1e-4, f64::NAN]), fuse_confidence([1e-4]));
        assert!((fuse_confidence([0.1]) - 0.5).abs() < 1e-12);
        assert!((fuse_confidence([1e-9]) - 0.9).abs() < 1e-12);
        // Rarer stays higher: no saturation.
        assert!(fuse_confidence([1e-20]) > fuse_confidence([1e-10]));
        assert!(fuse_confidence([0.0]) > 0.99 && fuse_confidence([0.0]) < 1.0);
    }

    #[test]
    fn seed_deviation_mapping() {
        assert!((deviation(105.0, 100.0) - 0.05).abs() < 1e-12);
        assert_eq!(deviation(0.0, 0.0), 0.0);
        assert!(deviation(1.0, 0.0).is_finite());
        assert_eq!(deviation_confidence(0.1), 0.5);
        assert_eq!(deviation_confidence(0.5), 1.0);
        assert_eq!(deviation_severity(0.04), Severity::Low);
        assert_eq!(deviation_severity(0.1), Severity::Medium);
        assert_eq!(deviation_severity(0.2), Severity::High);
    }
}
