#!/usr/bin/env python3
"""Train healer's LSTM forecaster on SMD training data and export it to ONNX.

The model is what PyTorch would export for ``nn.LSTM(1, 64, num_layers=2)`` followed by
``nn.Linear(64, 1)`` applied to the last time step (50,497 parameters), trained here with
JAX (no torch) and written as an ONNX graph with ``onnx.helper``:

    input [64, 60, 1] ─ Transpose ─ LSTM(64) ─ Squeeze ─ LSTM(64) ─ Squeeze
        ─ Gather(last step) ─ MatMul ─ Add ─ output [64, 1]

Input: the last 60 values of one series, z-normalised with the window's own mean and
(floored) standard deviation; output: the next value in the same normalised units, so
``prediction = mean + std * output``. See ``normalise`` for the exact formula.

One run does everything, deterministically for the pinned versions in requirements.txt:
load and window the data, train, export ``forecaster.onnx``, check it in onnxruntime against
a float64 numpy reference of the ONNX LSTM equations, and write ``manifest.json`` and
``fixture.json`` (inputs and onnxruntime outputs for the Rust tests).

Run from the repository root with the defaults to reproduce the committed model:

    python models/lstm/train.py
"""

from __future__ import annotations

import os

# One core, deterministic reductions: set before jax is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import optax  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

WINDOW = 60  # input length N
HIDDEN = 64  # LSTM hidden size (both layers)
LAYERS = 2
EXPORT_BATCH = 64  # fixed batch dimension of the ONNX graph (tract needs a fixed one)
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17
# std floor: max(std, EPS_REL * max(|mean|, 1)). See normalise().
EPS_REL = 1e-3
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Normalisation (the Rust side must do exactly this)
# --------------------------------------------------------------------------------------


def normalise(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-window z-normalisation.

    ``windows`` is float64 [n, 60]. In float64:
        mean = sum(x) / 60
        std  = sqrt(sum((x - mean)^2) / 60)           (population std, ddof = 0)
        s    = max(std, 1e-3 * max(|mean|, 1))
        z    = (x - mean) / s                          then cast to float32 for the model
    and the forecast is de-normalised as ``mean + s * y``.

    The floor keeps ``s`` strictly positive: a constant window gives z = 0 everywhere and
    the prediction stays at the window's level instead of dividing by zero. It is absolute
    (1e-3) for values of magnitude up to 1, so near zero a window of tiny noise (e.g. a
    counter idling at 0 ± 1e-6) is not blown up to unit variance, and relative (1e-3 of the
    level) for large values, so a flat 1e6 ± 1 series is treated as flat too.
    """
    mean = windows.mean(axis=1)
    std = np.sqrt(((windows - mean[:, None]) ** 2).mean(axis=1))
    s = np.maximum(std, EPS_REL * np.maximum(np.abs(mean), 1.0))
    z = ((windows - mean[:, None]) / s[:, None]).astype(np.float32)
    return z, mean, s


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_series(smd_dir: str, min_std: float):
    """Every column of every SMD train file whose std over the file exceeds ``min_std``."""
    files = sorted(glob.glob(os.path.join(smd_dir, "train", "machine-*.txt")))
    if not files:
        sys.exit(f"no SMD train files under {smd_dir}/train")
    series, used = [], {}
    for path in files:
        a = np.loadtxt(path, delimiter=",", dtype=np.float64)
        cols = [j for j in range(a.shape[1]) if a[:, j].std() > min_std]
        name = os.path.basename(path)
        used[name] = {"rows": int(a.shape[0]), "columns": int(a.shape[1]), "used": cols}
        series.extend(np.ascontiguousarray(a[:, j]) for j in cols)
    return series, used


def sample_windows(series, val_fraction, n_train, n_val, rng):
    """Windows of 61 (60 inputs + target). The first (1 - val_fraction) of each series gives
    training windows, the last val_fraction validation windows; no window crosses the cut.
    Samples without replacement, uniformly over all windows of all series."""

    def draw(spans, n):
        counts = np.array([max(hi - lo - WINDOW, 0) for (_, lo, hi) in spans], dtype=np.int64)
        total = int(counts.sum())
        n = min(n, total)
        idx = np.sort(rng.choice(total, size=n, replace=False))
        ends = np.cumsum(counts)
        which = np.searchsorted(ends, idx, side="right")
        offset = idx - (ends[which] - counts[which])
        out = np.empty((n, WINDOW + 1), dtype=np.float64)
        for k, (w, o) in enumerate(zip(which, offset)):
            x, lo, _ = spans[w]
            out[k] = x[lo + o : lo + o + WINDOW + 1]
        return out, total

    train_spans, val_spans = [], []
    for x in series:
        cut = int(len(x) * (1.0 - val_fraction))
        train_spans.append((x, 0, cut))
        val_spans.append((x, cut, len(x)))
    train, train_total = draw(train_spans, n_train)
    val, val_total = draw(val_spans, n_val)
    return train, val, train_total, val_total


def to_xy(windows: np.ndarray, target_clip: float):
    z, mean, s = normalise(windows[:, :WINDOW])
    y = ((windows[:, WINDOW] - mean) / s).astype(np.float32)
    return z, np.clip(y, -target_clip, target_clip), y


# --------------------------------------------------------------------------------------
# Model: parameters are kept in ONNX's LSTM layout, gate order i, o, f, c
# --------------------------------------------------------------------------------------


def init_params(rng: np.random.Generator) -> dict:
    """PyTorch's default init: U(-1/sqrt(H), 1/sqrt(H)) for LSTM and Linear(64, 1)."""
    k = 1.0 / np.sqrt(HIDDEN)
    p = {}
    for layer, n_in in ((1, 1), (2, HIDDEN)):
        p[f"W{layer}"] = rng.uniform(-k, k, (4 * HIDDEN, n_in))  # [4H, in]
        p[f"R{layer}"] = rng.uniform(-k, k, (4 * HIDDEN, HIDDEN))  # [4H, H]
        p[f"Wb{layer}"] = rng.uniform(-k, k, (4 * HIDDEN,))
        p[f"Rb{layer}"] = rng.uniform(-k, k, (4 * HIDDEN,))
    p["fc_w"] = rng.uniform(-k, k, (HIDDEN,))
    p["fc_b"] = rng.uniform(-k, k, (1,))
    return {name: v.astype(np.float32) for name, v in p.items()}


def count_params(p: dict) -> int:
    return int(sum(v.size for v in p.values()))


def _lstm_layer(xs, W, R, Wb, Rb):
    """xs [T, B, in] -> hs [T, B, H]; ONNX equations, gate order i, o, f, c."""
    H = R.shape[1]
    xproj = jnp.einsum("tbi,gi->tbg", xs, W) + (Wb + Rb)  # input projection, all steps at once

    def step(carry, xp):
        h, c = carry
        g = xp + h @ R.T
        i = jax.nn.sigmoid(g[:, 0:H])
        o = jax.nn.sigmoid(g[:, H : 2 * H])
        f = jax.nn.sigmoid(g[:, 2 * H : 3 * H])
        cc = jnp.tanh(g[:, 3 * H :])
        c = f * c + i * cc
        h = o * jnp.tanh(c)
        return (h, c), h

    B = xs.shape[1]
    zeros = jnp.zeros((B, H), xs.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), xproj)
    return hs


def forward(p, x):
    """x [B, 60, 1] -> [B]"""
    xs = jnp.transpose(x, (1, 0, 2))
    h1 = _lstm_layer(xs, p["W1"], p["R1"], p["Wb1"], p["Rb1"])
    h2 = _lstm_layer(h1, p["W2"], p["R2"], p["Wb2"], p["Rb2"])
    return h2[-1] @ p["fc_w"] + p["fc_b"][0]


def numpy_reference(p: dict, x: np.ndarray) -> np.ndarray:
    """Float64 numpy implementation of the exported graph, written from the ONNX LSTM spec
    (independent of the JAX code), for checking onnxruntime. x [B, 60, 1] -> [B, 1]."""

    def sig(v):
        return 1.0 / (1.0 + np.exp(-v))

    q = {k: np.asarray(v, np.float64) for k, v in p.items()}
    seq = np.transpose(np.asarray(x, np.float64), (1, 0, 2))  # [T, B, 1]
    for layer in (1, 2):
        W, R, Wb, Rb = (q[f"{n}{layer}"] for n in ("W", "R", "Wb", "Rb"))
        Wi, Wo, Wf, Wc = np.split(W, 4)
        Ri, Ro, Rf, Rc = np.split(R, 4)
        bi, bo, bf, bc = np.split(Wb + Rb, 4)
        H_t = np.zeros((seq.shape[1], HIDDEN))
        C_t = np.zeros_like(H_t)
        out = []
        for X_t in seq:
            i = sig(X_t @ Wi.T + H_t @ Ri.T + bi)
            f = sig(X_t @ Wf.T + H_t @ Rf.T + bf)
            c = np.tanh(X_t @ Wc.T + H_t @ Rc.T + bc)
            C_t = f * C_t + i * c
            o = sig(X_t @ Wo.T + H_t @ Ro.T + bo)
            H_t = o * np.tanh(C_t)
            out.append(H_t)
        seq = np.stack(out)
    return seq[-1] @ q["fc_w"][:, None] + q["fc_b"]


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def train(params, x_tr, y_tr, x_va, y_va, args, rng):
    steps_per_epoch = len(x_tr) // args.batch
    total_steps = steps_per_epoch * args.epochs
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=min(500, total_steps // 10),
        decay_steps=total_steps,
        end_value=args.lr * 0.02,
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    params = jax.tree_util.tree_map(jnp.asarray, params)
    opt_state = opt.init(params)

    def loss_fn(p, x, y):
        return jnp.mean((forward(p, x) - y) ** 2)

    @jax.jit
    def step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    history = []
    for epoch in range(args.epochs):
        perm = rng.permutation(len(x_tr))
        t = time.time()
        losses = []
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch : (b + 1) * args.batch]
            params, opt_state, loss = step(params, opt_state, x_tr[idx], y_tr[idx])
            losses.append(loss)
            if b and b % 200 == 0:
                log(f"epoch {epoch + 1} step {b}/{steps_per_epoch} loss {float(np.mean(losses[-200:])):.4f}")
        train_loss = float(np.mean(np.asarray(losses)))
        val_mse = mse(predict(params, x_va), y_va)
        history.append({"epoch": epoch + 1, "train_mse": train_loss, "val_mse": val_mse,
                        "seconds": round(time.time() - t, 1)})
        log(f"epoch {epoch + 1}/{args.epochs}: train MSE {train_loss:.4f}, val MSE {val_mse:.4f} "
            f"({time.time() - t:.0f}s)")
    return {k: np.asarray(v, np.float32) for k, v in params.items()}, history


_predict_jit = jax.jit(forward)


def predict(params, x, batch=4096):
    out = [np.asarray(_predict_jit(params, x[i : i + batch])) for i in range(0, len(x), batch)]
    return np.concatenate(out)


def mse(pred, y) -> float:
    return float(np.mean((np.asarray(pred, np.float64) - np.asarray(y, np.float64)) ** 2))


# --------------------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------------------


def build_onnx(p: dict) -> onnx.ModelProto:
    B, T, H = EXPORT_BATCH, WINDOW, HIDDEN

    def init(name, arr, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(arr, dtype), name)

    inits = [
        # ONNX LSTM: W [dirs, 4H, in], R [dirs, 4H, H], B [dirs, 8H] = Wb then Rb; gates i,o,f,c
        init("lstm1.W", p["W1"][None]),
        init("lstm1.R", p["R1"][None]),
        init("lstm1.B", np.concatenate([p["Wb1"], p["Rb1"]])[None]),
        init("lstm2.W", p["W2"][None]),
        init("lstm2.R", p["R2"][None]),
        init("lstm2.B", np.concatenate([p["Wb2"], p["Rb2"]])[None]),
        init("fc.W", p["fc_w"][:, None]),  # [H, 1]
        init("fc.b", p["fc_b"]),  # [1]
        init("axes_dir", [1], np.int64),
        init("last_step", T - 1, np.int64),  # scalar index: Gather drops the time axis
    ]
    nodes = [
        helper.make_node("Transpose", ["input"], ["x_tbf"], perm=[1, 0, 2], name="to_time_major"),
        helper.make_node("LSTM", ["x_tbf", "lstm1.W", "lstm1.R", "lstm1.B"], ["lstm1_Y"],
                         hidden_size=H, name="lstm1"),
        helper.make_node("Squeeze", ["lstm1_Y", "axes_dir"], ["h1"], name="squeeze1"),
        helper.make_node("LSTM", ["h1", "lstm2.W", "lstm2.R", "lstm2.B"], ["lstm2_Y"],
                         hidden_size=H, name="lstm2"),
        helper.make_node("Squeeze", ["lstm2_Y", "axes_dir"], ["h2"], name="squeeze2"),
        # A node must not share its name with a tensor: tract rejects the graph.
        helper.make_node("Gather", ["h2", "last_step"], ["h_last"], axis=0, name="take_last_step"),
        helper.make_node("MatMul", ["h_last", "fc.W"], ["fc_mm"], name="fc_matmul"),
        helper.make_node("Add", ["fc_mm", "fc.b"], ["output"], name="fc_add"),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "healer_lstm_forecaster",
        [helper.make_tensor_value_info("input", f32, [B, T, 1])],
        [helper.make_tensor_value_info("output", f32, [B, 1])],
        initializer=inits,
        value_info=[
            helper.make_tensor_value_info("x_tbf", f32, [T, B, 1]),
            helper.make_tensor_value_info("lstm1_Y", f32, [T, 1, B, H]),
            helper.make_tensor_value_info("h1", f32, [T, B, H]),
            helper.make_tensor_value_info("lstm2_Y", f32, [T, 1, B, H]),
            helper.make_tensor_value_info("h2", f32, [T, B, H]),
            helper.make_tensor_value_info("h_last", f32, [B, H]),
            helper.make_tensor_value_info("fc_mm", f32, [B, 1]),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="healer models/lstm/train.py",
        ir_version=IR_VERSION,
    )
    model.doc_string = (
        "LSTM(1,64,2 layers)+Linear(64,1) next-value forecaster. input [64,60,1] float32: last 60 "
        "values, z-normalised per window; output [64,1] float32 in the same units. "
        "See manifest.json."
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def run_onnx(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """Any number of windows through the fixed-batch model (zero-padding the last batch)."""
    out = []
    for i in range(0, len(x), EXPORT_BATCH):
        chunk = x[i : i + EXPORT_BATCH]
        n = len(chunk)
        if n < EXPORT_BATCH:
            chunk = np.concatenate([chunk, np.zeros((EXPORT_BATCH - n, WINDOW, 1), np.float32)])
        out.append(sess.run(["output"], {"input": chunk})[0][:n, 0])
    return np.concatenate(out)


# --------------------------------------------------------------------------------------
# Fixture for the Rust tests
# --------------------------------------------------------------------------------------


def fixture_windows(val_windows: np.ndarray, rng: np.random.Generator):
    """64 raw windows of 60: edge cases first, then SMD validation windows."""
    t = np.arange(WINDOW, dtype=np.float64)
    noise = rng.standard_normal((6, WINDOW))
    special = [
        ("constant 0.5", np.full(WINDOW, 0.5)),
        ("all zeros", np.zeros(WINDOW)),
        ("constant 1234.5 (relative floor)", np.full(WINDOW, 1234.5)),
        ("near zero, noise 1e-6 (below the floor)", np.round(1e-6 * noise[0], 12)),
        ("near zero, noise 1e-2", np.round(1e-2 * noise[1], 8)),
        ("small positive 0..1e-3 alternating", np.where(t % 2 == 0, 0.0, 1e-3)),
        ("1e6 + 1e3 * sin", np.round(1e6 + 1e3 * np.sin(t / 5.0), 6)),
        ("1e6 + noise 0.1 (below the relative floor)", np.round(1e6 + 0.1 * noise[2], 6)),
        ("negative level -50 + noise", np.round(-50.0 + noise[3], 6)),
        ("ramp 0..59", t.copy()),
        ("step 0.2 -> 0.8 at t=40", np.where(t < 40, 0.2, 0.8)),
        ("single spike 0.9 in 0.1", np.where(t == 30, 0.9, 0.1)),
        ("sine period 20", np.round(0.5 + 0.3 * np.sin(2 * np.pi * t / 20), 6)),
    ]
    n_smd = EXPORT_BATCH - len(special)
    pick = np.sort(rng.choice(len(val_windows), size=n_smd, replace=False))
    windows = [w for _, w in special] + [val_windows[i, :WINDOW] for i in pick]
    labels = [name for name, _ in special] + [f"SMD validation window {i}" for i in pick]
    return np.stack(windows), labels


# --------------------------------------------------------------------------------------
# Residual calibration: the tail of |residual| on every held-out window
# --------------------------------------------------------------------------------------

# Tail probabilities at which |residual| is measured; the deepest ones are kept only while
# at least CALIBRATION_MIN_EXCEEDING windows lie beyond them.
CALIBRATION_TAILS = [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4,
                     5e-5, 2e-5, 1e-5]
CALIBRATION_MIN_EXCEEDING = 10


def calibrate(sess: ort.InferenceSession, series, val_fraction: float) -> dict:
    """``P(|R| >= r)`` of the residual ``R = (x_next - prediction) / s`` (normalised units)
    over *all* validation windows (the last ``val_fraction`` of every series, which training
    never saw), at the levels of CALIBRATION_TAILS. healer's ``lstm_pvalue`` interpolates
    log-linearly between these points."""
    residuals = []
    for x in series:
        cut = int(len(x) * (1.0 - val_fraction))
        v = x[cut:]
        if len(v) <= WINDOW:
            continue
        w = np.lib.stride_tricks.sliding_window_view(v, WINDOW + 1)
        z, mean, s = normalise(np.ascontiguousarray(w[:, :WINDOW]))
        out = run_onnx(sess, z[..., None]).astype(np.float64)
        residuals.append((w[:, WINDOW] - mean) / s - out)
    r = np.abs(np.concatenate(residuals))
    n = len(r)
    points, last = [], 0.0
    for tail in CALIBRATION_TAILS:
        if tail * n < CALIBRATION_MIN_EXCEEDING:
            break
        value = float(np.quantile(r, 1.0 - tail))
        if value > last:  # ties (e.g. many exact zeros) would give a flat step: skip them
            points.append([value, tail])
            last = value
    return {
        "abs_residual_tail": points,
        "windows": n,
        "data": "every window of 61 in the validation part of every training series",
        "residual": "(x_next - mean) / s - output, in the model's normalised units",
        "use": "P(|R| >= r): log-linear between points from (0, 1), extended with the last "
               "slope beyond the last point",
    }


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--smd", default="../shared/datasets/smd", help="SMD dataset folder")
    ap.add_argument("--out", default="models/lstm", help="output folder")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--train-windows", type=int, default=200_000)
    ap.add_argument("--val-windows", type=int, default=50_000)
    ap.add_argument("--val-fraction", type=float, default=0.1,
                    help="last fraction of every series held out for validation")
    ap.add_argument("--min-std", type=float, default=1e-3,
                    help="columns whose std over the whole train file is below this are skipped")
    ap.add_argument("--target-clip", type=float, default=10.0,
                    help="normalised targets are clipped to +-this for the loss and val MSE")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--calibrate-only", action="store_true",
                    help="only recompute the residual calibration of the model in --out and "
                         "update its manifest")
    args = ap.parse_args()

    if args.calibrate_only:
        series, _ = load_series(args.smd, args.min_std)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(os.path.join(args.out, "forecaster.onnx"), so,
                                    providers=["CPUExecutionProvider"])
        path = os.path.join(args.out, "manifest.json")
        with open(path) as f:
            manifest = json.load(f)
        manifest["calibration"] = calibrate(sess, series, args.val_fraction)
        with open(path, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        log(f"calibration over {manifest['calibration']['windows']} windows written to {path}")
        return

    rng = np.random.default_rng(args.seed)
    log(f"jax {jax.__version__} on {jax.devices()}, numpy {np.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")

    # ---- data
    series, used = load_series(args.smd, args.min_std)
    log(f"{len(series)} series with std > {args.min_std} from {len(used)} files")
    tr_w, va_w, tr_total, va_total = sample_windows(
        series, args.val_fraction, args.train_windows, args.val_windows, rng)
    x_tr, y_tr, _ = to_xy(tr_w, args.target_clip)
    x_va, y_va, y_va_raw = to_xy(va_w, args.target_clip)
    x_tr, x_va = x_tr[..., None], x_va[..., None]
    log(f"train windows {len(x_tr)} of {tr_total}, validation windows {len(x_va)} of {va_total}")

    # ---- naive baseline: the next value equals the last one (in normalised units)
    naive_val = mse(x_va[:, -1, 0], y_va)
    mean_val = mse(np.zeros_like(y_va), y_va)
    log(f"validation MSE, naive last value: {naive_val:.4f}; window mean (predict 0): {mean_val:.4f}")

    # ---- train
    params = init_params(rng)
    n_params = count_params(params)
    log(f"parameters: {n_params}")
    t_train = time.time()
    params, history = train(params, x_tr, y_tr, x_va, y_va, args, rng)
    train_seconds = time.time() - t_train

    # ---- export
    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "forecaster.onnx")
    model = build_onnx(params)
    onnx.save(model, onnx_path)
    log(f"wrote {onnx_path} ({os.path.getsize(onnx_path)} bytes)")

    # ---- verify: onnxruntime vs float64 numpy reference vs jax
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    fx_raw, fx_labels = fixture_windows(va_w, rng)
    fx_z, fx_mean, fx_std = normalise(fx_raw)
    check_inputs = [fx_z[..., None]] + [
        x_va[i : i + EXPORT_BATCH] for i in (0, len(x_va) // 2, len(x_va) - EXPORT_BATCH)]
    diff_ref = diff_jax = 0.0
    for x in check_inputs:
        got = sess.run(["output"], {"input": x})[0]
        assert got.shape == (EXPORT_BATCH, 1) and got.dtype == np.float32
        diff_ref = max(diff_ref, float(np.abs(got - numpy_reference(params, x)).max()))
        diff_jax = max(diff_jax, float(np.abs(got[:, 0] - predict(params, x)).max()))
    log(f"onnxruntime vs numpy float64 reference: max abs diff {diff_ref:.2e}; vs jax {diff_jax:.2e}")
    if diff_ref > 1e-4:
        sys.exit("exported model does not match the reference")

    # validation MSE through the exported model itself
    pred_va = run_onnx(sess, x_va)
    model_val = mse(pred_va, y_va)
    model_val_unclipped = mse(pred_va, y_va_raw)
    naive_val_unclipped = mse(x_va[:, -1, 0], y_va_raw)
    # and in the series' own units (SMD values are in [0, 1])
    _, va_mean, va_std = normalise(va_w[:, :WINDOW])
    raw_model = mse(va_mean + va_std * pred_va, va_w[:, WINDOW])
    raw_naive = mse(va_w[:, WINDOW - 1], va_w[:, WINDOW])
    log(f"validation MSE (normalised, target clipped to +-{args.target_clip:g}): "
        f"model {model_val:.4f} vs naive {naive_val:.4f} ({model_val / naive_val:.3f}x)")
    log(f"validation MSE (normalised, unclipped): model {model_val_unclipped:.3f} vs naive {naive_val_unclipped:.3f}")
    log(f"validation MSE (raw SMD units): model {raw_model:.3e} vs naive {raw_naive:.3e}")
    if not model_val < naive_val:
        sys.exit("the model does not beat the naive last-value baseline")

    calibration = calibrate(sess, series, args.val_fraction)
    log(f"residual calibration over {calibration['windows']} held-out windows")

    # ---- fixture
    fx_out = run_onnx(sess, fx_z[..., None])
    fx_pred = fx_mean + fx_std * fx_out.astype(np.float64)
    fixture = {
        "description": "64 raw windows (one batch), their normalisation and onnxruntime "
                       f"{ort.__version__} outputs of forecaster.onnx; see README.md",
        "model_sha256": sha256(onnx_path),
        "window": WINDOW,
        "batch": EXPORT_BATCH,
        "tolerance": {"output_abs": 1e-5, "prediction_abs": "1e-5 * std (plus float64 rounding)"},
        "normalisation": "see manifest.json: mean, std (floored) in float64, z cast to float32",
        "cases": [
            {
                "label": label,
                "input": [float(v) for v in fx_raw[k]],
                "mean": float(fx_mean[k]),
                "std": float(fx_std[k]),
                "output": float(fx_out[k]),
                "prediction": float(fx_pred[k]),
            }
            for k, label in enumerate(fx_labels)
        ],
    }
    with open(os.path.join(args.out, "fixture.json"), "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")

    # ---- manifest
    cmd = "python models/lstm/train.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
        if v != ap.get_default(k))
    manifest = {
        "format": "healer.lstm-forecaster",
        "version": 1,
        "file": "forecaster.onnx",
        "sha256": sha256(onnx_path),
        "bytes": os.path.getsize(onnx_path),
        "onnx": {"opset": OPSET, "ir_version": IR_VERSION,
                 "graph": "Transpose -> LSTM(64) -> Squeeze -> LSTM(64) -> Squeeze -> "
                          "Gather(last step) -> MatMul -> Add"},
        "architecture": "nn.LSTM(1, 64, num_layers=2) + nn.Linear(64, 1) on the last step",
        "parameters": n_params,
        "input": {"name": "input", "shape": [EXPORT_BATCH, WINDOW, 1], "dtype": "float32",
                  "layout": "batch-first; the batch is fixed at 64: pad partial batches"},
        "output": {"name": "output", "shape": [EXPORT_BATCH, 1], "dtype": "float32"},
        "window": WINDOW,
        "normalisation": {
            "per_window": True,
            "mean": "sum(x) / 60",
            "std": "sqrt(sum((x - mean)^2) / 60)  (population, ddof = 0)",
            "scale": "s = max(std, eps_rel * max(|mean|, 1))",
            "eps_rel": EPS_REL,
            "input": "z = (x - mean) / s, cast to float32",
            "prediction": "mean + s * output",
            "precision": "mean, std, s and the prediction in float64",
            "why": "s > 0 always: a constant window gives z = 0 and predicts its own level; "
                   "the floor is absolute (1e-3) for |values| <= 1 so tiny noise near zero is "
                   "not amplified to unit variance, and relative (1e-3 of the level) above.",
        },
        "training_data": {
            "dataset": "SMD (OmniAnomaly server machine dataset), train split only",
            "path": "../shared/datasets/smd/train",
            "files": used,
            "series": len(series),
            "column_filter": f"std over the whole train file > {args.min_std}",
            "split": f"first {1 - args.val_fraction:.0%} of every series for training, last "
                     f"{args.val_fraction:.0%} for validation; no window crosses the cut",
            "windows_available": {"train": tr_total, "validation": va_total},
            "windows_used": {"train": len(x_tr), "validation": len(x_va)},
            "sampling": "uniform without replacement over all windows of 61 (60 + target)",
            "target_clip": args.target_clip,
        },
        "training": {"seed": args.seed, "epochs": args.epochs, "batch": args.batch,
                     "optimizer": f"adam, peak lr {args.lr}, warmup + cosine decay, grad clip 1.0",
                     "loss": "MSE on the normalised next value, clipped to +-target_clip",
                     "history": history, "seconds": round(train_seconds, 1)},
        "validation": {
            "mse_normalised_clipped": {"model": model_val, "naive_last_value": naive_val,
                                       "predict_window_mean": mean_val},
            "mse_normalised_unclipped": {"model": model_val_unclipped,
                                         "naive_last_value": naive_val_unclipped},
            "mse_raw_units": {"model": raw_model, "naive_last_value": raw_naive},
            "computed_with": "the exported forecaster.onnx in onnxruntime",
        },
        "verification": {"onnxruntime_vs_numpy_float64_max_abs_diff": diff_ref,
                         "onnxruntime_vs_jax_max_abs_diff": diff_jax,
                         "batches_checked": len(check_inputs)},
        "versions": {"python": platform.python_version(),
                     **{p: version(p) for p in ("numpy", "jax", "jaxlib", "optax", "onnx",
                                                "onnxruntime")}},
        "reproduce": ["python3 -m venv /var/tmp/healer-models-venv",
                      "/var/tmp/healer-models-venv/bin/pip install -r models/lstm/requirements.txt",
                      "/var/tmp/healer-models-venv/bin/" + cmd],
        "fixture": "fixture.json",
        "calibration": calibration,
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    log(f"wrote manifest.json and fixture.json to {args.out}")


if __name__ == "__main__":
    main()
