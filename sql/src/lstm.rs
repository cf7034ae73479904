//! The LSTM forecaster (`models/lstm/`), run through `ort` on one of two backends chosen at
//! run time:
//!
//! * **native**: ONNX Runtime's shared library (the `onnxruntime` wheel ships
//!   `libonnxruntime.so.1.32.0`), loaded with `dlopen` and handed to `ort` as its API;
//! * **tract**: the pure-Rust `ort-tract` backend, always available, slower.
//!
//! [`Backend::detect`] picks native when it finds the library (`HEALER_ONNXRUNTIME`, or a path
//! given in configuration) and tract otherwise. The backend is process-wide: ONNX Runtime's
//! API is installed once, before the first session.
//!
//! A [`Forecaster`] predicts the next value of a series from its last `window` values,
//! normalised per window as the model's manifest says (mean and population standard
//! deviation of the window, the deviation floored at `eps_rel · max(|mean|, 1)`), in batches
//! of the model's fixed batch size.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;

/// Errors of the forecaster.
#[derive(Debug, thiserror::Error)]
pub enum LstmError {
    /// The native library could not be loaded or does not offer the API this build needs.
    #[error("ONNX Runtime at {path}: {reason}")]
    Runtime {
        /// The library.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The model or its manifest could not be read.
    #[error("model {path}: {reason}")]
    Model {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Inference failed.
    #[error("inference: {0}")]
    Inference(String),
    /// A window of the wrong length.
    #[error("a window of {got} values, the model takes {want}")]
    Window {
        /// Values given.
        got: usize,
        /// Values the model takes.
        want: usize,
    },
}

/// Which ONNX Runtime implementation runs the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// ONNX Runtime's shared library at this path.
    Native(PathBuf),
    /// The pure-Rust tract backend.
    Tract,
}

impl Backend {
    /// Native if `HEALER_ONNXRUNTIME` names a library file, tract otherwise.
    pub fn detect() -> Self {
        match std::env::var_os("HEALER_ONNXRUNTIME") {
            Some(p) if Path::new(&p).is_file() => Backend::Native(PathBuf::from(p)),
            _ => Backend::Tract,
        }
    }

    /// A short name for messages: `native` or `tract`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Native(_) => "native",
            Backend::Tract => "tract",
        }
    }
}

/// The process-wide runtime: the backend in use and its environment.
#[derive(Debug)]
pub struct Runtime {
    /// The backend.
    pub backend: Backend,
    environment: ort::environment::Environment,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// Loads ONNX Runtime's API from a shared library.
#[allow(unsafe_code)]
fn native_api(path: &Path) -> Result<ort::sys::OrtApi, String> {
    type GetApiBase = unsafe extern "C" fn() -> *const ort::sys::OrtApiBase;
    // SAFETY: loading a library runs its initialisers; this is ONNX Runtime's own library,
    // chosen by the operator. It is never unloaded (leaked below), so the function pointers
    // copied out of it stay valid for the life of the process.
    let library = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
    let api = {
        // SAFETY: `OrtGetApiBase` has this signature in every ONNX Runtime release.
        let get: libloading::Symbol<GetApiBase> =
            unsafe { library.get(b"OrtGetApiBase\0") }.map_err(|e| e.to_string())?;
        // SAFETY: the base is a static table of the library; `GetApi` returns null for a
        // version the library does not implement, which is checked.
        unsafe {
            let base = get();
            if base.is_null() {
                return Err("OrtGetApiBase returned null".into());
            }
            let api = ((*base).GetApi)(ort::sys::ORT_API_VERSION);
            if api.is_null() {
                return Err(format!(
                    "the library does not offer ONNX Runtime API version {} (need 1.{} or newer)",
                    ort::sys::ORT_API_VERSION,
                    ort::sys::ORT_API_VERSION
                ));
            }
            std::ptr::read(api)
        }
    };
    std::mem::forget(library);
    Ok(api)
}

/// The runtime on `backend`, installed on first use. Later calls return the first runtime,
/// whatever they ask for: the process has one ONNX Runtime.
pub fn runtime(backend: Backend) -> Result<&'static Runtime, LstmError> {
    let runtime = RUNTIME.get_or_init(|| {
        let api = match &backend {
            Backend::Native(path) => {
                native_api(path).map_err(|reason| format!("{}: {reason}", path.display()))?
            }
            Backend::Tract => ort_tract::api(),
        };
        ort::set_api(api);
        let environment = ort::init()
            .with_name("healer")
            .with_telemetry(false)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Runtime {
            backend,
            environment,
        })
    });
    runtime.as_ref().map_err(|reason| LstmError::Runtime {
        path: PathBuf::from("ONNX Runtime"),
        reason: reason.clone(),
    })
}

/// The normalisation of the model's manifest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalisation {
    /// The deviation floor, relative to `max(|mean|, 1)`.
    pub eps_rel: f64,
}

/// A loaded forecaster.
///
/// It holds one ONNX Runtime session per core, each single-threaded: the workers of a
/// pipeline run inference at the same time, each on a free session, instead of queueing on
/// one session's lock.
#[derive(Debug)]
pub struct Forecaster {
    sessions: Vec<Mutex<Session>>,
    next: std::sync::atomic::AtomicUsize,
    window: usize,
    batch: usize,
    norm: Normalisation,
    input: String,
    output: String,
    calibration: Option<Calibration>,
    backend: &'static str,
}

/// The distribution of `|residual|` (`lstm_residual`, see [`crate::forecast`]) on held-out windows of
/// normal data, from the manifest's `calibration`: the tail probability of a residual.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// `(|residual|, P(|R| ≥ |residual|))` with |residual| ascending, P descending; the first
    /// point is `(0, 1)`.
    points: Vec<(f64, f64)>,
}

impl Calibration {
    /// From the manifest's `calibration.abs_residual_tail`: pairs `[value, tail]`.
    fn from_manifest(v: &serde_json::Value) -> Result<Self, String> {
        let pairs = v["abs_residual_tail"]
            .as_array()
            .ok_or("calibration.abs_residual_tail is missing")?;
        let mut points = vec![(0.0, 1.0)];
        for p in pairs {
            let (Some(x), Some(t)) = (p[0].as_f64(), p[1].as_f64()) else {
                return Err(format!("calibration point {p} is not [value, tail]"));
            };
            let &(px, pt) = points.last().expect("not empty");
            if !(x > px && t < pt && t > 0.0) {
                return Err(format!(
                    "calibration points must rise in value and fall in tail probability: \
                     [{x}, {t}] after [{px}, {pt}]"
                ));
            }
            points.push((x, t));
        }
        if points.len() < 3 {
            return Err("calibration needs at least two points".into());
        }
        Ok(Self { points })
    }

    /// `P(|R| ≥ |r|)` for normal data: log-linear interpolation between the measured points
    /// (an exponential tail between them), extended beyond the last point with the last
    /// segment's slope, floored at 1e-12. NaN for NaN.
    pub fn tail(&self, r: f64) -> f64 {
        if r.is_nan() {
            return f64::NAN;
        }
        let r = r.abs();
        let pts = &self.points;
        let i = pts
            .partition_point(|&(x, _)| x <= r)
            .clamp(1, pts.len() - 1);
        let ((x0, t0), (x1, t1)) = (pts[i - 1], pts[i]);
        let log = t0.log10() + (r - x0) / (x1 - x0) * (t1.log10() - t0.log10());
        10f64.powf(log.min(0.0)).max(1e-12)
    }
}

impl Forecaster {
    /// Loads `<dir>/forecaster.onnx` as its `<dir>/manifest.json` describes it, on `runtime`.
    pub fn load(dir: &Path, runtime: &Runtime) -> Result<Self, LstmError> {
        let manifest_path = dir.join("manifest.json");
        let model = |reason: String| LstmError::Model {
            path: manifest_path.clone(),
            reason,
        };
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&manifest_path).map_err(|e| model(e.to_string()))?,
        )
        .map_err(|e| model(e.to_string()))?;
        let shape: Vec<usize> = manifest["input"]["shape"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as usize)
                    .collect()
            })
            .unwrap_or_default();
        let [batch, window, 1] = shape[..] else {
            return Err(model(format!(
                "input shape {shape:?}, expected [batch, window, 1]"
            )));
        };
        if batch == 0 || window == 0 {
            return Err(model(format!(
                "input shape {shape:?}: batch and window must be positive"
            )));
        }
        let eps_rel = manifest["normalisation"]["eps_rel"]
            .as_f64()
            .ok_or_else(|| model("no normalisation.eps_rel".into()))?;
        if !(eps_rel.is_finite() && eps_rel > 0.0) {
            return Err(model(format!(
                "normalisation.eps_rel is {eps_rel}: the scale floor must be positive"
            )));
        }
        let name = |key: &str| {
            manifest[key]["name"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| model(format!("no {key}.name")))
        };
        let (input, output) = (name("input")?, name("output")?);
        let calibration = match manifest.get("calibration") {
            None => None,
            Some(c) => Some(Calibration::from_manifest(c).map_err(model)?),
        };
        let file = dir.join(manifest["file"].as_str().unwrap_or("forecaster.onnx"));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let sessions = (0..cores)
            .map(|_| {
                let session = || -> Result<Session, String> {
                    let builder =
                        Session::builder(&runtime.environment).map_err(|e| e.to_string())?;
                    let builder = builder.with_intra_threads(1).map_err(|e| e.to_string())?;
                    // ONNX Runtime optimises fully by default, but the tract backend only
                    // when asked: unoptimised, it ran this LSTM 8.7x slower than native.
                    let mut builder = builder
                        .with_optimization_level(GraphOptimizationLevel::All)
                        .map_err(|e| e.to_string())?;
                    builder.commit_from_file(&file).map_err(|e| e.to_string())
                };
                session()
                    .map(Mutex::new)
                    .map_err(|reason| LstmError::Model {
                        path: file.clone(),
                        reason,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            sessions,
            next: std::sync::atomic::AtomicUsize::new(0),
            window,
            batch,
            norm: Normalisation { eps_rel },
            input,
            output,
            calibration,
            backend: runtime.backend.name(),
        })
    }

    /// The backend's short name (`native` or `tract`).
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The residual calibration of the manifest, if it has one.
    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    /// A free session, or (all busy) the next one in turn.
    fn session(&self) -> Result<std::sync::MutexGuard<'_, Session>, LstmError> {
        for s in &self.sessions {
            if let Ok(guard) = s.try_lock() {
                return Ok(guard);
            }
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.sessions.len();
        // A panic while a session was held poisons its lock but leaves the session usable:
        // inference has no state between runs.
        Ok(self.sessions[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Values per window.
    pub fn window(&self) -> usize {
        self.window
    }

    /// The mean and the floored deviation of a window.
    pub fn moments(&self, values: &[f64]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        let floor = self.norm.eps_rel * mean.abs().max(1.0);
        (mean, var.sqrt().max(floor))
    }

    /// The forecast of the value after each window (each `window()` values, oldest first).
    pub fn predict(&self, windows: &[&[f64]]) -> Result<Vec<f64>, LstmError> {
        let mut out = Vec::with_capacity(windows.len());
        self.predict_with_scale(windows, |value, _| out.push(value))?;
        Ok(out)
    }

    /// Calls `emit(forecast, scale)` for each window in order, `scale` being the window's
    /// floored deviation (see [`Forecaster::moments`]).
    fn predict_with_scale(
        &self,
        windows: &[&[f64]],
        mut emit: impl FnMut(f64, f64),
    ) -> Result<(), LstmError> {
        if let Some(w) = windows.iter().find(|w| w.len() != self.window) {
            return Err(LstmError::Window {
                got: w.len(),
                want: self.window,
            });
        }
        if windows.is_empty() {
            return Ok(());
        }
        let mut session = self.session()?;
        for chunk in windows.chunks(self.batch) {
            let moments: Vec<(f64, f64)> = chunk.iter().map(|w| self.moments(w)).collect();
            // The batch is fixed: pad with zero windows and ignore their outputs.
            let mut z = vec![0f32; self.batch * self.window];
            for (i, (w, &(mean, s))) in chunk.iter().zip(&moments).enumerate() {
                for (j, x) in w.iter().enumerate() {
                    z[i * self.window + j] = ((x - mean) / s) as f32;
                }
            }
            let tensor = Tensor::from_array(([self.batch, self.window, 1], z))
                .map_err(|e| LstmError::Inference(e.to_string()))?;
            let outputs = session
                .run(ort::inputs![self.input.as_str() => tensor])
                .map_err(|e| LstmError::Inference(e.to_string()))?;
            let (_, y) = outputs[self.output.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(|e| LstmError::Inference(e.to_string()))?;
            for (i, &(mean, s)) in moments.iter().enumerate() {
                emit(mean + s * f64::from(y[i]), s);
            }
        }
        Ok(())
    }
}

impl healer_operators::window::SeriesForecaster for Forecaster {
    fn window(&self) -> usize {
        self.window
    }

    fn forecast(
        &self,
        windows: &[f64],
        out: &mut [healer_operators::window::Forecast],
    ) -> Result<(), String> {
        let refs: Vec<&[f64]> = windows.chunks_exact(self.window).collect();
        if windows.len() != out.len() * self.window {
            return Err(format!(
                "{} values for {} windows of {}",
                windows.len(),
                out.len(),
                self.window
            ));
        }
        let mut slots = out.iter_mut();
        self.predict_with_scale(&refs, |value, scale| {
            if let Some(slot) = slots.next() {
                *slot = healer_operators::window::Forecast { value, scale };
            }
        })
        .map_err(|e| e.to_string())
    }
}
