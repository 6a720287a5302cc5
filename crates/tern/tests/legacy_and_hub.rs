//! Inputs users already have: legacy PyTorch `.bin` checkpoints and adapters (fixtures
//! written by `torch.save`, scripts/fixtures/make_bin_fixtures.py) read without executing
//! their pickles and equal to their safetensors twins; malicious and damaged pickles refused;
//! `tern convert`; Hub ids resolved from a Hugging Face cache layout built here, offline.

mod common;

use candle_core::DType;
use common::*;
use std::path::{Path, PathBuf};
use tern::checkpoint::convert::convert_dir;
use tern::checkpoint::hub::{resolve, HubOptions, RepoKind};
use tern::checkpoint::safetensors::TensorFile;
use tern::lora::BatchAdapters;
use tern::{LoadOptions, LoadedModel};

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bin")
        .join(name)
}

fn adapter_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/adapters")
        .join(name)
}

fn load(p: &Path) -> LoadedModel {
    LoadedModel::load(p, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// Every tensor of the `.bin` files has the same name, dtype, shape and bytes as in the
/// safetensors files.
fn same_tensors(bins: &[PathBuf], sts: &[PathBuf]) {
    let open = |ps: &[PathBuf]| {
        ps.iter()
            .map(|p| TensorFile::open(p).unwrap())
            .collect::<Vec<_>>()
    };
    let (b, s) = (open(bins), open(sts));
    let find = |fs: &[TensorFile], n: &str| {
        fs.iter()
            .find(|f| f.entries().contains_key(n))
            .map(|f| f.bytes(n).unwrap().1.to_vec())
    };
    let mut n = 0;
    for f in &s {
        for (name, e) in f.entries() {
            let got = find(&b, name).unwrap_or_else(|| panic!("{name} missing from the .bin"));
            assert_eq!(got, f.bytes(name).unwrap().1, "{name}");
            let be = b.iter().find_map(|f| f.entries().get(name)).unwrap();
            assert_eq!((be.dtype, &be.shape), (e.dtype, &e.shape), "{name}");
            n += 1;
        }
    }
    assert!(n > 10);
}

#[test]
fn bin_checkpoints_equal_their_safetensors_twins() {
    same_tensors(
        &[bin("smollm/pytorch_model.bin")],
        &[fixture("smollm").join("model.safetensors")],
    );
    let shards: Vec<PathBuf> = (1..=3)
        .map(|i| {
            bin(&format!(
                "mistral_sharded/pytorch_model-0000{i}-of-00003.bin"
            ))
        })
        .collect();
    same_tensors(&shards, &[fixture("mistral").join("model.safetensors")]);
    for (b, st) in [("smollm", "smollm"), ("mistral_sharded", "mistral")] {
        let r = reference(st);
        let x = logprobs(
            &load(&bin(b)),
            &r.input_ids,
            &mut load(&bin(b)).model.new_cache(),
        );
        let want = load(&fixture(st));
        let y = logprobs(&want, &r.input_ids, &mut want.model.new_cache());
        assert_eq!(worst_row_diff(&x, &y), 0.0, "{b}");
    }
}

#[test]
fn bin_adapter_matches_peft_and_its_twin() {
    #[derive(serde::Deserialize)]
    struct R {
        input_ids: Vec<u32>,
        prompt_logprobs: Vec<Vec<f32>>,
    }
    same_tensors(
        &[bin("adapter_llama/adapter_model.bin")],
        &[adapter_fixture("llama_rslora_all").join("adapter_model.safetensors")],
    );
    let r: R = serde_json::from_str(
        &std::fs::read_to_string(adapter_fixture("llama_rslora_all").join("reference.json"))
            .unwrap(),
    )
    .unwrap();
    let lm = load(&fixture("llama"));
    let a = lm.load_adapter(&bin("adapter_llama"), "a").unwrap();
    let lp = logprobs_with(
        &lm,
        &r.input_ids,
        &mut lm.model.new_cache(),
        &BatchAdapters::uniform(Some(a)),
    );
    let d = worst_row_diff(&lp, &r.prompt_logprobs);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn malicious_and_damaged_pickles_are_refused() {
    let marker = Path::new("/tmp/tern-pickle-pwned");
    for (f, needle) in [
        (
            "malicious/pytorch_model.bin",
            "refusing GLOBAL `posix.system`",
        ),
        ("malicious/eval.bin", "refusing GLOBAL `__builtin__.eval`"),
        (
            "malicious/eval_proto4.bin",
            "refusing GLOBAL `builtins.eval`",
        ),
    ] {
        let e = TensorFile::open(&bin(f)).unwrap_err().to_string();
        assert!(
            e.contains(needle) && e.contains("nothing was executed"),
            "{f}: {e}"
        );
    }
    // As a whole checkpoint (side files from smollm, weights the malicious pickle).
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(bin("smollm")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    std::fs::copy(
        bin("malicious/pytorch_model.bin"),
        tmp.path().join("pytorch_model.bin"),
    )
    .unwrap();
    let e = LoadedModel::load(tmp.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("posix.system"), "{e}");
    assert!(!marker.exists(), "a pickle payload ran");
    for f in ["truncated.bin", "corrupt.bin"] {
        let e = TensorFile::open(&bin(f)).unwrap_err();
        let s = e.to_string();
        assert!(s.contains(f) && s.lines().count() == 1, "{f}: {s}");
        assert!(
            matches!(
                e,
                tern::TernError::Truncated { .. } | tern::TernError::Pickle { .. }
            ),
            "{f}: {e:?}"
        );
    }
}

#[test]
fn safetensors_win_over_pickles() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    std::fs::create_dir(&d).unwrap();
    for e in std::fs::read_dir(fixture("smollm")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    // A malicious pickle next to the safetensors is never opened.
    std::fs::copy(
        bin("malicious/pytorch_model.bin"),
        d.join("pytorch_model.bin"),
    )
    .unwrap();
    let lm = load(&d);
    let r = reference("smollm");
    let want = load(&fixture("smollm"));
    assert_eq!(
        worst_row_diff(
            &logprobs(&lm, &r.input_ids, &mut lm.model.new_cache()),
            &logprobs(&want, &r.input_ids, &mut want.model.new_cache())
        ),
        0.0
    );
}

#[test]
fn convert_writes_safetensors_twins_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mistral");
    let r = convert_dir(&bin("mistral_sharded"), &out, false).unwrap();
    assert_eq!((r.kind, r.files), ("model", 3));
    assert!(
        out.join("model.safetensors.index.json").is_file() && out.join("tokenizer.json").is_file()
    );
    let shards: Vec<PathBuf> = (1..=3)
        .map(|i| out.join(format!("model-0000{i}-of-00003.safetensors")))
        .collect();
    same_tensors(&shards, &[fixture("mistral").join("model.safetensors")]);
    let lm = load(&out);
    assert_eq!(lm.model.dtype(), DType::F32);
    let e = convert_dir(&bin("mistral_sharded"), &out, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--force"), "{e}");

    let a = tmp.path().join("adapter");
    let r = convert_dir(&bin("adapter_llama"), &a, false).unwrap();
    assert_eq!((r.kind, r.tensors), ("adapter", 28));
    same_tensors(
        &[a.join("adapter_model.safetensors")],
        &[adapter_fixture("llama_rslora_all").join("adapter_model.safetensors")],
    );
    assert!(a.join("adapter_config.json").is_file());
    // A malicious source fails before anything appears at the destination.
    let bad = tmp.path().join("bad");
    assert!(convert_dir(&bin("malicious"), &bad, false).is_err());
    assert!(!bad.exists());
    let stray: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

/// `convert --force` into a directory that holds its source is refused; the source survives.
#[test]
fn convert_never_replaces_its_source() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("work/smollm");
    copy_dir(&bin("smollm"), &src);
    let parent = tmp.path().join("work");
    let e = convert_dir(&src, &parent, true).unwrap_err().to_string();
    assert!(e.contains("contains the input"), "{e}");
    let e = convert_dir(&src, &src, true).unwrap_err().to_string();
    assert!(e.contains("is the input"), "{e}");
    assert!(src.join("pytorch_model.bin").is_file());
}

/// A Hugging Face cache with `org/llama` (main and tag v1 -> one commit) and `org/lora`.
fn hub_cache(root: &Path) -> (PathBuf, String) {
    let commit = "0123456789abcdef0123456789abcdef01234567".to_string();
    let put = |repo: &str, src: &Path, refs: &[&str]| {
        let r = root.join(repo);
        let snap = r.join("snapshots").join(&commit);
        std::fs::create_dir_all(&snap).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
        }
        std::fs::create_dir_all(r.join("refs")).unwrap();
        for name in refs {
            std::fs::write(r.join("refs").join(name), &commit).unwrap();
        }
        snap
    };
    let snap = put("models--org--llama", &fixture("llama"), &["main", "v1"]);
    put(
        "models--org--lora",
        &adapter_fixture("llama_rslora_all"),
        &["main"],
    );
    (snap, commit)
}

#[test]
fn hub_ids_resolve_from_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let (snap, commit) = hub_cache(tmp.path());
    let opts = HubOptions {
        cache_dir: tmp.path().to_path_buf(),
        offline: true,
        token: None,
        endpoint: "http://127.0.0.1:9".into(),
    };
    for spec in ["org/llama", "org/llama@v1", &format!("org/llama@{commit}")] {
        assert_eq!(
            resolve(spec, RepoKind::Model, &opts).unwrap(),
            snap,
            "{spec}"
        );
    }
    let lm = load(&resolve("org/llama", RepoKind::Model, &opts).unwrap());
    let a = resolve("org/lora", RepoKind::Adapter, &opts).unwrap();
    lm.load_adapter(&a, "a").unwrap();
    // A local path wins over an id of the same spelling.
    let local = fixture("llama");
    assert_eq!(
        resolve(local.to_str().unwrap(), RepoKind::Model, &opts).unwrap(),
        local
    );

    let e = resolve("org/missing", RepoKind::Model, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("org/missing@main")
            && e.contains("models--org--missing")
            && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    // A mistyped local path is told apart from a Hub id that is not cached.
    assert!(
        e.contains("no file or directory `org/missing` here, so it was taken as a Hub id"),
        "{e}"
    );
    let e = resolve("org/llama@v2", RepoKind::Model, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no snapshot for `v2`"), "{e}");
    // The adapter repo is not a model.
    let e = resolve("org/lora", RepoKind::Model, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lacks the Model files"), "{e}");
    let e = resolve("not a path", RepoKind::Model, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ORG/NAME"), "{e}");
}

#[cfg(feature = "hub")]
#[test]
fn hub_download_failure_names_the_id() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        cache_dir: tmp.path().to_path_buf(),
        offline: false,
        token: None,
        // Nothing listens on the discard port: the request fails at once, no network used.
        endpoint: "http://127.0.0.1:9".into(),
    };
    let e = resolve("org/unknown", RepoKind::Model, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("org/unknown@main")
            && e.contains("models--org--unknown")
            && e.contains("no file or directory `org/unknown` here"),
        "{e}"
    );
}
