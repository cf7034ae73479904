//! The event-time gate: bounded out-of-orderness, watermarks and late data.
//!
//! The gate tracks the largest `ts` seen and holds the watermark at
//! `max_ts − max_out_of_orderness`. It releases, in event-time order, every buffered row
//! with `ts < watermark`, followed by the watermark itself. Rows with equal `ts` are thus
//! always released together (never split by a watermark), and the rows of one resource keep
//! their arrival order among equal timestamps.
//!
//! A row that arrives with `ts < watermark` (the watermark as it stood when that row arrived,
//! rows taken one by one in arrival order) is *late*: it is not dropped silently but
//! returned as rejected, with the reason, for the dead-letter output. Which rows are late is
//! thus a function of the arrival order alone, never of batch boundaries. So are rows without a
//! timestamp or a resource.
//!
//! A gate *with external watermarks* ([`EventTimeGate::with_external_watermarks`]) does not
//! derive the watermark from the rows: the source sets it with [`EventTimeGate::advance`].
//! A stream of many shards does so because only the source knows how far each shard has
//! been read (the watermark is the minimum over the shards, not over the rows seen).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::buffer::ScalarBuffer;
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use healer_operators::schema::RESOURCE;

use crate::source::{sort_by_ts, ts_values};

/// What a step of the gate produced.
#[derive(Debug, Default)]
pub struct GateOutput {
    /// Rows released, in event-time order.
    pub released: Vec<RecordBatch>,
    /// The new watermark, when it advanced.
    pub watermark: Option<i64>,
    /// Rejected rows (the input columns plus `reason`), if any.
    pub rejected: Option<RecordBatch>,
    /// Of the rejected rows, how many were late.
    pub late: usize,
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct EventTimeGate {
    schema: SchemaRef,
    rejected_schema: SchemaRef,
    delay_ms: i64,
    max_ts: i64,
    watermark: i64,
    /// Sorted batches with their timestamps, all rows `>= watermark`.
    pending: Vec<(RecordBatch, ScalarBuffer<i64>)>,
    /// Whether the watermark is set by [`EventTimeGate::advance`] only.
    external: bool,
}

/// The saved state of an [`EventTimeGate`], for checkpoints.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GateState {
    max_ts: i64,
    watermark: i64,
    /// The rows not released yet, as an Arrow IPC stream.
    pending: Vec<u8>,
}

impl GateState {
    /// The watermark at the checkpoint: every row at or before it had been released.
    pub fn watermark(&self) -> i64 {
        self.watermark
    }
}

impl EventTimeGate {
    /// A gate for batches of `schema` with the given out-of-orderness bound.
    pub fn new(schema: SchemaRef, max_out_of_orderness_ms: i64) -> Self {
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("reason", DataType::Utf8, false));
        Self {
            rejected_schema: Arc::new(Schema::new(fields)),
            schema,
            delay_ms: max_out_of_orderness_ms.max(0),
            max_ts: i64::MIN,
            watermark: i64::MIN,
            pending: Vec::new(),
            external: false,
        }
    }

    /// The same gate, with its watermark set by [`EventTimeGate::advance`] instead of the
    /// rows. Late rows are still those behind the watermark when they arrive.
    pub fn with_external_watermarks(mut self) -> Self {
        self.external = true;
        self
    }

    /// Moves the watermark to `w` (if that is ahead) and releases the rows before it.
    pub fn advance(&mut self, w: i64) -> Result<GateOutput, ArrowError> {
        let mut out = GateOutput::default();
        if w > self.watermark {
            out.released = self.release(w)?;
            self.watermark = w;
            out.watermark = Some(w);
        }
        Ok(out)
    }

    /// A watermark from the source: taken by a gate with external watermarks, ignored by
    /// one that derives its own.
    pub fn advance_external(&mut self, w: i64) -> Result<GateOutput, ArrowError> {
        if self.external {
            self.advance(w)
        } else {
            Ok(GateOutput::default())
        }
    }

    /// The gate's state: its clocks and the rows it holds.
    pub fn save(&self) -> Result<GateState, ArrowError> {
        let mut pending = Vec::new();
        {
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut pending, &self.schema)?;
            for (batch, _) in &self.pending {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
        Ok(GateState {
            max_ts: self.max_ts,
            watermark: self.watermark,
            pending,
        })
    }

    /// Replaces the gate's state with a saved one (of a gate over the same schema).
    pub fn restore(&mut self, state: &GateState) -> Result<(), ArrowError> {
        let reader =
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(&state.pending), None)?;
        if reader.schema().fields() != self.schema.fields() {
            return Err(ArrowError::SchemaError(
                "the saved gate holds rows of another schema".into(),
            ));
        }
        self.pending.clear();
        for batch in reader {
            let batch = batch?;
            let batch = RecordBatch::try_new(Arc::clone(&self.schema), batch.columns().to_vec())?;
            let ts = ts_values(&batch);
            self.pending.push((batch, ts));
        }
        self.max_ts = state.max_ts;
        self.watermark = state.watermark;
        Ok(())
    }

    /// Replaces the gate's state with the union of saved parts, each restricted to the
    /// resources of its key ranges (`None`: all of its rows): a scaled-out worker gathers its
    /// shards' held rows from the checkpoints of their previous owners. `max_ts` is the
    /// newest of the parts. The watermark is the oldest of them, except when a part is
    /// restricted: then it starts unset and the source's restored shard positions set it.
    /// A saved watermark is the previous owner's, made of *its* shards: after a shard's end
    /// its sibling moved it on while the shard's children had not been read, and rows of
    /// those children would wrongly count as late under it. Starting lower is safe: held
    /// rows stay held until the new watermark passes them, and a resource's new rows come
    /// after its old ones.
    pub fn restore_parts(
        &mut self,
        parts: &[(&GateState, Option<&crate::lease::KeyRanges>)],
    ) -> Result<(), ArrowError> {
        let mut pending = Vec::new();
        let (mut max_ts, mut watermark) = (i64::MIN, i64::MAX);
        for (state, keys) in parts {
            self.restore(state)?;
            max_ts = max_ts.max(self.max_ts);
            watermark = watermark.min(self.watermark);
            for (batch, ts) in self.pending.drain(..) {
                let Some(keys) = keys else {
                    pending.push((batch, ts));
                    continue;
                };
                let resource = batch
                    .column_by_name(RESOURCE)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                    .ok_or_else(|| {
                        ArrowError::SchemaError("the gate's rows have no resource".into())
                    })?;
                let keep: BooleanArray = resource
                    .iter()
                    .map(|r| Some(r.is_some_and(|r| keys.contains_key(r))))
                    .collect();
                let kept = filter_record_batch(&batch, &keep)?;
                if kept.num_rows() > 0 {
                    let ts = ts_values(&kept);
                    pending.push((kept, ts));
                }
            }
        }
        self.pending = pending;
        self.max_ts = max_ts;
        let restricted = parts.iter().any(|(_, keys)| keys.is_some());
        self.watermark = if parts.is_empty() || restricted {
            i64::MIN
        } else {
            watermark
        };
        Ok(())
    }

    /// The current watermark.
    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Schema of rejected rows.
    pub fn rejected_schema(&self) -> &SchemaRef {
        &self.rejected_schema
    }

    /// Takes the next batch.
    pub fn push(&mut self, batch: RecordBatch) -> Result<GateOutput, ArrowError> {
        let mut out = GateOutput::default();
        let ts = ts_values(&batch);
        let resource = batch.column_by_name(RESOURCE).map(|c| c.logical_nulls());
        // Fast path, the common case: rows in order, none missing a key, the first not behind
        // the watermark. Then no row is late either: the watermark a row meets is at most
        // the previous row's ts, which is at most its own.
        let watermark = if self.external {
            self.watermark
        } else {
            self.watermark
                .max(self.max_ts.saturating_sub(self.delay_ms))
        };
        if ts.first().is_some_and(|&t| t != i64::MIN && t >= watermark)
            && resource.as_ref().is_none_or(|n| n.is_none())
            && ts.windows(2).all(|w| w[0] <= w[1])
        {
            self.max_ts = self.max_ts.max(*ts.last().expect("non-empty"));
            self.pending.push((batch, ts));
            return self.advance_own(out);
        }
        // Lateness is decided row by row in arrival order, so it never depends on where batch
        // boundaries fall: a row is late when it is behind the watermark as it stood when
        // the row arrived.
        let mut max_ts = self.max_ts;
        let mut reasons: Vec<Option<&'static str>> = Vec::with_capacity(ts.len());
        for (i, &t) in ts.iter().enumerate() {
            let watermark = if self.external {
                self.watermark
            } else {
                self.watermark.max(max_ts.saturating_sub(self.delay_ms))
            };
            reasons.push(if t == i64::MIN {
                Some("missing ts")
            } else if resource
                .as_ref()
                .is_some_and(|n| n.as_ref().is_some_and(|n| n.is_null(i)))
            {
                Some("missing resource")
            } else if t < watermark {
                Some("late: ts is before the watermark")
            } else {
                max_ts = max_ts.max(t);
                None
            });
        }
        let accepted = if reasons.iter().any(Option::is_some) {
            let keep: BooleanArray = reasons.iter().map(|r| Some(r.is_none())).collect();
            let drop: BooleanArray = reasons.iter().map(|r| Some(r.is_some())).collect();
            let rejected = filter_record_batch(&batch, &drop)?;
            let why: StringArray = reasons.iter().flatten().map(|r| Some(*r)).collect();
            out.late = reasons
                .iter()
                .flatten()
                .filter(|r| r.starts_with("late"))
                .count();
            let mut columns: Vec<ArrayRef> = rejected.columns().to_vec();
            columns.push(Arc::new(why));
            out.rejected = Some(RecordBatch::try_new(
                Arc::clone(&self.rejected_schema),
                columns,
            )?);
            filter_record_batch(&batch, &keep)?
        } else {
            batch
        };
        if accepted.num_rows() > 0 {
            let accepted = sort_by_ts(accepted)?;
            let ts = ts_values(&accepted);
            self.max_ts = self.max_ts.max(*ts.last().expect("non-empty"));
            self.pending.push((accepted, ts));
        }
        self.advance_own(out)
    }

    /// Without external watermarks: moves the watermark to `max_ts − delay` and releases the
    /// rows before it into `out`.
    fn advance_own(&mut self, mut out: GateOutput) -> Result<GateOutput, ArrowError> {
        if self.external {
            return Ok(out);
        }
        let w = self.max_ts.saturating_sub(self.delay_ms);
        if w > self.watermark {
            out.released = self.release(w)?;
            self.watermark = w;
            out.watermark = Some(w);
        }
        Ok(out)
    }

    /// Releases everything and ends with the final watermark.
    pub fn finish(&mut self) -> Result<GateOutput, ArrowError> {
        let released = self.release(i64::MAX)?;
        self.watermark = i64::MAX;
        Ok(GateOutput {
            released,
            watermark: Some(i64::MAX),
            ..GateOutput::default()
        })
    }

    fn release(&mut self, w: i64) -> Result<Vec<RecordBatch>, ArrowError> {
        let mut parts: Vec<(RecordBatch, i64, i64)> = Vec::new();
        let mut keep = Vec::new();
        for (batch, ts) in self.pending.drain(..) {
            let cut = if w == i64::MAX {
                ts.len()
            } else {
                ts.partition_point(|&t| t < w)
            };
            if cut > 0 {
                parts.push((batch.slice(0, cut), ts[0], ts[cut - 1]));
            }
            if cut < ts.len() {
                keep.push((
                    batch.slice(cut, ts.len() - cut),
                    ts.slice(cut, ts.len() - cut),
                ));
            }
        }
        self.pending = keep;
        let ordered = parts.windows(2).all(|p| p[0].2 <= p[1].1);
        if ordered {
            return Ok(parts.into_iter().map(|(b, _, _)| b).collect());
        }
        let batches: Vec<RecordBatch> = parts.into_iter().map(|(b, _, _)| b).collect();
        let merged = concat_batches(&self.schema, &batches)?;
        Ok(vec![sort_by_ts(merged)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, TimestampMillisecondArray};
    use healer_operators::schema::ts_type;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("ts", ts_type(), true),
            Field::new("resource", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
        ]))
    }

    fn batch(ts: &[Option<i64>], res: &[Option<&str>]) -> RecordBatch {
        let v: Vec<f64> = (0..ts.len()).map(|i| i as f64).collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(TimestampMillisecondArray::from(ts.to_vec()).with_timezone("UTC")),
                Arc::new(StringArray::from(res.to_vec())),
                Arc::new(Float64Array::from(v)),
            ],
        )
        .unwrap()
    }

    fn released_ts(out: &GateOutput) -> Vec<i64> {
        out.released
            .iter()
            .flat_map(|b| ts_values(b).to_vec())
            .collect()
    }

    #[test]
    fn sorted_batches_are_checked_as_row_by_row() {
        // Sorted batches take the fast path only when none of their rows can be late; the
        // outcome is the one of the row-by-row rules either way.
        let mut gate = EventTimeGate::new(schema(), 5);
        let out = gate
            .push(batch(&[Some(10), Some(12), Some(20)], &[Some("a"); 3]))
            .unwrap();
        assert!(out.rejected.is_none());
        assert_eq!(out.watermark, Some(15));
        assert_eq!(released_ts(&out), vec![10, 12]);
        // First row exactly at the watermark: accepted, all of it.
        let out = gate
            .push(batch(&[Some(15), Some(15), Some(30)], &[Some("a"); 3]))
            .unwrap();
        assert!(out.rejected.is_none());
        assert_eq!(released_ts(&out), vec![15, 15, 20]);
        assert_eq!(out.watermark, Some(25));
        // Sorted, but the first row is behind: late; the rest is not.
        let out = gate
            .push(batch(&[Some(24), Some(26), Some(27)], &[Some("a"); 3]))
            .unwrap();
        assert_eq!(out.late, 1);
        assert_eq!(out.rejected.unwrap().num_rows(), 1);
        // Sorted, but a resource is missing: rejected as invalid, not late.
        let out = gate
            .push(batch(&[Some(28), Some(29)], &[Some("a"), None]))
            .unwrap();
        assert_eq!((out.late, out.rejected.unwrap().num_rows()), (0, 1));
        let out = gate.finish().unwrap();
        assert_eq!(released_ts(&out), vec![26, 27, 28, 30]);
    }

    #[test]
    fn reorders_within_bound_and_rejects_late() {
        let mut gate = EventTimeGate::new(schema(), 5);
        let out = gate
            .push(batch(&[Some(10), Some(6), Some(12)], &[Some("a"); 3]))
            .unwrap();
        // 6 arrives behind 10 but within the bound; max 12, watermark 7: releases 6 only.
        assert!(out.rejected.is_none());
        assert_eq!(released_ts(&out), vec![6]);
        assert_eq!(out.watermark, Some(7));
        let out = gate
            .push(batch(
                &[Some(8), Some(6), None, Some(20)],
                &[Some("a"), Some("a"), Some("a"), None],
            ))
            .unwrap();
        let rejected = out.rejected.unwrap();
        assert_eq!(rejected.num_rows(), 3);
        assert_eq!(out.late, 1, "6 < watermark 7");
        // 8, 10, 12 pending; no new max (20 was rejected), so nothing moves.
        assert_eq!(out.watermark, None);
        let out = gate.finish().unwrap();
        assert_eq!(released_ts(&out), vec![8, 10, 12]);
    }

    #[test]
    fn lateness_is_decided_in_arrival_order_within_a_batch() {
        let mut gate = EventTimeGate::new(schema(), 5);
        // 3 arrives after 10: behind 10 − 5, late even though it is in the same batch.
        let out = gate
            .push(batch(&[Some(10), Some(3), Some(12)], &[Some("a"); 3]))
            .unwrap();
        assert_eq!(out.late, 1);
        assert_eq!(released_ts(&out), Vec::<i64>::new());
        assert_eq!(out.watermark, Some(7));
    }

    #[test]
    fn equal_timestamps_are_released_together() {
        let mut gate = EventTimeGate::new(schema(), 0);
        let out = gate
            .push(batch(
                &[Some(1), Some(2), Some(2)],
                &[Some("a"), Some("a"), Some("b")],
            ))
            .unwrap();
        assert_eq!(released_ts(&out), vec![1]);
        let out = gate
            .push(batch(&[Some(2), Some(3)], &[Some("c"), Some("a")]))
            .unwrap();
        assert_eq!(released_ts(&out), vec![2, 2, 2]);
        assert_eq!(out.watermark, Some(3));
    }

    #[test]
    fn external_watermarks_and_saved_state() {
        let mut gate = EventTimeGate::new(schema(), 5).with_external_watermarks();
        let out = gate
            .push(batch(&[Some(10), Some(3), Some(12)], &[Some("a"); 3]))
            .unwrap();
        // Nothing moves until the source says so; 3 is not late (the watermark is MIN).
        assert!(out.rejected.is_none());
        assert_eq!(out.watermark, None);
        let out = gate.advance(10).unwrap();
        assert_eq!(released_ts(&out), vec![3]);
        assert_eq!(out.watermark, Some(10));
        assert!(
            gate.advance(9).unwrap().watermark.is_none(),
            "never backwards"
        );

        let saved = gate.save().unwrap();
        let mut restored = EventTimeGate::new(schema(), 5).with_external_watermarks();
        restored.restore(&saved).unwrap();
        assert_eq!(restored.watermark(), 10);
        let out = restored
            .push(batch(&[Some(9), Some(11)], &[Some("a"); 2]))
            .unwrap();
        assert_eq!(out.late, 1, "9 is behind the restored watermark");
        let out = restored.finish().unwrap();
        assert_eq!(released_ts(&out), vec![10, 11, 12]);
    }
}
