//! SQL detection rules: planned by DataFusion, executed incrementally by healer.
//!
//! A rule is a `CREATE VIEW <name> AS <query>` statement in a `.sql` file. The query reads the
//! wide `metrics` stream or its long view `samples` (see [`healer_operators::unpivot`]) and
//! returns anomaly rows. DataFusion parses, resolves and type-checks the query; healer lowers
//! the logical plan into a linear pipeline of [`stage`]s whose projections and filters are
//! DataFusion physical expressions and whose `OVER (…)` aggregates run on healer's keyed
//! incremental [`healer_operators::window::WindowOperator`]. The pipeline keeps its state
//! between batches, so a rule runs on an unbounded stream with O(1) work per row and gives
//! the same rows whatever the batch boundaries are. The filters after a window are also
//! [`pushdown`] into it, conservatively, so that most rows are dropped before their
//! aggregates are built.
//!
//! See the README's *Rule language* section for what a rule may contain.

pub mod error;
pub mod forecast;
pub mod functions;
pub mod lstm;
pub mod models;
pub mod output;
pub mod pushdown;
pub mod rule;
pub mod stage;

pub use error::{RuleError, RuleErrors};
pub use rule::{CompiledRule, RuleCompiler, RuleInstance, RuleState, StreamTable};
