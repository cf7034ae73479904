//! Conservative row predicates over `f64` columns, evaluated a chunk of rows at a time.
//!
//! A [`RowPredicate`] is derived from a SQL filter that follows a window (see the `sql`
//! crate): the window operator evaluates it on each chunk of rows right after computing the
//! chunk's aggregates, and only the rows it keeps go on to the SQL filter itself. It is a
//! *pre*-filter: it must never drop a row the SQL filter would keep, and it may keep rows the
//! SQL filter then drops.
//!
//! # Semantics
//! Every value is an `f64`; booleans are `0.0` (false) and `1.0` (true). `NaN` stands for
//! *unknown*: a SQL NULL, a NaN value, or anything the predicate cannot decide. Logic is
//! Kleene's: `false AND unknown` is false, `true OR unknown` is true, every other operation
//! with an unknown operand is unknown. A row is dropped only when the predicate is certainly
//! false (`0.0`).
//!
//! Operations match the SQL engine's on the values they decide, and decline (give unknown)
//! where the engines may differ:
//! * arithmetic is IEEE `f64` (as Arrow's float kernels), with a division by zero unknown;
//! * comparisons of two known values are IEEE, except that NaN (Arrow orders it above every
//!   number) is unknown, and two zeros are unknown (`-0.0` against `+0.0`);
//! * `NULLIF(a, b)` is `a`, or unknown when `a = b` or `b` is unknown.
//!
//! ```
//! use healer_operators::predicate::{Cmp, RowExpr, RowPredicate, Scratch};
//!
//! // x > 3 over one column.
//! let p = RowPredicate::new(RowExpr::Compare(
//!     Cmp::Gt,
//!     Box::new(RowExpr::Column(0)),
//!     Box::new(RowExpr::Literal(3.0)),
//! ));
//! let x = [1.0, 4.0, f64::NAN, 3.0];
//! let mut kept = Vec::new();
//! p.select(&[&x], x.len(), &mut kept, &mut Scratch::default());
//! // Row 1 passes, row 2 is unknown (kept).
//! assert_eq!(kept, vec![1, 2]);
//! ```

/// An arithmetic operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arith {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`; unknown when `b` is zero.
    Div,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `=`.
    Eq,
    /// `<>`.
    NotEq,
    /// `<`.
    Lt,
    /// `<=`.
    LtEq,
    /// `>`.
    Gt,
    /// `>=`.
    GtEq,
}

/// An expression over the columns of a chunk of rows.
#[derive(Debug, Clone, PartialEq)]
pub enum RowExpr {
    /// Column `i` of the columns given to [`RowPredicate::select`].
    Column(usize),
    /// A constant (`NaN`: unknown).
    Literal(f64),
    /// `-a`.
    Neg(Box<RowExpr>),
    /// `abs(a)`.
    Abs(Box<RowExpr>),
    /// `NOT a`.
    Not(Box<RowExpr>),
    /// `a op b`.
    Arith(Arith, Box<RowExpr>, Box<RowExpr>),
    /// `a op b`, a boolean.
    Compare(Cmp, Box<RowExpr>, Box<RowExpr>),
    /// `a AND b`.
    And(Box<RowExpr>, Box<RowExpr>),
    /// `a OR b`.
    Or(Box<RowExpr>, Box<RowExpr>),
    /// `NULLIF(a, b)`.
    NullIf(Box<RowExpr>, Box<RowExpr>),
}

impl RowExpr {
    /// The columns the expression reads, each once, in first-use order.
    pub fn columns(&self) -> Vec<usize> {
        fn walk(e: &RowExpr, out: &mut Vec<usize>) {
            match e {
                RowExpr::Column(i) => {
                    if !out.contains(i) {
                        out.push(*i);
                    }
                }
                RowExpr::Literal(_) => {}
                RowExpr::Neg(a) | RowExpr::Abs(a) | RowExpr::Not(a) => walk(a, out),
                RowExpr::Arith(_, a, b)
                | RowExpr::Compare(_, a, b)
                | RowExpr::And(a, b)
                | RowExpr::Or(a, b)
                | RowExpr::NullIf(a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(self, &mut out);
        out
    }
}

/// A row predicate, evaluated column by column over chunks of rows into reused buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPredicate {
    expr: RowExpr,
    columns: Vec<usize>,
}

/// An operand during evaluation: a chunk-long buffer, a column of the chunk, or a constant.
enum Val<'a> {
    Buf(Vec<f64>),
    Col(&'a [f64]),
    Const(f64),
}

impl RowPredicate {
    /// A predicate that keeps the rows where `expr` is true or unknown.
    pub fn new(expr: RowExpr) -> Self {
        let columns = expr.columns();
        RowPredicate { expr, columns }
    }

    /// The expression.
    pub fn expr(&self) -> &RowExpr {
        &self.expr
    }

    /// The columns the predicate reads.
    pub fn columns(&self) -> &[usize] {
        &self.columns
    }

    /// Appends to `kept` the positions `k` of the rows `k < len` that the predicate
    /// does not rule out. `columns[i]` holds column `i` for the chunk (NaN where NULL); only
    /// the columns of [`RowPredicate::columns`] are read, and they need at least `len` rows.
    /// `scratch` holds the evaluation's buffers from one call to the next.
    pub fn select(
        &self,
        columns: &[&[f64]],
        len: usize,
        kept: &mut Vec<u32>,
        scratch: &mut Scratch,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2, as just checked.
            return unsafe { self.select_avx2(columns, len, kept, scratch) };
        }
        self.select_with(columns, len, kept, scratch, &eval_baseline);
    }

    /// [`RowPredicate::select`] compiled for AVX2: four lanes per instruction instead of the
    /// baseline's two, the same IEEE operations.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn select_avx2(
        &self,
        columns: &[&[f64]],
        len: usize,
        kept: &mut Vec<u32>,
        scratch: &mut Scratch,
    ) {
        // A closure in an AVX2 function is AVX2 code too.
        self.select_with(columns, len, kept, scratch, &|e, c, l, p| {
            eval_avx2(e, c, l, p)
        });
    }

    #[inline(always)]
    fn select_with<'a>(
        &self,
        columns: &[&'a [f64]],
        len: usize,
        kept: &mut Vec<u32>,
        scratch: &mut Scratch,
        eval: &impl Fn(&RowExpr, &[&'a [f64]], usize, &mut Vec<Vec<f64>>) -> Val<'a>,
    ) {
        let pool = &mut scratch.0;
        match eval(&self.expr, columns, len, pool) {
            Val::Const(c) => {
                if c != 0.0 {
                    kept.extend(0..len as u32);
                }
            }
            Val::Buf(b) => {
                keep_nonzero(&b, kept);
                pool.push(b);
            }
            Val::Col(c) => keep_nonzero(c, kept),
        }
    }
}

/// Buffers reused by [`RowPredicate::select`].
#[derive(Debug, Default)]
pub struct Scratch(Vec<Vec<f64>>);

#[inline(always)]
fn unknown_if(cond: bool, v: f64) -> f64 {
    if cond { f64::NAN } else { v }
}

#[inline(always)]
fn truth(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// A comparison's result `r` for operands `a` and `b`: unknown where Arrow's order may
/// differ from IEEE's (a NaN operand, or two zeros of either sign).
#[inline(always)]
fn compare(a: f64, b: f64, r: bool) -> f64 {
    let undecided = a.is_nan() | b.is_nan() | ((a == 0.0) & (b == 0.0));
    unknown_if(undecided, truth(r))
}

#[inline(always)]
fn and(a: f64, b: f64) -> f64 {
    if (a == 0.0) | (b == 0.0) {
        0.0
    } else {
        unknown_if(a.is_nan() | b.is_nan(), 1.0)
    }
}

#[inline(always)]
fn or(a: f64, b: f64) -> f64 {
    if (a == 1.0) | (b == 1.0) {
        1.0
    } else {
        unknown_if(a.is_nan() | b.is_nan(), 0.0)
    }
}

#[inline(always)]
fn null_if(a: f64, b: f64) -> f64 {
    unknown_if(b.is_nan() | (a == b), a)
}

#[inline(always)]
fn not(a: f64) -> f64 {
    unknown_if(a.is_nan(), 1.0 - a)
}

#[inline(always)]
fn keep_nonzero(values: &[f64], kept: &mut Vec<u32>) {
    for (&v, k) in values.iter().zip(0u32..) {
        if v != 0.0 {
            kept.push(k);
        }
    }
}

/// A buffer of `len` values (whatever they are) from the pool.
fn buffer(pool: &mut Vec<Vec<f64>>, len: usize) -> Vec<f64> {
    let mut b = pool.pop().unwrap_or_default();
    b.resize(len, 0.0);
    b
}

/// `f` over every row of `v`, written over `v`'s buffer when it has one. Every buffer holds
/// exactly the chunk's rows.
#[inline(always)]
fn unary<'a>(v: Val<'a>, len: usize, pool: &mut Vec<Vec<f64>>, f: impl Fn(f64) -> f64) -> Val<'a> {
    match v {
        Val::Const(c) => Val::Const(f(c)),
        Val::Buf(mut b) => {
            for x in &mut b {
                *x = f(*x);
            }
            Val::Buf(b)
        }
        Val::Col(c) => {
            let mut b = buffer(pool, len);
            for (o, &x) in b.iter_mut().zip(c) {
                *o = f(x);
            }
            Val::Buf(b)
        }
    }
}

/// `f` over every row of `a` and `b`, written over a buffer of theirs when they have one.
/// Inlined into each operator's own call so that every loop is specialised and vectorises.
#[inline(always)]
fn binary<'a>(
    a: Val<'a>,
    b: Val<'a>,
    len: usize,
    pool: &mut Vec<Vec<f64>>,
    f: impl Fn(f64, f64) -> f64,
) -> Val<'a> {
    match (a, b) {
        (Val::Const(x), Val::Const(y)) => Val::Const(f(x, y)),
        (Val::Buf(mut xs), Val::Const(y)) => {
            for x in &mut xs {
                *x = f(*x, y);
            }
            Val::Buf(xs)
        }
        (Val::Const(x), Val::Buf(mut ys)) => {
            for y in &mut ys {
                *y = f(x, *y);
            }
            Val::Buf(ys)
        }
        (Val::Buf(mut xs), Val::Buf(ys)) => {
            for (x, &y) in xs.iter_mut().zip(&ys) {
                *x = f(*x, y);
            }
            pool.push(ys);
            Val::Buf(xs)
        }
        (Val::Buf(mut xs), Val::Col(ys)) => {
            for (x, &y) in xs.iter_mut().zip(ys) {
                *x = f(*x, y);
            }
            Val::Buf(xs)
        }
        (Val::Col(xs), Val::Buf(mut ys)) => {
            for (y, &x) in ys.iter_mut().zip(xs) {
                *y = f(x, *y);
            }
            Val::Buf(ys)
        }
        (Val::Col(xs), Val::Const(y)) => {
            let mut b = buffer(pool, len);
            for (o, &x) in b.iter_mut().zip(xs) {
                *o = f(x, y);
            }
            Val::Buf(b)
        }
        (Val::Const(x), Val::Col(ys)) => {
            let mut b = buffer(pool, len);
            for (o, &y) in b.iter_mut().zip(ys) {
                *o = f(x, y);
            }
            Val::Buf(b)
        }
        (Val::Col(xs), Val::Col(ys)) => {
            let mut b = buffer(pool, len);
            for ((o, &x), &y) in b.iter_mut().zip(xs).zip(ys) {
                *o = f(x, y);
            }
            Val::Buf(b)
        }
    }
}

/// Evaluates `e`, its operands through `eval` (which lets a build for other CPU features
/// recurse into itself).
#[inline(always)]
fn eval_with<'a>(
    e: &RowExpr,
    columns: &[&'a [f64]],
    len: usize,
    pool: &mut Vec<Vec<f64>>,
    eval: &impl Fn(&RowExpr, &[&'a [f64]], usize, &mut Vec<Vec<f64>>) -> Val<'a>,
) -> Val<'a> {
    let pair = |a: &RowExpr, b: &RowExpr, pool: &mut Vec<Vec<f64>>| {
        (eval(a, columns, len, pool), eval(b, columns, len, pool))
    };
    match e {
        RowExpr::Column(i) => Val::Col(&columns[*i][..len]),
        RowExpr::Literal(c) => Val::Const(*c),
        RowExpr::Neg(a) => unary(eval(a, columns, len, pool), len, pool, |x| -x),
        RowExpr::Abs(a) => unary(eval(a, columns, len, pool), len, pool, f64::abs),
        RowExpr::Not(a) => unary(eval(a, columns, len, pool), len, pool, not),
        RowExpr::Arith(op, a, b) => {
            let (a, b) = pair(a, b, pool);
            match op {
                Arith::Add => binary(a, b, len, pool, |x, y| x + y),
                Arith::Sub => binary(a, b, len, pool, |x, y| x - y),
                Arith::Mul => binary(a, b, len, pool, |x, y| x * y),
                Arith::Div => binary(a, b, len, pool, |x, y| unknown_if(y == 0.0, x / y)),
            }
        }
        RowExpr::Compare(op, a, b) => {
            let (a, b) = pair(a, b, pool);
            match op {
                Cmp::Eq => binary(a, b, len, pool, |x, y| compare(x, y, x == y)),
                Cmp::NotEq => binary(a, b, len, pool, |x, y| compare(x, y, x != y)),
                Cmp::Lt => binary(a, b, len, pool, |x, y| compare(x, y, x < y)),
                Cmp::LtEq => binary(a, b, len, pool, |x, y| compare(x, y, x <= y)),
                Cmp::Gt => binary(a, b, len, pool, |x, y| compare(x, y, x > y)),
                Cmp::GtEq => binary(a, b, len, pool, |x, y| compare(x, y, x >= y)),
            }
        }
        RowExpr::And(a, b) => {
            let (a, b) = pair(a, b, pool);
            binary(a, b, len, pool, and)
        }
        RowExpr::Or(a, b) => {
            let (a, b) = pair(a, b, pool);
            binary(a, b, len, pool, or)
        }
        RowExpr::NullIf(a, b) => {
            let (a, b) = pair(a, b, pool);
            binary(a, b, len, pool, null_if)
        }
    }
}

fn eval_baseline<'a>(
    e: &RowExpr,
    columns: &[&'a [f64]],
    len: usize,
    pool: &mut Vec<Vec<f64>>,
) -> Val<'a> {
    eval_with(e, columns, len, pool, &eval_baseline)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn eval_avx2<'a>(
    e: &RowExpr,
    columns: &[&'a [f64]],
    len: usize,
    pool: &mut Vec<Vec<f64>>,
) -> Val<'a> {
    eval_with(e, columns, len, pool, &|e, c, l, p| eval_avx2(e, c, l, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(i: usize) -> Box<RowExpr> {
        Box::new(RowExpr::Column(i))
    }

    fn lit(v: f64) -> Box<RowExpr> {
        Box::new(RowExpr::Literal(v))
    }

    fn kept(p: &RowPredicate, columns: &[&[f64]]) -> Vec<u32> {
        let mut out = Vec::new();
        p.select(columns, columns[0].len(), &mut out, &mut Scratch::default());
        out
    }

    #[test]
    fn kleene_logic_keeps_unknown_rows() {
        let nan = f64::NAN;
        let a = [1.0, 0.0, nan, 1.0, 0.0, nan];
        let b = [nan, nan, nan, 1.0, 0.0, 0.0];
        let and = RowPredicate::new(RowExpr::And(col(0), col(1)));
        assert_eq!(kept(&and, &[&a, &b]), vec![0, 2, 3]);
        let or = RowPredicate::new(RowExpr::Or(col(0), col(1)));
        assert_eq!(kept(&or, &[&a, &b]), vec![0, 1, 2, 3, 5]);
        let not = RowPredicate::new(RowExpr::Not(col(0)));
        assert_eq!(kept(&not, &[&a]), vec![1, 2, 4, 5]);
    }

    #[test]
    fn comparisons_decline_nan_and_signed_zeros() {
        let x = [f64::NAN, -0.0, 0.0, 1.0, -1.0, f64::INFINITY];
        let gt0 = RowPredicate::new(RowExpr::Compare(Cmp::Gt, col(0), lit(0.0)));
        // NaN and the two zeros are unknown; 1 and inf are greater.
        assert_eq!(kept(&gt0, &[&x]), vec![0, 1, 2, 3, 5]);
        let eq1 = RowPredicate::new(RowExpr::Compare(Cmp::Eq, col(0), lit(1.0)));
        assert_eq!(kept(&eq1, &[&x]), vec![0, 3]);
    }

    #[test]
    fn z_score_filter_keeps_what_sql_keeps_and_unknowns() {
        // n = 300 AND abs((value - mean) / NULLIF(std, 0)) > 3, columns value, mean, std, n.
        let z = RowExpr::Arith(
            Arith::Div,
            Box::new(RowExpr::Arith(Arith::Sub, col(0), col(1))),
            Box::new(RowExpr::NullIf(col(2), lit(0.0))),
        );
        let p = RowPredicate::new(RowExpr::And(
            Box::new(RowExpr::Compare(Cmp::Eq, col(3), lit(300.0))),
            Box::new(RowExpr::Compare(
                Cmp::Gt,
                Box::new(RowExpr::Abs(Box::new(z))),
                lit(3.0),
            )),
        ));
        assert_eq!(p.columns(), &[3, 0, 1, 2]);
        let value = [10.0, 10.0, 13.5, 5.0, 10.0, f64::NAN];
        let mean = [0.0, 0.0, 10.0, 10.0, 10.0, 10.0];
        let std = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0];
        let n = [300.0, 299.0, 300.0, 300.0, 300.0, 300.0];
        // Row 0: z = 10, kept. Row 1: short window. Row 2: z = 3.5. Row 3: z = -5.
        // Row 4: std 0 gives NULL (unknown, kept). Row 5: NaN value, unknown.
        assert_eq!(kept(&p, &[&value, &mean, &std, &n]), vec![0, 2, 3, 4, 5]);
        let mut out = Vec::new();
        let mut scratch = Scratch::default();
        p.select(&[&value, &mean, &std, &n], 3, &mut out, &mut scratch);
        assert_eq!(out, vec![0, 2]);
    }

    #[test]
    fn division_by_zero_and_constants() {
        let x = [1.0, 2.0];
        let zero = [0.0, 1.0];
        let p = RowPredicate::new(RowExpr::Compare(
            Cmp::Lt,
            Box::new(RowExpr::Arith(Arith::Div, col(0), col(1))),
            lit(0.0),
        ));
        // 1 / 0 is unknown; 2 / 1 = 2 is not below 0.
        assert_eq!(kept(&p, &[&x, &zero]), vec![0]);
        let never = RowPredicate::new(RowExpr::Compare(Cmp::Lt, lit(1.0), lit(0.0)));
        assert!(kept(&never, &[&x]).is_empty());
        let always = RowPredicate::new(RowExpr::Neg(lit(-1.0)));
        assert_eq!(kept(&always, &[&x]), vec![0, 1]);
    }
}
