//! Errors of rule loading and execution.

use std::fmt;
use std::path::PathBuf;

/// A problem with one rule, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// The rule file.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// The rule's name, when the statement got that far.
    pub rule: Option<String>,
    /// What is wrong, and where possible what to do instead.
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.column > 0 {
                write!(f, ":{}", self.column)?;
            }
        }
        if let Some(rule) = &self.rule {
            write!(f, ": rule `{rule}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for RuleError {}

/// Every problem found while loading a set of rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleErrors(pub Vec<RuleError>);

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RuleErrors {}

/// An error while executing a compiled rule on a batch. This means a bug or an input that
/// violates the stream contract (the engine validates batches before rules see them).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// An expression failed to evaluate.
    #[error("rule `{rule}`: {source}")]
    DataFusion {
        /// The rule.
        rule: String,
        /// The cause.
        #[source]
        source: datafusion::error::DataFusionError,
    },
    /// An operator rejected its input.
    #[error("rule `{rule}`: {source}")]
    Operator {
        /// The rule.
        rule: String,
        /// The cause.
        #[source]
        source: healer_operators::OperatorError,
    },
    /// An Arrow kernel failed.
    #[error("rule `{rule}`: {source}")]
    Arrow {
        /// The rule.
        rule: String,
        /// The cause.
        #[source]
        source: arrow::error::ArrowError,
    },
}
