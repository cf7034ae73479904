//! The one message type that flows on every edge of the dataflow.
//!
//! # Contract
//! * `Data` batches on one edge are in event-time order *between* watermarks: every row of a
//!   `Data` that follows `Watermark(w)` has `ts >= w`.
//! * `Watermark(w)` promises that no later message on this edge carries a row with `ts < w`.
//!   Watermarks on an edge strictly increase. Downstream of the event-time gate, rows with
//!   one timestamp never straddle a watermark: all rows with `ts < w` precede `Watermark(w)`.
//! * `Barrier(epoch)` is a checkpoint barrier: an operator forwards it after it has emitted
//!   every output of the rows before it; operators with several inputs forward it once it
//!   has arrived on all of them (aligned checkpoints).
//! * `End` is the last message on an edge; it follows a final `Watermark(i64::MAX)`.
//! * `Suspend` is the last message on an edge of a stream that stops without ending (a
//!   streaming job shutting down): it follows a `Barrier`, every stage has saved its state
//!   at that barrier, and nothing is flushed past the last watermark. A restart restores the
//!   state and resumes the stream exactly there.
//!
//! Edges are bounded channels: a slow consumer blocks its producer (backpressure), memory
//! never grows with the input.

use arrow::array::RecordBatch;

/// A message on a dataflow edge. See the [module docs](self) for the ordering contract.
#[derive(Debug, Clone)]
pub enum Message {
    /// Rows.
    Data(RecordBatch),
    /// Event time has advanced to this many milliseconds since the epoch.
    Watermark(i64),
    /// Checkpoint barrier of this epoch.
    Barrier(u64),
    /// End of stream.
    End,
    /// The stream stops here without ending (see the [module docs](self)).
    Suspend,
}

/// The final watermark, sent before [`Message::End`].
pub const MAX_WATERMARK: i64 = i64::MAX;
