//! A training state in a checkpoint: the model's tensors under their names, both AdamW moments as
//! `m.<name>` and `v.<name>`, and in the manifest's `extra` the run's config, the data position and
//! the training time. What `semoe train --resume`, `semoe generate`, `semoe eval` and
//! `tools/reference/eval_checkpoint.py` read.
//!
//! This sits in `storage`, below the actor runtime and the training loop that both write
//! checkpoints, so it knows the model and the optimizer but not the training config: the config
//! is written as the caller gives it, and read back by the model's part only.

use crate::error::{Error, Result};
use crate::model::gpt::{Gpt, GptConfig};
use crate::optimizer::{AdamW, OptimizerConfig};
use crate::storage::checkpoint::{self, Checkpoint, NamedTensor};
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Write `model` and `optimizer` as the checkpoint of step `optimizer.step` under
/// `run_dir/checkpoints/`, with `config` (the run's, serialised as it is), the sampler's seed, the
/// training seconds so far and, when given, the SHA-256 of the training text in the manifest.
pub fn save(
    run_dir: &Path,
    config: &impl Serialize,
    seed: u64,
    model: &Gpt<f32>,
    optimizer: &AdamW,
    training_seconds: f64,
    data_digest: Option<&str>,
) -> Result<PathBuf> {
    save_interrupted(
        run_dir,
        config,
        seed,
        model,
        optimizer,
        training_seconds,
        data_digest,
        None,
    )
}

/// [`save`], interrupted as `interruption` says (chaos runs; see [`checkpoint::Interruption`]).
#[allow(clippy::too_many_arguments)]
pub fn save_interrupted(
    run_dir: &Path,
    config: &impl Serialize,
    seed: u64,
    model: &Gpt<f32>,
    optimizer: &AdamW,
    training_seconds: f64,
    data_digest: Option<&str>,
    interruption: Option<checkpoint::Interruption>,
) -> Result<PathBuf> {
    let tensors = model.tensors();
    if optimizer.m.len() != tensors.len() || optimizer.v.len() != tensors.len() {
        return Err(Error::shape(
            "checkpoint",
            "the optimizer state does not match the model",
        ));
    }
    let named: Vec<NamedTensor> = tensors
        .iter()
        .map(|(n, s, b)| NamedTensor::new(n.as_str(), s.clone(), b.as_slice()))
        .collect();
    let names_m: Vec<String> = tensors.iter().map(|(n, _, _)| format!("m.{n}")).collect();
    let names_v: Vec<String> = tensors.iter().map(|(n, _, _)| format!("v.{n}")).collect();
    let mut opt = Vec::new();
    for (i, (_, s, _)) in tensors.iter().enumerate() {
        opt.push(NamedTensor::new(
            names_m[i].as_str(),
            s.clone(),
            optimizer.m[i].as_slice(),
        ));
        opt.push(NamedTensor::new(
            names_v[i].as_str(),
            s.clone(),
            optimizer.v[i].as_slice(),
        ));
    }
    let config = config_value(config)?;
    let mut extra = json!({
        "config": config,
        "data_position": { "sampler": "pure function of (seed, step, group)", "next_step": optimizer.step },
        "rng": { "seed": seed },
        "optimizer_step": optimizer.step,
        "training_seconds": training_seconds,
    });
    if let (Some(digest), Some(map)) = (data_digest, extra.as_object_mut()) {
        map.insert("data_sha256".into(), json!(digest));
    }
    checkpoint::save_interrupted(run_dir, optimizer.step, &named, &opt, &extra, interruption)
}

/// Write `model` alone (no optimizer state) as the checkpoint of `step` under
/// `run_dir/checkpoints/`, with `config` in the manifest: a checkpoint to generate from (an
/// initialised model, or one converted from elsewhere), not to resume training from.
pub fn save_model(run_dir: &Path, config: &impl Serialize, step: u64, model: &Gpt<f32>) -> Result<PathBuf> {
    let tensors = model.tensors();
    let named: Vec<NamedTensor> = tensors
        .iter()
        .map(|(n, s, b)| NamedTensor::new(n.as_str(), s.clone(), b.as_slice()))
        .collect();
    let extra = json!({ "config": config_value(config)?, "model_only": true });
    checkpoint::save(run_dir, step, &named, &[], &extra)
}

/// `config` as the manifest's JSON (`json!` would panic where serde refuses it: a data path that
/// is not UTF-8).
fn config_value(config: &impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(config).map_err(|e| {
        Error::config(format!(
            "the run's configuration cannot be recorded in a checkpoint: {e}"
        ))
    })
}

/// The model and optimizer state of a loaded (and verified) checkpoint, for a model of
/// `model_config` and an optimizer of `optimizer_config`, and the training seconds it records.
/// Every tensor the model has must be there with its shape, and nothing else.
pub fn restore(
    model_config: &GptConfig,
    optimizer_config: &OptimizerConfig,
    mut ckpt: Checkpoint,
) -> Result<(Gpt<f32>, AdamW, f64)> {
    let dir = ckpt.dir.clone();
    check_model_tensors(model_config, &ckpt)?;
    let mut model = Gpt::<f32>::zeros(model_config)?;
    let specs: Vec<(String, Vec<usize>)> = model.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
    for ((name, shape), buf) in specs.iter().zip(model.buffers_mut()) {
        *buf = ckpt.take_model(name, shape)?;
    }
    if let Some(extra) = ckpt.model.keys().next() {
        return Err(Error::shape(
            format!("checkpoint {}", dir.display()),
            format!("it holds tensor {extra:?}, which this model does not have"),
        ));
    }
    let mut m = Vec::new();
    let mut v = Vec::new();
    for (name, shape) in &specs {
        m.push(ckpt.take_optimizer(&format!("m.{name}"), shape)?);
        v.push(ckpt.take_optimizer(&format!("v.{name}"), shape)?);
    }
    if let Some(extra) = ckpt.optimizer.keys().next() {
        return Err(Error::checkpoint(
            dir.join(checkpoint::OPTIMIZER_FILE),
            format!("it holds tensor {extra:?}, which this model's optimizer does not have"),
        ));
    }
    let mut optimizer = crate::optimizer::for_model(optimizer_config, &model)?;
    optimizer.restore(ckpt.step, m, v)?;
    let seconds = ckpt
        .extra
        .get("training_seconds")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    Ok((model, optimizer, seconds))
}

/// The checkpoint's model tensors against `config`, before a model of `config` is allocated:
/// every tensor there with its shape, and nothing else. The manifest's config is not covered by
/// the model file's digest, so an edited or damaged one (`n_layer` in the billions, a wider
/// `d_model`) must fail here, naming what differs, not abort the process on an allocation.
fn check_model_tensors(config: &GptConfig, ckpt: &Checkpoint) -> Result<()> {
    let path = ckpt.dir.join(checkpoint::MODEL_FILE);
    let expected = config
        .checked_tensor_shapes(ckpt.model.len())
        .map_err(|e| Error::checkpoint(&path, format!("the model config does not fit the file: {e}")))?;
    for (name, shape, _) in &expected {
        match ckpt.model.get(name) {
            None => {
                return Err(Error::checkpoint(
                    &path,
                    format!("tensor {name} of the model config is missing"),
                ))
            }
            Some(t) if t.shape != *shape => {
                return Err(Error::checkpoint(
                    &path,
                    format!(
                        "tensor {name} has shape {:?}, the model config needs {shape:?}",
                        t.shape
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    let wanted: std::collections::BTreeSet<&str> = expected.iter().map(|(n, _, _)| n.as_str()).collect();
    if let Some(extra) = ckpt.model.keys().find(|n| !wanted.contains(n.as_str())) {
        return Err(Error::checkpoint(
            &path,
            format!("it holds tensor {extra:?}, which the model config does not have"),
        ));
    }
    Ok(())
}

/// The model configuration a checkpoint's manifest records (`extra.config.model`), checked;
/// `dir` names the checkpoint in errors.
pub fn model_config(dir: &Path, extra: &serde_json::Value) -> Result<GptConfig> {
    let value = extra
        .get("config")
        .and_then(|c| c.get("model"))
        .cloned()
        .ok_or_else(|| Error::checkpoint(dir, "the manifest records no model config (extra.config.model)"))?;
    let config: GptConfig = serde_json::from_value(value)
        .map_err(|e| Error::parse(format!("checkpoint {} manifest config", dir.display()), e.to_string()))?;
    config.validate()?;
    Ok(config)
}

/// The model of a loaded checkpoint, built from the model part of the config in its manifest.
pub fn model_from(mut ckpt: Checkpoint) -> Result<Gpt<f32>> {
    let config = model_config(&ckpt.dir, &ckpt.extra)?;
    check_model_tensors(&config, &ckpt)?;
    let mut model = Gpt::<f32>::zeros(&config)?;
    let specs: Vec<(String, Vec<usize>)> = model.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
    for ((name, shape), buf) in specs.iter().zip(model.buffers_mut()) {
        *buf = ckpt.take_model(name, shape)?;
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration serde cannot write as JSON (a data path that is not UTF-8, which an
    /// embedder's runtime trains on) is an error naming it, not a panic, and nothing is written.
    #[test]
    fn a_config_json_refuses_is_an_error_not_a_panic() {
        use std::os::unix::ffi::OsStrExt;
        let mut config = crate::config::small_test_config();
        config.train.data = Some(PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/t\xff")));
        let model = Gpt::<f32>::init(&config.model, 1).expect("model");
        let optimizer = crate::optimizer::for_model(&config.optimizer, &model).expect("optimizer");
        let dir = std::env::temp_dir().join(format!("semoe-state-bad-config-{}", std::process::id()));
        let err = save(&dir, &config, 1, &model, &optimizer, 0.0, None).expect_err("a path that is not UTF-8");
        assert!(err.to_string().contains("cannot be recorded in a checkpoint"), "{err}");
        assert!(
            !dir.join(checkpoint::CHECKPOINTS_DIR).exists(),
            "a checkpoint was written"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
