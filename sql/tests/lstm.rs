//! The LSTM forecaster on both ONNX Runtime backends against the outputs of Python's
//! onnxruntime on the same windows (`models/lstm/fixture.json`). Each test runs in its own
//! process (nextest), so each can install its own backend.

use std::path::{Path, PathBuf};

use healer_sql::lstm::{Backend, Forecaster, runtime};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/lstm")
}

/// Every fixture window's forecast within the fixture's tolerance; returns the largest error
/// relative to the window's scale.
fn check_fixture(forecaster: &Forecaster) -> f64 {
    let fixture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir().join("fixture.json")).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let windows: Vec<Vec<f64>> = cases
        .iter()
        .map(|c| {
            c["input"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    let refs: Vec<&[f64]> = windows.iter().map(Vec::as_slice).collect();
    // Not a multiple of the batch: the last batch is padded.
    let predicted = forecaster.predict(&refs[..cases.len() - 5]).unwrap();
    let mut worst: f64 = 0.0;
    for (c, p) in cases.iter().zip(&predicted) {
        let expected = c["prediction"].as_f64().unwrap();
        let scale = c["std"].as_f64().unwrap();
        let (mean, s) = forecaster.moments(
            &c["input"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect::<Vec<_>>(),
        );
        assert!(
            (s - scale).abs() <= 1e-12 * scale.max(1.0),
            "{}",
            c["label"]
        );
        assert!((mean - c["mean"].as_f64().unwrap()).abs() <= 1e-9 * mean.abs().max(1.0));
        let err = (p - expected).abs() / scale;
        assert!(err < 2e-5, "{}: {p} vs {expected}", c["label"]);
        worst = worst.max(err);
    }
    assert_eq!(predicted.len(), cases.len() - 5);
    worst
}

#[test]
fn tract_backend_matches_python_onnxruntime() {
    let rt = runtime(Backend::Tract).unwrap();
    assert_eq!(rt.backend.name(), "tract");
    let forecaster = Forecaster::load(&model_dir(), rt).unwrap();
    assert_eq!(forecaster.window(), 60);
    let worst = check_fixture(&forecaster);
    eprintln!("tract: largest error {worst:.2e} of the window scale");
    let err = forecaster.predict(&[&[1.0; 59]]).unwrap_err();
    assert!(err.to_string().contains("59 values"), "{err}");
}

#[test]
fn native_backend_matches_python_onnxruntime() {
    let path = std::env::var_os("HEALER_ONNXRUNTIME").expect(
        "HEALER_ONNXRUNTIME names libonnxruntime.so from the onnxruntime wheel: run the suite \
         with .ci/test, which installs it",
    );
    let rt = runtime(Backend::Native(PathBuf::from(path))).unwrap();
    assert_eq!(rt.backend.name(), "native");
    let forecaster = Forecaster::load(&model_dir(), rt).unwrap();
    let worst = check_fixture(&forecaster);
    eprintln!("native: largest error {worst:.2e} of the window scale");
}

#[test]
fn a_missing_native_library_is_a_clear_error() {
    let err = runtime(Backend::Native(PathBuf::from(
        "/nonexistent/libonnxruntime.so",
    )))
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/nonexistent/libonnxruntime.so"), "{text}");
}
