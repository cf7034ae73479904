//! Loading and compiling rules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::{Schema, SchemaRef};
use datafusion::common::{DFSchema, DataFusionError, ScalarValue};
use datafusion::datasource::MemTable;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{
    Expr, LogicalPlan, WindowFrameBound, WindowFrameUnits, WindowFunctionDefinition,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{Spanned, Statement};
use healer_operators::keys::KeyValue;
use healer_operators::schema::{TS, anomaly_schema};
use healer_operators::unpivot::Unpivot;
use healer_operators::window::{AggKind, Aggregate, Frame, GroupState, Level, SeriesForecaster};

use crate::error::{ExecError, RuleError, RuleErrors};
use crate::forecast::LstmWindowUdf;
use crate::output::OutputMapping;
use crate::stage::{Stage, StageTemplate, WindowGroupTemplate};

/// The stream a rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamTable {
    /// The wide metrics stream, one row per (ts, resource).
    Metrics,
    /// The long view, one row per (ts, resource, metric).
    Samples,
}

impl StreamTable {
    /// The SQL name of the table.
    pub fn name(self) -> &'static str {
        match self {
            StreamTable::Metrics => "metrics",
            StreamTable::Samples => "samples",
        }
    }
}

/// A rule ready to run: its plan, without state.
#[derive(Debug)]
pub struct CompiledRule {
    /// The rule's name (the view name).
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// 1-based line of its `CREATE VIEW`.
    pub line: u64,
    /// The stream it reads.
    pub table: StreamTable,
    /// Columns of the wide `metrics` schema the rule needs (by name).
    pub columns: Vec<String>,
    /// Columns each window partitions by, per window (for the engine's key partitioning).
    pub partition_keys: Vec<Vec<String>>,
    /// The pipeline, bottom-up.
    pub stages: Vec<Arc<StageTemplate>>,
    /// Whether the rule gives the same rows when fed the `samples` view one metric at a
    /// time: it reads `samples` and every window partitions by the view's own `metric`
    /// column, so rows of different metrics never meet in a window. The engine then hands it
    /// one batch per metric column, which needs no copy of the values.
    pub metric_separable: bool,
    /// How the rule's output becomes anomaly rows (`None` when compiled without the output
    /// contract, see [`RuleCompiler::without_output_contract`]).
    pub output: Option<OutputMapping>,
}

impl CompiledRule {
    /// A runnable instance with fresh state.
    pub fn instantiate(self: &Arc<Self>) -> Result<RuleInstance, healer_operators::OperatorError> {
        Ok(RuleInstance {
            rule: Arc::clone(self),
            stages: self
                .stages
                .iter()
                .map(|s| s.instantiate())
                .collect::<Result<_, _>>()?,
        })
    }
}

/// The keyed state of a [`RuleInstance`]: per stage, per window group, the saved partition
/// keys. Independent of internal ids and of which worker held it, so it can be restored into
/// any number of workers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuleState {
    /// The rule's name.
    pub rule: String,
    /// Per stage, per window group, the saved keys.
    pub stages: Vec<Vec<Vec<GroupState>>>,
}

/// A rule with its state; owned by one worker.
#[derive(Debug)]
pub struct RuleInstance {
    rule: Arc<CompiledRule>,
    stages: Vec<Stage>,
}

impl RuleInstance {
    /// The compiled rule.
    pub fn rule(&self) -> &Arc<CompiledRule> {
        &self.rule
    }

    /// Runs the next batch of the rule's input table; returns the rule's raw output rows.
    pub fn process(&mut self, input: RecordBatch) -> Result<RecordBatch, ExecError> {
        let mut batch = input;
        for stage in &mut self.stages {
            batch = stage.process(&self.rule.name, batch)?;
        }
        Ok(batch)
    }

    /// The rule's keyed state, for a checkpoint.
    pub fn save(&self) -> RuleState {
        RuleState {
            rule: self.rule.name.clone(),
            stages: self.stages.iter().map(Stage::save).collect(),
        }
    }

    /// Installs saved state into this instance (normally a fresh one), keeping the partition
    /// keys for which `keep` (given the window's `PARTITION BY` names and the key's values) is
    /// true. State saved by several instances of the rule (several workers) can be installed
    /// one after the other. The state must have been saved from the same rule.
    pub fn restore(
        &mut self,
        state: &RuleState,
        keep: &dyn Fn(&[String], &[KeyValue]) -> bool,
    ) -> Result<(), ExecError> {
        let mismatch = |what: String| ExecError::DataFusion {
            rule: self.rule.name.clone(),
            source: DataFusionError::Plan(format!("saved state does not fit the rule: {what}")),
        };
        if state.rule != self.rule.name {
            return Err(mismatch(format!("it belongs to rule `{}`", state.rule)));
        }
        if state.stages.len() != self.stages.len() {
            return Err(mismatch(format!(
                "{} stages saved, {} in the rule",
                state.stages.len(),
                self.stages.len()
            )));
        }
        let name = self.rule.name.clone();
        for (stage, saved) in self.stages.iter_mut().zip(&state.stages) {
            stage.restore(&name, saved, keep)?;
        }
        Ok(())
    }

    /// Runs the next batch and converts the output to incident-log anomaly rows.
    pub fn anomalies(&mut self, input: RecordBatch) -> Result<RecordBatch, ExecError> {
        self.anomalies_of(vec![input])
    }

    /// Runs the next batches, in order, and converts their output to anomaly rows: the rows
    /// of [`RuleInstance::anomalies`] of each batch in turn, in one batch.
    ///
    /// The stages after the last window stage are stateless (filters and projections), so
    /// they run once over the batches' window output together rather than once per batch:
    /// their cost per call (planning-time work DataFusion repeats in every evaluation) is
    /// paid once, which matters when a wide batch becomes one small batch per metric.
    pub fn anomalies_of(&mut self, inputs: Vec<RecordBatch>) -> Result<RecordBatch, ExecError> {
        let name = &self.rule.name;
        let arrow_err = |source| ExecError::Arrow {
            rule: name.clone(),
            source,
        };
        let tail = self
            .stages
            .iter()
            .rposition(|s| matches!(s.template().as_ref(), StageTemplate::Window { .. }))
            .map_or(0, |w| w + 1);
        let (stateful, stateless) = self.stages.split_at_mut(tail);
        let mut windowed = Vec::with_capacity(inputs.len());
        for input in inputs {
            let mut batch = input;
            for stage in stateful.iter_mut() {
                batch = stage.process(name, batch)?;
            }
            windowed.push(batch);
        }
        // Every batch comes out of the same stages, with the same schema.
        let Some(schema) = windowed.first().map(RecordBatch::schema) else {
            return Ok(RecordBatch::new_empty(anomaly_schema()));
        };
        windowed.retain(|b| b.num_rows() > 0);
        let mut batch = match windowed.len() {
            0 => RecordBatch::new_empty(schema),
            1 => windowed.pop().expect("one batch"),
            _ => concat_batches(&schema, &windowed).map_err(arrow_err)?,
        };
        for stage in stateless.iter_mut() {
            batch = stage.process(name, batch)?;
        }
        let output = self
            .rule
            .output
            .as_ref()
            .ok_or_else(|| ExecError::DataFusion {
                rule: name.clone(),
                source: DataFusionError::Internal(
                    "rule compiled without the output contract".into(),
                ),
            })?;
        output.to_anomalies(name, &batch).map_err(arrow_err)
    }
}

/// Compiles rule files against the schema of a metrics stream.
pub struct RuleCompiler {
    ctx: SessionContext,
    metrics: SchemaRef,
    samples: SchemaRef,
    output_contract: bool,
    pushdown: bool,
}

impl std::fmt::Debug for RuleCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleCompiler")
            .field("metrics", &self.metrics)
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}

impl RuleCompiler {
    /// A compiler for rules over wide batches of `metrics`.
    pub fn try_new(metrics: SchemaRef) -> Result<Self, String> {
        let unpivot = Unpivot::try_new(&metrics).map_err(|e| e.to_string())?;
        let samples = unpivot.schema();
        let mut config = SessionConfig::new();
        config.options_mut().sql_parser.collect_spans = true;
        let ctx = SessionContext::new_with_config(config);
        crate::functions::register_all(
            &ctx,
            &Arc::new(crate::models::ModelRegistry::new()),
            &Arc::new(crate::forecast::ForecasterRegistry::new()),
        );
        for (name, schema) in [("metrics", &metrics), ("samples", &samples)] {
            let table =
                MemTable::try_new(Arc::clone(schema), vec![vec![]]).map_err(|e| e.to_string())?;
            ctx.register_table(name, Arc::new(table))
                .map_err(|e| e.to_string())?;
        }
        Ok(Self {
            ctx,
            metrics,
            samples,
            output_contract: true,
            pushdown: true,
        })
    }

    /// Do not push filters into window stages (see [`crate::pushdown`]): every row's
    /// aggregates are built and the filters decide alone. The rules give the same rows either
    /// way; this is for comparing the two.
    pub fn without_pushdown(mut self) -> Self {
        self.pushdown = false;
        self
    }

    /// Accept queries whose output is not anomaly rows (for tests and exploration: such rules
    /// can [`RuleInstance::process`] but not produce anomalies).
    pub fn without_output_contract(mut self) -> Self {
        self.output_contract = false;
        self
    }

    /// The wide schema rules are compiled against.
    pub fn metrics_schema(&self) -> &SchemaRef {
        &self.metrics
    }

    /// The long `samples` schema.
    pub fn samples_schema(&self) -> &SchemaRef {
        &self.samples
    }

    /// Compiles every `*.sql` file of `dir` (sorted by name), or `dir` itself when it is a
    /// file. Reports every problem of every file at once.
    pub fn compile_path(&self, path: &Path) -> Result<Vec<Arc<CompiledRule>>, RuleErrors> {
        let io = |e: std::io::Error| {
            RuleErrors(vec![RuleError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                rule: None,
                message: e.to_string(),
            }])
        };
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "sql"))
                .collect();
            files.sort();
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => match self.compile_str(&file, &text) {
                    Ok(mut r) => rules.append(&mut r),
                    Err(RuleErrors(mut e)) => errors.append(&mut e),
                },
                Err(e) => errors.push(RuleError {
                    file: file.clone(),
                    line: 0,
                    column: 0,
                    rule: None,
                    message: e.to_string(),
                }),
            }
        }
        let mut seen: HashMap<String, (PathBuf, u64)> = HashMap::new();
        for r in &rules {
            if let Some((file, line)) = seen.get(&r.name) {
                errors.push(RuleError {
                    file: r.file.clone(),
                    line: r.line,
                    column: 0,
                    rule: Some(r.name.clone()),
                    message: format!(
                        "a rule of this name is already defined at {}:{line}",
                        file.display()
                    ),
                });
            } else {
                seen.insert(r.name.clone(), (r.file.clone(), r.line));
            }
        }
        if rules.is_empty() && errors.is_empty() {
            errors.push(RuleError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                rule: None,
                message:
                    "no rules found (a rule is a `CREATE VIEW name AS SELECT …` in a .sql file)"
                        .into(),
            });
        }
        if errors.is_empty() {
            Ok(rules)
        } else {
            Err(RuleErrors(errors))
        }
    }

    /// Compiles the rules of one file's text.
    pub fn compile_str(
        &self,
        file: &Path,
        text: &str,
    ) -> Result<Vec<Arc<CompiledRule>>, RuleErrors> {
        let error = |line: u64, column: u64, rule: Option<&str>, message: String| RuleError {
            file: file.to_path_buf(),
            line,
            column,
            rule: rule.map(str::to_owned),
            message,
        };
        let statements = DFParserBuilder::new(text)
            .build()
            .and_then(|mut p| p.parse_statements())
            .map_err(|e| {
                let (line, column, message) = parser_location(&e);
                RuleErrors(vec![error(line, column, None, message)])
            })?;
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        for statement in statements {
            let DFStatement::Statement(statement) = statement else {
                errors.push(error(
                    0,
                    0,
                    None,
                    "only `CREATE VIEW name AS SELECT …` statements are allowed in rule files"
                        .into(),
                ));
                continue;
            };
            let span = statement.span();
            let (line, column) = (span.start.line, span.start.column);
            let Statement::CreateView(view) = *statement else {
                errors.push(error(
                    line,
                    column,
                    None,
                    "only `CREATE VIEW name AS SELECT …` statements are allowed in rule files"
                        .into(),
                ));
                continue;
            };
            let name = view.name.to_string();
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                errors.push(error(
                    line,
                    column,
                    Some(&name),
                    "rule names may only contain letters, digits and `_`".into(),
                ));
                continue;
            }
            match self.compile_query(view.query) {
                Ok(lowered) => rules.push(Arc::new(CompiledRule {
                    name,
                    file: file.to_path_buf(),
                    line,
                    table: lowered.table,
                    columns: lowered.columns,
                    partition_keys: lowered.partition_keys,
                    stages: lowered.stages,
                    metric_separable: lowered.metric_separable,
                    output: lowered.output,
                })),
                Err(e) => {
                    let (l, c) = e.location.unwrap_or((line, column));
                    errors.push(error(l, c, Some(&name), e.message));
                }
            }
        }
        if errors.is_empty() {
            Ok(rules)
        } else {
            Err(RuleErrors(errors))
        }
    }

    fn state(&self) -> SessionState {
        self.ctx.state()
    }

    fn compile_query(
        &self,
        query: Box<datafusion::sql::sqlparser::ast::Query>,
    ) -> Result<Lowered, CompileError> {
        let state = self.state();
        let statement = DFStatement::Statement(Box::new(Statement::Query(query)));
        let plan = futures::executor::block_on(state.statement_to_plan(statement))
            .map_err(CompileError::from_datafusion)?;
        // Analysis (type coercion) and DataFusion's logical optimizer: filters merge and
        // move next to the window, projections shrink to what is used, common
        // subexpressions are computed once. Every rewrite keeps SQL semantics, and the
        // lowering below rejects any node a streaming rule cannot run.
        let plan = state
            .optimize(&plan)
            .map_err(CompileError::from_datafusion)?;
        let mut lowering = Lowering {
            state: &state,
            table: None,
            columns: Vec::new(),
            partition_keys: Vec::new(),
            stages: Vec::new(),
            metric_intact: true,
            split_by_metric: true,
        };
        lowering.lower(&plan)?;
        if self.pushdown {
            crate::pushdown::push_down_filters(&mut lowering.stages);
        }
        let table = lowering.table.ok_or_else(|| {
            CompileError::msg("the rule reads no stream: select FROM metrics or FROM samples")
        })?;
        let output = if self.output_contract {
            Some(OutputMapping::try_new(plan.schema().as_arrow()).map_err(CompileError::msg)?)
        } else {
            None
        };
        let mut columns = lowering.columns;
        columns.sort();
        columns.dedup();
        Ok(Lowered {
            table,
            columns,
            partition_keys: lowering.partition_keys,
            metric_separable: table == StreamTable::Samples && lowering.split_by_metric,
            stages: lowering.stages.into_iter().map(Arc::new).collect(),
            output,
        })
    }
}

struct Lowered {
    table: StreamTable,
    columns: Vec<String>,
    partition_keys: Vec<Vec<String>>,
    metric_separable: bool,
    stages: Vec<Arc<StageTemplate>>,
    output: Option<OutputMapping>,
}

#[derive(Debug)]
struct CompileError {
    location: Option<(u64, u64)>,
    message: String,
}

impl CompileError {
    fn msg(message: impl Into<String>) -> Self {
        Self {
            location: None,
            message: message.into(),
        }
    }

    fn from_datafusion(e: DataFusionError) -> Self {
        let location = e
            .diagnostic()
            .and_then(|d| d.span)
            .map(|s| (s.start.line, s.start.column));
        let message = match e.diagnostic() {
            Some(d) => d.message.clone(),
            None => e.strip_backtrace().to_string(),
        };
        Self { location, message }
    }
}

/// Line, column and message of a parser error ("… at Line: 3, Column: 7").
fn parser_location(e: &DataFusionError) -> (u64, u64, String) {
    let text = e.strip_backtrace().to_string();
    let number_after = |key: &str| -> u64 {
        text.find(key)
            .map(|i| {
                text[i + key.len()..]
                    .chars()
                    .skip_while(|c| c.is_whitespace())
                    .take_while(|c| c.is_ascii_digit())
                    .collect::<String>()
            })
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    (number_after("Line:"), number_after("Column:"), text)
}

struct Lowering<'a> {
    state: &'a SessionState,
    table: Option<StreamTable>,
    columns: Vec<String>,
    partition_keys: Vec<Vec<String>>,
    stages: Vec<StageTemplate>,
    /// No projection so far has redefined `metric` as anything but itself.
    metric_intact: bool,
    /// Every window so far partitions by the intact `metric` column.
    split_by_metric: bool,
}

/// Whether `expr` is the `metric` column itself (possibly aliased to its own name).
fn is_metric_column(expr: &Expr) -> bool {
    match expr {
        Expr::Column(c) => c.name == healer_operators::unpivot::METRIC,
        Expr::Alias(a) => is_metric_column(&a.expr),
        _ => false,
    }
}

impl Lowering<'_> {
    fn physical(
        &self,
        expr: &Expr,
        schema: &DFSchema,
    ) -> Result<Arc<dyn PhysicalExpr>, CompileError> {
        self.state
            .create_physical_expr(expr.clone(), schema)
            .map_err(CompileError::from_datafusion)
    }

    fn note_columns(&mut self, expr: &Expr) {
        for c in expr.column_refs() {
            self.columns.push(c.name.clone());
        }
    }

    fn lower(&mut self, plan: &LogicalPlan) -> Result<(), CompileError> {
        match plan {
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table();
                let table = match name {
                    "metrics" => StreamTable::Metrics,
                    "samples" => StreamTable::Samples,
                    other => {
                        return Err(CompileError::msg(format!(
                            "unknown stream `{other}`: rules read `metrics` or `samples`"
                        )));
                    }
                };
                if self.table.is_some_and(|t| t != table) {
                    return Err(CompileError::msg("a rule reads one stream"));
                }
                self.table = Some(table);
                if !scan.filters.is_empty() || scan.fetch.is_some() {
                    return Err(CompileError::msg(
                        "internal: unexpected pushed-down scan filters",
                    ));
                }
                if let Some(projection) = &scan.projection {
                    let source = scan.source.schema();
                    let exprs = projection
                        .iter()
                        .map(|&i| {
                            datafusion::physical_expr::expressions::col(
                                source.field(i).name(),
                                &source,
                            )
                            .map_err(CompileError::from_datafusion)
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    self.stages.push(StageTemplate::Project {
                        exprs,
                        schema: Arc::new(scan.projected_schema.as_arrow().clone()),
                    });
                }
                Ok(())
            }
            LogicalPlan::SubqueryAlias(alias) => self.lower(&alias.input),
            LogicalPlan::Projection(p) => {
                self.lower(&p.input)?;
                for (e, field) in p.expr.iter().zip(p.schema.fields()) {
                    if field.name() == healer_operators::unpivot::METRIC && !is_metric_column(e) {
                        self.metric_intact = false;
                    }
                }
                let exprs = p
                    .expr
                    .iter()
                    .map(|e| {
                        self.note_columns(e);
                        self.physical(e, p.input.schema())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.stages.push(StageTemplate::Project {
                    exprs,
                    schema: Arc::new(p.schema.as_arrow().clone()),
                });
                Ok(())
            }
            LogicalPlan::Filter(f) => {
                self.lower(&f.input)?;
                self.note_columns(&f.predicate);
                let predicate = self.physical(&f.predicate, f.input.schema())?;
                self.stages.push(StageTemplate::Filter { predicate });
                Ok(())
            }
            LogicalPlan::Window(w) => {
                self.lower(&w.input)?;
                let stage = self.lower_window(&w.window_expr, w.input.schema(), &w.schema)?;
                self.stages.push(stage);
                Ok(())
            }
            LogicalPlan::Aggregate(_) => Err(CompileError::msg(
                "GROUP BY / aggregate functions without OVER are not supported in streaming rules; \
                 use a window: AGG(x) OVER (PARTITION BY … ORDER BY ts ROWS BETWEEN n PRECEDING AND CURRENT ROW)",
            )),
            LogicalPlan::Join(_) => Err(CompileError::msg(
                "JOIN is not supported in streaming rules",
            )),
            LogicalPlan::Sort(_) => Err(CompileError::msg(
                "ORDER BY on a rule's result is not supported: rule output follows event time",
            )),
            LogicalPlan::Limit(_) => Err(CompileError::msg(
                "LIMIT is not supported in streaming rules",
            )),
            LogicalPlan::Union(_) => Err(CompileError::msg(
                "UNION is not supported in a rule: write one rule per branch",
            )),
            LogicalPlan::Distinct(_) => Err(CompileError::msg(
                "DISTINCT is not supported in streaming rules",
            )),
            other => Err(CompileError::msg(format!(
                "`{}` is not supported in streaming rules",
                other.display()
            ))),
        }
    }

    fn lower_window(
        &mut self,
        window_exprs: &[Expr],
        input: &DFSchema,
        output: &DFSchema,
    ) -> Result<StageTemplate, CompileError> {
        // Group aggregates by (partition keys, frame); within a group, dedupe arguments.
        struct Group {
            key: String,
            /// The `PARTITION BY` expressions, as text.
            partition_text: String,
            partition: Vec<Arc<dyn PhysicalExpr>>,
            key_names: Vec<String>,
            frame: Frame,
            args: Vec<(String, Arc<dyn PhysicalExpr>)>,
            aggregates: Vec<Aggregate>,
            positions: Vec<usize>,
            forecasters: Vec<(String, Arc<dyn SeriesForecaster>)>,
        }
        let mut groups: Vec<Group> = Vec::new();
        for (pos, expr) in window_exprs.iter().enumerate() {
            let inner = match expr {
                Expr::Alias(a) => a.expr.as_ref(),
                e => e,
            };
            let Expr::WindowFunction(wf) = inner else {
                return Err(CompileError::msg(format!(
                    "unsupported window expression {expr}"
                )));
            };
            // An aggregate of healer's window operator, or a forecaster's function.
            let (name, kind, lstm) = match &wf.fun {
                WindowFunctionDefinition::AggregateUDF(udaf) => {
                    let name = udaf.name().to_string();
                    let kind = if is_percentile(&name) {
                        // The level is the second argument, taken below.
                        None
                    } else {
                        Some(AggKind::from_sql_name(&name).ok_or_else(|| {
                            CompileError::msg(format!(
                                "aggregate `{name}` is not supported over a window; supported: \
                                 {SUPPORTED_WINDOW_FUNCTIONS}"
                            ))
                        })?)
                    };
                    (name, kind, None)
                }
                WindowFunctionDefinition::WindowUDF(udwf) if udwf.name() == "first_value" => {
                    (udwf.name().to_string(), Some(AggKind::FirstValue), None)
                }
                WindowFunctionDefinition::WindowUDF(udwf) => {
                    let Some(lstm) = udwf.inner().downcast_ref::<LstmWindowUdf>() else {
                        return Err(CompileError::msg(format!(
                            "window function `{}` is not supported in streaming rules; \
                             supported: {SUPPORTED_WINDOW_FUNCTIONS}",
                            udwf.name()
                        )));
                    };
                    (udwf.name().to_string(), None, Some(lstm))
                }
            };
            let p = &wf.params;
            if p.distinct || p.filter.is_some() || p.null_treatment.is_some() {
                return Err(CompileError::msg(format!(
                    "`{name}`: DISTINCT, FILTER and IGNORE/RESPECT NULLS are not supported over windows"
                )));
            }
            match p.order_by.as_slice() {
                [sort] if sort.asc && matches!(&sort.expr, Expr::Column(c) if c.name == TS) => {}
                _ => {
                    return Err(CompileError::msg(format!(
                        "`{name}` OVER (…) must be ordered by event time: ORDER BY {TS} (ascending)"
                    )));
                }
            }
            let frame_error = || {
                CompileError::msg(format!(
                    "`{name}`: only frames ending at the current row are supported: ROWS \
                     BETWEEN <n> PRECEDING, RANGE BETWEEN INTERVAL '<duration>' PRECEDING or \
                     UNBOUNDED PRECEDING, AND CURRENT ROW (got {})",
                    p.window_frame
                ))
            };
            if let Some(reason) = range_interval_problem(&p.window_frame) {
                return Err(CompileError::msg(format!("`{name}`: {reason}")));
            }
            let frame = window_frame(&p.window_frame).ok_or_else(frame_error)?;
            if frame == Frame::Unbounded
                && (kind.is_some_and(AggKind::needs_bounded_frame) || is_percentile(&name))
            {
                return Err(CompileError::msg(format!(
                    "`{name}` keeps its frame's values: it needs a bounded frame, ROWS BETWEEN \
                     <n> PRECEDING or RANGE BETWEEN INTERVAL '<duration>' PRECEDING, AND \
                     CURRENT ROW (got {})",
                    p.window_frame
                )));
            }
            // The forecaster of an LSTM function, checked against the frame.
            let mut model = None;
            let mut kind = kind;
            let arg = match (lstm, p.args.as_slice()) {
                (None, [a, level]) if is_percentile(&name) => {
                    let q = match level {
                        Expr::Literal(v, _) => {
                            match v.cast_to(&arrow::datatypes::DataType::Float64) {
                                Ok(ScalarValue::Float64(Some(q))) => Level::new(q),
                                _ => None,
                            }
                        }
                        _ => None,
                    }
                    .ok_or_else(|| {
                        CompileError::msg(format!(
                            "`{name}`: the level must be a number literal between 0 and 1 \
                             (got {level})"
                        ))
                    })?;
                    kind = Some(AggKind::Quantile(q));
                    a.clone()
                }
                (None, _) if is_percentile(&name) => {
                    return Err(CompileError::msg(format!(
                        "`{name}` over a window takes a value and a level: {name}(x, 0.99)"
                    )));
                }
                (None, []) => Expr::Literal(ScalarValue::Int64(Some(1)), None),
                (None, [a]) => a.clone(),
                (None, _) => {
                    return Err(CompileError::msg(format!(
                        "`{name}` takes one argument over a window"
                    )));
                }
                (Some(lstm), [path, a]) => {
                    let path = match path {
                        Expr::Literal(v, _) => crate::forecast::literal_path(v),
                        _ => None,
                    }
                    .ok_or_else(|| {
                        CompileError::msg(format!(
                            "`{name}`: the first argument must be the model's directory, as a \
                             string literal"
                        ))
                    })?;
                    let forecaster = lstm
                        .model(path)
                        .map_err(|e| CompileError::msg(format!("`{name}`: {e}")))?;
                    let window = forecaster.window();
                    if frame != (Frame::Rows { preceding: window }) {
                        return Err(CompileError::msg(format!(
                            "`{name}`: model `{path}` forecasts from {window} values: its frame \
                             must be ROWS BETWEEN {window} PRECEDING AND CURRENT ROW (got {})",
                            p.window_frame
                        )));
                    }
                    model = Some((path.to_string(), forecaster as Arc<dyn SeriesForecaster>));
                    a.clone()
                }
                (Some(_), _) => {
                    return Err(CompileError::msg(format!(
                        "`{name}` takes the model's directory and one value: {name}('models/lstm', x)"
                    )));
                }
            };
            self.note_columns(&arg);
            self.split_by_metric &= self.metric_intact
                && p.partition_by.iter().any(
                    |e| matches!(e, Expr::Column(c) if c.name == healer_operators::unpivot::METRIC),
                );
            let mut key_names = Vec::new();
            for e in &p.partition_by {
                self.note_columns(e);
                match e {
                    Expr::Column(c) => key_names.push(c.name.clone()),
                    other => key_names.push(format!("{other}")),
                }
            }
            let partition_text = format!(
                "{:?}",
                p.partition_by
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
            );
            let key = format!("{partition_text}|{frame:?}");
            let group_index = match groups.iter().position(|g| g.key == key) {
                Some(i) => i,
                None => {
                    self.partition_keys.push(key_names.clone());
                    let partition = p
                        .partition_by
                        .iter()
                        .map(|e| self.physical(e, input))
                        .collect::<Result<Vec<_>, _>>()?;
                    groups.push(Group {
                        key,
                        partition_text,
                        partition,
                        key_names,
                        frame,
                        args: Vec::new(),
                        aggregates: Vec::new(),
                        positions: Vec::new(),
                        forecasters: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            let arg_key = arg.to_string();
            let arg_index = match groups[group_index]
                .args
                .iter()
                .position(|(k, _)| *k == arg_key)
            {
                Some(i) => i,
                None => {
                    let physical = self.physical(&arg, input)?;
                    let g = &mut groups[group_index];
                    g.args.push((arg_key, physical));
                    g.args.len() - 1
                }
            };
            let g = &mut groups[group_index];
            let kind = match (kind, model, lstm) {
                (Some(kind), _, _) => kind,
                (None, Some((path, forecaster)), Some(lstm)) => {
                    let index = match g.forecasters.iter().position(|(p, _)| *p == path) {
                        Some(i) => i,
                        None => {
                            g.forecasters.push((path, forecaster));
                            g.forecasters.len() - 1
                        }
                    };
                    AggKind::Forecast {
                        model: u16::try_from(index).map_err(|_| {
                            CompileError::msg("too many forecasting models in one window")
                        })?,
                        output: lstm.output(),
                    }
                }
                _ => unreachable!("a window function is an aggregate or a forecaster"),
            };
            g.aggregates.push(Aggregate {
                kind,
                arg: arg_index,
            });
            g.positions.push(pos);
        }
        // MIN/MAX windows of one partition over `ROWS` frames of different lengths run as one
        // operator over the longest: its monotonic deques hold the extremes of every shorter
        // frame too (`AggKind::MinOfLast` / `MaxOfLast`), so the rows are keyed and pushed once
        // instead of once per frame. Only windows of nothing but MIN/MAX are fused: another
        // aggregate would lose its own path (the running sums', or the presence bits').
        let extrema_only = |g: &Group| {
            matches!(g.frame, Frame::Rows { .. })
                && g.aggregates.iter().all(|a| {
                    matches!(
                        a.kind,
                        AggKind::Min | AggKind::Max | AggKind::MinOfLast(_) | AggKind::MaxOfLast(_)
                    )
                })
        };
        // Moves the aggregates of `short` into `long`, as extremes of `short`'s frame.
        fn absorb(long: &mut Group, short: Group) -> Result<(), CompileError> {
            let last = u32::try_from(short.frame.capacity())
                .map_err(|_| CompileError::msg("window frame too large"))?;
            for (a, pos) in short.aggregates.iter().zip(short.positions) {
                let (arg_key, physical) = &short.args[a.arg];
                let arg = match long.args.iter().position(|(k, _)| k == arg_key) {
                    Some(i) => i,
                    None => {
                        long.args.push((arg_key.clone(), Arc::clone(physical)));
                        long.args.len() - 1
                    }
                };
                let kind = match a.kind {
                    AggKind::Min => AggKind::MinOfLast(last),
                    AggKind::Max => AggKind::MaxOfLast(last),
                    shorter => shorter,
                };
                long.aggregates.push(Aggregate { kind, arg });
                long.positions.push(pos);
            }
            Ok(())
        }
        let mut fused: Vec<Group> = Vec::with_capacity(groups.len());
        for g in groups {
            let into = fused.iter().position(|t| {
                extrema_only(t) && extrema_only(&g) && t.partition_text == g.partition_text
            });
            let Some(t) = into else {
                fused.push(g);
                continue;
            };
            // The longer of the two keeps its operator.
            if g.frame.capacity() > fused[t].frame.capacity() {
                let short = std::mem::replace(&mut fused[t], g);
                absorb(&mut fused[t], short)?;
            } else {
                absorb(&mut fused[t], g)?;
            }
        }
        let groups = fused;
        Ok(StageTemplate::Window {
            groups: groups
                .into_iter()
                .map(|g| WindowGroupTemplate {
                    partition: g.partition,
                    key_names: g.key_names,
                    args: g.args.into_iter().map(|(_, e)| e).collect(),
                    frame: g.frame,
                    aggregates: g.aggregates,
                    positions: g.positions,
                    forecasters: g.forecasters.into_iter().map(|(_, f)| f).collect(),
                })
                .collect(),
            schema: Arc::new(output.as_arrow().clone()),
            input_columns: input.fields().len(),
            prefilter: None,
        })
    }
}

/// The window functions rules can use, for error messages.
const SUPPORTED_WINDOW_FUNCTIONS: &str = "COUNT, SUM, AVG, MIN, MAX, STDDEV[_SAMP|_POP], \
     VAR[_SAMP|_POP], MEDIAN, PERCENTILE_CONT(x, q), FIRST_VALUE, lstm_forecast, lstm_residual";

/// Whether `name` is DataFusion's exact percentile aggregate (`percentile_cont`, alias
/// `quantile_cont`), whose level is its second argument.
fn is_percentile(name: &str) -> bool {
    name.eq_ignore_ascii_case("percentile_cont") || name.eq_ignore_ascii_case("quantile_cont")
}

/// The schema of `metrics` restricted to what `rules` read, in the order of `full`. The time
/// and resource columns and tags are always kept.
pub fn required_columns(full: &Schema, rules: &[Arc<CompiledRule>]) -> Vec<usize> {
    let needs_all_metrics = rules.iter().any(|r| r.table == StreamTable::Samples);
    full.fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            let name = f.name();
            !healer_operators::schema::is_metric_type(f.data_type())
                || f.name() == TS
                || needs_all_metrics
                || rules.iter().any(|r| r.columns.iter().any(|c| c == name))
        })
        .map(|(i, _)| i)
        .collect()
}
/// The operator frame of a SQL window frame, if healer runs it: frames that end at the
/// current row, `ROWS` with a row count and `RANGE` with an interval of days and smaller
/// units (a month has no fixed length). `RANGE` frames end at the current row itself: rows
/// of the series with the same time that come after it are not included (see
/// [`healer_operators::window`]).
fn window_frame(frame: &datafusion::logical_expr::WindowFrame) -> Option<Frame> {
    if !matches!(frame.end_bound, WindowFrameBound::CurrentRow) {
        return None;
    }
    match (&frame.units, &frame.start_bound) {
        (WindowFrameUnits::Rows | WindowFrameUnits::Range, WindowFrameBound::Preceding(v))
            if v.is_null() =>
        {
            Some(Frame::Unbounded)
        }
        (WindowFrameUnits::Rows, WindowFrameBound::Preceding(ScalarValue::UInt64(Some(n)))) => {
            Some(Frame::Rows {
                preceding: usize::try_from(*n).ok()?,
            })
        }
        (WindowFrameUnits::Rows, WindowFrameBound::CurrentRow) => {
            Some(Frame::Rows { preceding: 0 })
        }
        (WindowFrameUnits::Range, WindowFrameBound::Preceding(v)) => Some(Frame::Range {
            preceding_ms: interval_ms(v)?,
        }),
        (WindowFrameUnits::Range, WindowFrameBound::CurrentRow) => {
            Some(Frame::Range { preceding_ms: 0 })
        }
        _ => None,
    }
}

/// What is wrong with a `RANGE … PRECEDING` interval that healer cannot run, in words (the
/// frame's own rendering shows DataFusion's internal interval type).
fn range_interval_problem(frame: &datafusion::logical_expr::WindowFrame) -> Option<String> {
    let (WindowFrameUnits::Range, WindowFrameBound::Preceding(v)) =
        (&frame.units, &frame.start_bound)
    else {
        return None;
    };
    if v.is_null() || interval_ms(v).is_some() {
        return None;
    }
    Some(match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months != 0 => format!(
            "a RANGE frame's interval must not count months or years, which have no fixed \
             length (got {} month(s); a bare number is read as months: write INTERVAL \
             '5 minutes')",
            i.months
        ),
        ScalarValue::IntervalYearMonth(Some(months)) => format!(
            "a RANGE frame's interval must not count months or years, which have no fixed \
             length (got {months} month(s))"
        ),
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.nanoseconds % 1_000_000 != 0 => {
            "a RANGE frame's interval must be whole milliseconds".to_string()
        }
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.days >= 0 && i.nanoseconds >= 0 => {
            "a RANGE frame's interval is too long".to_string()
        }
        ScalarValue::DurationSecond(Some(s)) if *s >= 0 => {
            "a RANGE frame's interval is too long".to_string()
        }
        ScalarValue::IntervalMonthDayNano(Some(_))
        | ScalarValue::IntervalDayTime(Some(_))
        | ScalarValue::DurationMillisecond(Some(_))
        | ScalarValue::DurationSecond(Some(_)) => {
            "a RANGE frame's interval must not be negative".to_string()
        }
        other => format!(
            "a RANGE frame over ts needs an interval: RANGE BETWEEN INTERVAL '5 minutes' \
             PRECEDING AND CURRENT ROW (got {other})"
        ),
    })
}

/// A non-negative interval without months, in whole milliseconds.
fn interval_ms(v: &ScalarValue) -> Option<i64> {
    let ms = match v {
        ScalarValue::IntervalDayTime(Some(d)) => {
            i64::from(d.days) * 86_400_000 + i64::from(d.milliseconds)
        }
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => {
            if i.nanoseconds % 1_000_000 != 0 {
                return None;
            }
            i64::from(i.days)
                .checked_mul(86_400_000)?
                .checked_add(i.nanoseconds / 1_000_000)?
        }
        ScalarValue::IntervalYearMonth(Some(0)) => 0,
        ScalarValue::DurationMillisecond(Some(ms)) => *ms,
        ScalarValue::DurationSecond(Some(s)) => s.checked_mul(1_000)?,
        _ => return None,
    };
    (ms >= 0).then_some(ms)
}
