//! Keyed, incremental sliding-window aggregates.
//!
//! A [`WindowOperator`] evaluates a set of aggregates that share one frame over many
//! independent series (one per partition key and argument). Each call to
//! [`WindowOperator::process`] takes the next rows in event-time order and returns, for every
//! row, the value of every aggregate over the frame that ends at that row. State is kept
//! between calls, so feeding a stream in one batch or in batches of any size gives identical
//! output.
//!
//! ```
//! use arrow::array::{Array, Float64Array};
//! use healer_operators::window::{AggKind, Aggregate, Frame, WindowOperator};
//!
//! // AVG over the last 2 rows (1 PRECEDING and the current one) of two interleaved series.
//! let avg = Aggregate { kind: AggKind::Avg, arg: 0 };
//! let mut op = WindowOperator::try_new(Frame::Rows { preceding: 1 }, 1, vec![avg]).unwrap();
//! let out = op.process(&[0, 1, 0], &[Float64Array::from(vec![1.0, 10.0, 3.0])]).unwrap();
//! let out = out[0].as_any().downcast_ref::<Float64Array>().unwrap();
//! assert_eq!(out.values().to_vec(), vec![1.0, 10.0, 2.0]);
//! // State is kept: the next batch continues both series.
//! let out = op.process(&[1], &[Float64Array::from(vec![20.0])]).unwrap();
//! assert_eq!(out[0].as_any().downcast_ref::<Float64Array>().unwrap().value(0), 15.0);
//! ```
//!
//! # Frames
//! `ROWS BETWEEN n PRECEDING AND CURRENT ROW` (the last `n + 1` rows of the series, the
//! current one included), `RANGE BETWEEN <interval> PRECEDING AND CURRENT ROW` (the rows
//! whose event time is at most the interval before the current row's: [`Frame::Range`], fed
//! through [`WindowOperator::process_at`]) and `ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT
//! ROW`.
//!
//! Every frame ends at the current row, also a `RANGE` frame: rows of the series with the
//! same event time that come after it are not in it (SQL would include these peers, which a
//! stream has not seen yet). A series holds one row per event time in practice, and then the
//! two agree.
//!
//! # Cost
//! Amortised O(1) work per row and aggregate; memory is `series × (n + 1)` values for `ROWS`
//! frames, the rows within the interval (value and event time) for `RANGE` frames, and O(1)
//! per series for unbounded ones. All ring buffers of an operator live in one
//! slab that only grows when a new series appears. The exception is
//! [`AggKind::Quantile`]. Quantiles within 64 ranks of the top (the 99.9th percentile of a
//! 6,000-row frame needs 8) keep only the candidates for the frame's largest values
//! ([`TopK`]: about `k · (1 + ln(n / k))` of them for noise), each row costing a pass over
//! them. Other quantiles keep the argument's present values sorted ([`SortedBlocks`]), one
//! more `n + 1` values per series, each row costing a search and a move within one block of
//! at most 256 values plus a walk over the block lengths. A restored series rebuilds either
//! from its ring. An operator whose every aggregate keeps only top candidates, or is a `MIN`
//! or `MAX` (whose monotonic deques hold their candidates), never reads a value back from its
//! frame (candidates leave by sequence number): it keeps one presence bit per row instead of
//! the ring, and saves its candidates.
//!
//! # Missing values
//! NULL and NaN inputs are both *missing*: they occupy a row of the frame but are ignored by
//! every aggregate, as pandas' rolling functions do. `COUNT(x)` counts the present values, so
//! `COUNT(x) OVER w = n + 1` is the "full window" test (pandas' `min_periods = window`).
//! Results: `COUNT` is 0 and the others are NULL when no value is present; `VAR_SAMP` and
//! `STDDEV_SAMP` are NULL with fewer than two values. Variances never go negative.
//! `FIRST_VALUE` is the frame's oldest row as it is: NULL when that row is missing.
//!
//! # Selecting rows
//! A rule keeps few of its rows. [`WindowOperator::process_selected`] takes a selector that
//! sees each chunk's aggregates right after they are computed and keeps only the rows it
//! picks, so the others' aggregates are never built into arrays; a [`Screen`] can first rule
//! out the rows within `k` standard deviations of their frame's mean from the running sums
//! alone, before any aggregate is computed.
//!
//! # Numerical stability
//! Bounded frames keep sums of deviations from a shift (a recent value of the series). They
//! are recomputed exactly from the ring, re-centred on the latest value, as soon as the shift
//! is far enough from the frame's mean to cost more than ~2.4 significant digits (a level
//! shift), and at least every 16 frame lengths, so rounding error cannot accumulate over an
//! unbounded stream. Unbounded frames use Welford's update.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array};
use arrow::buffer::{BooleanBuffer, NullBuffer};

use serde::{Deserialize, Serialize};

use crate::keys::KeyValue;
use crate::sorted::{SortedBlocks, TopK, top_k_for};
use crate::{OperatorError, Result};

/// An aggregate function computed over a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AggKind {
    /// Number of present values (`COUNT`).
    Count,
    /// Sum (`SUM`).
    Sum,
    /// Arithmetic mean (`AVG`).
    Avg,
    /// Sample variance, n − 1 (`VAR_SAMP`, `VARIANCE`).
    VarSamp,
    /// Population variance (`VAR_POP`).
    VarPop,
    /// Sample standard deviation (`STDDEV`, `STDDEV_SAMP`).
    StddevSamp,
    /// Population standard deviation (`STDDEV_POP`).
    StddevPop,
    /// Minimum (`MIN`).
    Min,
    /// Maximum (`MAX`).
    Max,
    /// A [`SeriesForecaster`]'s forecast of the current row from the frame's other rows.
    /// The frame must be `ROWS BETWEEN w PRECEDING AND CURRENT ROW` with `w` the model's
    /// window; the result is NULL until `w` rows precede the current one, or when one of them
    /// is missing.
    Forecast {
        /// Index of the model among the operator's forecasters
        /// ([`WindowOperator::try_new_with_forecasters`]).
        model: u16,
        /// What to return for the row.
        output: ForecastOutput,
    },
    /// The `q` quantile of the frame's present values, interpolated linearly between the two
    /// nearest ranks as `PERCENTILE_CONT(x, q)` does (`MEDIAN(x)` is q = 0.5). Bounded frames
    /// only.
    Quantile(Level),
    /// The value of the frame's first (oldest) row, NULL when it is missing (`FIRST_VALUE`).
    /// Over `ROWS BETWEEN n PRECEDING AND CURRENT ROW` that is the value `n` rows back once
    /// the series has `n + 1` rows (a lag). Bounded frames only.
    FirstValue,
    /// The minimum of the last `rows` rows of a `ROWS` frame at least that long: `MIN` over
    /// `ROWS BETWEEN rows − 1 PRECEDING AND CURRENT ROW`, read from the deque of the
    /// operator's longer frame. One operator can so answer `MIN` over several frames of one
    /// argument (the rule compiler fuses such windows), with one deque and one pass.
    MinOfLast(u32),
    /// The maximum of the last `rows` rows of a `ROWS` frame at least that long (see
    /// [`AggKind::MinOfLast`]).
    MaxOfLast(u32),
}

/// The level `q` of an [`AggKind::Quantile`], in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Level(u64);

impl Level {
    /// `q` as a level; `None` unless `0 <= q <= 1`.
    pub fn new(q: f64) -> Option<Self> {
        (0.0..=1.0).contains(&q).then_some(Self(q.to_bits()))
    }

    /// The level as a number.
    pub fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

/// What a [`AggKind::Forecast`] aggregate returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForecastOutput {
    /// The forecast value.
    Value,
    /// `(x − forecast) / scale`: the current value's residual in units of the window's scale
    /// (see [`Forecast::scale`]); NULL when the current value is missing.
    Residual,
}

/// One forecast: the predicted value and the scale of the window it came from.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Forecast {
    /// The predicted next value.
    pub value: f64,
    /// The window's spread as the model measures it (for a normalising model, the deviation
    /// it divided by); always > 0.
    pub scale: f64,
}

/// A model that forecasts the next value of a series from its last [`window`] values,
/// evaluated in batches across series.
///
/// [`window`]: SeriesForecaster::window
pub trait SeriesForecaster: Send + Sync + std::fmt::Debug {
    /// Values per window.
    fn window(&self) -> usize;

    /// One forecast per window: `windows` holds `out.len()` windows back to back, each
    /// [`window`](SeriesForecaster::window) values oldest first, all present (no NaN).
    fn forecast(&self, windows: &[f64], out: &mut [Forecast]) -> std::result::Result<(), String>;
}

impl AggKind {
    /// Maps a SQL aggregate name (DataFusion's canonical names and aliases) to a kind.
    pub fn from_sql_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "count" => AggKind::Count,
            "sum" => AggKind::Sum,
            "avg" | "mean" => AggKind::Avg,
            "var" | "var_samp" | "var_sample" | "variance" => AggKind::VarSamp,
            "var_pop" | "var_population" => AggKind::VarPop,
            "stddev" | "stddev_samp" => AggKind::StddevSamp,
            "stddev_pop" => AggKind::StddevPop,
            "min" => AggKind::Min,
            "max" => AggKind::Max,
            "median" => AggKind::Quantile(Level(0.5f64.to_bits())),
            "first_value" => AggKind::FirstValue,
            _ => return None,
        })
    }

    /// The ends of the frame's values this kind reads.
    fn extrema_sides(self) -> Sides {
        Sides {
            min: matches!(self, AggKind::Min | AggKind::MinOfLast(_)),
            max: matches!(self, AggKind::Max | AggKind::MaxOfLast(_)),
        }
    }

    /// Whether the kind is defined over bounded frames only.
    pub fn needs_bounded_frame(self) -> bool {
        matches!(
            self,
            AggKind::Quantile(_)
                | AggKind::FirstValue
                | AggKind::MinOfLast(_)
                | AggKind::MaxOfLast(_)
        )
    }

    /// For [`AggKind::MinOfLast`] and [`AggKind::MaxOfLast`]: whether the maximum, and over
    /// how many of the frame's last rows.
    fn of_last(self) -> Option<(bool, u32)> {
        match self {
            AggKind::MinOfLast(rows) => Some((false, rows)),
            AggKind::MaxOfLast(rows) => Some((true, rows)),
            _ => None,
        }
    }

    /// Whether the kind is computed by the plain path, from the running sums alone.
    fn is_plain(self) -> bool {
        !matches!(
            self,
            AggKind::Min
                | AggKind::Max
                | AggKind::MinOfLast(_)
                | AggKind::MaxOfLast(_)
                | AggKind::Forecast { .. }
                | AggKind::Quantile(_)
                | AggKind::FirstValue
        )
    }
}

/// The frame of a window: always ending at the current row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Frame {
    /// `ROWS BETWEEN n PRECEDING AND CURRENT ROW`: the last `n + 1` rows.
    Rows {
        /// Rows before the current one.
        preceding: usize,
    },
    /// `RANGE BETWEEN <interval> PRECEDING AND CURRENT ROW` over event time: the rows whose
    /// time is at least the current row's minus `preceding_ms` milliseconds.
    Range {
        /// The interval, in milliseconds (0: the rows at the current row's time).
        preceding_ms: i64,
    },
    /// `ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW`.
    Unbounded,
}

impl Frame {
    /// Ring slots per series: the rows of a `ROWS` frame; 0 for the others, which keep no ring.
    pub fn capacity(self) -> usize {
        match self {
            Frame::Rows { preceding } => preceding + 1,
            Frame::Range { .. } | Frame::Unbounded => 0,
        }
    }

    /// Whether the frame holds a bounded part of the series (`ROWS n` or `RANGE interval`).
    pub fn is_bounded(self) -> bool {
        !matches!(self, Frame::Unbounded)
    }
}

/// One aggregate of a [`WindowOperator`]: a function over one of the operator's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aggregate {
    /// The function.
    pub kind: AggKind,
    /// Index of the argument (see [`WindowOperator::process`]).
    pub arg: usize,
}

/// Running statistics of one series (one partition key × one argument).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Series {
    /// Rows currently in the frame, present or not.
    rows: usize,
    /// Next write position in the ring.
    head: usize,
    /// Present values in the frame.
    n: u64,
    /// Bounded: shift. Unbounded: running mean.
    shift: f64,
    /// Bounded: Σ(x − shift). Unbounded: Σx.
    s1: f64,
    /// Bounded: Σ(x − shift)². Unbounded: Welford's M2.
    s2: f64,
    /// Evictions since the last exact recomputation.
    evictions: usize,
    /// Rows ever pushed (sequence number of the next row).
    seq: u64,
}

/// The [`Series`] of an operator, one column per field (structure of arrays).
///
/// The replay's common case is a batch of ticks in which every series of a metric gets one
/// row, in the same order each tick: consecutive group ids, all at the same ring slot. The
/// plain path then updates a tick's series as one pass over contiguous columns (and
/// contiguous ring slots), which vectorises; with one cache line per series it was a gather
/// that did not. The general path keeps one [`Series`] per cache line instead: it reaches
/// each series once per row among much other work, where one line beats eight.
#[derive(Debug, Default)]
struct SeriesColumns {
    rows: Vec<usize>,
    head: Vec<usize>,
    /// Present values, as `f64` (exact below 2^53): the vectorised pass computes with them.
    n: Vec<f64>,
    shift: Vec<f64>,
    s1: Vec<f64>,
    s2: Vec<f64>,
    evictions: Vec<usize>,
    seq: Vec<u64>,
}

impl SeriesColumns {
    fn len(&self) -> usize {
        self.seq.len()
    }

    /// Adds empty series up to `len`.
    fn grow(&mut self, len: usize) {
        self.rows.resize(len, 0);
        self.head.resize(len, 0);
        self.n.resize(len, 0.0);
        self.shift.resize(len, 0.0);
        self.s1.resize(len, 0.0);
        self.s2.resize(len, 0.0);
        self.evictions.resize(len, 0);
        self.seq.resize(len, 0);
    }

    // Counts convert through i64 (one instruction each way; a count never reaches 2^53).
    #[inline]
    fn get(&self, s: usize) -> Series {
        Series {
            rows: self.rows[s],
            head: self.head[s],
            n: self.n[s] as i64 as u64,
            shift: self.shift[s],
            s1: self.s1[s],
            s2: self.s2[s],
            evictions: self.evictions[s],
            seq: self.seq[s],
        }
    }

    #[inline]
    fn set(&mut self, s: usize, v: &Series) {
        self.rows[s] = v.rows;
        self.head[s] = v.head;
        self.n[s] = v.n as i64 as f64;
        self.shift[s] = v.shift;
        self.s1[s] = v.s1;
        self.s2[s] = v.s2;
        self.evictions[s] = v.evictions;
        self.seq[s] = v.seq;
    }
}

/// The ordered state an argument's quantiles need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// No quantile reads the argument.
    None,
    /// Every present value of the frame, sorted.
    Sorted,
    /// Only the candidates for the frame's `k` largest values: every quantile of the
    /// argument is close enough to 1 (at most [`TOP_K_LIMIT`] ranks from the top).
    Top(usize),
}

/// The most ranks from the top for which quantiles keep a [`TopK`] instead of sorting the
/// whole frame.
const TOP_K_LIMIT: usize = 64;

/// Monotonic deques of (seq, value) for MIN / MAX of one series, kept only when needed;
/// a deque no aggregate reads stays empty.
#[derive(Debug, Clone, Default)]
struct Extrema {
    min: VecDeque<(u64, f64)>,
    max: VecDeque<(u64, f64)>,
    sides: Sides,
}

/// Which ends of an argument's values its aggregates read: `MIN`, `MAX`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sides {
    min: bool,
    max: bool,
}

impl Sides {
    fn any(self) -> bool {
        self.min || self.max
    }
}

/// Keyed incremental window aggregates over one frame. See the [module docs](self).
#[derive(Debug)]
pub struct WindowOperator {
    frame: Frame,
    n_args: usize,
    aggregates: Vec<Aggregate>,
    /// Per argument: which MIN/MAX deques must be maintained.
    extrema: Vec<Sides>,
    /// The running statistics of series `group * n_args + arg` whose argument is not
    /// plain (see `plain`): one cache line each, for the general path's row-by-row access.
    series: Vec<Series>,
    /// The running statistics of the series of plain arguments of a `ROWS` frame, one
    /// column per field (see [`SeriesColumns`]); indexed as `series`.
    columns: SeriesColumns,
    /// Parallel to `series` when any aggregate is MIN or MAX, else empty.
    extremes: Vec<Extrema>,
    /// Per argument: the ordered state its quantiles read.
    ordered: Vec<Order>,
    /// Parallel to `series` when any argument keeps [`Order::Sorted`], else empty: the
    /// present values of the frame in ascending order ([`f64::total_cmp`]).
    sorted: Vec<SortedBlocks>,
    /// Parallel to `series` when any argument keeps [`Order::Top`], else empty.
    tops: Vec<TopK>,
    /// Per argument: whether every aggregate reading it is computed from the running sums
    /// alone (the plain path).
    plain: Vec<bool>,
    /// Ring buffers of all series, slot-major: slot `k` of series `s` is at
    /// `k * stride + s`. Series advance roughly in lockstep (one sample per tick), so the
    /// values a tick writes and evicts are contiguous across series, which streams through
    /// memory instead of missing the cache once per cell.
    slab: Vec<f64>,
    /// Series capacity of the slab layout.
    stride: usize,
    /// Scratch reused by every call.
    snapshot: Snapshot,
    /// The models of [`AggKind::Forecast`] aggregates.
    forecasters: Vec<Arc<dyn SeriesForecaster>>,
    /// Per argument: whether a forecast aggregate reads it.
    forecast_args: Vec<bool>,
    /// Scratch of forecast aggregates: gathered windows, and the rows they belong to.
    gathered: Gathered,
    /// Parallel to `series` for [`Frame::Range`]: the frame's rows, (event time, value),
    /// oldest first.
    timed: Vec<VecDeque<(i64, f64)>>,
    /// Words per series of `present`; 0 unless every aggregate is a quantile that keeps only
    /// its top candidates ([`Order::Top`]), a `MIN` or a `MAX`. Such an operator never reads
    /// a value back from its frame (candidates are evicted by sequence number), so instead of
    /// a ring of values it keeps one bit per row of the frame, whether the row held a value:
    /// 1/64 of the memory.
    presence_words: usize,
    /// The presence bits of every series, `presence_words` per series, bit `k` for ring
    /// slot `k`.
    present: Vec<u64>,
    /// Scratch of [`WindowOperator::process_selected`].
    selection: Selection,
}

/// The windows gathered for forecasting during one call.
#[derive(Debug, Default)]
struct Gathered {
    /// Windows back to back, oldest value first.
    values: Vec<f64>,
    /// For each window, the row it forecasts.
    rows: Vec<usize>,
    /// The forecasts, parallel to `rows`.
    forecasts: Vec<Forecast>,
    /// The model whose forecasts `forecasts` holds for the current argument, if any: a
    /// model's `lstm_forecast` and `lstm_residual` share one inference.
    forecast_of: Option<u16>,
}

impl WindowOperator {
    /// An operator over `n_args` arguments computing `aggregates` over `frame`.
    pub fn try_new(frame: Frame, n_args: usize, aggregates: Vec<Aggregate>) -> Result<Self> {
        Self::try_new_with_forecasters(frame, n_args, aggregates, Vec::new())
    }

    /// As [`WindowOperator::try_new`], with the models that [`AggKind::Forecast`] aggregates
    /// refer to by index. Each forecast aggregate needs the frame
    /// `ROWS BETWEEN w PRECEDING AND CURRENT ROW` with `w` its model's window.
    pub fn try_new_with_forecasters(
        frame: Frame,
        n_args: usize,
        aggregates: Vec<Aggregate>,
        forecasters: Vec<Arc<dyn SeriesForecaster>>,
    ) -> Result<Self> {
        let mut forecast_args = vec![false; n_args];
        for a in &aggregates {
            let AggKind::Forecast { model, .. } = a.kind else {
                continue;
            };
            let model = forecasters.get(usize::from(model)).ok_or_else(|| {
                OperatorError::InvalidInput(format!(
                    "forecast aggregate refers to model {model} of {}",
                    forecasters.len()
                ))
            })?;
            let window = model.window();
            if window == 0 || frame != (Frame::Rows { preceding: window }) {
                return Err(OperatorError::InvalidInput(format!(
                    "a forecaster of {window} values needs the frame ROWS BETWEEN {window} \
                     PRECEDING AND CURRENT ROW, not {frame:?}"
                )));
            }
            if let Some(f) = forecast_args.get_mut(a.arg) {
                *f = true;
            }
        }
        if let Some(bad) = aggregates.iter().find(|a| a.arg >= n_args) {
            return Err(OperatorError::InvalidInput(format!(
                "aggregate {:?} refers to argument {} of {n_args}",
                bad.kind, bad.arg
            )));
        }
        if let Frame::Rows { preceding } = frame
            && preceding >= (u32::MAX as usize)
        {
            return Err(OperatorError::InvalidInput(format!(
                "window of {preceding} preceding rows is too large"
            )));
        }
        if let Frame::Range { preceding_ms } = frame
            && preceding_ms < 0
        {
            return Err(OperatorError::InvalidInput(format!(
                "a RANGE frame reaches back a negative interval ({preceding_ms} ms)"
            )));
        }
        if let Some((a, (_, rows))) = aggregates
            .iter()
            .find_map(|a| Some(a).zip(a.kind.of_last()))
            && (rows == 0
                || !matches!(frame, Frame::Rows { .. })
                || rows as usize > frame.capacity())
        {
            return Err(OperatorError::InvalidInput(format!(
                "{:?} needs a ROWS frame of at least {rows} rows, and at least one (got {frame:?})",
                a.kind
            )));
        }
        if frame == Frame::Unbounded
            && let Some(a) = aggregates.iter().find(|a| a.kind.needs_bounded_frame())
        {
            return Err(OperatorError::InvalidInput(format!(
                "{:?} needs a bounded frame: ROWS BETWEEN n PRECEDING or RANGE BETWEEN <interval> \
                 PRECEDING, AND CURRENT ROW",
                a.kind
            )));
        }
        let mut extrema = vec![Sides::default(); n_args];
        let mut ordered = vec![Order::None; n_args];
        let mut plain = vec![true; n_args];
        for a in &aggregates {
            let sides = a.kind.extrema_sides();
            extrema[a.arg].min |= sides.min;
            extrema[a.arg].max |= sides.max;
            plain[a.arg] &= a.kind.is_plain();
            if let AggKind::Quantile(q) = a.kind {
                let k = top_k_for(q.get(), frame.capacity());
                ordered[a.arg] = match ordered[a.arg] {
                    Order::Sorted => Order::Sorted,
                    // A time frame has no fixed row count to size the candidates for.
                    _ if matches!(frame, Frame::Range { .. }) => Order::Sorted,
                    _ if k > TOP_K_LIMIT => Order::Sorted,
                    Order::Top(other) => Order::Top(other.max(k)),
                    Order::None => Order::Top(k),
                };
            }
        }
        let presence_only = matches!(frame, Frame::Rows { .. })
            && !aggregates.is_empty()
            && aggregates.iter().all(|a| match a.kind {
                AggKind::Quantile(_) => matches!(ordered[a.arg], Order::Top(_)),
                AggKind::Min | AggKind::Max | AggKind::MinOfLast(_) | AggKind::MaxOfLast(_) => true,
                _ => false,
            });
        let presence_words = if presence_only {
            frame.capacity().div_ceil(64)
        } else {
            0
        };
        Ok(Self {
            frame,
            n_args,
            aggregates,
            extrema,
            series: Vec::new(),
            columns: SeriesColumns::default(),
            extremes: Vec::new(),
            ordered,
            sorted: Vec::new(),
            tops: Vec::new(),
            plain,
            slab: Vec::new(),
            stride: 0,
            snapshot: Snapshot::default(),
            forecasters,
            forecast_args,
            gathered: Gathered::default(),
            timed: Vec::new(),
            presence_words,
            present: Vec::new(),
            selection: Selection::default(),
        })
    }

    /// The frame of this operator.
    pub fn frame(&self) -> Frame {
        self.frame
    }

    /// Number of series (groups × arguments) holding state.
    pub fn series_count(&self) -> usize {
        self.series.len().max(self.columns.len())
    }

    /// Whether argument `arg`'s series live in `columns` (the plain path) or in `series`.
    fn columnar(&self, arg: usize) -> bool {
        matches!(self.frame, Frame::Rows { .. }) && self.plain[arg]
    }

    /// The statistics of series `s`, an argument `arg` one.
    fn stats(&self, s: usize, arg: usize) -> Series {
        if self.columnar(arg) {
            self.columns.get(s)
        } else {
            self.series[s].clone()
        }
    }

    fn ensure_groups(&mut self, groups: usize) {
        let needed = groups * self.n_args;
        if needed > self.series_count() {
            if (0..self.n_args).any(|a| self.columnar(a)) {
                self.columns.grow(needed);
            }
            if (0..self.n_args).any(|a| !self.columnar(a)) {
                self.series.resize_with(needed, Series::default);
            }
            if self.extrema.iter().any(|e| e.any()) {
                let n_args = self.n_args;
                let sides = &self.extrema;
                self.extremes
                    .extend((self.extremes.len()..needed).map(|s| Extrema {
                        sides: sides[s % n_args],
                        ..Extrema::default()
                    }));
            }
            if self.ordered.contains(&Order::Sorted) {
                self.sorted.resize_with(needed, SortedBlocks::default);
            }
            if self.ordered.iter().any(|o| matches!(o, Order::Top(_))) {
                self.tops.resize_with(needed, TopK::default);
            }
            if matches!(self.frame, Frame::Range { .. }) {
                self.timed.resize_with(needed, VecDeque::new);
            }
        }
        if self.presence_words > 0 {
            let words = needed * self.presence_words;
            if words > self.present.len() {
                self.present.resize(words, 0);
            }
            return;
        }
        let cap = self.frame.capacity();
        if needed > self.stride && cap > 0 {
            // Grow geometrically and re-lay the slots: amortised O(1) per new series.
            let stride = needed.max(self.stride * 2).max(64);
            let mut slab = vec![f64::NAN; cap * stride];
            for k in 0..cap {
                let old = &self.slab[k * self.stride..k * self.stride + self.stride];
                slab[k * stride..k * stride + self.stride].copy_from_slice(old);
            }
            self.slab = slab;
            self.stride = stride;
        }
    }

    /// Processes the next rows.
    ///
    /// `groups[i]` is the dense group id of row `i` (see [`crate::keys::KeyInterner`]);
    /// `args[a]` holds argument `a` for every row. Rows of one group must come in event-time
    /// order across calls. Returns one array per aggregate, in the order given to
    /// [`WindowOperator::try_new`]: `Int64` for `COUNT`, `Float64` otherwise.
    ///
    /// A [`Frame::Range`] operator needs the rows' event times: [`WindowOperator::process_at`].
    pub fn process(&mut self, groups: &[u32], args: &[Float64Array]) -> Result<Vec<ArrayRef>> {
        if let Frame::Range { .. } = self.frame {
            return Err(OperatorError::InvalidInput(
                "a RANGE frame needs the rows' event times (process_at)".into(),
            ));
        }
        self.process_rows(groups, None, args)
    }

    /// [`WindowOperator::process`] with each row's event time in milliseconds, `ts[i]` for
    /// row `i`, which [`Frame::Range`] frames are measured in (other frames ignore it). Rows
    /// of one group must come in event-time order.
    pub fn process_at(
        &mut self,
        groups: &[u32],
        ts: &[i64],
        args: &[Float64Array],
    ) -> Result<Vec<ArrayRef>> {
        if ts.len() != groups.len() {
            return Err(OperatorError::InvalidInput(format!(
                "{} event times for {} group ids",
                ts.len(),
                groups.len()
            )));
        }
        self.process_rows(groups, Some(ts), args)
    }

    /// Checks the shape of a call's input and makes room for its groups.
    fn prepare(&mut self, groups: &[u32], args: &[Float64Array]) -> Result<()> {
        let rows = groups.len();
        if args.len() != self.n_args {
            return Err(OperatorError::InvalidInput(format!(
                "expected {} arguments, got {}",
                self.n_args,
                args.len()
            )));
        }
        if let Some(a) = args.iter().find(|a| a.len() != rows) {
            return Err(OperatorError::InvalidInput(format!(
                "argument of {} rows for {rows} group ids",
                a.len()
            )));
        }
        let max_group = groups.iter().copied().max().map_or(0, |g| g as usize + 1);
        self.ensure_groups(max_group);
        Ok(())
    }

    fn process_rows(
        &mut self,
        groups: &[u32],
        ts: Option<&[i64]>,
        args: &[Float64Array],
    ) -> Result<Vec<ArrayRef>> {
        let rows = groups.len();
        self.prepare(groups, args)?;

        self.snapshot.resize(rows);
        let mut outputs: Vec<ArrayRef> = Vec::with_capacity(self.aggregates.len());
        let mut out_of: Vec<Option<ArrayRef>> = vec![None; self.aggregates.len()];
        let cap = self.frame.capacity();
        for arg in 0..self.n_args {
            if !self.aggregates.iter().any(|a| a.arg == arg) {
                continue;
            }
            let extrema = self.extrema[arg].any();
            let forecast = self.forecast_args[arg];
            let ordered = self.ordered[arg];
            let first_value = self
                .aggregates
                .iter()
                .any(|a| a.arg == arg && a.kind == AggKind::FirstValue);
            self.gathered.values.clear();
            self.gathered.rows.clear();
            self.gathered.forecast_of = None;
            let input = &args[arg];
            let raw = input.values();
            let nulls = input.nulls();
            if self.columnar(arg) {
                self.process_plain(arg, groups, input, &mut out_of);
                continue;
            }
            // The quantile levels read from this argument, each with its snapshot column.
            let levels: Vec<f64> = self
                .aggregates
                .iter()
                .filter_map(|a| match a.kind {
                    AggKind::Quantile(q) if a.arg == arg => Some(q.get()),
                    _ => None,
                })
                .collect();
            // The MIN/MAX of shorter frames read from this argument's deques: (maximum?,
            // rows), each with its snapshot column.
            let lasts: Vec<(bool, u64)> = self
                .aggregates
                .iter()
                .filter(|a| a.arg == arg)
                .filter_map(|a| a.kind.of_last())
                .map(|(max, rows)| (max, u64::from(rows)))
                .collect();
            let snap = &mut self.snapshot;
            snap.quantiles.resize_with(levels.len(), Vec::new);
            for column in &mut snap.quantiles {
                column.resize(rows, 0.0);
            }
            snap.lasts.resize_with(lasts.len(), Vec::new);
            for column in &mut snap.lasts {
                column.resize(rows, 0.0);
            }
            // Pass 1, the only one that touches series state: push every row in input order
            // (consecutive rows belong to different series, so reads of the input and writes
            // of the snapshot stay sequential; visiting rows series by series was measured
            // slower) and record the series' sums after it.
            for i in 0..rows {
                let x = match nulls {
                    Some(n) if n.is_null(i) => f64::NAN,
                    _ => raw[i],
                };
                let s = groups[i] as usize * self.n_args + arg;
                let series = &mut self.series[s];
                let mut ext = if extrema {
                    self.extremes.get_mut(s)
                } else {
                    None
                };
                // The value this row evicts from a full bounded frame, for the sorted values.
                let evicted = (ordered == Order::Sorted && cap > 0 && series.rows == cap)
                    .then(|| self.slab[series.head * self.stride + s]);
                match self.frame {
                    Frame::Range { preceding_ms } => {
                        let t = ts.expect("process_at gives RANGE frames their times")[i];
                        if let Some(&(last, _)) = self.timed[s].back()
                            && t < last
                        {
                            return Err(OperatorError::InvalidInput(format!(
                                "event time goes back within a series ({t} ms after {last} ms): \
                                 a RANGE frame needs each series in time order"
                            )));
                        }
                        let sorted = (ordered == Order::Sorted).then(|| &mut self.sorted[s]);
                        push_timed(
                            series,
                            &mut self.timed[s],
                            (t, x),
                            preceding_ms,
                            sorted,
                            ext.as_deref_mut(),
                        );
                    }
                    Frame::Rows { .. } if self.presence_words > 0 => {
                        let words = self.presence_words;
                        let bits = &mut self.present[s * words..][..words];
                        push_presence(series, bits, cap, x, ext.as_deref_mut());
                    }
                    Frame::Rows { .. } => push_bounded(
                        series,
                        Ring {
                            slab: &mut self.slab,
                            stride: self.stride,
                            series: s,
                            cap,
                        },
                        x,
                        ext.as_deref_mut(),
                    ),
                    Frame::Unbounded => push_unbounded(series, x, ext.as_deref_mut()),
                }
                if forecast && series.rows == cap {
                    // The ring is full: its oldest `cap - 1` values, from `head` on, are the
                    // window before the current row.
                    let start = self.gathered.values.len();
                    let mut slot = series.head;
                    for _ in 1..cap {
                        self.gathered.values.push(self.slab[slot * self.stride + s]);
                        slot = if slot + 1 == cap { 0 } else { slot + 1 };
                    }
                    // A missing (or infinite) value anywhere in the window: no forecast.
                    if self.gathered.values[start..].iter().any(|v| !v.is_finite()) {
                        self.gathered.values.truncate(start);
                    } else {
                        self.gathered.rows.push(i);
                    }
                }
                snap.n[i] = series.n as f64;
                snap.shift[i] = series.shift;
                snap.s1[i] = series.s1;
                snap.s2[i] = series.s2;
                if first_value {
                    // The oldest row of the frame (bounded: FIRST_VALUE needs one).
                    snap.first[i] = if cap > 0 {
                        let slot = (series.head + cap - series.rows) % cap;
                        self.slab[slot * self.stride + s]
                    } else {
                        self.timed[s].front().map_or(f64::NAN, |&(_, v)| v)
                    };
                }
                match ordered {
                    Order::None => {}
                    Order::Sorted => {
                        let sorted = &mut self.sorted[s];
                        // A RANGE frame's values are kept by `push_timed`.
                        if cap > 0 {
                            if let Some(old) = evicted.filter(|v| !v.is_nan()) {
                                let removed = sorted.remove(old);
                                debug_assert!(removed, "an evicted value is in the sorted set");
                            }
                            if !x.is_nan() {
                                sorted.insert(x);
                            }
                        }
                        for (column, &q) in snap.quantiles.iter_mut().zip(&levels) {
                            column[i] = sorted.quantile(q);
                        }
                    }
                    Order::Top(k) => {
                        // The frame holds sequence numbers (seq - rows ..= seq - 1).
                        let top = &mut self.tops[s];
                        top.evict_before(series.seq - series.rows as u64);
                        if !x.is_nan() {
                            top.push(series.seq - 1, x, k);
                        }
                        let n = series.n as usize;
                        for (column, &q) in snap.quantiles.iter_mut().zip(&levels) {
                            column[i] = top.quantile(q, n, k);
                        }
                    }
                }
                if let Some(e) = ext {
                    snap.min[i] = e.min.front().map_or(f64::NAN, |&(_, v)| v);
                    snap.max[i] = e.max.front().map_or(f64::NAN, |&(_, v)| v);
                    // A deque holds its candidates by ascending sequence number; the first
                    // one within the last `last` rows is the extreme of those rows.
                    for (column, &(max, last)) in snap.lasts.iter_mut().zip(&lasts) {
                        let from = series.seq.saturating_sub(last);
                        let deque = if max { &e.max } else { &e.min };
                        let k = deque.partition_point(|&(seq, _)| seq < from);
                        column[i] = deque.get(k).map_or(f64::NAN, |&(_, v)| v);
                    }
                }
            }
            // Pass 2: each aggregate from the snapshot, one tight loop per aggregate over
            // plain slices (no state, no branches on the frame), which the compiler
            // vectorises.
            let (mut level, mut last) = (0, 0);
            for (o, agg) in self.aggregates.iter().enumerate() {
                if agg.arg != arg {
                    continue;
                }
                out_of[o] = Some(match agg.kind {
                    AggKind::Quantile(_) => {
                        level += 1;
                        present_column(&snap.quantiles[level - 1][..rows])
                    }
                    AggKind::MinOfLast(_) | AggKind::MaxOfLast(_) => {
                        last += 1;
                        present_column(&snap.lasts[last - 1][..rows])
                    }
                    AggKind::FirstValue => present_column(&snap.first[..rows]),
                    AggKind::Forecast { model, output } => {
                        let g = &mut self.gathered;
                        if g.forecast_of != Some(model) {
                            g.forecasts.clear();
                            g.forecasts.resize(g.rows.len(), Forecast::default());
                            self.forecasters[usize::from(model)]
                                .forecast(&g.values, &mut g.forecasts)
                                .map_err(OperatorError::Model)?;
                            g.forecast_of = Some(model);
                        }
                        forecast_column(g, input, rows, output)
                    }
                    kind => finish(snap, rows, self.frame, kind),
                });
            }
        }
        for o in out_of {
            outputs.push(o.expect("every aggregate has an argument"));
        }
        Ok(outputs)
    }
}

/// Rows per chunk of [`WindowOperator::process_plain`]: the snapshot of a chunk (4 × 32 KiB)
/// stays in the L2 cache between the pass that writes it and the passes that read it.
const PLAIN_CHUNK: usize = 4096;

impl WindowOperator {
    /// Pushes rows of argument `arg` on the plain path (see [`push_rows_plain`]); their
    /// running sums land in the snapshot's first rows, or only those `screen` keeps in the
    /// screen.
    fn push_plain_chunk<S: RowScreen>(
        &mut self,
        arg: usize,
        groups: &[u32],
        input: &Float64Array,
        screen: &mut S,
    ) {
        push_rows_plain(
            PlainRows {
                series: &mut self.columns,
                slab: &mut self.slab,
                stride: self.stride,
                cap: self.frame.capacity(),
                n_args: self.n_args,
                arg,
            },
            groups,
            input,
            &mut self.snapshot,
            screen,
        );
    }

    /// [`WindowOperator::process`] for an argument of a bounded frame that needs neither
    /// MIN/MAX nor a forecast, chunk by chunk: push a chunk's rows, then finish every
    /// aggregate of the argument over that chunk.
    fn process_plain(
        &mut self,
        arg: usize,
        groups: &[u32],
        input: &Float64Array,
        out_of: &mut [Option<ArrayRef>],
    ) {
        let rows = groups.len();
        let mut outs: Vec<(usize, AggKind, Finished)> = self
            .aggregates
            .iter()
            .enumerate()
            .filter(|(_, a)| a.arg == arg)
            .map(|(o, a)| (o, a.kind, Finished::with_capacity(a.kind, rows)))
            .collect();
        let mut start = 0;
        while start < rows {
            let len = PLAIN_CHUNK.min(rows - start);
            self.push_plain_chunk(
                arg,
                &groups[start..start + len],
                &input.slice(start, len),
                &mut NoScreen,
            );
            for (_, kind, out) in &mut outs {
                out.extend(&self.snapshot, len, self.frame, *kind);
            }
            start += len;
        }
        for (o, _, out) in outs {
            out_of[o] = Some(out.finish());
        }
    }
}

/// The rows kept by [`WindowOperator::process_selected`], with their aggregates.
#[derive(Debug)]
pub struct Selected {
    /// The kept rows' positions in the input, ascending.
    pub rows: Vec<u32>,
    /// One array per aggregate (as [`WindowOperator::process`] returns them), over the
    /// kept rows only.
    pub outputs: Vec<ArrayRef>,
}

/// A chunk of rows handed to the selector of [`WindowOperator::process_selected`].
#[derive(Debug)]
pub struct Chunk<'a> {
    /// The chunk's first row in the input.
    pub start: usize,
    /// Its number of rows.
    pub len: usize,
    /// When a [`Screen`] ruled rows out, the rows (positions within the chunk, ascending)
    /// that `aggregates` are given for; otherwise every row of the chunk.
    pub rows: Option<&'a [u32]>,
    /// Per aggregate, its values as `f64` (`COUNT` included), NaN where the aggregate is
    /// NULL: one per row of `rows`.
    pub aggregates: &'a [&'a [f64]],
}

/// A test on the running sums that rules out, before any aggregate is computed, the rows
/// whose argument value lies within `k` standard deviations of the frame's mean, that is
/// where `|x − AVG(x)| ≤ k · STDDEV(x)` (a z-score filter `|z| > k` drops them).
///
/// The test needs no division: with `n` present values, `d = n·x − Σx` and
/// `M = n·Σx² − (Σx)²` (both from the shifted sums), the row is ruled out when
/// `d²·(n − 1) < k²·n·M` (sample) or `d² < k²·M` (population), by a relative margin far
/// wider than the rounding of either form. The aggregates the operator outputs come from the
/// same sums, so the margin only has to cover the last few operations: their cancellation
/// is bounded by the frame length (the shift is re-centred whenever it costs more than
/// 256×). Rows with a missing value, a short frame, a zero or non-finite spread are never
/// ruled out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Screen {
    /// The argument tested: its value in the row and the statistics of its frame.
    pub arg: usize,
    /// The number of standard deviations, at least 0.
    pub k: f64,
    /// Sample (`STDDEV_SAMP`) rather than population (`STDDEV_POP`) standard deviation.
    pub sample: bool,
}

/// Reused buffers of [`WindowOperator::process_selected`].
#[derive(Debug, Default)]
struct Selection {
    /// Per aggregate, its values over the chunk, NaN where NULL.
    values: Vec<Vec<f64>>,
    /// Per argument, its present-value counts over the chunk.
    counts: Vec<Vec<f64>>,
    /// The chunk's kept rows.
    kept: Vec<u32>,
    /// The chunk's rows that pass the screen.
    candidates: Vec<u32>,
    /// The snapshot rows of the candidates.
    compact: Snapshot,
}

impl WindowOperator {
    /// Whether [`WindowOperator::process_selected`] can run: a `ROWS` frame whose
    /// aggregates are all computed from running sums (no MIN/MAX, quantile, first value or
    /// forecast).
    pub fn selects(&self) -> bool {
        Self::can_select(self.frame, &self.aggregates)
    }

    /// Whether an operator over `frame` computing `aggregates` [`selects`](Self::selects).
    pub fn can_select(frame: Frame, aggregates: &[Aggregate]) -> bool {
        matches!(frame, Frame::Rows { .. }) && aggregates.iter().all(|a| a.kind.is_plain())
    }

    /// [`WindowOperator::process`] that returns only the rows `select` keeps, without
    /// building the aggregates of the others.
    ///
    /// Rows are processed in chunks of a few thousand. A `screen` first rules out rows
    /// from the running sums alone. The remaining rows' aggregates are then computed and
    /// given to `select`, which appends to its second argument the positions (ascending)
    /// among [`Chunk::rows`] of the rows to keep. The state afterwards is the same as after
    /// [`WindowOperator::process`]: every row is pushed, kept or not.
    ///
    /// Fails, before pushing any row, when [`WindowOperator::selects`] is false or the
    /// screen's argument is not one of the operator's. A selector that keeps a row beyond
    /// the chunk is a bug: the call fails with the rows before it pushed.
    pub fn process_selected(
        &mut self,
        groups: &[u32],
        args: &[Float64Array],
        screen: Option<Screen>,
        select: &mut dyn FnMut(Chunk<'_>, &mut Vec<u32>),
    ) -> Result<Selected> {
        if !self.selects() {
            return Err(OperatorError::InvalidInput(
                "selecting rows needs a ROWS frame whose aggregates all come from running sums"
                    .into(),
            ));
        }
        if let Some(sc) = screen
            && (sc.arg >= self.n_args || sc.k.is_nan() || sc.k < 0.0)
        {
            return Err(OperatorError::InvalidInput(format!(
                "screen on argument {} of {} at {} standard deviations",
                sc.arg, self.n_args, sc.k
            )));
        }
        // The screened argument first, so that the others' aggregates are computed for its
        // candidates only.
        let mut order: Vec<usize> = (0..self.n_args)
            .filter(|&a| self.aggregates.iter().any(|g| g.arg == a))
            .collect();
        if let Some(sc) = screen {
            order.retain(|&a| a != sc.arg);
            order.insert(0, sc.arg);
        }
        // Tolerance of the screen: the rounding of both forms is ~1e-13 relative for
        // frames of hundreds of rows and grows with the frame length (see `Screen`).
        let margin = 1.0 - (1e-6 + self.frame.capacity() as f64 * 1e-14);
        self.prepare(groups, args)?;
        let rows = groups.len();
        self.snapshot.resize(PLAIN_CHUNK.min(rows));
        let mut sel = std::mem::take(&mut self.selection);
        sel.values.resize_with(self.aggregates.len(), Vec::new);
        sel.counts.resize_with(self.n_args, Vec::new);
        let mut outs: Vec<Finished> = self
            .aggregates
            .iter()
            .map(|a| Finished::with_capacity(a.kind, 0))
            .collect();
        let mut kept_rows = Vec::new();
        let mut start = 0;
        while start < rows {
            let len = PLAIN_CHUNK.min(rows - start);
            let mut screened = false;
            for &arg in &order {
                let input = args[arg].slice(start, len);
                let chunk = &groups[start..start + len];
                match screen.filter(|sc| sc.arg == arg) {
                    Some(sc) => {
                        let mut screening =
                            Screening::new(sc, margin, &mut sel.candidates, &mut sel.compact);
                        self.push_plain_chunk(arg, chunk, &input, &mut screening);
                        screened = true;
                    }
                    None => {
                        self.push_plain_chunk(arg, chunk, &input, &mut NoScreen);
                        if screened {
                            sel.compact.gather(&self.snapshot, &sel.candidates);
                        }
                    }
                }
                let snap = if screened {
                    &sel.compact
                } else {
                    &self.snapshot
                };
                let m = if screened { sel.candidates.len() } else { len };
                // Buffers of a chunk's length (resized only at the batch's last chunk).
                let counts = &mut sel.counts[arg];
                counts.resize(m, 0.0);
                counts.copy_from_slice(&snap.n[..m]);
                for (a, values) in self.aggregates.iter().zip(&mut sel.values) {
                    if a.arg == arg {
                        values.resize(m, 0.0);
                        chunk_values(snap, self.frame, a.kind, values);
                    }
                }
            }
            let m = if screened { sel.candidates.len() } else { len };
            sel.kept.clear();
            if m > 0 {
                let views: Vec<&[f64]> = sel.values.iter().map(Vec::as_slice).collect();
                select(
                    Chunk {
                        start,
                        len,
                        rows: screened.then_some(sel.candidates.as_slice()),
                        aggregates: &views,
                    },
                    &mut sel.kept,
                );
            }
            if let Some(&bad) = sel.kept.iter().find(|&&k| k as usize >= m) {
                self.selection = sel;
                return Err(OperatorError::InvalidInput(format!(
                    "selector kept row {bad} of {m}"
                )));
            }
            for ((a, values), out) in self.aggregates.iter().zip(&sel.values).zip(&mut outs) {
                let counts = &sel.counts[a.arg];
                for &k in &sel.kept {
                    out.push(values[k as usize], counts[k as usize]);
                }
            }
            if screened {
                kept_rows.extend(
                    sel.kept
                        .iter()
                        .map(|&k| start as u32 + sel.candidates[k as usize]),
                );
            } else {
                kept_rows.extend(sel.kept.iter().map(|&k| start as u32 + k));
            }
            start += len;
        }
        self.selection = sel;
        Ok(Selected {
            rows: kept_rows,
            outputs: outs.into_iter().map(Finished::finish).collect(),
        })
    }
}

/// What the plain pass ([`push_rows_plain`]) does with each row's running sums besides
/// keeping them: nothing more ([`NoScreen`]: every row's sums land in the snapshot), or a
/// [`Screen`] applied on the fly ([`Screening`]).
trait RowScreen {
    /// Whether rows are screened: a tick's rows then skip the snapshot, and only the rows
    /// the screen keeps are written, by [`RowScreen::keep`].
    const ACTIVE: bool;

    /// Whether the screen rules out the row of value `x` (NaN when missing) whose frame
    /// has the running sums `(n, shift, s1, s2)`.
    fn ruled_out(&self, n: f64, x: f64, shift: f64, s1: f64, s2: f64) -> bool;

    /// Keeps row `row` of the chunk with its running sums.
    fn keep(&mut self, row: usize, n: f64, shift: f64, s1: f64, s2: f64);

    /// Keeps row `row` of value `x` unless the screen rules it out.
    #[inline(always)]
    fn offer(&mut self, row: usize, x: f64, n: f64, shift: f64, s1: f64, s2: f64) {
        if !self.ruled_out(n, x, shift, s1, s2) {
            self.keep(row, n, shift, s1, s2);
        }
    }

    /// The number of rows kept so far.
    fn kept(&self) -> usize;

    /// Forgets the rows kept after the first `len`.
    fn truncate(&mut self, len: usize);
}

/// The plain pass without a screen.
struct NoScreen;

impl RowScreen for NoScreen {
    const ACTIVE: bool = false;

    #[inline(always)]
    fn ruled_out(&self, _: f64, _: f64, _: f64, _: f64, _: f64) -> bool {
        false
    }

    #[inline(always)]
    fn keep(&mut self, _: usize, _: f64, _: f64, _: f64, _: f64) {}

    #[inline(always)]
    fn kept(&self) -> usize {
        0
    }

    #[inline(always)]
    fn truncate(&mut self, _: usize) {}
}

/// A [`Screen`] applied by the plain pass as it pushes the rows of a chunk: the rows it
/// does not rule out (positions within the chunk, ascending) and their running sums, in
/// the order of the rows. Screening in the pass saves writing every row's sums to the
/// snapshot and reading them back: about 1 % of the rows pass a 3σ screen.
struct Screening<'a> {
    /// `k²`, times the margin that covers the rounding of both forms of the test.
    k2: f64,
    sample: bool,
    /// The fewest present values a tested row needs (2 for the sample deviation).
    least: f64,
    rows: &'a mut Vec<u32>,
    sums: &'a mut Snapshot,
}

impl<'a> Screening<'a> {
    /// A screen with nothing kept yet (`rows` and `sums` emptied).
    fn new(sc: Screen, margin: f64, rows: &'a mut Vec<u32>, sums: &'a mut Snapshot) -> Self {
        let mut screening = Self {
            k2: sc.k * sc.k * margin,
            sample: sc.sample,
            least: if sc.sample { 2.0 } else { 1.0 },
            rows,
            sums,
        };
        screening.truncate(0);
        screening
    }
}

impl RowScreen for Screening<'_> {
    const ACTIVE: bool = true;

    #[inline(always)]
    fn ruled_out(&self, n: f64, x: f64, shift: f64, s1: f64, s2: f64) -> bool {
        let d = n * (x - shift) - s1;
        let spread = n * s2 - s1 * s1;
        let (lhs, rhs) = if self.sample {
            (d * d * (n - 1.0), self.k2 * n * spread)
        } else {
            (d * d, self.k2 * spread)
        };
        // NaN anywhere makes it false.
        (lhs < rhs) & rhs.is_finite() & (n >= self.least)
    }

    #[inline(always)]
    fn keep(&mut self, row: usize, n: f64, shift: f64, s1: f64, s2: f64) {
        self.rows.push(row as u32);
        self.sums.n.push(n);
        self.sums.shift.push(shift);
        self.sums.s1.push(s1);
        self.sums.s2.push(s2);
    }

    #[inline(always)]
    fn kept(&self) -> usize {
        self.rows.len()
    }

    fn truncate(&mut self, len: usize) {
        self.rows.truncate(len);
        for v in [
            &mut self.sums.n,
            &mut self.sums.shift,
            &mut self.sums.s1,
            &mut self.sums.s2,
        ] {
            v.truncate(len);
        }
    }
}

/// Writes over `out` the values of aggregate `kind` for the first `out.len()` rows of
/// `snap` as `f64`, NaN where the aggregate is NULL (the selection path's view of
/// [`Finished`]).
fn chunk_values(snap: &Snapshot, frame: Frame, kind: AggKind, out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        #[allow(unsafe_code)]
        // SAFETY: the CPU has AVX2, as just checked.
        return unsafe { chunk_values_avx2(snap, frame, kind, out) };
    }
    chunk_values_body(snap, frame, kind, out);
}

/// [`chunk_values`] compiled for AVX2 (see [`push_rows_plain_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn chunk_values_avx2(snap: &Snapshot, frame: Frame, kind: AggKind, out: &mut [f64]) {
    chunk_values_body(snap, frame, kind, out);
}

#[inline(always)]
fn chunk_values_body(snap: &Snapshot, frame: Frame, kind: AggKind, out: &mut [f64]) {
    let n = &snap.n[..out.len()];
    if kind == AggKind::Count {
        out.copy_from_slice(n);
        return;
    }
    aggregate_into(snap, frame, kind, out);
    let least = least_present(kind);
    for (v, &n) in out.iter_mut().zip(n) {
        *v = if n < least { f64::NAN } else { *v };
    }
}

/// Rows of aggregate `kind` with fewer present values than this are NULL.
fn least_present(kind: AggKind) -> f64 {
    match kind {
        AggKind::VarSamp | AggKind::StddevSamp => 2.0,
        _ => 1.0,
    }
}

/// Writes over `out` the aggregate `kind` (not `COUNT`) of the first `out.len()` rows of
/// `snap`, taken over `frame`, whether NULL or not.
#[inline(always)]
fn aggregate_into(snap: &Snapshot, frame: Frame, kind: AggKind, out: &mut [f64]) {
    let len = out.len();
    let n = &snap.n[..len];
    let (shift, s1, s2) = (&snap.shift[..len], &snap.s1[..len], &snap.s2[..len]);
    let bounded = frame.is_bounded();
    // Σ(x − mean)² from the shifted sums (bounded) or Welford's M2 (unbounded).
    let m2 = |n: f64, s1: f64, s2: f64| {
        if bounded {
            (s2 - s1 * s1 / n).max(0.0)
        } else {
            s2.max(0.0)
        }
    };
    // Zipped slices, so that the loops have no bounds checks and vectorise.
    #[inline(always)]
    fn map3(out: &mut [f64], a: &[f64], b: &[f64], c: &[f64], f: impl Fn(f64, f64, f64) -> f64) {
        for (((o, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
            *o = f(a, b, c);
        }
    }
    match kind {
        AggKind::Sum if bounded => map3(out, n, s1, shift, |n, s1, shift| s1 + n * shift),
        AggKind::Sum => out.copy_from_slice(s1),
        AggKind::Avg if bounded => map3(out, n, s1, shift, |n, s1, shift| shift + s1 / n),
        AggKind::Avg => out.copy_from_slice(shift),
        AggKind::VarPop => map3(out, n, s1, s2, |n, s1, s2| m2(n, s1, s2) / n),
        AggKind::StddevPop => map3(out, n, s1, s2, |n, s1, s2| (m2(n, s1, s2) / n).sqrt()),
        AggKind::VarSamp => map3(out, n, s1, s2, |n, s1, s2| m2(n, s1, s2) / (n - 1.0)),
        AggKind::StddevSamp => map3(out, n, s1, s2, |n, s1, s2| {
            (m2(n, s1, s2) / (n - 1.0)).sqrt()
        }),
        AggKind::Min => out.copy_from_slice(&snap.min[..len]),
        AggKind::Max => out.copy_from_slice(&snap.max[..len]),
        AggKind::Count => unreachable!("counts are integers"),
        AggKind::Forecast { .. } => {
            unreachable!("forecast aggregates are computed from gathered windows")
        }
        AggKind::Quantile(_)
        | AggKind::FirstValue
        | AggKind::MinOfLast(_)
        | AggKind::MaxOfLast(_) => {
            unreachable!("quantiles, first values and shorter frames' extrema are taken row by row")
        }
    }
}

/// The output of one aggregate, built from snapshots (chunk by chunk on the plain path).
enum Finished {
    Count(Vec<i64>),
    Values {
        values: Vec<f64>,
        /// Rows with fewer present values than this are NULL.
        least: f64,
        /// Validity, started at the first NULL row.
        valid: Option<arrow::array::BooleanBufferBuilder>,
    },
}

impl Finished {
    fn with_capacity(kind: AggKind, rows: usize) -> Self {
        match kind {
            AggKind::Count => Finished::Count(Vec::with_capacity(rows)),
            _ => Finished::Values {
                values: Vec::with_capacity(rows),
                least: least_present(kind),
                valid: None,
            },
        }
    }

    /// Appends the aggregate of the first `len` rows of `snap`, taken over `frame`.
    fn extend(&mut self, snap: &Snapshot, len: usize, frame: Frame, kind: AggKind) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2, as just checked.
            return unsafe { self.extend_avx2(snap, len, frame, kind) };
        }
        self.extend_body(snap, len, frame, kind);
    }

    /// [`Finished::extend`] compiled for AVX2 (see [`push_rows_plain_avx2`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn extend_avx2(&mut self, snap: &Snapshot, len: usize, frame: Frame, kind: AggKind) {
        self.extend_body(snap, len, frame, kind);
    }

    #[inline(always)]
    fn extend_body(&mut self, snap: &Snapshot, len: usize, frame: Frame, kind: AggKind) {
        let n = &snap.n[..len];
        match self {
            Finished::Count(counts) => counts.extend(n.iter().map(|&c| count_to_i64(c))),
            Finished::Values {
                values,
                least,
                valid,
            } => {
                let before = values.len();
                values.resize(before + len, 0.0);
                aggregate_into(snap, frame, kind, &mut values[before..]);
                let least = *least;
                // Counted rather than `any`: a scan without an early exit vectorises, and
                // almost every chunk has no short frame to find.
                if valid.is_none() && n.iter().map(|&c| usize::from(c < least)).sum::<usize>() > 0 {
                    let mut b = arrow::array::BooleanBufferBuilder::new(values.capacity());
                    b.append_n(before, true);
                    *valid = Some(b);
                }
                if let Some(b) = valid {
                    for &c in n {
                        b.append(c >= least);
                    }
                }
            }
        }
    }

    /// Appends one row: its value `v` (ignored for `COUNT`) and its count of present values.
    fn push(&mut self, v: f64, count: f64) {
        match self {
            Finished::Count(counts) => counts.push(count_to_i64(count)),
            Finished::Values {
                values,
                least,
                valid,
            } => {
                let present = count >= *least;
                if valid.is_none() && !present {
                    let mut b = arrow::array::BooleanBufferBuilder::new(values.capacity());
                    b.append_n(values.len(), true);
                    *valid = Some(b);
                }
                values.push(v);
                if let Some(b) = valid {
                    b.append(present);
                }
            }
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Finished::Count(counts) => Arc::new(Int64Array::new(counts.into(), None)),
            Finished::Values { values, valid, .. } => {
                let nulls = valid.map(|mut b| NullBuffer::new(b.finish()));
                Arc::new(Float64Array::new(values.into(), nulls))
            }
        }
    }
}

/// The saved state of one series: everything needed to continue it bit for bit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesState {
    /// The running statistics.
    stats: Series,
    /// `ROWS` frames: the ring in slot order (not oldest first), so that an exact
    /// recomputation after a restore sums in the same order as before it. `RANGE` frames: the
    /// frame's values, oldest first.
    ring: Vec<f64>,
    /// `RANGE` frames: the event times of `ring`'s values.
    times: Vec<i64>,
    /// Operators that keep presence bits instead of values: the frame's rows (the bits'
    /// count), the bits, and the quantile's candidates, which cannot be rebuilt without the
    /// values.
    capacity: usize,
    present: Vec<u64>,
    top: Option<TopK>,
    min: Vec<(u64, f64)>,
    max: Vec<(u64, f64)>,
}

/// The saved state of one partition key of a [`WindowOperator`]: its key values and one
/// [`SeriesState`] per argument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    /// The partition key, one value per `PARTITION BY` expression.
    pub key: Vec<KeyValue>,
    /// One series per argument.
    pub series: Vec<SeriesState>,
}

impl WindowOperator {
    /// The state of group `group` (a dense id of this operator's [`crate::keys::KeyInterner`]),
    /// with `key` as its key values. `None` if the group holds no state.
    pub fn export_group(&self, group: u32, key: Vec<KeyValue>) -> Option<GroupState> {
        let base = group as usize * self.n_args;
        if base + self.n_args > self.series_count() {
            return None;
        }
        let cap = self.frame.capacity();
        let series = (0..self.n_args)
            .map(|a| {
                let words = self.presence_words;
                let (ring, times) = match self.timed.get(base + a) {
                    Some(frame) => frame.iter().map(|&(t, v)| (v, t)).unzip(),
                    None if words > 0 => (Vec::new(), Vec::new()),
                    None => (
                        (0..cap)
                            .map(|k| self.slab[k * self.stride + base + a])
                            .collect(),
                        Vec::new(),
                    ),
                };
                let (min, max) = match self.extremes.get(base + a) {
                    Some(e) => (
                        e.min.iter().copied().collect(),
                        e.max.iter().copied().collect(),
                    ),
                    None => (Vec::new(), Vec::new()),
                };
                let (present, top) = if words > 0 {
                    let s = base + a;
                    let top = matches!(self.ordered[a], Order::Top(_)).then(|| self.tops[s].live());
                    (self.present[s * words..][..words].to_vec(), top)
                } else {
                    (Vec::new(), None)
                };
                SeriesState {
                    stats: self.stats(base + a, a),
                    ring,
                    times,
                    capacity: if words > 0 { cap } else { 0 },
                    present,
                    top,
                    min,
                    max,
                }
            })
            .collect();
        Some(GroupState { key, series })
    }

    /// Installs a saved group as group `group`, replacing whatever it held. The saved state
    /// must come from an operator with the same frame and arguments.
    pub fn import_group(&mut self, group: u32, state: &GroupState) -> Result<()> {
        let cap = self.frame.capacity();
        if state.series.len() != self.n_args {
            return Err(OperatorError::InvalidInput(format!(
                "saved window state has {} arguments, the operator {}",
                state.series.len(),
                self.n_args
            )));
        }
        let timed = matches!(self.frame, Frame::Range { .. });
        if timed {
            if let Some(s) = state.series.iter().find(|s| {
                s.times.len() != s.ring.len()
                    || s.ring.len() != s.stats.rows
                    || !s.times.is_sorted()
            }) {
                return Err(OperatorError::InvalidInput(format!(
                    "saved RANGE window state is inconsistent: {} rows, {} values, {} times",
                    s.stats.rows,
                    s.ring.len(),
                    s.times.len()
                )));
            }
        } else if self.presence_words > 0 {
            for (a, s) in state.series.iter().enumerate() {
                // The candidates were chosen for the `k` of the saved operator; with the values
                // gone they cannot be chosen again for another.
                let want_k = match self.ordered[a] {
                    Order::Top(k) => Some(k),
                    _ => None,
                };
                let top_k = s.top.as_ref().filter(|t| t.is_consistent()).map(TopK::k);
                // A quantile's candidates for the same `k` (or none left); no candidates for
                // an argument of MIN/MAX only.
                let top_fits = match (want_k, &s.top) {
                    (Some(k), Some(top)) => top_k == Some(k) || top_k.is_some() && top.is_empty(),
                    (None, None) => true,
                    _ => false,
                };
                if s.capacity != cap
                    || s.present.len() != self.presence_words
                    || !s.ring.is_empty()
                    || !top_fits
                {
                    return Err(OperatorError::InvalidInput(format!(
                        "saved window state does not fit: a frame of {} rows with {} candidates \
                         (k = {:?}), the operator's frame {cap} rows with k = {want_k:?}",
                        s.capacity,
                        s.top.as_ref().map_or(0, TopK::len),
                        top_k,
                    )));
                }
            }
        } else if let Some(s) = state
            .series
            .iter()
            .find(|s| s.ring.len() != cap || !s.times.is_empty() || !s.present.is_empty())
        {
            return Err(OperatorError::InvalidInput(format!(
                "saved window state holds {} rows per series, the frame {cap}",
                s.ring.len()
            )));
        }
        if cap > 0
            && let Some(s) = state
                .series
                .iter()
                .find(|s| s.stats.head >= cap || s.stats.rows > cap)
        {
            return Err(OperatorError::InvalidInput(format!(
                "saved window state is inconsistent: {} rows, next slot {}, frame {cap}",
                s.stats.rows, s.stats.head
            )));
        }
        self.ensure_groups(group as usize + 1);
        let base = group as usize * self.n_args;
        for (a, saved) in state.series.iter().enumerate() {
            if self.columnar(a) {
                self.columns.set(base + a, &saved.stats);
            } else {
                self.series[base + a] = saved.stats.clone();
            }
            if self.presence_words > 0 {
                let words = self.presence_words;
                let s = base + a;
                self.present[s * words..][..words].copy_from_slice(&saved.present);
                if let Some(top) = &saved.top {
                    // No candidate left: nothing was chosen for the saved `k`.
                    self.tops[s] = if !top.is_empty() {
                        top.clone()
                    } else {
                        TopK::default()
                    };
                }
                if let Some(e) = self.extremes.get_mut(s) {
                    e.min = saved.min.iter().copied().collect();
                    e.max = saved.max.iter().copied().collect();
                }
                continue;
            }
            if timed {
                self.timed[base + a] = saved
                    .times
                    .iter()
                    .copied()
                    .zip(saved.ring.iter().copied())
                    .collect();
            } else {
                for (k, &v) in saved.ring.iter().enumerate() {
                    self.slab[k * self.stride + base + a] = v;
                }
            }
            if let Some(e) = self.extremes.get_mut(base + a) {
                e.min = saved.min.iter().copied().collect();
                e.max = saved.max.iter().copied().collect();
            }
            // The frame's rows, oldest first: a RANGE frame's saved values, or the ring's last
            // `rows` slots before `head`.
            let rows = saved.stats.rows;
            let frame: Vec<f64> = if self.ordered[a] == Order::None {
                Vec::new()
            } else if timed {
                saved.ring.clone()
            } else {
                (0..rows)
                    .map(|k| saved.ring[(saved.stats.head + cap - rows + k) % cap])
                    .collect()
            };
            match self.ordered[a] {
                Order::None => {}
                Order::Sorted => {
                    self.sorted[base + a] = SortedBlocks::from_values(
                        frame.into_iter().filter(|v| !v.is_nan()).collect(),
                    );
                }
                Order::Top(k) => {
                    let first = saved.stats.seq - rows as u64;
                    let mut top = TopK::default();
                    for (seq, v) in (first..).zip(frame) {
                        if !v.is_nan() {
                            top.push(seq, v, k);
                        }
                    }
                    self.tops[base + a] = top;
                }
            }
        }
        Ok(())
    }
}

/// A count held as `f64` (a whole number in `0 ..= 2^52`) as `i64`, without the
/// saturating conversion's per-value range checks (which keep `as` from vectorising): added
/// to 2^52, the count is the low bits of the sum's representation.
#[inline]
fn count_to_i64(c: f64) -> i64 {
    const TWO_52: f64 = 4_503_599_627_370_496.0;
    debug_assert!(
        (0.0..=TWO_52).contains(&c) && c.fract() == 0.0,
        "not a count: {c}"
    );
    ((c + TWO_52).to_bits() - TWO_52.to_bits()) as i64
}

/// Per-row copies of a series' running sums, taken right after the row was pushed.
#[derive(Debug, Default)]
struct Snapshot {
    n: Vec<f64>,
    shift: Vec<f64>,
    s1: Vec<f64>,
    s2: Vec<f64>,
    min: Vec<f64>,
    max: Vec<f64>,
    /// Bounded frames: the value of the frame's oldest row.
    first: Vec<f64>,
    /// One column per quantile aggregate of the argument being processed.
    quantiles: Vec<Vec<f64>>,
    /// One column per [`AggKind::MinOfLast`] or [`AggKind::MaxOfLast`] aggregate of the
    /// argument being processed.
    lasts: Vec<Vec<f64>>,
}

impl Snapshot {
    /// The running sums of `from`'s rows `rows`, in that order (the columns of the plain
    /// path only).
    fn gather(&mut self, from: &Snapshot, rows: &[u32]) {
        for (to, from) in [
            (&mut self.n, &from.n),
            (&mut self.shift, &from.shift),
            (&mut self.s1, &from.s1),
            (&mut self.s2, &from.s2),
        ] {
            to.clear();
            to.extend(rows.iter().map(|&r| from[r as usize]));
        }
    }

    fn resize(&mut self, rows: usize) {
        for v in [
            &mut self.n,
            &mut self.shift,
            &mut self.s1,
            &mut self.s2,
            &mut self.min,
            &mut self.max,
            &mut self.first,
        ] {
            if v.len() < rows {
                v.resize(rows, 0.0);
            }
        }
    }
}

/// The column of a forecast aggregate: NULL for rows without a full window.
fn forecast_column(
    g: &Gathered,
    input: &Float64Array,
    rows: usize,
    output: ForecastOutput,
) -> ArrayRef {
    let mut values = vec![0.0; rows];
    let mut valid = vec![false; rows];
    for (&row, f) in g.rows.iter().zip(&g.forecasts) {
        let v = match output {
            ForecastOutput::Value => f.value,
            ForecastOutput::Residual => (input.value(row) - f.value) / f.scale,
        };
        let present = !v.is_nan()
            && match output {
                ForecastOutput::Value => true,
                ForecastOutput::Residual => input.is_valid(row),
            };
        values[row] = v;
        valid[row] = present;
    }
    Arc::new(Float64Array::new(
        values.into(),
        Some(NullBuffer::new(BooleanBuffer::from(valid))),
    ))
}

/// A column holding `values`, NULL where a value is NaN (missing).
fn present_column(values: &[f64]) -> ArrayRef {
    let valid = BooleanBuffer::from_iter(values.iter().map(|v| !v.is_nan()));
    Arc::new(Float64Array::new(
        values.to_vec().into(),
        Some(NullBuffer::new(valid)),
    ))
}

/// The values of `kind` for the first `rows` snapshot rows; NULL where SQL says so.
fn finish(snap: &Snapshot, rows: usize, frame: Frame, kind: AggKind) -> ArrayRef {
    let mut out = Finished::with_capacity(kind, rows);
    out.extend(snap, rows, frame, kind);
    out.finish()
}

impl Extrema {
    /// Drops the candidates older than sequence number `first`, the frame's oldest row.
    fn evict_before(&mut self, first: u64) {
        while self.min.front().is_some_and(|&(s, _)| s < first) {
            self.min.pop_front();
        }
        while self.max.front().is_some_and(|&(s, _)| s < first) {
            self.max.pop_front();
        }
    }
}

fn push_extrema(e: &mut Extrema, seq: u64, x: f64) {
    if x.is_nan() {
        return;
    }
    if e.sides.min {
        while e.min.back().is_some_and(|&(_, v)| v >= x) {
            e.min.pop_back();
        }
        e.min.push_back((seq, x));
    }
    if e.sides.max {
        while e.max.back().is_some_and(|&(_, v)| v <= x) {
            e.max.pop_back();
        }
        e.max.push_back((seq, x));
    }
}

/// The ring of one series inside the slot-major slab.
struct Ring<'a> {
    slab: &'a mut [f64],
    stride: usize,
    series: usize,
    cap: usize,
}

impl Ring<'_> {
    fn get(&self, slot: usize) -> f64 {
        self.slab[slot * self.stride + self.series]
    }
    fn set(&mut self, slot: usize, v: f64) {
        self.slab[slot * self.stride + self.series] = v;
    }
}

impl Series {
    /// Takes the frame's oldest row, `old`, out of the sums of a bounded frame.
    fn evict(&mut self, old: f64) {
        if !old.is_nan() {
            self.n -= 1;
            if self.n == 0 {
                self.s1 = 0.0;
                self.s2 = 0.0;
            } else {
                let d = old - self.shift;
                self.s1 -= d;
                self.s2 -= d * d;
            }
        }
        self.rows -= 1;
        self.evictions += 1;
    }

    /// Adds the newest row, `x`, to the sums of a bounded frame, and to `extrema` (whose
    /// rows older than the frame leave). Advances the sequence number.
    fn add(&mut self, x: f64, extrema: Option<&mut Extrema>) {
        self.rows += 1;
        if !x.is_nan() {
            if self.n == 0 {
                self.shift = x;
                self.s1 = 0.0;
                self.s2 = 0.0;
            } else {
                let d = x - self.shift;
                self.s1 += d;
                self.s2 += d * d;
            }
            self.n += 1;
        }
        if let Some(e) = extrema {
            push_extrema(e, self.seq, x);
            // The frame holds sequence numbers (seq + 1 - rows ..= seq].
            e.evict_before(self.seq + 1 - self.rows as u64);
        }
        self.seq += 1;
    }

    /// Whether the shifted sums are due an exact recomputation over a frame of `rows` rows:
    /// at least every 16 frame lengths (amortised O(1), the frame being what a
    /// recomputation walks) and after a level shift.
    fn needs_recompute(&self, rows: usize) -> bool {
        self.evictions > 0 && (self.evictions >= REFRESH_FRAMES * rows || cancels(self))
    }
}

fn push_bounded(series: &mut Series, mut ring: Ring<'_>, x: f64, extrema: Option<&mut Extrema>) {
    let cap = ring.cap;
    if series.rows == cap {
        series.evict(ring.get(series.head));
    }
    ring.set(series.head, x);
    series.head = if series.head + 1 == cap {
        0
    } else {
        series.head + 1
    };
    series.add(x, extrema);
    if series.needs_recompute(cap) {
        recompute(series, &ring, x);
    }
}

/// Pushes `(t, x)` onto a [`Frame::Range`] series after evicting the rows older than
/// `t − preceding_ms`: the same sums as [`push_bounded`], over a deque of (time, value)
/// instead of a ring. `sorted` (when quantiles read the series) follows the frame's values.
fn push_timed(
    series: &mut Series,
    frame: &mut VecDeque<(i64, f64)>,
    (t, x): (i64, f64),
    preceding_ms: i64,
    mut sorted: Option<&mut SortedBlocks>,
    extrema: Option<&mut Extrema>,
) {
    let oldest = t.saturating_sub(preceding_ms);
    while let Some(&(at, old)) = frame.front()
        && at < oldest
    {
        frame.pop_front();
        series.evict(old);
        if let Some(sorted) = sorted.as_deref_mut()
            && !old.is_nan()
        {
            let removed = sorted.remove(old);
            debug_assert!(removed, "an evicted value is in the sorted set");
        }
    }
    frame.push_back((t, x));
    series.add(x, extrema);
    if let Some(sorted) = sorted
        && !x.is_nan()
    {
        sorted.insert(x);
    }
    if series.needs_recompute(series.rows) {
        recompute_from(series, frame.iter().map(|&(_, v)| v), x);
    }
}

/// [`push_bounded`] for an operator that keeps presence bits instead of values (see
/// `WindowOperator::presence_words`): only the row and value counts, and `extrema`.
fn push_presence(
    series: &mut Series,
    bits: &mut [u64],
    cap: usize,
    x: f64,
    extrema: Option<&mut Extrema>,
) {
    let (word, bit) = (series.head / 64, 1u64 << (series.head % 64));
    if series.rows == cap {
        if bits[word] & bit != 0 {
            series.n -= 1;
        }
        series.rows -= 1;
    }
    if x.is_nan() {
        bits[word] &= !bit;
    } else {
        bits[word] |= bit;
        series.n += 1;
    }
    series.head = if series.head + 1 == cap {
        0
    } else {
        series.head + 1
    };
    series.rows += 1;
    if let Some(e) = extrema {
        push_extrema(e, series.seq, x);
        e.evict_before(series.seq + 1 - series.rows as u64);
    }
    series.seq += 1;
}

/// The state [`push_rows_plain`] works on.
struct PlainRows<'a> {
    series: &'a mut SeriesColumns,
    slab: &'a mut [f64],
    stride: usize,
    cap: usize,
    n_args: usize,
    arg: usize,
}

/// Pass 1 of [`WindowOperator::process`] for the common case, a bounded frame whose
/// argument needs neither MIN/MAX nor a forecast: the same steps as [`push_bounded`], with
/// the frame, extrema and forecast tests taken out of the loop. Runs of rows that are one
/// tick of consecutive series (see [`SeriesColumns`]) go through [`push_tick`].
fn push_rows_plain<S: RowScreen>(
    st: PlainRows<'_>,
    groups: &[u32],
    input: &Float64Array,
    snap: &mut Snapshot,
    screen: &mut S,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        #[allow(unsafe_code)]
        // SAFETY: the CPU has AVX2, as just checked.
        return unsafe { push_rows_plain_avx2(st, groups, input, snap, screen) };
    }
    push_rows_plain_body(st, groups, input, snap, screen);
}

/// [`push_rows_plain`] compiled for AVX2: four `f64` lanes per instruction in the tick pass
/// ([`push_tick`]) instead of the baseline's two, and four ids or counts in its run and
/// readiness checks ([`run_length`], [`tick_ready`]). The operations are the same IEEE ones
/// (Rust never contracts a multiply and an add into a fused one), so the results are bit
/// for bit those of the baseline build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn push_rows_plain_avx2<S: RowScreen>(
    st: PlainRows<'_>,
    groups: &[u32],
    input: &Float64Array,
    snap: &mut Snapshot,
    screen: &mut S,
) {
    push_rows_plain_body(st, groups, input, snap, screen);
}

#[inline(always)]
fn push_rows_plain_body<S: RowScreen>(
    mut st: PlainRows<'_>,
    groups: &[u32],
    input: &Float64Array,
    snap: &mut Snapshot,
    screen: &mut S,
) {
    let rows = groups.len();
    let raw = &input.values()[..rows];
    let nulls = input.nulls().filter(|n| n.null_count() > 0);
    let mut i = 0;
    while i < rows {
        // The run of consecutive series from row `i` (one argument only: with several,
        // consecutive groups are not adjacent in the columns).
        let g = groups[i] as usize;
        let mut len = 1;
        if st.n_args == 1 && nulls.is_none() {
            let most = (rows - i).min(st.series.len() - g);
            len = run_length(&groups[i..i + most]);
        }
        let ready = if len >= TICK_RUN {
            tick_ready(st.series, g, len, st.cap)
        } else {
            None
        };
        if let Some(full) = ready {
            push_tick(&mut st, g, &raw[i..i + len], full, snap, i, screen);
        } else {
            for r in i..i + len {
                let x = match nulls {
                    Some(nb) if nb.is_null(r) => f64::NAN,
                    _ => raw[r],
                };
                let s = groups[r] as usize * st.n_args + st.arg;
                push_row_plain(&mut st, s, x, snap, r);
                if S::ACTIVE {
                    screen.offer(r, x, snap.n[r], snap.shift[r], snap.s1[r], snap.s2[r]);
                }
            }
        }
        i += len;
    }
}

/// The length of the run of consecutive ids that `ids` starts with (at least 1 when `ids`
/// is not empty): 16 ids at a time, compared without an early exit so that the comparison
/// vectorises, then one at a time.
#[inline(always)]
fn run_length(ids: &[u32]) -> usize {
    let Some(&g) = ids.first() else {
        return 0;
    };
    let mut len = 1;
    while len + 16 <= ids.len() {
        let base = g.wrapping_add(len as u32);
        let consecutive = ids[len..len + 16]
            .iter()
            .zip(0u32..)
            .fold(true, |ok, (&x, k)| ok & (x == base.wrapping_add(k)));
        if !consecutive {
            break;
        }
        len += 16;
    }
    while len < ids.len() && ids[len] == g.wrapping_add(len as u32) {
        len += 1;
    }
    len
}

/// The shortest run of consecutive series worth a [`push_tick`].
const TICK_RUN: usize = 8;

/// Whether series `g .. g + len` can take their next row as one [`push_tick`]: they are
/// all at the same ring slot and either all full and not due a refresh on this row
/// (`Some(true)`) or all still filling, with the same number of rows (`Some(false)`).
#[inline(always)]
fn tick_ready(cols: &SeriesColumns, g: usize, len: usize, cap: usize) -> Option<bool> {
    let (head, rows) = (cols.head[g], cols.rows[g]);
    let refresh = REFRESH_FRAMES * cap;
    let mut ok = true;
    for s in g..g + len {
        ok &= (cols.head[s] == head) & (cols.rows[s] == rows) & (cols.evictions[s] + 1 < refresh);
    }
    ok.then_some(rows == cap)
}

/// Whether the AVX2 builds of the vectorised loops ([`push_rows_plain_avx2`],
/// [`Finished::extend_avx2`]) may run: the CPU has AVX2 (a cached check) and, in tests, the
/// baseline build is not forced.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn avx2() -> bool {
    #[cfg(test)]
    if tests::BASELINE.with(std::cell::Cell::get) {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx2")
}

/// [`push_row_plain`] for one row of each of the series `g .. g + xs.len()`, rows
/// `row0 ..` of the snapshot, where [`tick_ready`] holds (`full` as it says): the same
/// arithmetic, written as selects over contiguous columns so that it vectorises. The few
/// full series whose sums then cancel are recomputed after the pass, as [`push_row_plain`]
/// would. With an active `screen`, the rows' sums are screened in the pass, sixteen rows at
/// a time, instead of being written to the snapshot.
#[inline(always)]
fn push_tick<S: RowScreen>(
    st: &mut PlainRows<'_>,
    g: usize,
    xs: &[f64],
    full: bool,
    snap: &mut Snapshot,
    row0: usize,
    screen: &mut S,
) {
    let len = xs.len();
    let (cap, stride) = (st.cap, st.stride);
    let cols = &mut *st.series;
    let head = cols.head[g];
    let slot = head * stride + g;
    let kept_before = screen.kept();
    let mut cancelled = false;
    {
        let olds = &mut st.slab[slot..slot + len];
        let n = &mut cols.n[g..g + len];
        let shift = &mut cols.shift[g..g + len];
        let s1 = &mut cols.s1[g..g + len];
        let s2 = &mut cols.s2[g..g + len];
        let sn = &mut snap.n[row0..row0 + len];
        let ssh = &mut snap.shift[row0..row0 + len];
        let ss1 = &mut snap.s1[row0..row0 + len];
        let ss2 = &mut snap.s2[row0..row0 + len];
        let mut k0 = 0;
        while k0 < len {
            let end = if S::ACTIVE { (k0 + 16).min(len) } else { len };
            let mut mask = 0u32;
            for k in k0..end {
                let (old, x) = (olds[k], xs[k]);
                let (had, has) = (full & !old.is_nan(), !x.is_nan());
                let (sh, a, b) = (shift[k], s1[k], s2[k]);
                // Evict the oldest row (of a full frame).
                let d = old - sh;
                let n1 = if had { n[k] - 1.0 } else { n[k] };
                let emptied = had & (n1 == 0.0);
                let a = if emptied {
                    0.0
                } else if had {
                    a - d
                } else {
                    a
                };
                let b = if emptied {
                    0.0
                } else if had {
                    b - d * d
                } else {
                    b
                };
                // Add the new one.
                let restart = has & (n1 == 0.0);
                let d = x - sh;
                let sh = if restart { x } else { sh };
                let a = if restart {
                    0.0
                } else if has {
                    a + d
                } else {
                    a
                };
                let b = if restart {
                    0.0
                } else if has {
                    b + d * d
                } else {
                    b
                };
                let n2 = if has { n1 + 1.0 } else { n1 };
                olds[k] = x;
                (n[k], shift[k], s1[k], s2[k]) = (n2, sh, a, b);
                if S::ACTIVE {
                    mask |= u32::from(!screen.ruled_out(n2, x, sh, a, b)) << (k - k0);
                } else {
                    (sn[k], ssh[k], ss1[k], ss2[k]) = (n2, sh, a, b);
                }
                cancelled |= b * n2 > 256.0 * (b * n2 - a * a);
            }
            while mask != 0 {
                let k = k0 + mask.trailing_zeros() as usize;
                screen.keep(row0 + k, n[k], shift[k], s1[k], s2[k]);
                mask &= mask - 1;
            }
            k0 = end;
        }
    }
    let next = if head + 1 == cap { 0 } else { head + 1 };
    cols.head[g..g + len].fill(next);
    let counted = if full {
        &mut cols.evictions[g..g + len]
    } else {
        &mut cols.rows[g..g + len]
    };
    for c in counted {
        *c += 1;
    }
    for q in &mut cols.seq[g..g + len] {
        *q += 1;
    }
    // A frame still filling has no eviction yet, so nothing to recompute (as in
    // `push_row_plain`).
    if cancelled && full {
        for k in 0..len {
            let s = g + k;
            let mut series = cols.get(s);
            if cancels(&series) {
                let ring = Ring {
                    slab: &mut *st.slab,
                    stride,
                    series: s,
                    cap,
                };
                recompute(&mut series, &ring, xs[k]);
                cols.set(s, &series);
                let r = row0 + k;
                (snap.n[r], snap.shift[r]) = (series.n as i64 as f64, series.shift);
                (snap.s1[r], snap.s2[r]) = (series.s1, series.s2);
            }
        }
        if S::ACTIVE {
            // Screen the tick again on the recomputed sums.
            screen.truncate(kept_before);
            for (k, &x) in xs.iter().enumerate() {
                let s = g + k;
                screen.offer(
                    row0 + k,
                    x,
                    cols.n[s],
                    cols.shift[s],
                    cols.s1[s],
                    cols.s2[s],
                );
            }
        }
    }
}

/// One row `x` of series `s`, row `r` of the snapshot.
fn push_row_plain(st: &mut PlainRows<'_>, s: usize, x: f64, snap: &mut Snapshot, r: usize) {
    let (cap, stride) = (st.cap, st.stride);
    let cols = &mut *st.series;
    let (mut filled, mut head, mut n) = (cols.rows[s], cols.head[s], cols.n[s]);
    let (mut shift, mut s1, mut s2) = (cols.shift[s], cols.s1[s], cols.s2[s]);
    let mut evictions = cols.evictions[s];
    let slot = head * stride + s;
    if filled == cap {
        let old = st.slab[slot];
        if !old.is_nan() {
            n -= 1.0;
            let d = old - shift;
            s1 -= d;
            s2 -= d * d;
            if n == 0.0 {
                s1 = 0.0;
                s2 = 0.0;
            }
        }
        evictions += 1;
    } else {
        filled += 1;
    }
    st.slab[slot] = x;
    head = if head + 1 == cap { 0 } else { head + 1 };
    if !x.is_nan() {
        if n == 0.0 {
            shift = x;
            s1 = 0.0;
            s2 = 0.0;
        } else {
            let d = x - shift;
            s1 += d;
            s2 += d * d;
        }
        n += 1.0;
    }
    (cols.rows[s], cols.head[s], cols.n[s]) = (filled, head, n);
    (cols.shift[s], cols.s1[s], cols.s2[s]) = (shift, s1, s2);
    cols.evictions[s] = evictions;
    cols.seq[s] += 1;
    if evictions > 0 && (evictions >= REFRESH_FRAMES * cap || s2 * n > 256.0 * (s2 * n - s1 * s1)) {
        let mut series = cols.get(s);
        let ring = Ring {
            slab: &mut *st.slab,
            stride,
            series: s,
            cap,
        };
        recompute(&mut series, &ring, x);
        cols.set(s, &series);
        (n, shift, s1, s2) = (series.n as i64 as f64, series.shift, series.s1, series.s2);
    }
    (snap.n[r], snap.shift[r], snap.s1[r], snap.s2[r]) = (n, shift, s1, s2);
}

/// Bounded frames recompute their sums exactly at least once per this many frame lengths.
const REFRESH_FRAMES: usize = 16;

/// Whether the shift has moved so far from the frame's mean (a level shift) that
/// `Σd² − (Σd)²/n` cancels more than `log10(256)` ≈ 2.4 of the 16 significant digits.
fn cancels(series: &Series) -> bool {
    let n = series.n as f64;
    let (s1, s2) = (series.s1, series.s2);
    s2 * n > 256.0 * (s2 * n - s1 * s1)
}

/// Exact recomputation of the shifted sums from the ring, re-centred on `latest` when present.
fn recompute(series: &mut Series, ring: &Ring<'_>, latest: f64) {
    recompute_from(series, (0..ring.cap).map(|slot| ring.get(slot)), latest);
}

/// Exact recomputation of the shifted sums from the frame's values (missing ones included,
/// as NaN), re-centred on `latest` when present.
fn recompute_from(series: &mut Series, values: impl Iterator<Item = f64>, latest: f64) {
    series.evictions = 0;
    if series.n == 0 {
        return;
    }
    let shift = if latest.is_nan() {
        series.shift + series.s1 / series.n as f64
    } else {
        latest
    };
    let (mut s1, mut s2) = (0.0, 0.0);
    for v in values {
        if !v.is_nan() {
            let d = v - shift;
            s1 += d;
            s2 += d * d;
        }
    }
    series.shift = shift;
    series.s1 = s1;
    series.s2 = s2;
}

fn push_unbounded(series: &mut Series, x: f64, extrema: Option<&mut Extrema>) {
    series.rows = series.rows.saturating_add(1);
    if !x.is_nan() {
        series.n += 1;
        let delta = x - series.shift;
        series.shift += delta / series.n as f64;
        series.s2 += delta * (x - series.shift);
        series.s1 += x;
        if let Some(e) = extrema {
            // Unbounded frames never evict: the deques hold just the extremes.
            if e.sides.min && e.min.front().is_none_or(|&(_, v)| x < v) {
                e.min.clear();
                e.min.push_back((series.seq, x));
            }
            if e.sides.max && e.max.front().is_none_or(|&(_, v)| x > v) {
                e.max.clear();
                e.max.push_back((series.seq, x));
            }
        }
    }
    series.seq += 1;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    thread_local! {
        /// Forces the baseline build of the vectorised loops on this thread.
        pub(crate) static BASELINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Two-pass reference over the frame ending at each row.
    pub(super) fn reference(
        xs: &[Option<f64>],
        preceding: Option<usize>,
        kind: AggKind,
    ) -> Vec<Option<f64>> {
        (0..xs.len())
            .map(|i| {
                let start = preceding.map_or(0, |p| i.saturating_sub(p));
                let present: Vec<f64> = xs[start..=i]
                    .iter()
                    .flatten()
                    .copied()
                    .filter(|v| !v.is_nan())
                    .collect();
                let n = present.len() as f64;
                let mean = present.iter().sum::<f64>() / n;
                let m2: f64 = present.iter().map(|v| (v - mean) * (v - mean)).sum();
                match kind {
                    AggKind::Count => Some(n),
                    _ if present.is_empty() => None,
                    AggKind::Sum => Some(present.iter().sum()),
                    AggKind::Avg => Some(mean),
                    AggKind::VarPop => Some(m2 / n),
                    AggKind::StddevPop => Some((m2 / n).sqrt()),
                    AggKind::VarSamp => (n >= 2.0).then(|| m2 / (n - 1.0)),
                    AggKind::StddevSamp => (n >= 2.0).then(|| (m2 / (n - 1.0)).sqrt()),
                    AggKind::Min => present.iter().copied().reduce(f64::min),
                    AggKind::Max => present.iter().copied().reduce(f64::max),
                    AggKind::Forecast { .. } => unreachable!("not a SQL aggregate"),
                    AggKind::Quantile(_) | AggKind::FirstValue => {
                        unreachable!("see ordered_reference")
                    }
                    AggKind::MinOfLast(_) | AggKind::MaxOfLast(_) => {
                        unreachable!("compared with operators of their own frame")
                    }
                }
            })
            .collect()
    }

    const KINDS: [AggKind; 9] = [
        AggKind::Count,
        AggKind::Sum,
        AggKind::Avg,
        AggKind::VarSamp,
        AggKind::VarPop,
        AggKind::StddevSamp,
        AggKind::StddevPop,
        AggKind::Min,
        AggKind::Max,
    ];

    fn run(frame: Frame, xs: &[Option<f64>], chunk: usize) -> Vec<Vec<Option<f64>>> {
        let aggs = KINDS
            .iter()
            .map(|&kind| Aggregate { kind, arg: 0 })
            .collect();
        let mut op = WindowOperator::try_new(frame, 1, aggs).unwrap();
        let mut out = vec![Vec::new(); KINDS.len()];
        for part in xs.chunks(chunk.max(1)) {
            let arg = Float64Array::from(part.to_vec());
            let groups = vec![0u32; part.len()];
            let arrays = op.process(&groups, &[arg]).unwrap();
            for (k, array) in arrays.iter().enumerate() {
                for i in 0..array.len() {
                    out[k].push(if array.is_null(i) {
                        None
                    } else if KINDS[k] == AggKind::Count {
                        Some(
                            array
                                .as_any()
                                .downcast_ref::<Int64Array>()
                                .unwrap()
                                .value(i) as f64,
                        )
                    } else {
                        Some(
                            array
                                .as_any()
                                .downcast_ref::<Float64Array>()
                                .unwrap()
                                .value(i),
                        )
                    });
                }
            }
        }
        out
    }

    pub(super) fn close(a: Option<f64>, b: Option<f64>, scale: f64) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                (a - b).abs() <= 1e-9 * scale.max(1.0) + 1e-9 * a.abs().max(b.abs())
            }
            _ => false,
        }
    }

    proptest! {
        #[test]
        fn matches_two_pass_reference(
            xs in proptest::collection::vec(
                prop_oneof![8 => (-1e3f64..1e3).prop_map(Some), 1 => Just(None), 1 => Just(Some(f64::NAN))],
                1..400),
            preceding in prop_oneof![Just(None), (0usize..40).prop_map(Some)],
            chunk in 1usize..64,
        ) {
            let frame = preceding.map_or(Frame::Unbounded, |preceding| Frame::Rows { preceding });
            let got = run(frame, &xs, chunk);
            for (k, kind) in KINDS.iter().enumerate() {
                let want = reference(&xs, preceding, *kind);
                let scale = match kind { AggKind::VarPop | AggKind::VarSamp => 1e6, _ => 1e3 * 400.0 };
                for i in 0..xs.len() {
                    prop_assert!(close(got[k][i], want[i], scale),
                        "{kind:?} row {i}: got {:?} want {:?}", got[k][i], want[i]);
                }
            }
        }
    }

    /// `len` values at a 1e9 offset with unit noise and a level shift half-way: naive Σx²
    /// loses all precision on them.
    fn level_shift(len: usize) -> Vec<Option<f64>> {
        (0..len)
            .map(|i| {
                let noise = ((i * 7919) % 13) as f64 - 6.0;
                let level = if i > len / 2 { 1e9 + 1e6 } else { 1e9 };
                Some(level + noise)
            })
            .collect()
    }

    #[test]
    fn stable_with_large_offset_and_level_shift() {
        let xs = level_shift(5000);
        let got = run(Frame::Rows { preceding: 299 }, &xs, 777);
        let want = reference(&xs, Some(299), AggKind::StddevSamp);
        for i in 0..xs.len() {
            let (g, w) = (got[5][i].unwrap_or(0.0), want[i].unwrap_or(0.0));
            assert!((g - w).abs() <= 1e-6 * w.max(1.0), "row {i}: {g} vs {w}");
        }
    }

    /// Outputs as bit patterns (`None` for NULL), aggregate by aggregate.
    pub(super) type Bits = Vec<Vec<Option<u64>>>;

    /// Every output as bit patterns, aggregate by aggregate.
    pub(super) fn bits(arrays: &[ArrayRef]) -> Bits {
        arrays
            .iter()
            .map(|a| {
                (0..a.len())
                    .map(|i| {
                        (!a.is_null(i)).then(|| {
                            if let Some(f) = a.as_any().downcast_ref::<Float64Array>() {
                                f.value(i).to_bits()
                            } else {
                                a.as_any().downcast_ref::<Int64Array>().unwrap().value(i) as u64
                            }
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// The aggregates of the plain path (no MIN/MAX, no forecast): all but the last two.
    const PLAIN: &[AggKind] = KINDS.split_at(KINDS.len() - 2).0;

    /// The plain aggregates over `xs` (row `i` in group `i * 7 % groups`) in batches of
    /// `batch` rows, computed by the plain path and, with a MIN added, by the general one.
    fn plain_and_general(
        xs: &[Option<f64>],
        groups: u32,
        preceding: usize,
        batch: usize,
    ) -> (Bits, Bits) {
        let ids: Vec<u32> = (0..xs.len() as u32).map(|i| i * 7 % groups).collect();
        plain_and_general_on(xs, &ids, groups, preceding, batch)
    }

    /// Row `i` of `xs` belongs to group `ids[i]` (of `groups`).
    fn plain_and_general_on(
        xs: &[Option<f64>],
        ids: &[u32],
        groups: u32,
        preceding: usize,
        batch: usize,
    ) -> (Bits, Bits) {
        let aggs: Vec<Aggregate> = PLAIN
            .iter()
            .map(|&kind| Aggregate { kind, arg: 0 })
            .collect();
        let mut with_min = aggs.clone();
        with_min.push(Aggregate {
            kind: AggKind::Min,
            arg: 0,
        });
        let frame = Frame::Rows { preceding };
        let mut plain = WindowOperator::try_new(frame, 1, aggs).unwrap();
        let mut general = WindowOperator::try_new(frame, 1, with_min).unwrap();
        let (mut a, mut b) = (vec![Vec::new(); PLAIN.len()], vec![Vec::new(); PLAIN.len()]);
        for (part, ids) in xs.chunks(batch).zip(ids.chunks(batch)) {
            let arg = Float64Array::from(part.to_vec());
            let p = plain.process(ids, std::slice::from_ref(&arg)).unwrap();
            let g = general.process(ids, &[arg]).unwrap();
            for (k, (p, g)) in bits(&p)
                .into_iter()
                .zip(bits(&g[..PLAIN.len()]))
                .enumerate()
            {
                a[k].extend(p);
                b[k].extend(g);
            }
        }
        // The saved state, which a restore continues from, is the same too.
        for g in 0..groups {
            let (p, q) = (
                plain.export_group(g, vec![]),
                general.export_group(g, vec![]),
            );
            let (Some(p), Some(q)) = (p, q) else {
                continue;
            };
            assert_eq!(p.series[0].stats, q.series[0].stats, "group {g}");
            assert_eq!(
                p.series[0]
                    .ring
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                q.series[0]
                    .ring
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            );
        }
        (a, b)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The plain path (chunked, no MIN/MAX) gives the general path's results bit for bit,
        /// across its chunk boundaries and the caller's batches.
        #[test]
        fn plain_path_equals_general_path(
            xs in proptest::collection::vec(
                prop_oneof![8 => (-1e3f64..1e3).prop_map(Some), 1 => Just(None), 1 => Just(Some(f64::NAN))],
                1..9000),
            groups in 1u32..5,
            preceding in 0usize..40,
            batch in 1usize..6000,
        ) {
            let (plain, general) = plain_and_general(&xs, groups, preceding, batch);
            prop_assert_eq!(plain, general);
        }
    }

    /// Ids of a replay's ticks: every group once per tick, in order (the runs the plain
    /// path updates as one pass), except that every `skip`-th row is dropped, so that some
    /// series fall behind the others and runs break.
    fn ticks(rows: usize, groups: u32, skip: usize) -> (Vec<u32>, Vec<usize>) {
        (0..rows)
            .filter(|&i| skip == 0 || i % skip != skip - 1)
            .map(|i| (i as u32 % groups, i))
            .unzip()
    }

    /// Values for the tick tests: ordinary ones, large ones whose sums cancel, and NaN.
    fn tick_values() -> impl Strategy<Value = Vec<Option<f64>>> {
        proptest::collection::vec(
            prop_oneof![
                8 => (-1e3f64..1e3).prop_map(Some),
                1 => (1e9f64..1e9 + 10.0).prop_map(Some),
                1 => Just(Some(f64::NAN)),
            ],
            1..12_000,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Ticks of consecutive series go through the vectorised pass: still the general
        /// path's results and state bit for bit, with missing values (NaN; a NULL sends the
        /// batch down the row-by-row path), level shifts that force a recomputation in the
        /// pass, refreshes, and series that fall behind.
        #[test]
        fn plain_ticks_equal_general_path(
            xs in tick_values(),
            groups in 8u32..40,
            preceding in 0usize..30,
            batch in 1usize..6000,
            skip in prop_oneof![Just(0usize), 50usize..500],
        ) {
            let (ids, keep) = ticks(xs.len(), groups, skip);
            let xs: Vec<Option<f64>> = keep.iter().map(|&i| xs[i]).collect();
            let (plain, general) = plain_and_general_on(&xs, &ids, groups, preceding, batch);
            prop_assert_eq!(plain, general);
        }
    }

    /// Rows, each with the bits of every aggregate (`None` for NULL).
    type RowBits = Vec<(u32, Vec<Option<u64>>)>;

    /// The rows of a selected run, and for each the bits of every aggregate (`None` for
    /// NULL), against the full outputs of [`WindowOperator::process`] filtered by the same
    /// test on the same aggregates.
    ///
    /// With `two_args`, argument 1 is the series and argument 0 another one (the row-by-row
    /// path); otherwise the series is the only argument (ticks of consecutive series go
    /// through the vectorised pass, which screens on the fly).
    fn selected_and_filtered(
        xs: &[Option<f64>],
        ids: &[u32],
        preceding: usize,
        batch: usize,
        screen: Option<Screen>,
        k: f64,
        two_args: bool,
    ) -> (RowBits, RowBits) {
        let series = usize::from(two_args);
        let mut aggs: Vec<Aggregate> = [AggKind::Avg, AggKind::StddevSamp, AggKind::Count]
            .into_iter()
            .map(|kind| Aggregate { kind, arg: series })
            .collect();
        let mut args = vec![Float64Array::from(xs.to_vec())];
        if two_args {
            for kind in [AggKind::Sum, AggKind::VarPop] {
                aggs.push(Aggregate { kind, arg: 0 });
            }
            let other: Vec<Option<f64>> = xs.iter().map(|x| x.map(|v| 2.0 - v)).collect();
            args.insert(0, Float64Array::from(other));
        }
        let n_args = args.len();
        let frame = Frame::Rows { preceding };
        let z_above = |x: f64, mean: f64, std: f64| ((x - mean) / std).abs() > k;
        let mut op = WindowOperator::try_new(frame, n_args, aggs.clone()).unwrap();
        let mut selected = Vec::new();
        let mut start = 0;
        while start < xs.len() {
            let len = batch.min(xs.len() - start);
            let part: Vec<Float64Array> = args.iter().map(|a| a.slice(start, len)).collect();
            let values = part[series].values().clone();
            let out = op
                .process_selected(
                    &ids[start..start + len],
                    &part,
                    screen,
                    &mut |chunk, kept| {
                        let rows: Vec<usize> = match chunk.rows {
                            Some(rows) => rows.iter().map(|&r| r as usize).collect(),
                            None => (0..chunk.len).collect(),
                        };
                        for (i, &r) in rows.iter().enumerate() {
                            let x = values[chunk.start + r];
                            if z_above(x, chunk.aggregates[0][i], chunk.aggregates[1][i]) {
                                kept.push(i as u32);
                            }
                        }
                    },
                )
                .unwrap();
            let out_bits = bits(&out.outputs);
            for (i, &r) in out.rows.iter().enumerate() {
                let row = out_bits.iter().map(|c| c[i]).collect();
                selected.push((start as u32 + r, row));
            }
            start += len;
        }
        let mut full = WindowOperator::try_new(frame, n_args, aggs).unwrap();
        let outputs = full.process(ids, &args).unwrap();
        let (mean, std) = (outputs[0].as_any(), outputs[1].as_any());
        let (mean, std) = (
            mean.downcast_ref::<Float64Array>().unwrap(),
            std.downcast_ref::<Float64Array>().unwrap(),
        );
        let all_bits = bits(&outputs);
        let filtered = (0..xs.len())
            .filter(|&r| {
                mean.is_valid(r)
                    && std.is_valid(r)
                    && z_above(args[series].value(r), mean.value(r), std.value(r))
            })
            .map(|r| (r as u32, all_bits.iter().map(|c| c[r]).collect()))
            .collect();
        (selected, filtered)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Selecting rows gives the rows, and the aggregates, of the full output filtered by
        /// the same test, with or without a screen on the running sums (which must never
        /// rule out a row the test keeps, level shifts and NaN included), over one argument
        /// (vectorised ticks, series falling behind) or two, and any batching.
        #[test]
        fn selected_rows_are_the_filtered_full_output(
            xs in tick_values(),
            groups in 1u32..40,
            preceding in 1usize..30,
            batch in 1usize..6000,
            k in prop_oneof![Just(0.0), 0.5f64..4.0],
            sample in any::<bool>(),
            two_args in any::<bool>(),
            skip in prop_oneof![Just(0usize), 50usize..500],
        ) {
            let (ids, keep) = ticks(xs.len(), groups, skip);
            let xs: Vec<Option<f64>> = keep.iter().map(|&i| xs[i]).collect();
            // A population screen with the sample test keeps more rows; both are sound.
            let screen = Screen { arg: usize::from(two_args), k, sample };
            let run = |screen| selected_and_filtered(&xs, &ids, preceding, batch, screen, k, two_args);
            let (plain, filtered) = run(None);
            prop_assert_eq!(&plain, &filtered);
            let (screened, _) = run(Some(screen));
            prop_assert_eq!(&screened, &filtered);
        }
    }

    #[test]
    fn selection_checks_its_operator_screen_and_selector() {
        let avg = Aggregate {
            kind: AggKind::Avg,
            arg: 0,
        };
        let min = Aggregate {
            kind: AggKind::Min,
            arg: 0,
        };
        let x = [Float64Array::from(vec![1.0, 2.0, 3.0])];
        let keep_all = &mut |c: Chunk<'_>, kept: &mut Vec<u32>| kept.extend(0..c.len as u32);
        let mut op = WindowOperator::try_new(Frame::Rows { preceding: 1 }, 1, vec![min]).unwrap();
        assert!(!op.selects());
        assert!(op.process_selected(&[0, 0, 0], &x, None, keep_all).is_err());
        let op = WindowOperator::try_new(Frame::Unbounded, 1, vec![avg]).unwrap();
        assert!(!op.selects());
        let mut op = WindowOperator::try_new(Frame::Rows { preceding: 1 }, 1, vec![avg]).unwrap();
        let bad = Screen {
            arg: 1,
            k: 3.0,
            sample: true,
        };
        assert!(
            op.process_selected(&[0, 0, 0], &x, Some(bad), keep_all)
                .is_err()
        );
        let nan = Screen {
            arg: 0,
            k: f64::NAN,
            sample: true,
        };
        assert!(
            op.process_selected(&[0, 0, 0], &x, Some(nan), keep_all)
                .is_err()
        );
        let out = op.process_selected(&[0, 0, 0], &x, None, keep_all).unwrap();
        assert_eq!(out.rows, vec![0, 1, 2]);
        let avg = out.outputs[0]
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        // The rejected calls pushed nothing: the frames hold the rows of this call only.
        assert_eq!(avg.values().to_vec(), vec![1.0, 1.5, 2.5]);
        let beyond = &mut |_: Chunk<'_>, kept: &mut Vec<u32>| kept.push(3);
        assert!(op.process_selected(&[0, 0, 0], &x, None, beyond).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The AVX2 and baseline builds of the vectorised loops give the same results and
        /// state, bit for bit (on a CPU without AVX2 both runs take the baseline).
        #[test]
        fn avx2_and_baseline_builds_agree(
            xs in tick_values(),
            groups in 8u32..40,
            preceding in 0usize..30,
            batch in 1usize..6000,
            skip in prop_oneof![Just(0usize), 50usize..500],
        ) {
            let (ids, keep) = ticks(xs.len(), groups, skip);
            let xs: Vec<Option<f64>> = keep.iter().map(|&i| xs[i]).collect();
            let wide = plain_and_general_on(&xs, &ids, groups, preceding, batch);
            BASELINE.with(|b| b.set(true));
            let narrow = plain_and_general_on(&xs, &ids, groups, preceding, batch);
            BASELINE.with(|b| b.set(false));
            prop_assert_eq!(wide, narrow);
        }
    }

    proptest! {
        /// [`run_length`] against a count one id at a time, over runs broken anywhere.
        #[test]
        fn run_length_counts_consecutive_ids(
            start in 0u32..1000,
            len in 0usize..100,
            breaks in proptest::collection::vec((0usize..100, 0u32..3), 0..3),
        ) {
            let mut ids: Vec<u32> = (0..len as u32).map(|k| start + k).collect();
            for (at, by) in breaks {
                if let Some(id) = ids.get_mut(at) {
                    *id += by;
                }
            }
            let naive = match ids.first() {
                None => 0,
                Some(&g) => (1..=ids.len())
                    .take_while(|&k| k == 1 || ids[k - 1] == g + k as u32 - 1)
                    .last()
                    .unwrap_or(1),
            };
            prop_assert_eq!(run_length(&ids), naive);
        }
    }

    #[test]
    fn plain_ticks_recompute_after_a_level_shift() {
        // 20 series in lockstep, each the level-shifted series (its sums cancel after the
        // shift), and each far past its refresh.
        let one = level_shift(6_000);
        let xs: Vec<Option<f64>> = one.iter().flat_map(|&x| [x; 20]).collect();
        let (ids, _) = ticks(xs.len(), 20, 0);
        let (plain, general) = plain_and_general_on(&xs, &ids, 20, 299, 4_000);
        assert_eq!(plain, general);
    }

    #[test]
    fn plain_ticks_match_while_their_frames_fill() {
        // 20 series in lockstep whose first value is far from the others: their sums cancel
        // while the frame is still filling, when nothing is recomputed yet.
        let one: Vec<Option<f64>> = (0..400)
            .map(|i| {
                Some(if i == 0 {
                    0.0
                } else {
                    1e9 + ((i * 7919) % 13) as f64
                })
            })
            .collect();
        let xs: Vec<Option<f64>> = one.iter().flat_map(|&x| [x; 20]).collect();
        let (ids, _) = ticks(xs.len(), 20, 0);
        let (plain, general) = plain_and_general_on(&xs, &ids, 20, 299, 4_000);
        assert_eq!(plain, general);
    }

    #[test]
    fn plain_path_recomputes_after_a_level_shift() {
        let xs = level_shift(12_000);
        // The general path matches the two-pass reference on this series
        // (`stable_with_large_offset_and_level_shift`); the plain one must match it exactly.
        let (plain, general) = plain_and_general(&xs, 2, 299, 5000);
        assert_eq!(plain, general);
    }

    #[test]
    fn counts_convert_exactly() {
        for c in [
            0u64,
            1,
            2,
            299,
            300,
            65_536,
            1 << 40,
            (1 << 52) - 1,
            1 << 52,
        ] {
            assert_eq!(count_to_i64(c as f64), c as i64);
        }
    }

    #[test]
    fn constant_series_has_zero_variance_not_negative() {
        let xs = vec![Some(0.1f64); 1000];
        let got = run(Frame::Rows { preceding: 299 }, &xs, 100);
        assert!(
            got[3].iter().skip(1).all(|v| *v == Some(0.0)),
            "{:?}",
            &got[3][..5]
        );
    }

    #[test]
    fn groups_are_independent() {
        let aggs = vec![Aggregate {
            kind: AggKind::Sum,
            arg: 0,
        }];
        let mut op = WindowOperator::try_new(Frame::Rows { preceding: 1 }, 1, aggs).unwrap();
        let out = op
            .process(
                &[0, 1, 0, 1, 0],
                &[Float64Array::from(vec![1.0, 10.0, 2.0, 20.0, 3.0])],
            )
            .unwrap();
        let sums = out[0].as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(sums.values().to_vec(), vec![1.0, 10.0, 3.0, 30.0, 5.0]);
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(
            WindowOperator::try_new(
                Frame::Unbounded,
                1,
                vec![Aggregate {
                    kind: AggKind::Sum,
                    arg: 1
                }]
            )
            .is_err()
        );
        let mut op = WindowOperator::try_new(Frame::Unbounded, 1, vec![]).unwrap();
        assert!(
            op.process(&[0, 0], &[Float64Array::from(vec![1.0])])
                .is_err()
        );
    }
}

#[cfg(test)]
mod state_tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, StringArray};
    use proptest::prelude::*;

    use super::tests::{Bits, bits};
    use super::*;
    use crate::keys::KeyInterner;

    /// One group's `rows` as both arguments of a two-argument operator; the outputs as bit
    /// patterns.
    fn feed_twice(op: &mut WindowOperator, rows: &[Option<f64>]) -> Bits {
        let x = Float64Array::from(rows.to_vec());
        bits(&op.process(&vec![0; rows.len()], &[x.clone(), x]).unwrap())
    }

    /// Cut `xs` at each of `cuts`: the rows before it through a fresh `op()`, its group saved
    /// through the wire format and restored into another fresh `op()`, the rows after it
    /// there. Together they must give `whole` (the outputs of `xs` in one go) bit for bit.
    fn continues_after_restore(
        op: impl Fn() -> WindowOperator,
        xs: &[Option<f64>],
        whole: &Bits,
        cuts: &[usize],
    ) {
        for &cut in cuts {
            let mut first = op();
            let head = feed_twice(&mut first, &xs[..cut]);
            let state = first.export_group(0, vec![]).unwrap();
            let bytes = postcard::to_stdvec(&state).unwrap();
            let state: GroupState = postcard::from_bytes(&bytes).unwrap();
            let mut restored = op();
            restored.import_group(0, &state).unwrap();
            let tail = feed_twice(&mut restored, &xs[cut..]);
            for (w, (h, t)) in whole.iter().zip(head.iter().zip(&tail)) {
                let joined: Vec<Option<u64>> = h.iter().chain(t).copied().collect();
                assert_eq!(w, &joined, "cut {cut}");
            }
        }
    }

    /// Every kind but forecasts; over bounded frames also quantiles and the first value.
    fn all_aggregates(frame: Frame) -> Vec<Aggregate> {
        let mut kinds = vec![
            AggKind::Count,
            AggKind::Sum,
            AggKind::Avg,
            AggKind::Min,
            AggKind::Max,
            AggKind::StddevSamp,
            AggKind::VarPop,
        ];
        if frame != Frame::Unbounded {
            kinds.extend(ORDERED);
        }
        kinds
            .into_iter()
            .map(|kind| Aggregate { kind, arg: 0 })
            .collect()
    }

    fn run(
        keys: &mut KeyInterner,
        op: &mut WindowOperator,
        rows: &[(u8, Option<f64>)],
    ) -> Vec<Vec<Option<u64>>> {
        let k: ArrayRef = Arc::new(StringArray::from(
            rows.iter()
                .map(|(k, _)| format!("r{k}"))
                .collect::<Vec<_>>(),
        ));
        let ids = keys.intern(&[k], rows.len()).unwrap();
        let x = Float64Array::from(rows.iter().map(|(_, v)| *v).collect::<Vec<_>>());
        let out = op.process(&ids, &[x]).unwrap();
        // Bit patterns, so that "identical" means identical.
        out.iter()
            .map(|a| {
                let a = arrow::compute::cast(a, &arrow::datatypes::DataType::Float64).unwrap();
                let a = a.as_any().downcast_ref::<Float64Array>().unwrap();
                (0..a.len())
                    .map(|i| a.is_valid(i).then(|| a.value(i).to_bits()))
                    .collect()
            })
            .collect()
    }

    fn save_and_restore(
        keys: &KeyInterner,
        op: &WindowOperator,
        frame: Frame,
    ) -> (KeyInterner, WindowOperator) {
        let groups: Vec<GroupState> = keys
            .group_keys()
            .into_iter()
            .enumerate()
            .filter_map(|(g, key)| op.export_group(g as u32, key))
            .collect();
        // Through the checkpoint wire format, restored in reverse order so that ids are
        // assigned differently.
        let bytes = postcard::to_stdvec(&groups).unwrap();
        let groups: Vec<GroupState> = postcard::from_bytes(&bytes).unwrap();
        let mut keys = KeyInterner::new(1);
        let mut restored = WindowOperator::try_new(frame, 1, all_aggregates(frame)).unwrap();
        for g in groups.iter().rev() {
            let id = keys.intern_values(&g.key).unwrap();
            restored.import_group(id, g).unwrap();
        }
        (keys, restored)
    }

    proptest! {
        /// Saving the state at any point and continuing from the restored copy gives the same
        /// output, bit for bit, as running on.
        #[test]
        fn restored_state_continues_identically(
            rows in proptest::collection::vec(
                (0u8..4, proptest::option::weighted(0.9, -1e3f64..1e3)),
                1..400,
            ),
            cut in 0usize..400,
            preceding in prop_oneof![Just(None), (0usize..20).prop_map(Some)],
        ) {
            let frame = preceding.map_or(Frame::Unbounded, |p| Frame::Rows { preceding: p });
            let cut = cut.min(rows.len());
            let mut keys = KeyInterner::new(1);
            let mut op = WindowOperator::try_new(frame, 1, all_aggregates(frame)).unwrap();
            let whole = run(&mut keys, &mut op, &rows);

            let mut keys = KeyInterner::new(1);
            let mut op = WindowOperator::try_new(frame, 1, all_aggregates(frame)).unwrap();
            let first = run(&mut keys, &mut op, &rows[..cut]);
            let (mut keys, mut op) = save_and_restore(&keys, &op, frame);
            let second = run(&mut keys, &mut op, &rows[cut..]);
            for (a, (f, s)) in whole.iter().zip(first.iter().zip(&second)) {
                let joined: Vec<Option<u64>> = f.iter().chain(s).copied().collect();
                prop_assert_eq!(a, &joined);
            }
        }
    }

    /// The kinds that keep a bounded frame's values: quantiles at both ends, the median, a
    /// high level that interpolates, and the first value.
    const ORDERED: [AggKind; 5] = [
        AggKind::Quantile(Level(0f64.to_bits())),
        AggKind::Quantile(Level(0.5f64.to_bits())),
        AggKind::Quantile(Level(0.999f64.to_bits())),
        AggKind::Quantile(Level(1f64.to_bits())),
        AggKind::FirstValue,
    ];

    /// Sorting reference of [`AggKind::Quantile`] and [`AggKind::FirstValue`]: numpy's
    /// default (linear) quantile of the frame's present values, and its first row.
    fn ordered_reference(xs: &[Option<f64>], preceding: usize, kind: AggKind) -> Vec<Option<f64>> {
        (0..xs.len())
            .map(|i| {
                let frame = &xs[i.saturating_sub(preceding)..=i];
                let mut present: Vec<f64> = frame.iter().flatten().copied().collect();
                present.sort_by(f64::total_cmp);
                match kind {
                    AggKind::FirstValue => frame[0],
                    AggKind::Quantile(q) if !present.is_empty() => {
                        let h = q.get() * (present.len() - 1) as f64;
                        let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
                        Some(present[lo] + (h - lo as f64) * (present[hi] - present[lo]))
                    }
                    AggKind::Quantile(_) => None,
                    other => unreachable!("{other:?} is not ordered"),
                }
            })
            .collect()
    }

    proptest! {
        /// Quantiles and first values equal a sort of each frame, for any batching, with
        /// missing values and ties (integers), beside the other kinds of one operator.
        #[test]
        fn ordered_kinds_match_a_sort_of_each_frame(
            xs in proptest::collection::vec(
                proptest::option::weighted(0.85, (-20i32..20).prop_map(f64::from)),
                1..300,
            ),
            preceding in 0usize..40,
            chunk in 1usize..64,
        ) {
            let frame = Frame::Rows { preceding };
            let aggregates = all_aggregates(frame);
            let mut op = WindowOperator::try_new(frame, 1, aggregates.clone()).unwrap();
            let mut outputs = vec![Vec::new(); aggregates.len()];
            for part in xs.chunks(chunk) {
                let arrays = op
                    .process(&vec![0; part.len()], &[Float64Array::from(part.to_vec())])
                    .unwrap();
                for (out, a) in outputs.iter_mut().zip(&arrays) {
                    let a = arrow::compute::cast(a, &arrow::datatypes::DataType::Float64).unwrap();
                    let a = a.as_any().downcast_ref::<Float64Array>().unwrap();
                    out.extend((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i))));
                }
            }
            for (agg, out) in aggregates.iter().zip(&outputs) {
                if ORDERED.contains(&agg.kind) {
                    let expected = ordered_reference(&xs, preceding, agg.kind);
                    for (i, (e, o)) in expected.iter().zip(out).enumerate() {
                        prop_assert!(super::tests::close(*e, *o, 20.0), "{:?} row {i}: {e:?} vs {o:?}", agg.kind);
                    }
                }
            }
        }
    }

    /// Reference of every kind over a `RANGE` frame: for each row, the earlier rows of its
    /// group (in input order) whose time is at least its own minus `preceding_ms`.
    fn range_reference(
        rows: &[(u8, i64, Option<f64>)],
        preceding_ms: i64,
        kind: AggKind,
    ) -> Vec<Option<f64>> {
        (0..rows.len())
            .map(|i| {
                let (g, t, _) = rows[i];
                let frame: Vec<Option<f64>> = rows[..=i]
                    .iter()
                    .filter(|&&(h, u, _)| h == g && u >= t - preceding_ms)
                    .map(|&(_, _, v)| v)
                    .collect();
                let last = frame.len() - 1;
                match kind {
                    AggKind::Quantile(_) | AggKind::FirstValue => {
                        ordered_reference(&frame, last, kind)[last]
                    }
                    _ => super::tests::reference(&frame, Some(last), kind)[last],
                }
            })
            .collect()
    }

    proptest! {
        /// `RANGE` frames over event time, with gaps and repeated times in interleaved
        /// series: every kind equals a recomputation over each frame, for any batching and
        /// across a save and restore.
        #[test]
        fn range_frames_match_a_recomputation(
            steps in proptest::collection::vec(
                (0u8..3, 0i64..4, proptest::option::weighted(0.85, (-20i32..20).prop_map(f64::from))),
                1..250,
            ),
            preceding_s in 0i64..12,
            chunk in 1usize..40,
            cut in 0usize..250,
        ) {
            // Each group's clock moves on by 0-3 s per row of the group.
            let mut clocks = [0i64; 3];
            let rows: Vec<(u8, i64, Option<f64>)> = steps
                .iter()
                .map(|&(g, dt, v)| {
                    clocks[g as usize] += dt * 1_000;
                    (g, clocks[g as usize], v)
                })
                .collect();
            let frame = Frame::Range { preceding_ms: preceding_s * 1_000 };
            let aggregates = all_aggregates(frame);
            let new_op = || WindowOperator::try_new(frame, 1, aggregates.clone()).unwrap();
            let (mut keys, mut op) = (KeyInterner::new(1), new_op());
            let cut = cut.min(rows.len());
            let mut outputs = vec![Vec::new(); aggregates.len()];
            for (part_start, part) in [(0, &rows[..cut]), (cut, &rows[cut..])] {
                if part_start > 0 {
                    (keys, op) = save_and_restore(&keys, &op, frame);
                }
                for piece in part.chunks(chunk) {
                    let k: ArrayRef = Arc::new(StringArray::from(
                        piece.iter().map(|(g, _, _)| format!("r{g}")).collect::<Vec<_>>(),
                    ));
                    let ids = keys.intern(&[k], piece.len()).unwrap();
                    let ts: Vec<i64> = piece.iter().map(|&(_, t, _)| t).collect();
                    let x = Float64Array::from(piece.iter().map(|&(_, _, v)| v).collect::<Vec<_>>());
                    let arrays = op.process_at(&ids, &ts, &[x]).unwrap();
                    for (out, a) in outputs.iter_mut().zip(&arrays) {
                        let a = arrow::compute::cast(a, &arrow::datatypes::DataType::Float64).unwrap();
                        let a = a.as_any().downcast_ref::<Float64Array>().unwrap();
                        out.extend((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i))));
                    }
                }
            }
            for (agg, out) in aggregates.iter().zip(&outputs) {
                let expected = range_reference(&rows, preceding_s * 1_000, agg.kind);
                for (i, (e, o)) in expected.iter().zip(out).enumerate() {
                    prop_assert!(super::tests::close(*e, *o, 400.0), "{:?} row {i}: {e:?} vs {o:?}", agg.kind);
                }
            }
        }
    }

    #[test]
    fn range_frames_need_event_times() {
        let frame = Frame::Range {
            preceding_ms: 1_000,
        };
        let avg = vec![Aggregate {
            kind: AggKind::Avg,
            arg: 0,
        }];
        let mut op = WindowOperator::try_new(frame, 1, avg.clone()).unwrap();
        let x = Float64Array::from(vec![1.0, 2.0]);
        assert!(op.process(&[0, 0], std::slice::from_ref(&x)).is_err());
        assert!(
            op.process_at(&[0, 0], &[0], std::slice::from_ref(&x))
                .is_err()
        );
        let out = op.process_at(&[0, 0], &[0, 500], &[x]).unwrap();
        let out = out[0].as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(out.values().to_vec(), vec![1.0, 1.5]);
        assert!(WindowOperator::try_new(Frame::Range { preceding_ms: -1 }, 1, avg).is_err());
        // Time going back within a series is refused, not misread.
        let back = op.process_at(&[0], &[400], &[Float64Array::from(vec![3.0])]);
        assert!(
            back.unwrap_err()
                .to_string()
                .contains("event time goes back")
        );
    }

    /// An operator whose aggregates are all top-candidate quantiles keeps presence bits,
    /// not values: it still equals a sort of every frame, with missing values and a level
    /// shift, and continues bit for bit after a save and restore through the wire format,
    /// at any cut.
    #[test]
    fn presence_bits_instead_of_values() {
        let preceding = 299;
        let frame = Frame::Rows { preceding };
        let mut random = crate::test_randoms(3);
        let xs: Vec<Option<f64>> = (0..1_500)
            .map(|t| {
                let v = ((random() >> 40) % 200) as f64 + if t > 900 { 500.0 } else { 0.0 };
                (t % 41 != 7 && !(600..640).contains(&t)).then_some(v)
            })
            .collect();
        let aggregates: Vec<Aggregate> = [(0.999, 0), (0.99, 0), (1.0, 1)]
            .into_iter()
            .map(|(q, arg)| Aggregate {
                kind: AggKind::Quantile(Level::new(q).unwrap()),
                arg,
            })
            .collect();
        let op = || WindowOperator::try_new(frame, 2, aggregates.clone()).unwrap();
        let mut whole_op = op();
        let whole = feed_twice(&mut whole_op, &xs);
        assert_eq!(whole_op.presence_words, 5);
        assert!(whole_op.slab.is_empty());
        for (agg, out) in aggregates.iter().zip(&whole) {
            let expected = ordered_reference(&xs, preceding, agg.kind);
            let expected: Vec<Option<u64>> = expected.iter().map(|v| v.map(f64::to_bits)).collect();
            assert_eq!(out, &expected, "{agg:?}");
        }
        continues_after_restore(op, &xs, &whole, &[1, 299, 300, 620, 1_000]);
        // Several series, and batches that hold only the first of them: the same quantiles
        // as an operator that keeps values (a COUNT makes it keep them).
        let q = aggregates[0];
        let count = Aggregate {
            kind: AggKind::Count,
            arg: 0,
        };
        let mut bits = WindowOperator::try_new(frame, 1, vec![q]).unwrap();
        let mut ring = WindowOperator::try_new(frame, 1, vec![q, count]).unwrap();
        assert!(bits.presence_words > 0 && ring.presence_words == 0);
        for (b, part) in xs.chunks(97).enumerate() {
            let groups: Vec<u32> = (0..part.len())
                .map(|i| if b % 3 == 1 { 0 } else { (i % 3) as u32 })
                .collect();
            let x = Float64Array::from(part.to_vec());
            let a = bits.process(&groups, std::slice::from_ref(&x)).unwrap();
            let r = ring.process(&groups, &[x]).unwrap();
            assert_eq!(&a[0], &r[0], "batch {b}");
        }

        // A saved state does not fit another frame of as many presence words, nor another
        // level's candidates.
        let mut wrapped = op();
        feed_twice(&mut wrapped, &xs[..400]);
        let saved = wrapped.export_group(0, vec![]).unwrap();
        let other_frame = Frame::Rows { preceding: 310 };
        let mut longer = WindowOperator::try_new(other_frame, 2, aggregates.clone()).unwrap();
        assert_eq!(longer.presence_words, 5);
        assert!(longer.import_group(0, &saved).is_err());
        let mut other_level = aggregates.clone();
        other_level[0].kind = AggKind::Quantile(Level::new(0.9).unwrap());
        let mut other_level = WindowOperator::try_new(frame, 2, other_level).unwrap();
        assert!(other_level.presence_words > 0);
        assert!(other_level.import_group(0, &saved).is_err());

        // A value ring's state is not a presence operator's, nor the reverse.
        let mut values = WindowOperator::try_new(frame, 2, all_aggregates(frame)).unwrap();
        let x = Float64Array::from(xs[..10].to_vec());
        values.process(&[0; 10], &[x.clone(), x]).unwrap();
        let saved = values.export_group(0, vec![]).unwrap();
        assert!(op().import_group(0, &saved).is_err());
        let mut presence = op();
        feed_twice(&mut presence, &xs[..10]);
        let saved = presence.export_group(0, vec![]).unwrap();
        assert!(values.import_group(0, &saved).is_err());
    }

    /// `MIN` and `MAX` (alone, or beside a top-candidate quantile) keep presence bits too:
    /// the same results as an operator that keeps a ring of values, over several series,
    /// missing values and batches holding one series, and bit for bit after a save and
    /// restore at any cut. A ring's state does not fit them.
    #[test]
    fn min_and_max_keep_presence_bits() {
        let frame = Frame::Rows { preceding: 199 };
        let mut random = crate::test_randoms(11);
        let xs: Vec<Option<f64>> = (0..1_200)
            .map(|t| {
                let v = ((random() >> 40) % 1_000) as f64 - if t > 700 { 400.0 } else { 0.0 };
                (t % 29 != 5 && !(300..520).contains(&t)).then_some(v)
            })
            .collect();
        let agg = |kind, arg| Aggregate { kind, arg };
        let high = AggKind::Quantile(Level::new(0.999).unwrap());
        for aggregates in [
            vec![agg(AggKind::Max, 0), agg(AggKind::Min, 1)],
            vec![agg(AggKind::Max, 0), agg(high, 1), agg(AggKind::Min, 1)],
        ] {
            let op = || WindowOperator::try_new(frame, 2, aggregates.clone()).unwrap();
            let mut bits = op();
            // A COUNT makes an operator keep the ring of values.
            let mut with_count = aggregates.clone();
            with_count.push(agg(AggKind::Count, 0));
            with_count.push(agg(AggKind::Count, 1));
            let mut ring = WindowOperator::try_new(frame, 2, with_count).unwrap();
            assert!(bits.presence_words > 0 && bits.slab.is_empty());
            assert_eq!(ring.presence_words, 0);
            for (b, part) in xs.chunks(89).enumerate() {
                let groups: Vec<u32> = (0..part.len())
                    .map(|i| if b % 3 == 1 { 0 } else { (i % 3) as u32 })
                    .collect();
                let x = Float64Array::from(part.to_vec());
                let args = [x.clone(), x];
                let got = bits.process(&groups, &args).unwrap();
                let want = ring.process(&groups, &args).unwrap();
                for (a, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g, w, "aggregate {a}, batch {b}");
                }
            }
            let whole = feed_twice(&mut op(), &xs);
            continues_after_restore(op, &xs, &whole, &[1, 199, 200, 450, 900]);
            let saved = ring.export_group(0, vec![]).unwrap();
            assert!(op().import_group(0, &saved).is_err());
        }
        // A quantile's saved candidates do not fit a MAX, nor the reverse.
        let max_only = || WindowOperator::try_new(frame, 1, vec![agg(AggKind::Max, 0)]).unwrap();
        let quantile = || WindowOperator::try_new(frame, 1, vec![agg(high, 0)]).unwrap();
        let x = Float64Array::from(xs[..50].to_vec());
        let mut q = quantile();
        q.process(&[0; 50], std::slice::from_ref(&x)).unwrap();
        assert!(
            max_only()
                .import_group(0, &q.export_group(0, vec![]).unwrap())
                .is_err()
        );
        let mut m = max_only();
        m.process(&[0; 50], &[x]).unwrap();
        assert!(
            quantile()
                .import_group(0, &m.export_group(0, vec![]).unwrap())
                .is_err()
        );
    }

    /// `MinOfLast` / `MaxOfLast` read the extremes of a shorter frame from the longer
    /// frame's deques: the same values as an operator of their own frame, with presence bits
    /// or beside a ring, over several series, missing values and batches; bit for bit after
    /// a save and restore. Sub-frames longer than the frame, empty ones and frames without a
    /// row count are refused.
    #[test]
    fn extremes_of_shorter_frames_match_operators_of_their_own() {
        let frame = Frame::Rows { preceding: 199 };
        let mut random = crate::test_randoms(23);
        let xs: Vec<Option<f64>> = (0..1_500)
            .map(|t| {
                let v = ((random() >> 40) % 1_000) as f64 - if t > 900 { 300.0 } else { 0.0 };
                (t % 31 != 4 && !(400..470).contains(&t)).then_some(v)
            })
            .collect();
        let agg = |kind, arg| Aggregate { kind, arg };
        let lasts = [
            AggKind::MaxOfLast(1),
            AggKind::MaxOfLast(17),
            AggKind::MinOfLast(60),
            AggKind::MaxOfLast(100),
            AggKind::MinOfLast(200),
        ];
        let own = |kind: AggKind| -> WindowOperator {
            let (kind, rows) = match kind {
                AggKind::MaxOfLast(rows) => (AggKind::Max, rows),
                AggKind::MinOfLast(rows) => (AggKind::Min, rows),
                other => unreachable!("{other:?}"),
            };
            let frame = Frame::Rows {
                preceding: rows as usize - 1,
            };
            WindowOperator::try_new(frame, 1, vec![agg(kind, 0)]).unwrap()
        };
        // Two arguments, as `feed_twice` gives: the shorter frames read the first.
        let mut presence: Vec<Aggregate> = vec![agg(AggKind::Max, 1)];
        presence.extend(lasts.iter().map(|&k| agg(k, 0)));
        // A COUNT makes the operator keep a ring of values; its deques are the same.
        let mut ring = presence.clone();
        ring.push(agg(AggKind::Count, 0));
        for aggregates in [presence, ring] {
            let op = || WindowOperator::try_new(frame, 2, aggregates.clone()).unwrap();
            let mut fused = op();
            let mut separate: Vec<WindowOperator> = lasts.iter().map(|&k| own(k)).collect();
            for (b, part) in xs.chunks(113).enumerate() {
                let groups: Vec<u32> = (0..part.len())
                    .map(|i| if b % 4 == 2 { 1 } else { (i % 3) as u32 })
                    .collect();
                let x = Float64Array::from(part.to_vec());
                let got = fused.process(&groups, &[x.clone(), x.clone()]).unwrap();
                for (j, op) in separate.iter_mut().enumerate() {
                    let want = op.process(&groups, std::slice::from_ref(&x)).unwrap();
                    assert_eq!(&got[1 + j], &want[0], "{:?}, batch {b}", lasts[j]);
                }
            }
            let whole = feed_twice(&mut op(), &xs);
            continues_after_restore(op, &xs, &whole, &[1, 150, 200, 430, 1_000]);
        }
        for (frame, kind) in [
            (frame, AggKind::MaxOfLast(0)),
            (frame, AggKind::MaxOfLast(201)),
            (frame, AggKind::MinOfLast(u32::MAX)),
            (Frame::Unbounded, AggKind::MaxOfLast(5)),
            (
                Frame::Range {
                    preceding_ms: 60_000,
                },
                AggKind::MinOfLast(5),
            ),
        ] {
            assert!(
                WindowOperator::try_new(frame, 1, vec![agg(kind, 0)]).is_err(),
                "{kind:?} over {frame:?}"
            );
        }
    }

    /// Large frames: the median sorts the whole frame in blocks, a lone 99.9th percentile
    /// keeps only the top candidates; both equal a sort of each frame and continue bit for
    /// bit after a save and restore.
    #[test]
    fn large_frames_sorted_and_top_k_match_and_restore() {
        let preceding = 999;
        let frame = Frame::Rows { preceding };
        let mut random = crate::test_randoms(7);
        let xs: Vec<Option<f64>> = (0..3_000)
            .map(|t| {
                let v = ((random() >> 40) % 500) as f64 + if t > 2_000 { 300.0 } else { 0.0 };
                (t % 97 != 3).then_some(v)
            })
            .collect();
        let median = AggKind::Quantile(Level::new(0.5).unwrap());
        let high = AggKind::Quantile(Level::new(0.999).unwrap());
        let aggregates = vec![
            Aggregate {
                kind: median,
                arg: 0,
            },
            Aggregate { kind: high, arg: 0 },
            Aggregate { kind: high, arg: 1 },
        ];
        let op = || WindowOperator::try_new(frame, 2, aggregates.clone()).unwrap();
        assert_eq!(op().ordered, vec![Order::Sorted, Order::Top(3)]);
        let whole = feed_twice(&mut op(), &xs);
        for (agg, out) in aggregates.iter().zip(&whole) {
            let expected = ordered_reference(&xs, preceding, agg.kind);
            let expected: Vec<Option<u64>> = expected.iter().map(|v| v.map(f64::to_bits)).collect();
            assert_eq!(out, &expected, "{agg:?}");
        }
        let mut first = op();
        let head = feed_twice(&mut first, &xs[..1_700]);
        let state = first.export_group(0, vec![]).unwrap();
        let mut restored = op();
        restored.import_group(0, &state).unwrap();
        let tail = feed_twice(&mut restored, &xs[1_700..]);
        for (w, (h, t)) in whole.iter().zip(head.iter().zip(&tail)) {
            let joined: Vec<Option<u64>> = h.iter().chain(t).copied().collect();
            assert_eq!(w, &joined);
        }
    }

    #[test]
    fn ordered_kinds_need_a_bounded_frame() {
        for kind in ORDERED {
            let err =
                WindowOperator::try_new(Frame::Unbounded, 1, vec![Aggregate { kind, arg: 0 }])
                    .unwrap_err();
            assert!(err.to_string().contains("bounded frame"), "{err}");
        }
        assert_eq!(Level::new(1.5), None);
        assert_eq!(Level::new(f64::NAN), None);
        assert_eq!(Level::new(0.25).map(Level::get), Some(0.25));
        assert_eq!(AggKind::from_sql_name("MEDIAN"), Some(ORDERED[1]));
    }

    /// A forecaster for the tests: the window's last value plus its mean step, with the
    /// window's range (at least 1) as its scale.
    #[derive(Debug)]
    struct Trend(usize, std::sync::atomic::AtomicUsize);

    impl Trend {
        fn new(window: usize) -> Self {
            Trend(window, std::sync::atomic::AtomicUsize::new(0))
        }
    }

    impl SeriesForecaster for Trend {
        fn window(&self) -> usize {
            self.0
        }
        fn forecast(
            &self,
            windows: &[f64],
            out: &mut [Forecast],
        ) -> std::result::Result<(), String> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(windows.len(), out.len() * self.0);
            for (w, f) in windows.chunks_exact(self.0).zip(out) {
                let step = (w[self.0 - 1] - w[0]) / (self.0 - 1) as f64;
                let (lo, hi) = w
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                *f = Forecast {
                    value: w[self.0 - 1] + step,
                    scale: (hi - lo).max(1.0),
                };
            }
            Ok(())
        }
    }

    fn forecast_op(window: usize) -> WindowOperator {
        forecast_op_with(Arc::new(Trend::new(window)))
    }

    /// Forecast value, residual (one model) and AVG over the model's frame.
    fn forecast_op_with(trend: Arc<Trend>) -> WindowOperator {
        let window = trend.0;
        let forecasters: Vec<Arc<dyn SeriesForecaster>> = vec![trend];
        let aggs = vec![
            Aggregate {
                kind: AggKind::Forecast {
                    model: 0,
                    output: ForecastOutput::Value,
                },
                arg: 0,
            },
            Aggregate {
                kind: AggKind::Forecast {
                    model: 0,
                    output: ForecastOutput::Residual,
                },
                arg: 0,
            },
            Aggregate {
                kind: AggKind::Avg,
                arg: 0,
            },
        ];
        WindowOperator::try_new_with_forecasters(
            Frame::Rows { preceding: window },
            1,
            aggs,
            forecasters,
        )
        .unwrap()
    }

    fn column(a: &ArrayRef) -> Vec<Option<f64>> {
        let a = a.as_any().downcast_ref::<Float64Array>().unwrap();
        (0..a.len())
            .map(|i| a.is_valid(i).then(|| a.value(i)))
            .collect()
    }

    #[test]
    fn forecasts_from_the_rows_before_the_current_one() {
        let trend = Arc::new(Trend::new(3));
        let mut op = forecast_op_with(Arc::clone(&trend));
        // Two interleaved series; series 1 has a missing value.
        let groups = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0];
        let xs = Float64Array::from(vec![
            Some(1.0),
            Some(5.0),
            Some(2.0),
            None,
            Some(3.0),
            Some(7.0),
            Some(10.0),
            Some(8.0),
            Some(5.0),
            Some(9.0),
            Some(6.0),
        ]);
        let out = op.process(&groups, &[xs]).unwrap();
        // Value and residual of one model share one inference per call.
        assert_eq!(trend.1.load(std::sync::atomic::Ordering::Relaxed), 1);
        let value = column(&out[0]);
        let residual = column(&out[1]);
        // Series 0: 1, 2, 3, 10, 5, 6. Row 6 (x = 10) is forecast from [1, 2, 3]: 4.
        assert_eq!(&value[..6], &[None; 6]);
        assert_eq!(value[6], Some(4.0));
        assert_eq!(residual[6], Some((10.0 - 4.0) / 2.0));
        // Row 8 (x = 5) from [2, 3, 10]: 10 + 4 = 14, scale 8.
        assert_eq!(value[8], Some(14.0));
        assert_eq!(residual[8], Some((5.0 - 14.0) / 8.0));
        // Series 1: 5, NULL, 7, 8, 9: windows holding the missing value give NULL.
        assert_eq!(value[7], None);
        assert_eq!(value[9], None);
        let more = op
            .process(&[1, 1], &[Float64Array::from(vec![Some(11.0), None])])
            .unwrap();
        // [7, 8, 9] forecasts 10; then [8, 9, 11] forecasts 12.5 for a missing value: the
        // forecast is there, the residual is NULL.
        assert_eq!(column(&more[0]), vec![Some(10.0), Some(12.5)]);
        assert_eq!(column(&more[1]), vec![Some(1.0 / 2.0), None]);
    }

    #[test]
    fn forecasts_do_not_depend_on_batching_or_restore() {
        let n = 400;
        let groups: Vec<u32> = (0..n).map(|i| (i % 3) as u32).collect();
        let xs: Vec<Option<f64>> = (0..n)
            .map(|i| (i % 37 != 5).then(|| ((i * 7919) % 101) as f64 * 0.5))
            .collect();
        let whole = {
            let mut op = forecast_op(8);
            op.process(&groups, &[Float64Array::from(xs.clone())])
                .unwrap()
        };
        for chunk in [1, 7, 64] {
            let mut op = forecast_op(8);
            let mut got = vec![Vec::new(); 3];
            for (start, part) in xs.chunks(chunk).enumerate().map(|(k, p)| (k * chunk, p)) {
                if start == 200 {
                    // A checkpoint: the state moves to a new operator.
                    let saved: Vec<GroupState> = (0..3)
                        .filter_map(|g| op.export_group(g, Vec::new()))
                        .collect();
                    op = forecast_op(8);
                    for (g, state) in saved.iter().enumerate() {
                        op.import_group(g as u32, state).unwrap();
                    }
                }
                let out = op
                    .process(
                        &groups[start..start + part.len()],
                        &[Float64Array::from(part.to_vec())],
                    )
                    .unwrap();
                for (k, o) in out.iter().enumerate() {
                    got[k].extend(column(o));
                }
            }
            for k in 0..3 {
                assert_eq!(got[k], column(&whole[k]), "chunk {chunk}, aggregate {k}");
            }
        }
        assert!(column(&whole[0]).iter().flatten().count() > 200);
    }

    #[test]
    fn forecast_needs_its_models_frame() {
        let forecasters: Vec<Arc<dyn SeriesForecaster>> = vec![Arc::new(Trend::new(3))];
        let agg = Aggregate {
            kind: AggKind::Forecast {
                model: 0,
                output: ForecastOutput::Value,
            },
            arg: 0,
        };
        let err = WindowOperator::try_new_with_forecasters(
            Frame::Rows { preceding: 4 },
            1,
            vec![agg],
            forecasters.clone(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("ROWS BETWEEN 3 PRECEDING"),
            "{err}"
        );
        let missing = Aggregate {
            kind: AggKind::Forecast {
                model: 1,
                output: ForecastOutput::Value,
            },
            arg: 0,
        };
        assert!(
            WindowOperator::try_new_with_forecasters(
                Frame::Rows { preceding: 3 },
                1,
                vec![missing],
                forecasters
            )
            .is_err()
        );
    }
}
