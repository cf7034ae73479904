//! Trained models as SQL functions.
//!
//! | function | returns |
//! |---|---|
//! | `iforest_score('model.json', f1, …, fn)` | the isolation-forest score in (0, 1], higher is more anomalous |
//! | `iforest_threshold('model.json')` | the score above which a row is an outlier at the training contamination |
//! | `iforest_confidence('model.json', score)` | share of training rows that score lower (0..1) |
//! | `iforest_severity('model.json', score)` | `LOW`, `MEDIUM`, `HIGH` or `CRITICAL` |
//! | `iforest_pvalue('model.json', score)` | probability that a normal row scores at least `score` ([`IforestModel::pvalue`]) |
//!
//! The first argument is the path of a model file written by `healer train iforest` (see
//! [`healer_operators::iforest_model`]), relative to the working directory. It must be a
//! string literal: the model is loaded when the rule is compiled, and the feature arguments
//! are checked against the model's feature names then, so a rule that passes the wrong
//! columns, or the right ones in the wrong order, is rejected at load. Alias expressions to
//! the feature name (`SELECT cpu * 100 AS cpu_percent …`) where they differ.
//!
//! A model whose file changes is reloaded (checked at most once a second), so retraining
//! takes effect without a restart. A replacement with other features is refused: the rule
//! keeps the model it was checked against and a warning says why.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, StringArray};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use healer_operators::iforest_model::IforestModel;

/// How often a model file is checked for changes.
const RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Entry {
    model: Arc<IforestModel>,
    stamp: (SystemTime, u64),
    checked: Instant,
}

/// Loaded models by path, reloaded when their file changes.
#[derive(Debug, Default)]
pub struct ModelRegistry {
    models: Mutex<HashMap<PathBuf, Entry>>,
}

fn stamp(path: &Path) -> std::io::Result<(SystemTime, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.modified()?, meta.len()))
}

fn load(path: &Path) -> std::result::Result<(IforestModel, (SystemTime, u64)), String> {
    let before = stamp(path).map_err(|e| format!("cannot read model `{}`: {e}", path.display()))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read model `{}`: {e}", path.display()))?;
    let model =
        IforestModel::from_json(&text).map_err(|e| format!("model `{}`: {e}", path.display()))?;
    Ok((model, before))
}

impl ModelRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The model at `path`: loaded on first use, reloaded when the file has changed.
    pub fn get(&self, path: &str) -> std::result::Result<Arc<IforestModel>, String> {
        let key = PathBuf::from(path);
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = models.get_mut(&key) {
            if entry.checked.elapsed() < RECHECK {
                return Ok(Arc::clone(&entry.model));
            }
            entry.checked = Instant::now();
            if stamp(&key).is_ok_and(|s| s == entry.stamp) {
                return Ok(Arc::clone(&entry.model));
            }
            match load(&key) {
                Ok((model, s)) if model.features == entry.model.features => {
                    entry.model = Arc::new(model);
                    entry.stamp = s;
                }
                Ok((model, s)) => {
                    eprintln!(
                        "warning: model `{path}` changed its features to ({}); rules were \
                         checked against ({}), so they keep the previous model",
                        model.features.join(", "),
                        entry.model.features.join(", ")
                    );
                    entry.stamp = s;
                }
                Err(e) => eprintln!("warning: {e}; keeping the previous model"),
            }
            return Ok(Arc::clone(&entry.model));
        }
        let (model, s) = load(&key)?;
        let model = Arc::new(model);
        models.insert(
            key,
            Entry {
                model: Arc::clone(&model),
                stamp: s,
                checked: Instant::now(),
            },
        );
        Ok(model)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Score,
    Threshold,
    Confidence,
    Severity,
    Pvalue,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Score => "iforest_score",
            Kind::Threshold => "iforest_threshold",
            Kind::Confidence => "iforest_confidence",
            Kind::Severity => "iforest_severity",
            Kind::Pvalue => "iforest_pvalue",
        }
    }
}

/// One of the isolation-forest functions.
#[derive(Debug)]
struct IforestUdf {
    kind: Kind,
    registry: Arc<ModelRegistry>,
    signature: Signature,
}

impl PartialEq for IforestUdf {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && Arc::ptr_eq(&self.registry, &other.registry)
    }
}

impl Eq for IforestUdf {}

impl Hash for IforestUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
    }
}

fn model_path<'a>(name: &str, arg: Option<&'a ScalarValue>) -> Result<&'a str> {
    match arg {
        Some(ScalarValue::Utf8(Some(p)) | ScalarValue::LargeUtf8(Some(p))) => Ok(p),
        Some(ScalarValue::Utf8View(Some(p))) => Ok(p),
        _ => plan_err!(
            "{name}: the first argument must be the model file's path, as a string literal"
        ),
    }
}

fn as_f64(value: &ColumnarValue, rows: usize) -> Result<Float64Array> {
    let array = value.to_array(rows)?;
    let array = if array.data_type() == &DataType::Float64 {
        array
    } else {
        arrow::compute::cast(&array, &DataType::Float64)?
    };
    Ok(array.as_primitive::<Float64Type>().clone())
}

impl ScalarUDFImpl for IforestUdf {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let expected = match self.kind {
            Kind::Score => None,
            Kind::Threshold => Some(1),
            Kind::Confidence | Kind::Severity | Kind::Pvalue => Some(2),
        };
        if arg_types.is_empty() || expected.is_some_and(|n| n != arg_types.len()) {
            let usage = match self.kind {
                Kind::Score => "iforest_score('model.json', feature, …)",
                Kind::Threshold => "iforest_threshold('model.json')",
                Kind::Confidence => "iforest_confidence('model.json', score)",
                Kind::Severity => "iforest_severity('model.json', score)",
                Kind::Pvalue => "iforest_pvalue('model.json', score)",
            };
            return plan_err!(
                "{}: {} arguments given; usage: {usage}",
                self.name(),
                arg_types.len()
            );
        }
        let mut types = vec![DataType::Utf8];
        types.extend(std::iter::repeat_n(DataType::Float64, arg_types.len() - 1));
        Ok(types)
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            Kind::Severity => DataType::Utf8,
            _ => DataType::Float64,
        })
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let path = model_path(
            self.name(),
            args.scalar_arguments.first().copied().flatten(),
        )?;
        let model = match self.registry.get(path) {
            Ok(m) => m,
            Err(e) => return plan_err!("{}: {e}", self.name()),
        };
        if self.kind == Kind::Score {
            let names: Vec<&str> = args.arg_fields[1..]
                .iter()
                .map(|f| f.name().as_str())
                .collect();
            if let Err(e) = model.check_features(&names) {
                return plan_err!("{}: model `{path}`: {e}", self.name());
            }
        }
        let data_type = self.return_type(&[])?;
        Ok(Arc::new(Field::new(self.name(), data_type, true)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let path = match &args.args[0] {
            ColumnarValue::Scalar(s) => model_path(self.name(), Some(s))?,
            ColumnarValue::Array(_) => {
                return exec_err!("{}: the model path must be a literal", self.name());
            }
        };
        let model = match self.registry.get(path) {
            Ok(m) => m,
            Err(e) => return exec_err!("{}: {e}", self.name()),
        };
        let out: ArrayRef = match self.kind {
            Kind::Threshold => {
                return Ok(ColumnarValue::Scalar(ScalarValue::Float64(Some(
                    model.threshold(),
                ))));
            }
            Kind::Score => {
                let inputs = args.args[1..]
                    .iter()
                    .map(|a| as_f64(a, rows))
                    .collect::<Result<Vec<_>>>()?;
                // NULL reads as missing (NaN), which the forest sends left.
                let columns: Vec<std::borrow::Cow<'_, [f64]>> = inputs
                    .iter()
                    .map(|a| {
                        if a.null_count() == 0 {
                            std::borrow::Cow::Borrowed(&a.values()[..])
                        } else {
                            a.iter().map(|v| v.unwrap_or(f64::NAN)).collect()
                        }
                    })
                    .collect();
                let refs: Vec<&[f64]> = columns.iter().map(|c| c.as_ref()).collect();
                let mut scores = vec![0.0; rows];
                model
                    .forest
                    .score_columns(&refs, &mut scores)
                    .map_err(|e| datafusion::error::DataFusionError::Execution(e.to_string()))?;
                Arc::new(Float64Array::from(scores))
            }
            Kind::Confidence => {
                let s = as_f64(&args.args[1], rows)?;
                Arc::new(
                    s.iter()
                        .map(|v| Some(model.confidence(v.unwrap_or(f64::NAN))))
                        .collect::<Float64Array>(),
                )
            }
            Kind::Pvalue => {
                let s = as_f64(&args.args[1], rows)?;
                Arc::new(
                    s.iter()
                        .map(|v| Some(model.pvalue(v.unwrap_or(f64::NAN))).filter(|p| !p.is_nan()))
                        .collect::<Float64Array>(),
                )
            }
            Kind::Severity => {
                let s = as_f64(&args.args[1], rows)?;
                Arc::new(
                    s.iter()
                        .map(|v| Some(model.severity(v.unwrap_or(f64::NAN)).as_str()))
                        .collect::<StringArray>(),
                )
            }
        };
        Ok(ColumnarValue::Array(out))
    }
}

/// The isolation-forest functions, sharing `registry`.
pub fn iforest_udfs(registry: &Arc<ModelRegistry>) -> Vec<ScalarUDF> {
    [
        Kind::Score,
        Kind::Threshold,
        Kind::Confidence,
        Kind::Severity,
        Kind::Pvalue,
    ]
    .into_iter()
    .map(|kind| {
        ScalarUDF::new_from_impl(IforestUdf {
            kind,
            registry: Arc::clone(registry),
            signature: Signature::user_defined(Volatility::Stable),
        })
    })
    .collect()
}
