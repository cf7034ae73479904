//! Interning of partition keys into dense group ids.
//!
//! Window state is stored in flat vectors indexed by a dense `u32` group id. A
//! [`KeyInterner`] maps the values of one or more key columns to those ids, stably across
//! batches: the first key seen gets id 0, the next new one id 1, and so on.
//!
//! Dictionary-encoded columns are interned once per distinct dictionary value, not once per
//! row, which makes the long `samples` view (see [`crate::unpivot`]) cheap to key.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::{OperatorError, Result};

/// One value of a partition key, as interned: integer-like columns as integers, every other
/// type as its string form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyValue {
    /// A NULL key.
    Null,
    /// A key of an integer, date, timestamp or boolean column.
    Int(i64),
    /// A key of any other column.
    Str(String),
}

impl KeyValue {
    /// The value as text (integers in decimal), `None` for NULL.
    pub fn as_text(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            KeyValue::Null => None,
            KeyValue::Int(v) => Some(v.to_string().into()),
            KeyValue::Str(s) => Some(s.as_str().into()),
        }
    }
}

/// Interner of a single column's values.
#[derive(Debug, Default)]
struct ColumnInterner {
    strings: HashMap<String, u32>,
    ints: HashMap<i64, u32>,
    null: Option<u32>,
    next: u32,
    /// The ids of the last dictionary's values. Batches cut from one wide batch share their
    /// dictionaries, so they are interned once; holding the array keeps its address from
    /// being reused by another one.
    last_dictionary: Option<(ArrayRef, Vec<u32>)>,
}

impl ColumnInterner {
    fn fresh(&mut self) -> u32 {
        let id = self.next;
        self.next += 1;
        id
    }

    fn null_id(&mut self) -> u32 {
        match self.null {
            Some(id) => id,
            None => {
                let id = self.fresh();
                self.null = Some(id);
                id
            }
        }
    }

    fn str_id(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.strings.get(s) {
            return id;
        }
        let id = self.fresh();
        self.strings.insert(s.to_owned(), id);
        id
    }

    fn int_id(&mut self, v: i64) -> u32 {
        if let Some(&id) = self.ints.get(&v) {
            return id;
        }
        let id = self.fresh();
        self.ints.insert(v, id);
        id
    }

    fn value_id(&mut self, v: &KeyValue) -> u32 {
        match v {
            KeyValue::Null => self.null_id(),
            KeyValue::Int(i) => self.int_id(*i),
            KeyValue::Str(s) => self.str_id(s),
        }
    }

    /// The value of every id, indexed by id.
    fn values(&self) -> Vec<KeyValue> {
        let mut out = vec![KeyValue::Null; self.next as usize];
        for (s, &id) in &self.strings {
            out[id as usize] = KeyValue::Str(s.clone());
        }
        for (&v, &id) in &self.ints {
            out[id as usize] = KeyValue::Int(v);
        }
        out
    }

    /// The ids of a dictionary's `values`, interned once for batches that share them (see
    /// `last_dictionary`).
    fn dictionary_ids(&mut self, values: &ArrayRef) -> Result<&[u32]> {
        let cached = self
            .last_dictionary
            .take()
            .filter(|(v, _)| Arc::ptr_eq(v, values));
        let ids = match cached {
            Some((_, ids)) => ids,
            None => {
                let mut ids = Vec::with_capacity(values.len());
                self.intern(values.as_ref(), &mut ids)?;
                ids
            }
        };
        Ok(&self.last_dictionary.insert((Arc::clone(values), ids)).1)
    }

    /// The one id of every row of `array` when it is a dictionary of one value without
    /// NULLs (interned as [`Self::intern`] would), else `None`.
    fn single_value_id(&mut self, array: &dyn Array) -> Result<Option<u32>> {
        match array.data_type() {
            DataType::Dictionary(key, _)
                if key.as_ref() == &DataType::Int32 && array.logical_null_count() == 0 =>
            {
                let values = array
                    .as_dictionary::<arrow::datatypes::Int32Type>()
                    .values();
                if values.len() != 1 {
                    return Ok(None);
                }
                Ok(Some(self.dictionary_ids(values)?[0]))
            }
            _ => Ok(None),
        }
    }

    /// Appends the id of every row of `array` to `out`.
    fn intern(&mut self, array: &dyn Array, out: &mut Vec<u32>) -> Result<()> {
        match array.data_type() {
            DataType::Utf8 => {
                // Rows often repeat with a period (a replay's resources, tick after tick): a
                // row equal to the row one period back takes its id without a hash lookup.
                // The period is where row 0's value first comes back.
                let a = array.as_string::<i32>();
                let start = out.len();
                let mut period = 0;
                for i in 0..a.len() {
                    if a.is_null(i) {
                        let id = self.null_id();
                        out.push(id);
                        continue;
                    }
                    let v = a.value(i);
                    if period > 0
                        && i >= period
                        && a.is_valid(i - period)
                        && a.value(i - period) == v
                    {
                        out.push(out[start + i - period]);
                        continue;
                    }
                    let id = self.str_id(v);
                    out.push(id);
                    if period == 0 && i > 0 && a.is_valid(0) && id == out[start] {
                        period = i;
                        if periodic_from(a, period, i + 1) {
                            // The rest repeats the rows one period back: copy their ids.
                            while out.len() - start < a.len() {
                                let from = out.len() - period;
                                let take = period.min(a.len() - (out.len() - start));
                                out.extend_from_within(from..from + take);
                            }
                            break;
                        }
                    }
                }
            }
            DataType::LargeUtf8 => {
                let a = array.as_string::<i64>();
                out.extend((0..a.len()).map(|i| {
                    if a.is_null(i) {
                        self.null_id()
                    } else {
                        self.str_id(a.value(i))
                    }
                }));
            }
            DataType::Utf8View => {
                let a = array.as_string_view();
                out.extend((0..a.len()).map(|i| {
                    if a.is_null(i) {
                        self.null_id()
                    } else {
                        self.str_id(a.value(i))
                    }
                }));
            }
            DataType::Dictionary(key, _)
                if key.as_ref() == &DataType::Int32 && array.logical_null_count() == 0 =>
            {
                // Fast path (the samples view): intern each dictionary value once, then map
                // the keys.
                let dict = array.as_dictionary::<arrow::datatypes::Int32Type>();
                let value_ids = self.dictionary_ids(dict.values())?;
                match *value_ids {
                    // One value (the metric of a samples view): every row has its id.
                    [only] => out.resize(out.len() + dict.len(), only),
                    _ => out.extend(dict.keys().values().iter().map(|&k| value_ids[k as usize])),
                }
            }
            DataType::Dictionary(_, _) => {
                let dict = array.as_any_dictionary();
                let mut value_ids = Vec::with_capacity(dict.values().len());
                self.intern(dict.values().as_ref(), &mut value_ids)?;
                let keys = dict.normalized_keys();
                let nulls = array.logical_nulls();
                out.extend(keys.iter().enumerate().map(|(i, &k)| {
                    if nulls.as_ref().is_some_and(|n| n.is_null(i)) {
                        self.null_id()
                    } else {
                        value_ids[k]
                    }
                }));
            }
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::Date32
            | DataType::Date64
            | DataType::Timestamp(_, _)
            | DataType::Boolean => {
                let ints = cast(array, &DataType::Int64)?;
                let a = ints.as_primitive::<arrow::datatypes::Int64Type>();
                out.extend((0..a.len()).map(|i| {
                    if a.is_null(i) {
                        self.null_id()
                    } else {
                        self.int_id(a.value(i))
                    }
                }));
            }
            other => {
                let strings = cast(array, &DataType::Utf8).map_err(|e| {
                    OperatorError::InvalidInput(format!(
                        "cannot use a column of type {other} as a partition key: {e}"
                    ))
                })?;
                self.intern(strings.as_ref(), out)?;
            }
        }
        Ok(())
    }
}

/// Whether every row of `a` from `from` on equals the row `period` rows before it, checked
/// in bulk: the rows' lengths repeat and their bytes are one slice equal to the slice one
/// period back (equal lengths make equal concatenations equal row by row). Arrays with
/// NULLs are left to the row-by-row path.
fn periodic_from(a: &arrow::array::StringArray, period: usize, from: usize) -> bool {
    if a.null_count() > 0 || period == 0 || from < period || from >= a.len() {
        return false;
    }
    // Equal lengths from row `from` on: every offset from there is the one a period back
    // plus the same constant (a branch-free test per chunk, so it vectorises).
    let offsets = a.value_offsets();
    let (here, back) = (
        &offsets[from..],
        &offsets[from - period..offsets.len() - period],
    );
    let shift = here[0] - back[0];
    let lengths_repeat = here.chunks(1024).zip(back.chunks(1024)).all(|(h, b)| {
        h.iter()
            .zip(b)
            .fold(true, |same, (&x, &y)| same & (x - y == shift))
    });
    if !lengths_repeat {
        return false;
    }
    let bytes = a.value_data();
    let range = |r: std::ops::Range<usize>| offsets[r.start] as usize..offsets[r.end] as usize;
    bytes[range(from..a.len())] == bytes[range(from - period..a.len() - period)]
}

/// Group ids of (first, second) id pairs: a dense table per first id while second ids are
/// small (the common resource × metric case), a hash map beyond.
#[derive(Debug, Default)]
struct PairTable {
    dense: Vec<Vec<u32>>,
    sparse: HashMap<(u32, u32), u32>,
    /// For second ids that came alone in a batch (the metric of a samples view): the group
    /// id of every first id, `u32::MAX` where not assigned yet. A read-through copy of the
    /// tables above, kept while it stays under [`BY_SECOND_LIMIT`] entries.
    by_second: HashMap<u32, Vec<u32>>,
    /// For a column of `by_second` unchanged since it was last checked: `Some(offset)` when
    /// it maps every first id `a` to `offset + a`, as a replay's resources seen in one order
    /// for each metric make it; then a batch's group ids are an addition, not a gather.
    offsets: HashMap<u32, Option<u32>>,
    by_second_entries: usize,
    /// Entries `by_second` may hold ([`BY_SECOND_LIMIT`]; smaller in tests).
    by_second_limit: usize,
}

/// Entries (4 bytes each) the `by_second` cache may hold.
const BY_SECOND_LIMIT: usize = 1 << 24;

const DENSE_PAIR_LIMIT: u32 = 1 << 12;

impl PairTable {
    /// The id of `pair`, assigning `next` (and returning true) when it is new.
    fn get_or_insert(&mut self, pair: (u32, u32), next: u32) -> (u32, bool) {
        let (a, b) = (pair.0 as usize, pair.1 as usize);
        if pair.1 < DENSE_PAIR_LIMIT {
            if a >= self.dense.len() {
                self.dense.resize_with(a + 1, Vec::new);
            }
            let row = &mut self.dense[a];
            if b >= row.len() {
                row.resize(b + 1, u32::MAX);
            }
            if row[b] == u32::MAX {
                row[b] = next;
                return (next, true);
            }
            return (row[b], false);
        }
        let id = *self.sparse.entry(pair).or_insert(next);
        (id, id == next)
    }

    /// The group id of `(a, b)` for every `a` of `firsts`, appended to `out`; new pairs get
    /// ids from `next` on.
    /// `width` is one more than the largest id in `firsts` (or 0).
    fn get_column(
        &mut self,
        firsts: &[u32],
        width: u32,
        b: u32,
        next: &mut u32,
        out: &mut Vec<u32>,
    ) {
        let width = width as usize;
        let cached = self.by_second.get(&b).map_or(0, Vec::len);
        if width > cached && self.by_second_entries + (width - cached) > self.by_second_limit {
            for &a in firsts {
                let (id, new) = self.get_or_insert((a, b), *next);
                *next += u32::from(new);
                out.push(id);
            }
            return;
        }
        if width <= cached
            && let Some(Some(offset)) = self.offsets.get(&b)
        {
            // Below the column's length, `offset + a` cannot overflow (see `offsets`).
            out.extend(firsts.iter().map(|&a| a + offset));
            return;
        }
        let mut column = self.by_second.remove(&b).unwrap_or_default();
        if width > column.len() {
            self.by_second_entries += width - column.len();
            column.resize(width, u32::MAX);
            self.offsets.remove(&b);
        }
        // A plain gather first (it vectorises), then the rows of pairs not seen before.
        let start = out.len();
        out.extend(firsts.iter().map(|&a| column[a as usize]));
        if out[start..].contains(&u32::MAX) {
            self.offsets.remove(&b);
            for (&a, id) in firsts.iter().zip(&mut out[start..]) {
                if *id == u32::MAX {
                    let slot = &mut column[a as usize];
                    if *slot == u32::MAX {
                        let (assigned, new) = self.get_or_insert((a, b), *next);
                        *next += u32::from(new);
                        *slot = assigned;
                    }
                    *id = *slot;
                }
            }
        }
        self.offsets.entry(b).or_insert_with(|| {
            let offset = *column.first()?;
            // No unassigned slot (`u32::MAX`) can match: `offset + a` stays below it.
            let affine = column
                .iter()
                .enumerate()
                .all(|(a, &id)| offset.checked_add(a as u32) == Some(id) && id != u32::MAX);
            affine.then_some(offset)
        });
        self.by_second.insert(b, column);
    }
}

/// Maps rows of one or more key columns to dense, stable group ids.
#[derive(Debug, Default)]
pub struct KeyInterner {
    columns: Vec<ColumnInterner>,
    pairs: PairTable,
    tuples: HashMap<Box<[u32]>, u32>,
    groups: u32,
    /// Per column: the ids of the rows of the last array interned (empty while the column
    /// is [`constant`](Self::constant) and nothing needed them row by row).
    scratch: Vec<Vec<u32>>,
    /// Per column: the one id of every row of the last array, when it is a dictionary of
    /// one value without NULLs (the metric of a samples view).
    constant: Vec<Option<u32>>,
    /// Per column: one more than the largest id of the last array's rows.
    widths: Vec<u32>,
    /// Per column: that array. Views cut from one batch share their key arrays (the samples
    /// view passes the same `resource` column with every metric), so each is interned once;
    /// holding the array keeps its address from being reused by another one.
    last: Vec<Option<ArrayRef>>,
}

impl KeyInterner {
    /// An interner for keys of `columns` columns (0 means every row is in group 0).
    pub fn new(columns: usize) -> Self {
        Self {
            columns: (0..columns).map(|_| ColumnInterner::default()).collect(),
            groups: u32::from(columns == 0),
            pairs: PairTable {
                by_second_limit: BY_SECOND_LIMIT,
                ..PairTable::default()
            },
            ..Self::default()
        }
    }

    /// Number of distinct groups seen so far.
    pub fn len(&self) -> usize {
        self.groups as usize
    }

    /// Whether no group has been seen.
    pub fn is_empty(&self) -> bool {
        self.groups == 0
    }

    /// The group id of one key given by its values (one per key column), assigning a new id
    /// when it is new. Used to restore saved state.
    pub fn intern_values(&mut self, key: &[KeyValue]) -> Result<u32> {
        if key.len() != self.columns.len() {
            return Err(OperatorError::InvalidInput(format!(
                "expected {} key values, got {}",
                self.columns.len(),
                key.len()
            )));
        }
        let ids: Vec<u32> = key
            .iter()
            .zip(self.columns.iter_mut())
            .map(|(v, c)| c.value_id(v))
            .collect();
        Ok(match ids.len() {
            0 => 0,
            1 => {
                self.groups = self.columns[0].next;
                ids[0]
            }
            2 => {
                let (id, new) = self.pairs.get_or_insert((ids[0], ids[1]), self.groups);
                if new {
                    self.groups += 1;
                }
                id
            }
            _ => *self
                .tuples
                .entry(ids.into_boxed_slice())
                .or_insert_with(|| {
                    self.groups += 1;
                    self.groups - 1
                }),
        })
    }

    /// The key values of every group, indexed by group id.
    pub fn group_keys(&self) -> Vec<Vec<KeyValue>> {
        let values: Vec<Vec<KeyValue>> = self.columns.iter().map(|c| c.values()).collect();
        let mut out = vec![Vec::new(); self.groups as usize];
        match self.columns.len() {
            0 => {}
            1 => {
                for (id, v) in values[0].iter().enumerate() {
                    out[id] = vec![v.clone()];
                }
            }
            2 => {
                let pair = |a: u32, b: u32| {
                    vec![values[0][a as usize].clone(), values[1][b as usize].clone()]
                };
                for (a, row) in self.pairs.dense.iter().enumerate() {
                    for (b, &g) in row.iter().enumerate() {
                        if g != u32::MAX {
                            out[g as usize] = pair(a as u32, b as u32);
                        }
                    }
                }
                for (&(a, b), &g) in &self.pairs.sparse {
                    out[g as usize] = pair(a, b);
                }
            }
            _ => {
                for (tuple, &g) in &self.tuples {
                    out[g as usize] = tuple
                        .iter()
                        .enumerate()
                        .map(|(c, &id)| values[c][id as usize].clone())
                        .collect();
                }
            }
        }
        out
    }

    /// The group id of every row. `keys` must hold one array per key column, all of `rows`
    /// rows.
    pub fn intern(&mut self, keys: &[ArrayRef], rows: usize) -> Result<Vec<u32>> {
        if keys.len() != self.columns.len() {
            return Err(OperatorError::InvalidInput(format!(
                "expected {} key columns, got {}",
                self.columns.len(),
                keys.len()
            )));
        }
        if let Some(k) = keys.iter().find(|k| k.len() != rows) {
            return Err(OperatorError::InvalidInput(format!(
                "key column of {} rows for {rows} rows",
                k.len()
            )));
        }
        let n = keys.len();
        if n == 0 {
            return Ok(vec![0; rows]);
        }
        self.scratch.resize_with(n, Vec::new);
        self.constant.resize(n, None);
        self.widths.resize(n, 0);
        self.last.resize(n, None);
        for (c, key) in keys.iter().enumerate() {
            if self.last[c].as_ref().is_some_and(|a| Arc::ptr_eq(a, key)) {
                continue;
            }
            self.last[c] = None;
            self.scratch[c].clear();
            let interner = &mut self.columns[c];
            self.constant[c] = interner.single_value_id(key.as_ref())?;
            self.widths[c] = match self.constant[c] {
                Some(id) => id + 1,
                None => {
                    let scratch = &mut self.scratch[c];
                    scratch.reserve(rows);
                    interner.intern(key.as_ref(), scratch)?;
                    // Only pairs use it (`PairTable::get_column`).
                    if n == 2 {
                        scratch.iter().copied().max().map_or(0, |m| m + 1)
                    } else {
                        0
                    }
                }
            };
            self.last[c] = Some(Arc::clone(key));
        }
        if n == 2
            && let (None, Some(b)) = (self.constant[0], self.constant[1])
        {
            // One value in the second column (a metric of the samples view): one table
            // row lookup per row, or an addition.
            let mut out = Vec::with_capacity(rows);
            let first = &self.scratch[0];
            self.pairs
                .get_column(first, self.widths[0], b, &mut self.groups, &mut out);
            return Ok(out);
        }
        for c in 0..n {
            if let Some(id) = self.constant[c]
                && self.scratch[c].len() != rows
            {
                self.scratch[c].clear();
                self.scratch[c].resize(rows, id);
            }
        }
        match n {
            1 => {
                self.groups = self.columns[0].next;
                Ok(self.scratch[0].clone())
            }
            n => {
                let mut out = Vec::with_capacity(rows);
                if n == 2 {
                    let (first, second) = (&self.scratch[0], &self.scratch[1]);
                    let b = second.first().copied().unwrap_or(0);
                    if second.iter().all(|&x| x == b) {
                        // One value in the second column, not as a dictionary.
                        let width = self.widths[0];
                        self.pairs
                            .get_column(first, width, b, &mut self.groups, &mut out);
                    } else {
                        for (&a, &b) in first.iter().zip(second) {
                            let (id, new) = self.pairs.get_or_insert((a, b), self.groups);
                            self.groups += u32::from(new);
                            out.push(id);
                        }
                    }
                } else {
                    let mut tuple = vec![0u32; n];
                    for i in 0..rows {
                        for c in 0..n {
                            tuple[c] = self.scratch[c][i];
                        }
                        let id = match self.tuples.get(tuple.as_slice()) {
                            Some(&id) => id,
                            None => {
                                let id = self.groups;
                                self.tuples.insert(tuple.clone().into_boxed_slice(), id);
                                self.groups += 1;
                                id
                            }
                        };
                        out.push(id);
                    }
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{DictionaryArray, Int32Array, StringArray};
    use arrow::datatypes::Int32Type;

    use super::*;

    #[test]
    fn ids_are_dense_and_stable_across_batches() {
        let mut k = KeyInterner::new(1);
        let a: ArrayRef = Arc::new(StringArray::from(vec![
            Some("x"),
            Some("y"),
            None,
            Some("x"),
        ]));
        assert_eq!(k.intern(&[a], 4).unwrap(), vec![0, 1, 2, 0]);
        let b: ArrayRef = Arc::new(StringArray::from(vec![Some("z"), None, Some("y")]));
        assert_eq!(k.intern(&[b], 3).unwrap(), vec![3, 2, 1]);
        assert_eq!(k.len(), 4);
    }

    #[test]
    fn dictionary_and_plain_columns_agree() {
        let mut plain = KeyInterner::new(2);
        let mut dict = KeyInterner::new(2);
        let r: ArrayRef = Arc::new(StringArray::from(vec!["a", "a", "b", "b"]));
        let m: ArrayRef = Arc::new(StringArray::from(vec!["cpu", "mem", "cpu", "mem"]));
        let rd: ArrayRef = Arc::new(
            DictionaryArray::<Int32Type>::try_new(
                Int32Array::from(vec![0, 0, 1, 1]),
                Arc::new(StringArray::from(vec!["a", "b"])),
            )
            .unwrap(),
        );
        let md: ArrayRef = Arc::new(
            DictionaryArray::<Int32Type>::try_new(
                Int32Array::from(vec![1, 0, 1, 0]),
                Arc::new(StringArray::from(vec!["mem", "cpu"])),
            )
            .unwrap(),
        );
        assert_eq!(
            plain.intern(&[r, m], 4).unwrap(),
            dict.intern(&[rd, md], 4).unwrap()
        );
        assert_eq!(plain.len(), 4);
    }

    /// Per-metric views of one batch: the resource column shared, one metric per view.
    fn views(resources: &[&str], metrics: usize) -> Vec<[ArrayRef; 2]> {
        let resource: ArrayRef = Arc::new(StringArray::from(resources.to_vec()));
        let names: ArrayRef = Arc::new(StringArray::from(vec!["cpu", "mem", "disk"]));
        (0..metrics)
            .map(|m| {
                let metric: ArrayRef = Arc::new(
                    DictionaryArray::<Int32Type>::try_new(
                        Int32Array::from(vec![m as i32; resources.len()]),
                        Arc::clone(&names),
                    )
                    .unwrap(),
                );
                [Arc::clone(&resource), metric]
            })
            .collect()
    }

    /// The ids of every view, interned by `k`, with each array deep-copied first when `copy`
    /// (so that nothing is shared and no cache applies).
    fn ids_of(k: &mut KeyInterner, views: &[[ArrayRef; 2]], copy: bool) -> Vec<Vec<u32>> {
        views
            .iter()
            .map(|v| {
                let cols: Vec<ArrayRef> = if copy {
                    v.iter()
                        .map(|a| arrow::array::make_array(a.to_data()))
                        .collect()
                } else {
                    v.to_vec()
                };
                k.intern(&cols, v[0].len()).unwrap()
            })
            .collect()
    }

    #[test]
    fn shared_and_single_valued_columns_get_the_same_ids() {
        // Cached columns and the one-metric table against interning every array afresh,
        // over batches that bring new resources, repeat old ones and change their order.
        let batches: [&[&str]; 3] = [&["a", "b", "c"], &["c", "d", "a", "a"], &["e", "b"]];
        let (mut cached, mut fresh) = (KeyInterner::new(2), KeyInterner::new(2));
        for resources in batches {
            let v = views(resources, 3);
            assert_eq!(ids_of(&mut cached, &v, false), ids_of(&mut fresh, &v, true));
        }
        assert_eq!(cached.len(), 15);
        assert_eq!(cached.group_keys(), fresh.group_keys());
        // Mixed metrics in one column take the general path and still agree.
        let r: ArrayRef = Arc::new(StringArray::from(vec!["e", "a", "f"]));
        let m: ArrayRef = Arc::new(StringArray::from(vec!["cpu", "disk", "mem"]));
        assert_eq!(
            cached.intern(&[Arc::clone(&r), Arc::clone(&m)], 3).unwrap(),
            fresh.intern(&[r, m], 3).unwrap()
        );
    }

    proptest::proptest! {
        /// Per-metric views as the samples view makes them (the batch's resource column
        /// shared, one one-entry dictionary per metric) get the ids of a first-seen
        /// numbering of (resource, metric), whether a metric's ids are found by a gather or,
        /// while resources keep one order, by an addition; over batches that repeat,
        /// reorder and add resources.
        #[test]
        fn views_get_first_seen_ids(
            batches in proptest::collection::vec(
                proptest::collection::vec(0usize..12, 0..30), 1..8),
            metrics in 1usize..4,
            in_order in proptest::bool::ANY,
        ) {
            let names = StringArray::from(vec!["cpu", "mem", "disk"]);
            let mut k = KeyInterner::new(2);
            let mut reference: HashMap<(usize, usize), u32> = HashMap::new();
            for (i, rows) in batches.iter().enumerate() {
                // Sometimes every batch holds all resources in one order (the replay's case).
                let rows: Vec<usize> = if in_order && i % 2 == 0 { (0..12).collect() } else { rows.clone() };
                let resource: ArrayRef = Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| format!("r{r}")),
                ));
                let zeros = DictionaryArray::<Int32Type>::try_new(
                    Int32Array::from(vec![0; rows.len()]),
                    Arc::new(names.slice(0, 1)),
                )
                .unwrap();
                for m in 0..metrics {
                    let metric: ArrayRef =
                        Arc::new(zeros.with_values(Arc::new(names.slice(m, 1))));
                    let got = k.intern(&[Arc::clone(&resource), metric], rows.len()).unwrap();
                    let expected: Vec<u32> = rows
                        .iter()
                        .map(|&r| {
                            let next = reference.len() as u32;
                            *reference.entry((r, m)).or_insert(next)
                        })
                        .collect();
                    proptest::prop_assert_eq!(got, expected);
                }
            }
        }
    }

    proptest::proptest! {
        /// A string column's ids, found partly through its period, are a first-seen
        /// numbering of its values, with NULL a value of its own.
        #[test]
        fn string_ids_are_first_seen_ids(
            period in 1usize..20,
            rows in 0usize..200,
            noise in proptest::collection::vec((0usize..200, proptest::option::of(0usize..30)), 0..10),
            skip in 0usize..4,
        ) {
            let mut values: Vec<Option<String>> =
                (0..rows).map(|i| Some(format!("r{}", i % period))).collect();
            for (at, v) in noise {
                if let Some(slot) = values.get_mut(at) {
                    *slot = v.map(|v| format!("r{v}"));
                }
            }
            let mut k = KeyInterner::new(1);
            // A slice of a longer array, as a batch cut from a larger one is: its offsets
            // do not start at 0.
            let mut longer: Vec<Option<String>> = (0..skip).map(|i| Some(format!("x{i}"))).collect();
            longer.extend(values.iter().cloned());
            let column: ArrayRef = Arc::new(StringArray::from(longer).slice(skip, rows));
            let got = k.intern(&[column], rows).unwrap();
            let mut seen: HashMap<Option<String>, u32> = HashMap::new();
            let expected: Vec<u32> = values
                .into_iter()
                .map(|v| {
                    let next = seen.len() as u32;
                    *seen.entry(v).or_insert(next)
                })
                .collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn single_valued_table_respects_its_limit() {
        let mut small = KeyInterner::new(2);
        small.pairs.by_second_limit = 4;
        let mut large = KeyInterner::new(2);
        let resources: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
        let names: Vec<&str> = resources.iter().map(String::as_str).collect();
        let v = views(&names, 3);
        assert_eq!(ids_of(&mut small, &v, false), ids_of(&mut large, &v, false));
        assert_eq!(small.pairs.by_second_entries, 0, "over the limit: no cache");
        assert_eq!(large.pairs.by_second_entries, 30);
    }

    #[test]
    fn single_valued_dictionaries_in_any_position() {
        // A dictionary of one value is not materialised row by row unless a path needs it:
        // in every position, alone, with others, and interned again (cached), it must give
        // the ids of the same values as plain strings.
        let varying = ["a", "b", "a", "c"];
        for n in 1..=3 {
            for mask in 0..(1u32 << n) {
                let (mut dict, mut plain) = (KeyInterner::new(n), KeyInterner::new(n));
                for round in 0..3 {
                    let constant = ["x", "y", "x"][round];
                    let (mut d_cols, mut p_cols): (Vec<ArrayRef>, Vec<ArrayRef>) = (vec![], vec![]);
                    for c in 0..n {
                        if mask & (1 << c) != 0 {
                            d_cols.push(Arc::new(
                                DictionaryArray::<Int32Type>::try_new(
                                    Int32Array::from(vec![0; 4]),
                                    Arc::new(StringArray::from(vec![constant])),
                                )
                                .unwrap(),
                            ));
                            p_cols.push(Arc::new(StringArray::from(vec![constant; 4])));
                        } else {
                            let col: ArrayRef = Arc::new(StringArray::from(varying.to_vec()));
                            d_cols.push(Arc::clone(&col));
                            p_cols.push(col);
                        }
                    }
                    for _ in 0..2 {
                        assert_eq!(
                            dict.intern(&d_cols, 4).unwrap(),
                            plain.intern(&p_cols, 4).unwrap(),
                            "{n} columns, mask {mask:b}, round {round}"
                        );
                    }
                }
                assert_eq!(dict.len(), plain.len());
                assert_eq!(dict.group_keys(), plain.group_keys());
            }
        }
    }

    #[test]
    fn many_columns() {
        let mut k = KeyInterner::new(3);
        let c: ArrayRef = Arc::new(Int32Array::from(vec![1, 1, 2]));
        assert_eq!(
            k.intern(&[c.clone(), c.clone(), c], 3).unwrap(),
            vec![0, 0, 1]
        );
        assert!(k.intern(&[], 0).is_err());
    }

    #[test]
    fn group_keys_round_trip_through_values() {
        for columns in 1..=3 {
            let mut k = KeyInterner::new(columns);
            let s: ArrayRef = Arc::new(StringArray::from(vec![
                Some("a"),
                None,
                Some("b"),
                Some("a"),
            ]));
            let n: ArrayRef = Arc::new(Int32Array::from(vec![Some(1), Some(2), None, Some(1)]));
            let cols: Vec<ArrayRef> = [s.clone(), n, s].into_iter().take(columns).collect();
            let ids = k.intern(&cols, 4).unwrap();
            let keys = k.group_keys();
            assert_eq!(keys.len(), k.len());
            let mut fresh = KeyInterner::new(columns);
            // Restored in reverse: ids differ, the mapping from values to groups does not.
            let mut map = std::collections::HashMap::new();
            for (g, key) in keys.iter().enumerate().rev() {
                map.insert(g as u32, fresh.intern_values(key).unwrap());
            }
            let again = fresh.intern(&cols, 4).unwrap();
            let mapped: Vec<u32> = ids.iter().map(|g| map[g]).collect();
            assert_eq!(again, mapped, "{columns} columns");
            assert_eq!(fresh.len(), k.len());
        }
        assert_eq!(KeyValue::Int(7).as_text().unwrap(), "7");
        assert!(KeyValue::Null.as_text().is_none());
    }
}
