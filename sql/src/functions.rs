//! Scalar functions healer registers for rules.
//!
//! | function | returns |
//! |---|---|
//! | `zscore_severity(z DOUBLE)` | `'LOW'`, `'MEDIUM'`, `'HIGH'` or `'CRITICAL'` ([`Severity::from_zscore`]) |
//! | `zscore_confidence(z DOUBLE)` | min(\|z\| / 10, 1), 0 for NaN or NULL |

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

/// `zscore_severity(z)`.
pub fn zscore_severity_udf() -> ScalarUDF {
    create_udf(
        "zscore_severity",
        vec![DataType::Float64],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            unary_f64(args, |z| {
                Arc::new(
                    (0..z.len())
                        .map(|i| {
                            let v = if z.is_null(i) { f64::NAN } else { z.value(i) };
                            Some(Severity::from_zscore(v).as_str())
                        })
                        .collect::<StringArray>(),
                )
            })
        }),
    )
}

/// `zscore_confidence(z)`.
pub fn zscore_confidence_udf() -> ScalarUDF {
    create_udf(
        "zscore_confidence",
        vec![DataType::Float64],
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            unary_f64(args, |z| {
                Arc::new(
                    (0..z.len())
                        .map(|i| {
                            let v = if z.is_null(i) { f64::NAN } else { z.value(i) };
                            Some(zscore_confidence(v))
                        })
                        .collect::<Float64Array>(),
                )
            })
        }),
    )
}

/// Registers every healer function on `ctx`.
pub fn register_all(ctx: &SessionContext) {
    ctx.register_udf(zscore_severity_udf());
    ctx.register_udf(zscore_confidence_udf());
}
