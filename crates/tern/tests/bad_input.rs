//! Every kind of bad checkpoint gets its own typed error naming the file and the tensor or
//! field at fault, never a panic.

mod common;

use common::fixture;
use std::path::{Path, PathBuf};
use tern::checkpoint::safetensors::{write_atomic, TensorFile};
use tern::{LoadOptions, LoadedModel, TernError};

fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn load(p: &Path) -> TernError {
    LoadedModel::load(p, &LoadOptions::default()).expect_err("load should fail")
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn missing_files() {
    let t = tempfile::tempdir().unwrap();
    let d = copy_fixture("llama", t.path());
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let e = load(&d);
    assert!(
        matches!(&e, TernError::MissingFile { path, .. } if path.ends_with("tokenizer.json")),
        "{e}"
    );
    std::fs::remove_file(d.join("config.json")).unwrap();
    let e = load(&d);
    assert!(
        matches!(&e, TernError::MissingFile { path, .. } if path.ends_with("config.json")),
        "{e}"
    );
    let e = load(&t.path().join("nowhere"));
    assert!(matches!(e, TernError::MissingFile { .. }), "{e}");
    // A shard named in the index that is not on disk.
    let d = copy_fixture("llama3", t.path());
    std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap();
    let e = load(&d);
    assert!(
        matches!(&e, TernError::MissingFile { path, .. } if path.ends_with("model-00002-of-00003.safetensors")),
        "{e}"
    );
}

#[test]
fn missing_tensor_names_it() {
    let t = tempfile::tempdir().unwrap();
    let d = copy_fixture("llama", t.path());
    let p = d.join("model.safetensors");
    let st = TensorFile::open(&p).unwrap();
    let kept: Vec<(String, candle_core::Tensor)> = st
        .entries()
        .keys()
        .filter(|n| n.as_str() != "model.layers.1.mlp.up_proj.weight")
        .map(|n| {
            (
                n.clone(),
                st.tensor(n, candle_core::DType::F32, &candle_core::Device::Cpu)
                    .unwrap(),
            )
        })
        .collect();
    drop(st);
    write_atomic(&p, &kept).unwrap();
    let e = load(&d);
    assert!(
        matches!(&e, TernError::MissingTensor { tensor, .. } if tensor == "model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let t = tempfile::tempdir().unwrap();
    let d = copy_fixture("llama", t.path());
    edit_config(&d, |v| v["intermediate_size"] = 96.into());
    let e = load(&d);
    match &e {
        TernError::WrongShape {
            tensor,
            expected,
            actual,
            ..
        } => {
            assert!(tensor.contains("mlp"), "{tensor}");
            assert_ne!(expected, actual);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn unsupported_architecture_and_bad_fields() {
    let t = tempfile::tempdir().unwrap();
    let d = copy_fixture("llama", t.path());
    edit_config(&d, |v| v["model_type"] = "gpt_neox".into());
    let e = load(&d);
    assert!(
        matches!(&e, TernError::UnsupportedArchitecture { arch, .. } if arch == "gpt_neox"),
        "{e}"
    );
    edit_config(&d, |v| {
        v["model_type"] = "llama".into();
        v["num_hidden_layers"] = "two".into();
    });
    let e = load(&d);
    assert!(
        matches!(&e, TernError::Config { key, .. } if key == "num_hidden_layers"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_weight_files() {
    let t = tempfile::tempdir().unwrap();
    let d = copy_fixture("llama3", t.path());
    let shard = d.join("model-00002-of-00003.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let e = load(&d);
    assert!(
        matches!(&e, TernError::Truncated { file, .. } if file == &shard),
        "{e}"
    );
    std::fs::write(&shard, b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
    assert!(matches!(load(&d), TernError::HeaderPastEnd { .. }));
}

#[test]
fn bad_gguf_files() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("x.gguf");
    std::fs::write(&p, b"not a gguf file at all").unwrap();
    assert!(matches!(load(&p), TernError::Gguf { .. }));
    // A valid header cut short.
    let mut f = std::fs::File::create(&p).unwrap();
    let md = candle_core::quantized::gguf_file::Value::String("phi3".into());
    let w = candle_core::quantized::QTensor::quantize(
        &candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
        candle_core::quantized::GgmlDType::Q8_0,
    )
    .unwrap();
    candle_core::quantized::gguf_file::write(
        &mut f,
        &[("general.architecture", &md)],
        &[("token_embd.weight", &w)],
    )
    .unwrap();
    drop(f);
    let e = load(&p);
    assert!(
        matches!(&e, TernError::UnsupportedArchitecture { arch, .. } if arch == "phi3"),
        "{e}"
    );
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 40]).unwrap();
    assert!(
        matches!(load(&p), TernError::Truncated { .. }),
        "{}",
        load(&p)
    );
    std::fs::write(&p, &bytes[..30]).unwrap();
    let e = load(&p);
    assert!(
        matches!(e, TernError::Truncated { .. } | TernError::Gguf { .. }),
        "{e}"
    );
}
