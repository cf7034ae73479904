//! The executable form of a rule: a linear pipeline of stages.
//!
//! A [`StageTemplate`] is what the compiler produces: physical expressions and operator
//! specifications, shareable between workers. [`StageTemplate::instantiate`] gives a
//! [`Stage`] with its own state (interned keys, window buffers). Stages only ever see rows in
//! event-time order, one batch after the other.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch, UInt32Array};
use arrow::compute::{cast, filter_record_batch, take};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::Result as DFResult;
use datafusion::physical_expr::PhysicalExpr;
use healer_operators::keys::KeyInterner;
use healer_operators::keys::KeyValue;
use healer_operators::predicate::Scratch;
use healer_operators::window::{Aggregate, Frame, GroupState, SeriesForecaster, WindowOperator};

use crate::error::ExecError;
use crate::pushdown::WindowPrefilter;

/// One group of window aggregates that share partition keys and frame.
#[derive(Debug)]
pub struct WindowGroupTemplate {
    /// `PARTITION BY` expressions.
    pub partition: Vec<Arc<dyn PhysicalExpr>>,
    /// Their names (the column name, or the expression's text).
    pub key_names: Vec<String>,
    /// Distinct aggregate arguments (evaluated, then cast to `Float64`).
    pub args: Vec<Arc<dyn PhysicalExpr>>,
    /// The frame.
    pub frame: Frame,
    /// The aggregates, over `args`.
    pub aggregates: Vec<Aggregate>,
    /// For each aggregate, its position among the window node's output columns.
    pub positions: Vec<usize>,
    /// The models of forecast aggregates.
    pub forecasters: Vec<Arc<dyn SeriesForecaster>>,
}

/// A stage as compiled: no state.
#[derive(Debug)]
pub enum StageTemplate {
    /// Keep the rows where the predicate is true (NULL counts as false).
    Filter {
        /// The predicate.
        predicate: Arc<dyn PhysicalExpr>,
    },
    /// Compute new columns.
    Project {
        /// One expression per output column.
        exprs: Vec<Arc<dyn PhysicalExpr>>,
        /// Output schema.
        schema: SchemaRef,
    },
    /// Append window aggregate columns to every row.
    Window {
        /// Groups of aggregates.
        groups: Vec<WindowGroupTemplate>,
        /// Output schema: the input columns, then one column per aggregate.
        schema: SchemaRef,
        /// Number of input columns.
        input_columns: usize,
        /// A conservative pre-filter over the output columns, derived from the filters that
        /// follow (see [`crate::pushdown`]): rows it rules out are not output. Used when the
        /// stage has one group whose operator can select rows.
        prefilter: Option<WindowPrefilter>,
    },
}

impl StageTemplate {
    /// A stage with fresh state.
    pub fn instantiate(self: &Arc<Self>) -> Result<Stage, healer_operators::OperatorError> {
        let windows = match self.as_ref() {
            StageTemplate::Window { groups, .. } => groups
                .iter()
                .map(|g| {
                    Ok((
                        KeyInterner::new(g.partition.len()),
                        WindowOperator::try_new_with_forecasters(
                            g.frame,
                            g.args.len(),
                            g.aggregates.clone(),
                            g.forecasters.clone(),
                        )?,
                    ))
                })
                .collect::<Result<_, healer_operators::OperatorError>>()?,
            _ => Vec::new(),
        };
        Ok(Stage {
            template: Arc::clone(self),
            windows,
            scratch: Scratch::default(),
        })
    }
}

/// A stage with its state.
#[derive(Debug)]
pub struct Stage {
    template: Arc<StageTemplate>,
    windows: Vec<(KeyInterner, WindowOperator)>,
    /// Buffers of the pre-filter.
    scratch: Scratch,
}

fn eval(expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> DFResult<ArrayRef> {
    expr.evaluate(batch)?.into_array(batch.num_rows())
}

impl Stage {
    /// The stage's template.
    pub fn template(&self) -> &Arc<StageTemplate> {
        &self.template
    }

    /// The saved keys of every window group (empty for stages without windows).
    pub fn save(&self) -> Vec<Vec<GroupState>> {
        self.windows
            .iter()
            .map(|(keys, op)| {
                keys.group_keys()
                    .into_iter()
                    .enumerate()
                    .filter_map(|(g, key)| op.export_group(g as u32, key))
                    .collect()
            })
            .collect()
    }

    /// Installs saved keys, keeping those for which `keep` is true.
    pub fn restore(
        &mut self,
        rule: &str,
        saved: &[Vec<GroupState>],
        keep: &dyn Fn(&[String], &[KeyValue]) -> bool,
    ) -> Result<(), ExecError> {
        let op_err = |source| ExecError::Operator {
            rule: rule.to_string(),
            source,
        };
        let StageTemplate::Window { groups, .. } = self.template.as_ref() else {
            return if saved.iter().all(Vec::is_empty) {
                Ok(())
            } else {
                Err(op_err(healer_operators::OperatorError::InvalidInput(
                    "saved window state for a stage without windows".into(),
                )))
            };
        };
        if saved.len() != groups.len() {
            return Err(op_err(healer_operators::OperatorError::InvalidInput(
                format!(
                    "{} window groups saved, {} in the stage",
                    saved.len(),
                    groups.len()
                ),
            )));
        }
        for ((template, (keys, op)), saved) in groups.iter().zip(self.windows.iter_mut()).zip(saved)
        {
            for group in saved.iter().filter(|g| keep(&template.key_names, &g.key)) {
                let id = keys.intern_values(&group.key).map_err(op_err)?;
                op.import_group(id, group).map_err(op_err)?;
            }
        }
        Ok(())
    }

    /// Processes the next batch of rows.
    pub fn process(&mut self, rule: &str, batch: RecordBatch) -> Result<RecordBatch, ExecError> {
        let df = |source| ExecError::DataFusion {
            rule: rule.to_string(),
            source,
        };
        let arrow_err = |source| ExecError::Arrow {
            rule: rule.to_string(),
            source,
        };
        match self.template.as_ref() {
            StageTemplate::Filter { predicate } => {
                if batch.num_rows() == 0 {
                    return Ok(batch);
                }
                let mask = eval(predicate, &batch).map_err(df)?;
                let mask = mask.as_boolean_opt().ok_or_else(|| {
                    df(datafusion::error::DataFusionError::Internal(format!(
                        "filter predicate is {}, not boolean",
                        mask.data_type()
                    )))
                })?;
                filter_record_batch(&batch, mask).map_err(arrow_err)
            }
            StageTemplate::Project { exprs, schema } => {
                let columns = exprs
                    .iter()
                    .zip(schema.fields())
                    .map(|(e, field)| {
                        let array = eval(e, &batch).map_err(df)?;
                        if array.data_type() == field.data_type() {
                            Ok(array)
                        } else {
                            cast(&array, field.data_type()).map_err(arrow_err)
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let options =
                    arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
                RecordBatch::try_new_with_options(Arc::clone(schema), columns, &options)
                    .map_err(arrow_err)
            }
            StageTemplate::Window {
                groups,
                schema,
                input_columns,
                prefilter,
            } => {
                if let (Some(prefilter), [template], [(interner, op)]) =
                    (prefilter, groups.as_slice(), self.windows.as_mut_slice())
                    && op.selects()
                {
                    return window_selected(
                        rule,
                        &batch,
                        (template, interner, op),
                        prefilter,
                        schema,
                        *input_columns,
                        &mut self.scratch,
                    );
                }
                let rows = batch.num_rows();
                let mut columns: Vec<Option<ArrayRef>> =
                    vec![None; schema.fields().len() - input_columns];
                // The rows' event times, read once for all the batch's RANGE frames.
                let mut times: Option<Vec<i64>> = None;
                for (template, (interner, op)) in groups.iter().zip(self.windows.iter_mut()) {
                    let (ids, args) = group_input(rule, &batch, template, interner)?;
                    let outputs = match template.frame {
                        Frame::Range { .. } => match &times {
                            Some(ts) => op.process_at(&ids, ts, &args),
                            None => event_times_ms(&batch)
                                .and_then(|ts| op.process_at(&ids, times.insert(ts), &args)),
                        },
                        _ => op.process(&ids, &args),
                    }
                    .map_err(|source| ExecError::Operator {
                        rule: rule.to_string(),
                        source,
                    })?;
                    for (array, &pos) in outputs.into_iter().zip(&template.positions) {
                        let field = schema.field(input_columns + pos);
                        let array = if array.data_type() == field.data_type() {
                            array
                        } else {
                            cast(&array, field.data_type()).map_err(arrow_err)?
                        };
                        columns[pos] = Some(array);
                    }
                }
                let mut all: Vec<ArrayRef> = batch.columns().to_vec();
                for (i, c) in columns.into_iter().enumerate() {
                    all.push(c.ok_or_else(|| {
                        df(datafusion::error::DataFusionError::Internal(format!(
                            "window column {i} was not computed"
                        )))
                    })?);
                }
                let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
                RecordBatch::try_new_with_options(Arc::clone(schema), all, &options)
                    .map_err(arrow_err)
            }
        }
    }
}

/// The group ids and arguments of `batch`'s rows for window group `template`.
fn group_input(
    rule: &str,
    batch: &RecordBatch,
    template: &WindowGroupTemplate,
    interner: &mut KeyInterner,
) -> Result<(Vec<u32>, Vec<Float64Array>), ExecError> {
    let df = |source| ExecError::DataFusion {
        rule: rule.to_string(),
        source,
    };
    let keys = template
        .partition
        .iter()
        .map(|e| eval(e, batch))
        .collect::<DFResult<Vec<_>>>()
        .map_err(df)?;
    let ids = interner
        .intern(&keys, batch.num_rows())
        .map_err(|source| ExecError::Operator {
            rule: rule.to_string(),
            source,
        })?;
    let args = template
        .args
        .iter()
        .map(|e| {
            let a = eval(e, batch).map_err(df)?;
            let a = if a.data_type() == &DataType::Float64 {
                a
            } else {
                cast(&a, &DataType::Float64).map_err(|source| ExecError::Arrow {
                    rule: rule.to_string(),
                    source,
                })?
            };
            Ok(a.as_primitive::<arrow::datatypes::Float64Type>().clone())
        })
        .collect::<Result<Vec<Float64Array>, ExecError>>()?;
    Ok((ids, args))
}

/// A window stage of one group with a pre-filter: the operator computes the aggregates a
/// chunk of rows at a time, the pre-filter picks the chunk's rows, and only those are built
/// into the output (input columns taken, aggregates appended).
fn window_selected(
    rule: &str,
    batch: &RecordBatch,
    (template, interner, op): (&WindowGroupTemplate, &mut KeyInterner, &mut WindowOperator),
    prefilter: &WindowPrefilter,
    schema: &SchemaRef,
    input_columns: usize,
    scratch: &mut Scratch,
) -> Result<RecordBatch, ExecError> {
    let internal = |what: String| ExecError::DataFusion {
        rule: rule.to_string(),
        source: datafusion::error::DataFusionError::Internal(what),
    };
    let arrow_err = |source| ExecError::Arrow {
        rule: rule.to_string(),
        source,
    };
    let (ids, args) = group_input(rule, batch, template, interner)?;
    let predicate = &prefilter.predicate;
    // The predicate's columns: input columns (Float64, NULL as NaN) or aggregates.
    enum Leaf<'a> {
        Input(std::borrow::Cow<'a, [f64]>),
        Aggregate(usize),
    }
    let mut leaves = Vec::with_capacity(predicate.columns().len());
    for &c in predicate.columns() {
        let leaf = if c < input_columns {
            let a = batch
                .column(c)
                .as_primitive_opt::<arrow::datatypes::Float64Type>()
                .ok_or_else(|| internal(format!("pre-filter column {c} is not Float64")))?;
            Leaf::Input(match a.nulls().filter(|n| n.null_count() > 0) {
                None => std::borrow::Cow::Borrowed(&a.values()[..]),
                Some(nulls) => std::borrow::Cow::Owned(
                    a.values()
                        .iter()
                        .zip(nulls.iter())
                        .map(|(&v, valid)| if valid { v } else { f64::NAN })
                        .collect(),
                ),
            })
        } else {
            let j = template
                .positions
                .iter()
                .position(|&p| p == c - input_columns)
                .ok_or_else(|| internal(format!("pre-filter column {c} is not an aggregate")))?;
            Leaf::Aggregate(j)
        };
        leaves.push((c, leaf));
    }
    let width = schema.fields().len();
    // The input columns at a screened chunk's candidate rows.
    let mut gathered: Vec<Vec<f64>> = vec![Vec::new(); leaves.len()];
    let selected = op
        .process_selected(&ids, &args, prefilter.screen, &mut |chunk, kept| {
            let rows = chunk.rows.map_or(chunk.len, <[u32]>::len);
            let mut columns: Vec<&[f64]> = vec![&[]; width];
            for ((c, leaf), buffer) in leaves.iter().zip(&mut gathered) {
                columns[*c] = match leaf {
                    Leaf::Input(values) => {
                        let values = &values[chunk.start..chunk.start + chunk.len];
                        match chunk.rows {
                            None => values,
                            Some(rows) => {
                                buffer.clear();
                                buffer.extend(rows.iter().map(|&r| values[r as usize]));
                                buffer
                            }
                        }
                    }
                    Leaf::Aggregate(j) => chunk.aggregates[*j],
                };
            }
            predicate.select(&columns, rows, kept, scratch);
        })
        .map_err(|source| ExecError::Operator {
            rule: rule.to_string(),
            source,
        })?;
    let mut all: Vec<ArrayRef> = if selected.rows.len() == batch.num_rows() {
        batch.columns().to_vec()
    } else {
        let indices = UInt32Array::from(selected.rows);
        batch
            .columns()
            .iter()
            .map(|c| take(c, &indices, None))
            .collect::<Result<_, _>>()
            .map_err(arrow_err)?
    };
    let rows = all.first().map_or(0, |c| c.len());
    let mut outputs: Vec<Option<ArrayRef>> = vec![None; width - input_columns];
    for (array, &pos) in selected.outputs.into_iter().zip(&template.positions) {
        let field = schema.field(input_columns + pos);
        outputs[pos] = Some(if array.data_type() == field.data_type() {
            array
        } else {
            cast(&array, field.data_type()).map_err(arrow_err)?
        });
    }
    for (i, c) in outputs.into_iter().enumerate() {
        all.push(c.ok_or_else(|| internal(format!("window column {i} was not computed")))?);
    }
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
    RecordBatch::try_new_with_options(Arc::clone(schema), all, &options).map_err(arrow_err)
}

/// The event time of every row of `batch` in milliseconds since the epoch, from its `ts`
/// column (any timestamp unit), for `RANGE` frames; a NULL time is an error.
fn event_times_ms(batch: &RecordBatch) -> healer_operators::Result<Vec<i64>> {
    use healer_operators::OperatorError::InvalidInput;
    let ts = batch
        .column_by_name(healer_operators::schema::TS)
        .ok_or_else(|| InvalidInput("a RANGE window needs the `ts` column".into()))?;
    let DataType::Timestamp(_, tz) = ts.data_type() else {
        return Err(InvalidInput(format!(
            "a RANGE window needs `ts` as a timestamp, not {}",
            ts.data_type()
        )));
    };
    let unit = DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, tz.clone());
    let ms = cast(ts, &unit).map_err(|e| InvalidInput(e.to_string()))?;
    let ms = ms.as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    if let Some(row) = ms
        .nulls()
        .and_then(|n| (0..n.len()).find(|&i| n.is_null(i)))
    {
        return Err(InvalidInput(format!(
            "a RANGE window needs every row's ts; row {row} of the batch has none"
        )));
    }
    Ok(ms.values().to_vec())
}
