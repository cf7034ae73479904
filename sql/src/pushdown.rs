//! Pre-filters pushed into window stages.
//!
//! A detection rule keeps a tiny fraction of its rows (the z-score rule about 0.75 %), yet a
//! plan evaluates its window aggregates for every row, then its filters over whole batches.
//! [`push_down_filters`] follows each window stage through the projections and filters after
//! it and derives a [`RowPredicate`] over the window stage's output columns: the conjunction
//! of every filter it reaches, with columns replaced by the expressions that computed them.
//! The window operator evaluates it on each chunk of rows as soon as the chunk's aggregates
//! are known, and only the rows it keeps are built into the stage's output (see
//! `Stage::process`).
//!
//! The pre-filter is conservative: parts of a filter it cannot evaluate exactly as
//! DataFusion does (an integer operation, a function other than `abs` and `NULLIF`, a column
//! that is not a `Float64` input or a window aggregate) become *unknown*, which never drops a
//! row. The filters themselves stay in the plan and decide on the rows that remain, so a rule
//! returns the same rows with or without the pre-filter.

use std::sync::Arc;

use arrow::datatypes::{DataType, Schema};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_expr::expressions::{
    BinaryExpr, CastExpr, Column, Literal, NegativeExpr, NotExpr, TryCastExpr,
};
use healer_operators::predicate::{Arith, Cmp, RowExpr, RowPredicate};
use healer_operators::window::{AggKind, Screen, WindowOperator};

use crate::stage::{StageTemplate, WindowGroupTemplate};

/// What a window stage knows of the filters after it.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowPrefilter {
    /// The conjunction of the filters, conservatively, over the stage's output columns.
    pub predicate: RowPredicate,
    /// A z-score conjunct `abs((x - AVG(x)) / STDDEV(x)) > k` over the stage's own
    /// aggregates, tested on the running sums before any aggregate is computed.
    pub screen: Option<Screen>,
}

/// Integers up to this magnitude convert to `f64` exactly.
const EXACT_INT: u128 = 1 << 53;

/// Fills in the pre-filter of every window stage of `stages` from the filters that follow
/// it (up to the next window stage).
pub fn push_down_filters(stages: &mut [StageTemplate]) {
    for i in 0..stages.len() {
        let (head, tail) = stages.split_at_mut(i + 1);
        if let StageTemplate::Window {
            schema,
            input_columns,
            groups,
            prefilter,
        } = &mut head[i]
        {
            // One group only: the selection runs inside that group's operator.
            let [group] = groups.as_slice() else {
                continue;
            };
            if !WindowOperator::can_select(group.frame, &group.aggregates) {
                continue;
            }
            // Inputs: their Float64 columns. Aggregates: all of them (COUNT is exact).
            let leaves = schema
                .fields()
                .iter()
                .enumerate()
                .map(|(c, field)| match field.data_type() {
                    t if c >= *input_columns => Sym::Known(RowExpr::Column(c), kind_of(t)),
                    DataType::Float64 => Sym::Known(RowExpr::Column(c), Kind::Float),
                    _ => Sym::Unknown,
                })
                .collect();
            *prefilter = derive(leaves, schema, tail).map(|expr| WindowPrefilter {
                screen: z_screen(&expr, group, *input_columns),
                predicate: RowPredicate::new(expr),
            });
        }
    }
}

/// What a symbolic value is known to hold.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// A `Float64`.
    Float,
    /// An integer that converts to `f64` exactly.
    Int,
    /// A boolean.
    Bool,
}

fn kind_of(t: &DataType) -> Kind {
    match t {
        DataType::Boolean => Kind::Bool,
        DataType::Int64 => Kind::Int,
        _ => Kind::Float,
    }
}

/// A column or expression as the pre-filter sees it.
#[derive(Debug, Clone)]
enum Sym {
    Known(RowExpr, Kind),
    Unknown,
}

/// The conjunction of the filters in `stages` (until a window stage), over the columns
/// `leaves` of the window stage with `schema`.
fn derive(
    mut columns: Vec<Sym>,
    schema: &Arc<Schema>,
    stages: &[StageTemplate],
) -> Option<RowExpr> {
    let mut schema = Arc::clone(schema);
    let mut conjuncts: Vec<RowExpr> = Vec::new();
    for stage in stages {
        match stage {
            StageTemplate::Filter { predicate } => {
                if let Sym::Known(e, Kind::Bool) = convert(predicate, &columns, &schema) {
                    conjuncts.push(e);
                }
            }
            StageTemplate::Project { exprs, schema: out } => {
                columns = exprs
                    .iter()
                    .map(|e| convert(e, &columns, &schema))
                    .collect();
                schema = Arc::clone(out);
            }
            StageTemplate::Window { .. } => break,
        }
    }
    conjuncts
        .into_iter()
        .reduce(|a, b| RowExpr::And(Box::new(a), Box::new(b)))
}

/// `expr`, evaluated over rows whose columns are `columns`, as a pre-filter expression.
fn convert(expr: &Arc<dyn PhysicalExpr>, columns: &[Sym], schema: &Schema) -> Sym {
    let any: &dyn PhysicalExpr = expr.as_ref();
    let Ok(data_type) = expr.data_type(schema) else {
        return Sym::Unknown;
    };
    let float = data_type == DataType::Float64;
    if let Some(c) = any.downcast_ref::<Column>() {
        return columns.get(c.index()).cloned().unwrap_or(Sym::Unknown);
    }
    if let Some(l) = any.downcast_ref::<Literal>() {
        return literal(l.value());
    }
    if let Some(b) = any.downcast_ref::<BinaryExpr>() {
        let (l, r) = (
            convert(b.left(), columns, schema),
            convert(b.right(), columns, schema),
        );
        return binary(*b.op(), l, r, float);
    }
    if let Some(n) = any.downcast_ref::<NotExpr>() {
        return match convert(n.arg(), columns, schema) {
            Sym::Known(e, Kind::Bool) => Sym::Known(RowExpr::Not(Box::new(e)), Kind::Bool),
            _ => Sym::Unknown,
        };
    }
    if let Some(n) = any.downcast_ref::<NegativeExpr>() {
        return match convert(n.arg(), columns, schema) {
            Sym::Known(e, Kind::Float) if float => {
                Sym::Known(RowExpr::Neg(Box::new(e)), Kind::Float)
            }
            _ => Sym::Unknown,
        };
    }
    let cast = any
        .downcast_ref::<CastExpr>()
        .map(|c| (c.expr(), c.cast_type()))
        .or_else(|| {
            any.downcast_ref::<TryCastExpr>()
                .map(|c| (c.expr(), c.cast_type()))
        });
    if let Some((inner, to)) = cast {
        // Numbers to Float64 convert exactly (integers are known to be exact).
        return match convert(inner, columns, schema) {
            Sym::Known(e, Kind::Float | Kind::Int) if *to == DataType::Float64 => {
                Sym::Known(e, Kind::Float)
            }
            _ => Sym::Unknown,
        };
    }
    if let Some(f) = any.downcast_ref::<ScalarFunctionExpr>() {
        let args: Vec<Sym> = f
            .args()
            .iter()
            .map(|a| convert(a, columns, schema))
            .collect();
        return match (f.name(), args.as_slice()) {
            ("abs", [Sym::Known(a, Kind::Float)]) if float => {
                Sym::Known(RowExpr::Abs(Box::new(a.clone())), Kind::Float)
            }
            ("nullif", [Sym::Known(a, ka), Sym::Known(b, kb)]) if ka == kb && ka != &Kind::Bool => {
                Sym::Known(
                    RowExpr::NullIf(Box::new(a.clone()), Box::new(b.clone())),
                    ka.to_owned(),
                )
            }
            _ => Sym::Unknown,
        };
    }
    Sym::Unknown
}

fn literal(v: &ScalarValue) -> Sym {
    let int = |i: i128| {
        if i.unsigned_abs() <= EXACT_INT {
            Sym::Known(RowExpr::Literal(i as f64), Kind::Int)
        } else {
            Sym::Unknown
        }
    };
    match v {
        ScalarValue::Float64(Some(f)) => Sym::Known(RowExpr::Literal(*f), Kind::Float),
        ScalarValue::Boolean(Some(b)) => {
            Sym::Known(RowExpr::Literal(if *b { 1.0 } else { 0.0 }), Kind::Bool)
        }
        ScalarValue::Int8(Some(i)) => int(i128::from(*i)),
        ScalarValue::Int16(Some(i)) => int(i128::from(*i)),
        ScalarValue::Int32(Some(i)) => int(i128::from(*i)),
        ScalarValue::Int64(Some(i)) => int(i128::from(*i)),
        ScalarValue::UInt8(Some(i)) => int(i128::from(*i)),
        ScalarValue::UInt16(Some(i)) => int(i128::from(*i)),
        ScalarValue::UInt32(Some(i)) => int(i128::from(*i)),
        ScalarValue::UInt64(Some(i)) => int(i128::from(*i)),
        _ => Sym::Unknown,
    }
}

fn binary(op: Operator, l: Sym, r: Sym, float: bool) -> Sym {
    let ((a, ka), (b, kb)) = match (l, r) {
        (Sym::Known(a, ka), Sym::Known(b, kb)) => ((Box::new(a), ka), (Box::new(b), kb)),
        // `unknown AND x` drops exactly the rows that `x` drops.
        (Sym::Unknown, x @ Sym::Known(_, Kind::Bool))
        | (x @ Sym::Known(_, Kind::Bool), Sym::Unknown)
            if op == Operator::And =>
        {
            return x;
        }
        _ => return Sym::Unknown,
    };
    let both = |k: Kind| ka == k && kb == k;
    let numbers = ka != Kind::Bool && kb != Kind::Bool;
    // Float arithmetic only: Arrow's integer kernels wrap or fail on overflow.
    let float = float && both(Kind::Float);
    let (expr, kind, exact) = match op {
        Operator::And => (RowExpr::And(a, b), Kind::Bool, both(Kind::Bool)),
        Operator::Or => (RowExpr::Or(a, b), Kind::Bool, both(Kind::Bool)),
        Operator::Eq => (RowExpr::Compare(Cmp::Eq, a, b), Kind::Bool, numbers),
        Operator::NotEq => (RowExpr::Compare(Cmp::NotEq, a, b), Kind::Bool, numbers),
        Operator::Lt => (RowExpr::Compare(Cmp::Lt, a, b), Kind::Bool, numbers),
        Operator::LtEq => (RowExpr::Compare(Cmp::LtEq, a, b), Kind::Bool, numbers),
        Operator::Gt => (RowExpr::Compare(Cmp::Gt, a, b), Kind::Bool, numbers),
        Operator::GtEq => (RowExpr::Compare(Cmp::GtEq, a, b), Kind::Bool, numbers),
        Operator::Plus => (RowExpr::Arith(Arith::Add, a, b), Kind::Float, float),
        Operator::Minus => (RowExpr::Arith(Arith::Sub, a, b), Kind::Float, float),
        Operator::Multiply => (RowExpr::Arith(Arith::Mul, a, b), Kind::Float, float),
        Operator::Divide => (RowExpr::Arith(Arith::Div, a, b), Kind::Float, float),
        _ => return Sym::Unknown,
    };
    if exact {
        Sym::Known(expr, kind)
    } else {
        Sym::Unknown
    }
}

/// A [`Screen`] for a top-level conjunct of `expr` of the form
/// `abs((x - mean) / NULLIF(std, 0)) > k` (or `>=`, or without the `NULLIF`), where `mean`
/// and `std` are `AVG` and `STDDEV_SAMP` / `STDDEV_POP` of the group's argument and `x` is
/// that argument's own input column.
fn z_screen(expr: &RowExpr, group: &WindowGroupTemplate, input_columns: usize) -> Option<Screen> {
    use RowExpr::{Abs, And, Arith as A, Column as C, Compare, Literal as L, NullIf};
    if let And(a, b) = expr {
        return z_screen(a, group, input_columns).or_else(|| z_screen(b, group, input_columns));
    }
    let Compare(Cmp::Gt | Cmp::GtEq, abs, k) = expr else {
        return None;
    };
    let (Abs(z), L(k)) = (abs.as_ref(), k.as_ref()) else {
        return None;
    };
    let A(Arith::Div, diff, std) = z.as_ref() else {
        return None;
    };
    let A(Arith::Sub, x, mean) = diff.as_ref() else {
        return None;
    };
    let std = match std.as_ref() {
        NullIf(std, zero) if **zero == L(0.0) => std.as_ref(),
        other => other,
    };
    let (C(x), C(mean), C(std)) = (x.as_ref(), mean.as_ref(), std) else {
        return None;
    };
    // The aggregate behind an output column.
    let aggregate = |c: usize| {
        let pos = c.checked_sub(input_columns)?;
        let j = group.positions.iter().position(|&p| p == pos)?;
        group.aggregates.get(j)
    };
    let (x, mean, std) = (*x, aggregate(*mean)?, aggregate(*std)?);
    let sample = match std.kind {
        AggKind::StddevSamp => true,
        AggKind::StddevPop => false,
        _ => return None,
    };
    let arg = group.args.get(mean.arg)?;
    let arg_column = arg.as_ref().downcast_ref::<Column>()?.index();
    (mean.kind == AggKind::Avg
        && std.arg == mean.arg
        && arg_column == x
        && k.is_finite()
        && *k >= 0.0)
        .then_some(Screen {
            arg: mean.arg,
            k: *k,
            sample,
        })
}
