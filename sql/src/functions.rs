//! Scalar functions healer registers for rules.
//!
//! | function | returns |
//! |---|---|
//! | `zscore_severity(z DOUBLE)` | `'LOW'`, `'MEDIUM'`, `'HIGH'` or `'CRITICAL'` ([`Severity::from_zscore`]) |
//! | `zscore_confidence(z DOUBLE)` | min(\|z\| / 10, 1), 0 for NaN or NULL |
//!
//! the model functions of [`crate::models`] (`iforest_score`, `iforest_threshold`,
//! `iforest_confidence`, `iforest_severity`, `iforest_pvalue`), and those of
//! [`crate::forecast`] (`lstm_forecast`, `lstm_residual`, `lstm_deviation`, `lstm_confidence`,
//! `lstm_severity`, `zscore_pvalue`, `lstm_pvalue`, `fuse_confidence`).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, StringArray};
use arrow::datatypes::{DataType, Float64Type};
use datafusion::common::Result;
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use datafusion::prelude::SessionContext;
use healer_operators::severity::{Severity, zscore_confidence};

fn unary_f64(
    args: &[ColumnarValue],
    f: impl Fn(&Float64Array) -> ArrayRef,
) -> Result<ColumnarValue> {
    let scalar = matches!(args[0], ColumnarValue::Scalar(_));
    let array = args[0].to_array(1)?;
    let out = f(array.as_primitive::<Float64Type>());
    Ok(if scalar {
        ColumnarValue::Scalar(datafusion::scalar::ScalarValue::try_from_array(&out, 0)?)
    } else {
        ColumnarValue::Array(out)
    })
}

/// A scalar UDF applying `f` to each value of one `DOUBLE` argument (NULL reads as NaN).
fn map_f64_udf<A>(name: &str, returns: DataType, f: fn(f64) -> Option<A::Native>) -> ScalarUDF
where
    A: arrow::array::Array + FromIterator<Option<A::Native>> + 'static,
    A: NativeItem,
{
    create_udf(
        name,
        vec![DataType::Float64],
        returns,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            unary_f64(args, |z| {
                Arc::new(
                    (0..z.len())
                        .map(|i| f(if z.is_null(i) { f64::NAN } else { z.value(i) }))
                        .collect::<A>(),
                ) as ArrayRef
            })
        }),
    )
}

/// The item type an output array is collected from.
trait NativeItem {
    /// The collected item.
    type Native;
}

impl NativeItem for StringArray {
    type Native = &'static str;
}

impl NativeItem for Float64Array {
    type Native = f64;
}

/// `zscore_severity(z)`.
pub fn zscore_severity_udf() -> ScalarUDF {
    map_f64_udf::<StringArray>("zscore_severity", DataType::Utf8, |z| {
        Some(Severity::from_zscore(z).as_str())
    })
}

/// `zscore_confidence(z)`.
pub fn zscore_confidence_udf() -> ScalarUDF {
    map_f64_udf::<Float64Array>("zscore_confidence", DataType::Float64, |z| {
        Some(zscore_confidence(z))
    })
}

/// Registers every healer function on `ctx`; isolation forests load through `models`, LSTM
/// forecasters through `forecasters`.
pub fn register_all(
    ctx: &SessionContext,
    models: &Arc<crate::models::ModelRegistry>,
    forecasters: &Arc<crate::forecast::ForecasterRegistry>,
) {
    ctx.register_udf(zscore_severity_udf());
    ctx.register_udf(zscore_confidence_udf());
    for udf in crate::models::iforest_udfs(models) {
        ctx.register_udf(udf);
    }
    crate::forecast::register(ctx, forecasters);
}
